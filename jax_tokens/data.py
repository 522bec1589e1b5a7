"""Input pipelines: TFDS datasets in array_record format, read with Grain, decoded in NumPy.

One path for every dataset::

    tfds.data_source(...)  ->  grain.MapDataset  ->  shuffle / repeat / batch  ->  NumPy decode +
    augment  ->  prefetch threads (and optionally worker processes)  ->  dict of NumPy arrays

No TensorFlow is needed to prepare or read the data: TFDS serialises examples with its own
protobufs and writes `array_record` files; images are decoded with NumPy / Pillow.

Datasets (the `name` argument):

* ``"fashion_mnist"`` — read from the raw IDX files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``) by the local TFDS builder
  `FashionMnistLocal`, registered in TFDS as ``"fashion_mnist_local"`` so that it does not collide
  with TFDS's own ``fashion_mnist`` (which downloads from the internet). Users pass
  ``"fashion_mnist"`` (or ``"fashion_mnist_local"``) to this module. Prepare it once::

      apt-get install -y dataset-fashion-mnist
      python -m jax_tokens.data prepare --dataset fashion_mnist --data_dir DIR

* ``"imagenet2012"`` — TFDS's ImageNet, prepared by the user in array_record format (JPEG bytes
  are decoded here with Pillow: random-resized-crop + flip for training, resize + center crop
  for evaluation, mean/std normalisation).
* ``"mnist"``, ``"cifar10"``, ``"cifar100"`` and any other TFDS image-classification dataset
  prepared in array_record format under `data_dir` (small fixed-size images: pad-and-crop / flip;
  variable-size images: the ImageNet recipe).
* A `DatasetSpec` instance for anything else (a custom TFDS builder, other statistics).

Batches are dicts of NumPy arrays: ``{"image": float32 [B, H, W, C], "label": int32 [B]}``; eval
batches add ``"mask": bool [B]`` (False on padding rows). ``B`` is the *process-local* batch:
`batch_size` arguments are global and are divided by the number of processes (shards).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from grain.sharding import ShardByJaxProcess, ShardOptions
from PIL import Image

__all__ = [
    "DEFAULT_DATA_DIR",
    "DATASETS",
    "DatasetSpec",
    "DatasetSummary",
    "DatasetNotPreparedError",
    "FashionMnistLocal",
    "TrainLoader",
    "EvalLoader",
    "prepare",
    "dataset_info",
    "make_train_loader",
    "make_eval_loader",
    "to_global_batch",
    "decode_image",
    "sample_crop_box",
    "imagenet_train_image",
    "imagenet_eval_image",
    "normalize",
]

DEFAULT_DATA_DIR = os.path.expanduser(
    os.environ.get("JAX_TOKENS_DATA_DIR") or os.path.join("~", "tensorflow_datasets"))
"""Where datasets are prepared and read when `data_dir` is None: $JAX_TOKENS_DATA_DIR, else
~/tensorflow_datasets."""

FASHION_MNIST_SOURCE_DIR = os.environ.get(
    "JAX_TOKENS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
"""Where the Debian package `dataset-fashion-mnist` installs the raw gzipped IDX files."""

APT_COMMAND = "apt-get install -y dataset-fashion-mnist"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_FILES = {  # split -> (images, labels, count)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_PREPROCESS = ("small", "imagenet")


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset is not prepared (as array_record) in the data dir; the message says how."""


# ----------------------------------------------------------------------------------------------
# Dataset specs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read and preprocess one TFDS image-classification dataset.

    Attributes:
      tfds_name: the TFDS builder name (directory under the data dir).
      preprocess: "small" (fixed-size uint8 images decoded by TFDS; optional resize,
        pad-and-random-crop and flip) or "imagenet" (encoded images decoded here; random
        resized crop + flip for training, resize + center crop for evaluation).
      train_split / eval_split: default splits of `make_train_loader` / `make_eval_loader`.
      image_size: output side length; None keeps the stored size ("small" only).
      mean / std: per-channel statistics of [0, 1] pixels; None leaves pixels in [0, 1].
      crop_padding: "small" training augmentation: zero-pad by this many pixels, then crop back
        at a random offset (0 disables).
      flip: random horizontal flips in training.
      crop_fraction: "imagenet" eval: the center crop covers this fraction of the short side.
      min_crop_area: "imagenet" train: smallest crop area fraction of the random resized crop.
      image_key / label_key: feature names in the TFDS examples.
    """

    tfds_name: str
    preprocess: str = "small"
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_padding: int = 0
    flip: bool = False
    crop_fraction: float = 0.875
    min_crop_area: float = 0.08
    image_key: str = "image"
    label_key: str = "label"

    def __post_init__(self):
        if self.preprocess not in _PREPROCESS:
            raise ValueError(f"preprocess={self.preprocess!r} is not one of {_PREPROCESS}")
        if self.image_size is not None and (not isinstance(self.image_size, int)
                                            or self.image_size <= 0):
            raise ValueError(f"image_size={self.image_size!r} must be a positive int or None")
        if self.preprocess == "imagenet" and self.image_size is None:
            raise ValueError("preprocess='imagenet' needs an image_size (e.g. 224)")
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"mean={self.mean!r} and std={self.std!r} must both be set or None")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std={self.std!r} must be positive")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding={self.crop_padding!r} must be >= 0")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction={self.crop_fraction!r} must be in (0, 1]")
        if not 0.0 < self.min_crop_area <= 1.0:
            raise ValueError(f"min_crop_area={self.min_crop_area!r} must be in (0, 1]")


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("fashion_mnist_local", mean=(0.2860,), std=(0.3530,),
                                 crop_padding=2, flip=True),
    "imagenet2012": DatasetSpec("imagenet2012", preprocess="imagenet", eval_split="validation",
                                image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=True),
    "mnist": DatasetSpec("mnist", mean=(0.1307,), std=(0.3081,), crop_padding=2),
    "cifar10": DatasetSpec("cifar10", mean=(0.4914, 0.4822, 0.4465),
                           std=(0.2470, 0.2435, 0.2616), crop_padding=4, flip=True),
    "cifar100": DatasetSpec("cifar100", mean=(0.5071, 0.4865, 0.4409),
                            std=(0.2673, 0.2564, 0.2762), crop_padding=4, flip=True),
}
"""Datasets known by name. Other TFDS names work too when prepared in array_record format."""

_ALIASES = {"fashion_mnist_local": "fashion_mnist"}


def _check_data_dir(data_dir) -> str:
    if data_dir is None:
        return DEFAULT_DATA_DIR
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir={data_dir!r} must be a path (str or os.PathLike) or None")
    return os.path.expanduser(os.fspath(data_dir))


def _tfds_registered(tfds_name: str) -> bool:
    try:
        tfds.builder_cls(tfds_name)
        return True
    except tfds.core.registered.DatasetNotFoundError:
        return False


def _resolve(name, data_dir: str) -> tuple[str, DatasetSpec, bool]:
    """Returns (display name, spec, whether the spec is a generic guess); ValueError for unknown
    names."""
    if isinstance(name, DatasetSpec):
        return name.tfds_name, name, False
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a dataset name (str) or a DatasetSpec")
    key = _ALIASES.get(name, name)
    if key in DATASETS:
        return key, DATASETS[key], False
    base = name.split(":", 1)[0]              # TFDS names: "name", "name/config", "name:1.0.0"
    if (re.fullmatch(r"[a-z0-9_]+(/[A-Za-z0-9_.\-]+)?(:[0-9.]+)?", name)
            and (os.path.isdir(os.path.join(data_dir, base))
                 or _tfds_registered(base.split("/", 1)[0]))):
        return name, DatasetSpec(name), True   # preprocess is refined from the features
    raise ValueError(
        f"name={name!r} is not a known dataset: pass one of {sorted(DATASETS)}, the name of a TFDS "
        f"image-classification dataset prepared in array_record format under data_dir="
        f"{data_dir!r}, or a DatasetSpec")


def _prepare_command(key: str, spec: DatasetSpec, data_dir: str) -> str:
    if spec.tfds_name == FashionMnistLocal.name:
        return f"python -m jax_tokens.data prepare --dataset fashion_mnist --data_dir {data_dir}"
    if spec.tfds_name == "imagenet2012":
        return (f"tfds build imagenet2012 --data_dir {data_dir} --file_format array_record "
                f"--manual_dir DIR_WITH_ILSVRC2012_TARS   (TFDS's ImageNet builder needs "
                f"TensorFlow while preparing; reading here does not)")
    return f"python -m jax_tokens.data prepare --dataset {key} --data_dir {data_dir}"


def _fashion_sources_missing(source_dir: str) -> list[str]:
    return [os.path.join(source_dir, f) for images, labels, _ in _FASHION_FILES.values()
            for f in (images, labels) if not os.path.isfile(os.path.join(source_dir, f))]


def _open_builder(key: str, spec: DatasetSpec, data_dir: str):
    """The prepared TFDS builder, or DatasetNotPreparedError naming the command that prepares it."""
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        builder = None
    if builder is None or not builder.is_prepared():
        msg = (f"dataset {key!r} is not prepared in data_dir={data_dir!r} (looked for "
               f"{os.path.join(data_dir, spec.tfds_name)}/<version>/). Prepare it once with:\n"
               f"    {_prepare_command(key, spec, data_dir)}")
        if spec.tfds_name == FashionMnistLocal.name:
            missing = _fashion_sources_missing(FASHION_MNIST_SOURCE_DIR)
            if missing:
                msg += (f"\nwhich reads the Debian package's files, missing here ({missing[0]}); "
                        f"install them first with:\n    {APT_COMMAND}")
        raise DatasetNotPreparedError(msg)
    file_format = builder.info.file_format
    if file_format is None or str(getattr(file_format, "value", file_format)) != "array_record":
        raise DatasetNotPreparedError(
            f"dataset {key!r} in {builder.data_dir} is stored as {file_format}, not array_record, "
            f"which random access (tfds.data_source / Grain) needs. Convert it with:\n"
            f"    tfds convert_format --dataset_dir {builder.data_dir} "
            f"--out_file_format array_record\nor prepare it again with:\n"
            f"    {_prepare_command(key, spec, data_dir)}")
    return builder


def _refine_spec(key: str, spec: DatasetSpec, generic: bool, info) -> DatasetSpec:
    """Checks the features and picks the preprocessing of datasets not in DATASETS."""
    image_key, label_key = spec.image_key, spec.label_key
    if generic and info.supervised_keys and len(info.supervised_keys) == 2 \
            and all(isinstance(k, str) for k in info.supervised_keys):
        image_key, label_key = info.supervised_keys
    features = info.features
    for k in (image_key, label_key):
        if k not in features:
            raise ValueError(f"dataset {key!r} has no feature {k!r}; its features are "
                             f"{sorted(features.keys())} (set image_key / label_key in a "
                             f"DatasetSpec)")
    shape = tuple(features[image_key].shape)
    if generic and (len(shape) != 3 or any(d is None for d in shape)):
        spec = dataclasses.replace(spec, preprocess="imagenet", image_size=spec.image_size or 224,
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD, flip=True)
    if spec.preprocess == "small" and (len(shape) != 3 or any(d is None for d in shape)):
        raise ValueError(f"dataset {key!r}: preprocess='small' needs fixed-size images [H, W, C]; "
                         f"feature {image_key!r} has shape {shape}")
    return dataclasses.replace(spec, image_key=image_key, label_key=label_key)


def _check_split(key: str, split: str, info) -> None:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split={split!r} must be a split name such as 'train'")
    for part in split.split("+"):
        base = part.split("[", 1)[0].strip()
        if base not in info.splits:
            raise ValueError(f"split={split!r}: {base!r} is not a split of dataset {key!r}; "
                             f"allowed: {sorted(info.splits.keys())} (optionally sliced, e.g. "
                             f"'train[:90%]')")


def _num_classes(info, label_key: str) -> int | None:
    return getattr(info.features[label_key], "num_classes", None)


# ----------------------------------------------------------------------------------------------
# The local Fashion-MNIST builder
# ----------------------------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """Reads a (gzipped) IDX file of unsigned bytes: images [N, 28, 28] or labels [N]."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(dims):
        raise ValueError(f"{path}: header says shape {dims} but holds {len(data) - offset} bytes")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder,
                        skip_registration=__name__ == "__main__"):
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist`; TFDS name
    "fashion_mnist_local".

    Features: "image" uint8 Tensor [28, 28, 1] (stored as raw bytes, decoded with NumPy) and
    "label" ClassLabel (10 classes). Splits: train (60000), test (10000).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw IDX files of Debian's dataset-fashion-mnist; uint8 tensors."}

    def __init__(self, *, source_dir: str | None = None, **kwargs):
        self._source_dir = source_dir or FASHION_MNIST_SOURCE_DIR
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 locates builders defined inside packages with the `importlib_resources`
        # backport, which Python >= 3.9 installs do not have; our code path is simply this file.
        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Zalando): 28x28 grayscale photos of clothing, 10 classes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        missing = _fashion_sources_missing(self._source_dir)
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files are missing: {missing}. Install the Debian package with:\n"
                f"    {APT_COMMAND}\n(or pass source_dir= / --source_dir to a folder holding "
                f"the four *-ubyte.gz files)")
        return {split: self._generate_examples(split) for split in _FASHION_FILES}

    def _generate_examples(self, split):
        images_file, labels_file, count = _FASHION_FILES[split]
        images = read_idx(os.path.join(self._source_dir, images_file))
        labels = read_idx(os.path.join(self._source_dir, labels_file))
        if images.shape != (count, 28, 28) or labels.shape != (count,):
            raise ValueError(f"Fashion-MNIST {split}: expected images ({count}, 28, 28) and labels "
                             f"({count},), got {images.shape} and {labels.shape}")
        for i in range(count):
            yield i, {"image": images[i][:, :, None], "label": int(labels[i])}


def prepare(name: str = "fashion_mnist", data_dir=None, *,
            max_examples_per_split: int | None = None, source_dir: str | None = None,
            overwrite: bool = False, manual_dir: str | None = None) -> str:
    """Prepares a dataset once into `data_dir` in array_record format; returns its directory.

    Args:
      name: "fashion_mnist" (the local Debian-file builder) or another TFDS dataset name (built by
        TFDS's own builder with file_format="array_record"; some need TensorFlow to build).
      data_dir: TFDS data dir; None means DEFAULT_DATA_DIR.
      max_examples_per_split: keep only the first N examples of each split (for tests).
      source_dir: Fashion-MNIST only: the folder with the raw *-ubyte.gz files.
      overwrite: rebuild when the dataset is already there.
      manual_dir: for datasets whose raw files are downloaded by hand (e.g. imagenet2012).

    A prepared dataset whose split sizes differ from the ones requested (e.g. a slice made for
    tests) is not silently reused: ValueError unless overwrite=True.
    """
    data_dir = _check_data_dir(data_dir)
    key, spec, _ = _resolve(name, data_dir)
    if max_examples_per_split is not None and (
            not isinstance(max_examples_per_split, int) or max_examples_per_split <= 0):
        raise ValueError(f"max_examples_per_split={max_examples_per_split!r} must be a positive "
                         f"int or None")
    local = spec.tfds_name == FashionMnistLocal.name
    if source_dir is not None and not local:
        raise ValueError(f"source_dir={source_dir!r} is only used by 'fashion_mnist'")

    def make_builder():
        if local:
            return FashionMnistLocal(data_dir=data_dir, source_dir=source_dir,
                                     file_format="array_record")
        return tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")

    builder = make_builder()
    expected = {s: c for s, (_, _, c) in _FASHION_FILES.items()} if local else None
    if expected and max_examples_per_split:
        expected = {s: min(c, max_examples_per_split) for s, c in expected.items()}
    if builder.is_prepared():
        have = {s: v.num_examples for s, v in builder.info.splits.items()}
        if not overwrite:
            if expected is not None and have != expected:
                raise ValueError(
                    f"{builder.data_dir} already holds {key!r} with split sizes {have}, not the "
                    f"requested {expected}; pass overwrite=True (--overwrite) to rebuild it")
            return os.fspath(builder.data_dir)
        shutil.rmtree(os.fspath(builder.data_dir))
        builder = make_builder()
    config = tfds.download.DownloadConfig(max_examples_per_split=max_examples_per_split,
                                          manual_dir=manual_dir)
    with tempfile.TemporaryDirectory(prefix="jax_tokens_dl_") as download_dir:
        builder.download_and_prepare(
            download_dir=download_dir if local else None,
            download_config=config)
    return os.fspath(builder.data_dir)


# ----------------------------------------------------------------------------------------------
# Dataset info
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    """What a prepared dataset holds and what the loaders produce.

    Attributes:
      name / tfds_name / data_dir: which dataset, where.
      splits: number of examples per split.
      image_shape: (H, W, C) of the images the loaders produce with the default image_size.
      num_classes: number of label classes.
      class_names: the class names when TFDS knows them.
      spec: the DatasetSpec used for reading.
    """

    name: str
    tfds_name: str
    data_dir: str
    splits: dict[str, int]
    image_shape: tuple[int, int, int]
    num_classes: int | None
    class_names: tuple[str, ...] | None
    spec: DatasetSpec


def _open(name, data_dir):
    data_dir = _check_data_dir(data_dir)
    key, spec, generic = _resolve(name, data_dir)
    builder = _open_builder(key, spec, data_dir)
    spec = _refine_spec(key, spec, generic, builder.info)
    return key, spec, builder, data_dir


def _output_shape(spec: DatasetSpec, info, image_size: int | None) -> tuple[int, int, int]:
    size = image_size or spec.image_size
    if spec.preprocess == "imagenet":
        return (size, size, 3)
    h, w, c = info.features[spec.image_key].shape
    return (size, size, c) if size else (h, w, c)


def dataset_info(name, data_dir=None) -> DatasetSummary:
    """Summary of a prepared dataset (examples per split, output image shape, classes)."""
    key, spec, builder, data_dir = _open(name, data_dir)
    info = builder.info
    label = info.features[spec.label_key]
    names = tuple(label.names) if getattr(label, "names", None) else None
    return DatasetSummary(
        name=key, tfds_name=spec.tfds_name, data_dir=data_dir,
        splits={s: v.num_examples for s, v in info.splits.items()},
        image_shape=_output_shape(spec, info, None), num_classes=_num_classes(info, spec.label_key),
        class_names=names, spec=spec)


# ----------------------------------------------------------------------------------------------
# NumPy / Pillow image functions
# ----------------------------------------------------------------------------------------------


def _to_pil(image) -> Image.Image:
    """Encoded bytes or a uint8 array [H, W] / [H, W, C] -> a lazily decoded PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return Image.open(io.BytesIO(bytes(image)))
        except Exception as e:  # PIL.UnidentifiedImageError and friends
            raise ValueError(f"could not decode image bytes ({len(image)} bytes, starting "
                             f"{bytes(image[:8]).hex()}): {e}") from e
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"image must be uint8 [H, W] or [H, W, C]; got {image.dtype} "
                             f"{image.shape}")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if isinstance(image, Image.Image):
        return image
    raise TypeError(f"image must be encoded bytes, a uint8 array or a PIL image; got "
                    f"{type(image).__name__}")


def decode_image(data) -> np.ndarray:
    """Decodes JPEG/PNG/... bytes to uint8 RGB [H, W, 3] (grayscale, CMYK, palette converted)."""
    return np.asarray(_to_pil(data).convert("RGB"))


def sample_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    attempts: int = 10) -> tuple[int, int, int, int]:
    """Inception-style random crop: (left, top, crop_width, crop_height) inside the image.

    The area fraction is uniform in `scale`, the aspect ratio (w / h) log-uniform in `ratio`;
    after `attempts` misses it falls back to the largest center crop with a ratio in `ratio`.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive; got width={width}, height={height}")
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        w, h = max(1, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _crop_resize(image, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Crops box (left, top, w, h; original pixel units) and resizes to [size, size, 3] uint8.

    JPEGs are decoded at a reduced scale (DCT scaling via PIL's draft mode) when the crop still
    has at least `size` pixels per side at that scale, which makes large photos much cheaper.
    """
    img = _to_pil(image)
    width, height = img.size
    left, top, w, h = box
    if img.format == "JPEG":
        img.draft("RGB", (max(1, math.ceil(width * size / w)),
                          max(1, math.ceil(height * size / h))))
    img = img.convert("RGB")
    sx, sy = img.size[0] / width, img.size[1] / height
    out = img.resize((size, size), Image.BICUBIC,
                     box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    return np.asarray(out)


def imagenet_train_image(image, rng: np.random.Generator, image_size: int = 224, *,
                         min_crop_area: float = 0.08, flip: bool = True) -> np.ndarray:
    """Random resized crop (+ horizontal flip) of encoded bytes or uint8 array -> uint8
    [image_size, image_size, 3]."""
    img = _to_pil(image)
    box = sample_crop_box(img.size[0], img.size[1], rng, scale=(min_crop_area, 1.0))
    out = _crop_resize(img, box, image_size)
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def imagenet_eval_image(image, image_size: int = 224, *, crop_fraction: float = 0.875
                        ) -> np.ndarray:
    """Resize the short side to image_size / crop_fraction (256 for 224), then center crop
    -> uint8 [image_size, image_size, 3] (done as one crop-and-resize)."""
    img = _to_pil(image)
    width, height = img.size
    side = min(width, height) * crop_fraction   # the crop, in original pixels
    box = ((width - side) / 2, (height - side) / 2, side, side)
    return _crop_resize(img, box, image_size)


def normalize(images: np.ndarray, mean=None, std=None) -> np.ndarray:
    """uint8 [..., C] -> float32 [..., C]: x / 255, then (x - mean) / std per channel if given."""
    x = images.astype(np.float32) * np.float32(1 / 255)
    if mean is not None:
        x -= np.asarray(mean, np.float32)
        x *= np.float32(1) / np.asarray(std, np.float32)
    return x


def _resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C] (bilinear)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    out = np.asarray(_to_pil(image).resize((size, size), Image.BILINEAR))
    return out.reshape(size, size, image.shape[-1])


def _pad_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int,
                   flip: bool) -> np.ndarray:
    """uint8 [B, H, W, C] -> same shape: zero-pad, crop at random offsets, random h-flip."""
    b, h, w, _ = images.shape
    if padding:
        padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        oy = rng.integers(0, 2 * padding + 1, size=b)
        ox = rng.integers(0, 2 * padding + 1, size=b)
        rows = (oy[:, None] + np.arange(h))[:, :, None]
        cols = (ox[:, None] + np.arange(w))[:, None, :]
        images = padded[np.arange(b)[:, None, None], rows, cols]
    if flip:
        flips = rng.random(b) < 0.5
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return images


# ----------------------------------------------------------------------------------------------
# Grain pipelines
# ----------------------------------------------------------------------------------------------


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

    def images(self, examples, rng) -> np.ndarray:
        spec, key = self.spec, self.spec.image_key
        if spec.preprocess == "imagenet":
            if self.train:
                imgs = [imagenet_train_image(e[key], rng, self.out_shape[0],
                                             min_crop_area=spec.min_crop_area,
                                             flip=self.augment and spec.flip) if self.augment
                        else imagenet_eval_image(e[key], self.out_shape[0],
                                                 crop_fraction=spec.crop_fraction)
                        for e in examples]
            else:
                imgs = [imagenet_eval_image(e[key], self.out_shape[0],
                                            crop_fraction=spec.crop_fraction) for e in examples]
            return np.stack(imgs) if imgs else np.zeros((0, *self.out_shape), np.uint8)
        imgs = [np.asarray(e[key], np.uint8) for e in examples]
        if self.image_size:
            imgs = [_resize_uint8(x, self.image_size) for x in imgs]
        images = np.stack(imgs) if imgs else np.zeros((0, *self.out_shape), np.uint8)
        if self.train and self.augment and (spec.crop_padding or spec.flip):
            images = _pad_crop_flip(images, rng, spec.crop_padding, spec.flip)
        return images

    def read(self, indices: np.ndarray, rng) -> dict[str, np.ndarray]:
        indices = [int(i) for i in indices]
        try:
            examples = self.source.__getitems__(indices) if indices else []
            images = self.images(examples, rng)
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
        rng = np.random.default_rng([self.seed, self.shard_index, batch_index])
        return self.read(indices, rng)


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
    num_examples: int                # examples per pass over this process's shard (train) or
                                     # over the whole split (eval)
    num_batches: int | None          # batches this loader yields (None: forever)
    image_shape: tuple[int, int, int]
    num_classes: int | None
    shard_options: ShardOptions
    spec: DatasetSpec


@dataclasses.dataclass(eq=False)
class TrainLoader(_Loader):
    """Iterator over training batches ``{"image": f32 [B,H,W,C], "label": i32 [B]}``.

    B = process_batch_size = batch_size // shard_count. Resumable: `get_state()` returns a
    JSON-serialisable dict (the Grain `DatasetIterator` state); `set_state(state)` on a loader
    built with the same arguments continues with exactly the batches that would have followed.
    For Orbax, checkpoint `loader.iterator` with `grain.checkpoint.CheckpointSave/Restore`.
    `steps_per_epoch` = num_examples // process_batch_size (batches run across epochs).
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
      shard_options: which part this process reads (default ShardByJaxProcess()). Training
        always gives every process an equal, contiguous share of the split (the remainder of
        len(split) / shard_count is dropped), so all processes take the same number of steps.
      num_threads / prefetch: Grain reader threads and batches buffered.
      worker_count: > 0 runs decoding in that many worker processes (grain mp_prefetch).
      with_index: add "index": int64 [B], each example's index in the split.

    Returns:
      a TrainLoader (iterator with get_state / set_state).
    """
    _check_common(image_size, seed, num_epochs)
    shard_options, local_bs = _check_batching(batch_size, shard_options, "train")
    num_threads, prefetch, worker_count = _check_threads(num_threads, prefetch, worker_count)
    key, spec, builder, data_dir = _open(name, data_dir)
    out_shape = _output_shape(spec, builder.info, image_size)
    spec = _with_overrides(spec, mean, std, out_shape[-1])
    split = spec.train_split if split is None else split
    _check_split(key, split, builder.info)
    source = _source(key, spec, builder, data_dir, split)
    start, end = _even_split(len(source), shard_options, drop_remainder=True)
    if end - start == 0:
        raise ValueError(f"split={split!r} of {key!r} has {len(source)} examples, too few for "
                         f"{shard_options.shard_count} processes")
    total = None if num_epochs is None else num_epochs * (end - start)
    if total is not None and total < local_bs:
        raise ValueError(f"batch_size={batch_size} needs {local_bs} examples per process but "
                         f"num_epochs={num_epochs} of this shard gives only {total}")
    reader = _BatchReader(source, spec, image_size or spec.image_size, out_shape, train=True,
                          augment=bool(augment), seed=int(seed),
                          shard_index=shard_options.shard_index, with_index=with_index)
    ds = (grain.MapDataset.range(start, end).shuffle(seed=int(seed)).repeat(num_epochs)
          .batch(local_bs, drop_remainder=True).map_with_index(reader.train_batch))
    return TrainLoader(
        _iter_dataset(ds, num_threads, prefetch, worker_count), name=key, split=split,
        batch_size=int(batch_size), process_batch_size=local_bs, num_examples=end - start,
        steps_per_epoch=(end - start) // local_bs,
        num_batches=None if total is None else total // local_bs, image_shape=out_shape,
        num_classes=_num_classes(builder.info, spec.label_key), shard_options=shard_options,
        spec=spec)


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
    key, spec, builder, data_dir = _open(name, data_dir)
    out_shape = _output_shape(spec, builder.info, image_size)
    spec = _with_overrides(spec, mean, std, out_shape[-1])
    split = spec.eval_split if split is None else split
    _check_split(key, split, builder.info)
    source = _source(key, spec, builder, data_dir, split)
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


def to_global_batch(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Places a process-local batch on devices as global jax.Arrays.

    Args:
      batch: pytree of NumPy arrays whose leading axis is this process's part of the batch.
      sharding: one jax.sharding.Sharding for every leaf (shard the leading axis only, e.g.
        NamedSharding(mesh, P("data"))), or a pytree of shardings with batch's structure.

    Returns:
      the same pytree of jax.Arrays with global leading axis = sum over processes.
    """
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, x), batch, sharding)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jax_tokens.data prepare|info --dataset NAME --data_dir DIR`."""
    parser = argparse.ArgumentParser(prog="python -m jax_tokens.data", description=__doc__.split(
        "\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare a dataset once (array_record) into --data_dir")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--max_examples_per_split", type=int, default=None)
    p.add_argument("--source_dir", default=None, help="fashion_mnist: folder of *-ubyte.gz files")
    p.add_argument("--manual_dir", default=None)
    p.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("info", help="print what a prepared dataset holds")
    i.add_argument("--dataset", default="fashion_mnist")
    i.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            path = prepare(args.dataset, args.data_dir,
                           max_examples_per_split=args.max_examples_per_split,
                           source_dir=args.source_dir, overwrite=args.overwrite,
                           manual_dir=args.manual_dir)
            print(f"prepared {args.dataset} in {path}")
        summary = dataset_info(args.dataset, args.data_dir)
        print(json.dumps({k: v for k, v in dataclasses.asdict(summary).items() if k != "spec"},
                         indent=2))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
