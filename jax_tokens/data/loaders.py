"""Grain input pipelines: `make_train_loader` (shuffled, augmented, resumable) and
`make_eval_loader` (one ordered pass, padded with a mask); `jax_tokens.sharding.put_batch`
places a batch on the devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from grain.sharding import ShardByJaxProcess, ShardOptions

from jax_tokens.data.prepared import _check_split, _num_classes, _open, _output_shape
from jax_tokens.data.preprocess import (_pad_crop_flip, _resize_uint8, imagenet_eval_image,
                                        imagenet_train_image, normalize)
from jax_tokens.data.specs import DatasetSpec


@dataclasses.dataclass
class _BatchReader:
    """Reads and preprocesses the examples of one batch of indices (picklable for workers)."""

    source: Any                  # tfds ArrayRecordDataSource
    spec: DatasetSpec
    image_size: int | None
    out_shape: tuple[int, int, int]
    train: bool
    augment: bool
    seed: int
    shard_index: int
    with_index: bool
    process_rows: int = 0        # training: rows of each global batch this process reads

    def images(self, examples, rngs) -> np.ndarray:
        """Decoded, resized and (in training) augmented images; `rngs` holds one generator per
        example, so an example's augmentation does not depend on which process reads it."""
        spec, key = self.spec, self.spec.image_key
        if spec.preprocess == "imagenet":
            if self.train:
                imgs = [imagenet_train_image(e[key], r, self.out_shape[0],
                                             min_crop_area=spec.min_crop_area,
                                             flip=self.augment and spec.flip) if self.augment
                        else imagenet_eval_image(e[key], self.out_shape[0],
                                                 crop_fraction=spec.crop_fraction)
                        for e, r in zip(examples, rngs)]
            else:
                imgs = [imagenet_eval_image(e[key], self.out_shape[0],
                                            crop_fraction=spec.crop_fraction) for e in examples]
            return np.stack(imgs) if imgs else np.zeros((0, *self.out_shape), np.uint8)
        imgs = [np.asarray(e[key], np.uint8) for e in examples]
        if self.image_size:
            imgs = [_resize_uint8(x, self.image_size) for x in imgs]
        images = np.stack(imgs) if imgs else np.zeros((0, *self.out_shape), np.uint8)
        if self.train and self.augment and (spec.crop_padding or spec.flip):
            images = _pad_crop_flip(images, rngs, spec.crop_padding, spec.flip)
        return images

    def read(self, indices: np.ndarray, rngs=None) -> dict[str, np.ndarray]:
        indices = [int(i) for i in indices]
        try:
            examples = self.source.__getitems__(indices) if indices else []
            images = self.images(examples, rngs)
        except Exception as e:
            shown = f"{indices[:8]}{'...' if len(indices) > 8 else ''}"
            raise ValueError(f"could not read/decode examples {shown} of "
                             f"{self.spec.tfds_name}: {e}") from e
        batch = {"image": normalize(images, self.spec.mean, self.spec.std),
                 "label": np.asarray([int(e[self.spec.label_key]) for e in examples], np.int32)}
        if self.with_index:
            batch["index"] = np.asarray(indices, np.int64)
        return batch

    def train_batch(self, batch_index: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        """This process's rows of global batch `batch_index` (`indices`: the whole global
        batch, the same on every process). Example j of the global batch is augmented with
        its own generator seeded (seed, batch_index, j): N processes together read and
        augment exactly what one process would."""
        rows = np.arange(self.process_rows) + self.shard_index * self.process_rows
        rngs = [np.random.default_rng([self.seed, batch_index, int(j)]) for j in rows]
        return self.read(np.asarray(indices)[rows], rngs)


@dataclasses.dataclass
class _EvalBatch:
    """Eval batch `b` of a shard [start, start + length): padded to `batch` rows with a mask."""

    reader: _BatchReader
    start: int
    length: int
    batch: int

    def __call__(self, b: int) -> dict[str, np.ndarray]:
        pos = b * self.batch + np.arange(self.batch)
        valid = pos < self.length
        out = self.reader.read(self.start + pos[valid], None)
        n = int(valid.sum())
        padded = {}
        for k, v in out.items():
            full = np.zeros((self.batch, *v.shape[1:]), v.dtype)
            full[:n] = v
            padded[k] = full
        if "index" in padded:
            padded["index"][n:] = -1
        padded["mask"] = valid
        return padded


def _check_batching(batch_size, shard_options, what: str) -> tuple[ShardOptions, int]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int (the global batch "
                         f"size over all processes)")
    if shard_options is None:
        shard_options = ShardByJaxProcess(drop_remainder=what == "train")
    if not isinstance(shard_options, ShardOptions):
        raise TypeError(f"shard_options={shard_options!r} must be a grain.sharding.ShardOptions "
                        f"(e.g. ShardByJaxProcess()) or None")
    if batch_size % shard_options.shard_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes "
                         f"(shard_count={shard_options.shard_count})")
    return shard_options, int(batch_size) // shard_options.shard_count


def _check_threads(num_threads, prefetch, worker_count) -> tuple[int, int, int]:
    if num_threads is None:
        num_threads = min(8, os.cpu_count() or 1)
    if not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads={num_threads!r} must be an int >= 0")
    if prefetch is None:
        prefetch = max(2, num_threads)
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r} must be an int >= 0 (batches buffered)")
    if not isinstance(worker_count, int) or worker_count < 0:
        raise ValueError(f"worker_count={worker_count!r} must be an int >= 0")
    return num_threads, prefetch, worker_count


def _source(key: str, spec: DatasetSpec, builder, data_dir: str, split: str):
    decoders = None
    if spec.preprocess == "imagenet" and isinstance(builder.info.features[spec.image_key],
                                                    tfds.features.Image):
        decoders = {spec.image_key: tfds.decode.SkipDecoding()}   # JPEG bytes, decoded here
    source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False,
                              decoders=decoders)
    if len(source) == 0:
        raise ValueError(f"split={split!r} of dataset {key!r} is empty")
    return source


def _iter_dataset(ds: grain.MapDataset, num_threads: int, prefetch: int,
                  worker_count: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=prefetch))
    if worker_count:
        from absl import flags  # Grain's worker processes read absl flags (defaults here)
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


@dataclasses.dataclass(eq=False)
class _Loader:
    dataset: grain.IterDataset       # the Grain pipeline
    name: str                        # dataset name
    split: str                       # TFDS split read
    batch_size: int                  # global batch size (all processes)
    process_batch_size: int          # rows per batch on this process
    num_examples: int                # examples in one pass over the split
    num_batches: int | None          # batches this loader yields (None: forever)
    image_shape: tuple[int, int, int]
    num_classes: int | None
    shard_options: ShardOptions
    spec: DatasetSpec


@dataclasses.dataclass(eq=False)
class TrainLoader(_Loader):
    """Iterator over training batches ``{"image": f32 [B,H,W,C], "label": i32 [B]}``.

    B = process_batch_size = batch_size // shard_count: this process's rows of every global
    batch (all processes share one shuffle of the split). Resumable: `get_state()` returns a
    JSON-serialisable dict (the Grain `DatasetIterator` state); `set_state(state)` on a loader
    built with the same arguments continues with exactly the batches that would have followed.
    For Orbax, checkpoint `loader.iterator` with `grain.checkpoint.CheckpointSave/Restore`.
    `steps_per_epoch` = num_examples // batch_size (batches run across epochs).
    """

    steps_per_epoch: int = 0

    def __post_init__(self):
        self.iterator = iter(self.dataset)   # grain DatasetIterator

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        self.iterator.set_state(state)

    def close(self) -> None:
        """Stops prefetch threads and worker processes."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass(eq=False)
class EvalLoader(_Loader):
    """A single finite pass over a split; every `iter()` starts a fresh pass.

    Batches are ``{"image", "label", "mask": bool [B]}`` with B = batch_size // shard_count; the
    last batches are padded (mask False, zero image and label) so every example of the split is
    seen exactly once over all processes, and every process yields the same number of batches
    (`len(loader)`). `process_num_examples` is the size of this process's shard.
    """

    process_num_examples: int = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset)

    def __len__(self) -> int:
        return self.num_batches


def _check_common(image_size, seed=0, num_epochs=None):
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise ValueError(f"image_size={image_size!r} must be a positive int or None")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0")
    if num_epochs is not None and (isinstance(num_epochs, bool) or not isinstance(num_epochs, int)
                                   or num_epochs <= 0):
        raise ValueError(f"num_epochs={num_epochs!r} must be a positive int, or None to repeat "
                         f"forever")


def _with_overrides(spec: DatasetSpec, mean, std, channels: int) -> DatasetSpec:
    """Applies mean/std overrides and checks they have 1 or `channels` entries."""
    if mean is not None or std is not None:
        spec = dataclasses.replace(spec, mean=None if mean is None else tuple(mean),
                                   std=None if std is None else tuple(std))
    for arg, value in (("mean", spec.mean), ("std", spec.std)):
        if value is not None and len(value) not in (1, channels):
            allowed = "1 entry" if channels == 1 else f"1 or {channels} entries"
            raise ValueError(f"{arg}={value!r} must have {allowed} (images have {channels} "
                             f"channel{'s' if channels > 1 else ''})")
    return spec


def make_train_loader(name, data_dir, batch_size: int, seed: int = 0, *,
                      split: str | None = None, num_epochs: int | None = None,
                      augment: bool = True, image_size: int | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      shard_options: ShardOptions | None = None, num_threads: int | None = None,
                      prefetch: int | None = None, worker_count: int = 0,
                      with_index: bool = False) -> TrainLoader:
    """Shuffled, augmented, batched training batches of a prepared dataset.

    Args:
      name: dataset name (see module docstring) or a DatasetSpec.
      data_dir: TFDS data dir (None: DEFAULT_DATA_DIR).
      batch_size: global batch size; each process gets batch_size // shard_count rows.
      seed: shuffle and augmentation seed (each epoch is shuffled differently).
      split: TFDS split, optionally sliced ("train[:90%]"); None: the dataset's train split.
      num_epochs: None repeats forever; batches run across epoch boundaries (drop_remainder
        only drops the final partial batch).
      augment: random crop / flip as the dataset spec says ("imagenet": random resized crop +
        flip; off: resize + center crop).
      image_size: output side (None: the dataset's default).
      mean, std: override the normalisation statistics.
      shard_options: which part this process reads (default ShardByJaxProcess()): every
        process shuffles the whole split with the same seed and cuts the same global batches;
        process i reads rows [i * B, (i + 1) * B) of each, B = batch_size // shard_count. So
        N processes together read (and augment) exactly the batches one process reads.
      num_threads / prefetch: Grain reader threads and batches buffered.
      worker_count: > 0 runs decoding in that many worker processes (grain mp_prefetch).
      with_index: add "index": int64 [B], each example's index in the split.

    Returns:
      a TrainLoader (iterator with get_state / set_state).
    """
    _check_common(image_size, seed, num_epochs)
    shard_options, local_bs = _check_batching(batch_size, shard_options, "train")
    num_threads, prefetch, worker_count = _check_threads(num_threads, prefetch, worker_count)
    key, spec, builder, out_shape, split, source = _open_split(
        name, data_dir, image_size, mean, std, split, train=True)
    n = len(source)
    total = None if num_epochs is None else num_epochs * n
    if (n if total is None else total) < batch_size:
        raise ValueError(f"batch_size={batch_size} needs {batch_size} examples but "
                         f"split={split!r} of {key!r} gives only "
                         f"{n if total is None else total}"
                         + ("" if num_epochs is None else f" in num_epochs={num_epochs}"))
    reader = _BatchReader(source, spec, image_size or spec.image_size, out_shape, train=True,
                          augment=bool(augment), seed=int(seed),
                          shard_index=shard_options.shard_index, with_index=with_index,
                          process_rows=local_bs)
    # Every process shuffles the whole split alike and cuts the same global batches; each
    # reads only its rows of each (train_batch), so the processes together read exactly the
    # batches one process would.
    ds = (grain.MapDataset.range(n).shuffle(seed=int(seed)).repeat(num_epochs)
          .batch(int(batch_size), drop_remainder=True).map_with_index(reader.train_batch))
    return TrainLoader(
        _iter_dataset(ds, num_threads, prefetch, worker_count), name=key, split=split,
        batch_size=int(batch_size), process_batch_size=local_bs, num_examples=n,
        steps_per_epoch=n // int(batch_size),
        num_batches=None if total is None else total // int(batch_size), image_shape=out_shape,
        num_classes=_num_classes(builder.info, spec.label_key), shard_options=shard_options,
        spec=spec)


def _open_split(name, data_dir, image_size, mean, std, split, *, train: bool):
    """(key, spec, builder, output shape, split, source) of one split of a prepared dataset;
    split None means the dataset's train or eval split."""
    key, spec, builder, data_dir = _open(name, data_dir)
    out_shape = _output_shape(spec, builder.info, image_size)
    spec = _with_overrides(spec, mean, std, out_shape[-1])
    if split is None:
        split = spec.train_split if train else spec.eval_split
    _check_split(key, split, builder.info)
    return key, spec, builder, out_shape, split, _source(key, spec, builder, data_dir, split)


def _even_split(n: int, options: ShardOptions, drop_remainder: bool) -> tuple[int, int]:
    """Contiguous [start, end) of shard `options.shard_index`; sizes differ by at most one
    (or are equal with drop_remainder)."""
    per = n // options.shard_count
    if drop_remainder:
        return per * options.shard_index, per * (options.shard_index + 1)
    extra = n % options.shard_count
    start = per * options.shard_index + min(options.shard_index, extra)
    return start, start + per + (1 if options.shard_index < extra else 0)


def make_eval_loader(name, data_dir, batch_size: int, split: str | None = None, *,
                     image_size: int | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None,
                     shard_options: ShardOptions | None = None, num_threads: int | None = None,
                     prefetch: int | None = None, worker_count: int = 0,
                     with_index: bool = False) -> EvalLoader:
    """One ordered, finite pass over a split, padded with a mask (see EvalLoader).

    Args:
      name, data_dir, image_size, mean, std, num_threads, prefetch, worker_count, with_index:
        as in make_train_loader (with_index marks padding rows with -1).
      batch_size: global batch size; each process gets batch_size // shard_count rows.
      split: None: the dataset's eval split ("test"; "validation" for imagenet2012).
      shard_options: default ShardByJaxProcess(); the remainder is spread over the first
        processes (no example is dropped).
    """
    _check_common(image_size)
    shard_options, local_bs = _check_batching(batch_size, shard_options, "eval")
    num_threads, prefetch, worker_count = _check_threads(num_threads, prefetch, worker_count)
    key, spec, builder, out_shape, split, source = _open_split(
        name, data_dir, image_size, mean, std, split, train=False)
    n = len(source)
    start, end = _even_split(n, shard_options, False)
    num_batches = math.ceil(math.ceil(n / shard_options.shard_count) / local_bs)
    reader = _BatchReader(source, spec, image_size or spec.image_size, out_shape, train=False,
                          augment=False, seed=0, shard_index=shard_options.shard_index,
                          with_index=with_index)
    ds = grain.MapDataset.range(num_batches).map(_EvalBatch(reader, start, end - start, local_bs))
    return EvalLoader(
        _iter_dataset(ds, num_threads, prefetch, worker_count), name=key, split=split,
        batch_size=int(batch_size), process_batch_size=local_bs, num_examples=n,
        process_num_examples=end - start, num_batches=num_batches, image_shape=out_shape,
        num_classes=_num_classes(builder.info, spec.label_key), shard_options=shard_options,
        spec=spec)
