"""Tests for jax_tokens.data: the local Fashion-MNIST builder, Grain loaders, ImageNet decoding.

Real data only: a slice of Fashion-MNIST from the Debian package `dataset-fashion-mnist`
(prepared once per module into a tmp dir) and the real ImageNet sample JPEGs in
../shared/data/imagenet_samples/.
"""

import collections
import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from grain.sharding import ShardOptions
from PIL import Image

from jax_tokens import data
from jax_tokens.data import fashion_mnist

from conftest import IMAGENET_SAMPLES

N = 600                     # examples per split in the prepared slice
FASHION_MISSING = bool(data._fashion_sources_missing(data.FASHION_MNIST_SOURCE_DIR))
needs_fashion = pytest.mark.skipif(
    FASHION_MISSING, reason=f"Debian files missing: run `{data.APT_COMMAND}`")
MEAN, STD = data.DATASETS["fashion_mnist"].mean[0], data.DATASETS["fashion_mnist"].std[0]


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    """TFDS data dir with the first N examples of each Fashion-MNIST split (array_record)."""
    if FASHION_MISSING:
        pytest.skip(f"Debian files missing: run `{data.APT_COMMAND}`")
    d = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("fashion_mnist", d, max_examples_per_split=N)
    return d


def _raw_fashion(split, n):
    images_file, labels_file, _ = data._FASHION_FILES[split]
    src = data.FASHION_MNIST_SOURCE_DIR
    return (data.read_idx(os.path.join(src, images_file))[:n],
            data.read_idx(os.path.join(src, labels_file))[:n])


def _take(loader, n):
    return [next(loader) for _ in range(n)]


# ----------------------------------------------------------------------------------------------
# Preparing and describing Fashion-MNIST
# ----------------------------------------------------------------------------------------------


@needs_fashion
def test_prepare_writes_array_record_and_info(fmnist_dir):
    version_dir = os.path.join(fmnist_dir, "fashion_mnist_local", "1.0.0")
    files = sorted(os.listdir(version_dir))
    assert any(f.startswith("fashion_mnist_local-train.array_record") for f in files), files
    assert any(f.startswith("fashion_mnist_local-test.array_record") for f in files), files
    info = data.dataset_info("fashion_mnist", fmnist_dir)
    assert info.tfds_name == "fashion_mnist_local"
    assert info.splits == {"train": N, "test": N}
    assert info.image_shape == (28, 28, 1)
    assert info.num_classes == 10 and info.class_names[9] == "Ankle boot"
    # the alias and plain TFDS reading give the same thing
    assert data.dataset_info("fashion_mnist_local", fmnist_dir).splits == info.splits
    src = tfds.data_source("fashion_mnist_local", split="test", data_dir=fmnist_dir,
                           download=False)
    ex = src[0]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (28, 28, 1)


@needs_fashion
def test_prepare_is_idempotent_and_refuses_other_sizes(fmnist_dir):
    path = data.prepare("fashion_mnist", fmnist_dir, max_examples_per_split=N)
    assert path.endswith(os.path.join("fashion_mnist_local", "1.0.0"))
    with pytest.raises(ValueError, match="overwrite"):
        data.prepare("fashion_mnist", fmnist_dir)  # full size requested, slice present


@needs_fashion
def test_no_tensorflow_needed(fmnist_dir):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; this checks the TF-free environment")
    loader = data.make_eval_loader("fashion_mnist", fmnist_dir, 100)
    next(iter(loader))
    assert "tensorflow" not in sys.modules


@needs_fashion
def test_stored_examples_equal_the_debian_files_exactly_once(fmnist_dir):
    raw_x, raw_y = _raw_fashion("test", N)
    want = collections.Counter((x.tobytes(), int(y)) for x, y in zip(raw_x, raw_y))
    loader = data.make_eval_loader("fashion_mnist", fmnist_dir, 128, mean=(0.0,), std=(1.0,),
                                   num_threads=2)
    got = collections.Counter()
    for b in loader:
        pixels = np.rint(b["image"][b["mask"]] * 255).astype(np.uint8)[..., 0]
        got.update((x.tobytes(), int(y)) for x, y in zip(pixels, b["label"][b["mask"]]))
    assert got == want


# ----------------------------------------------------------------------------------------------
# Training loader
# ----------------------------------------------------------------------------------------------


@needs_fashion
def test_train_batches_shapes_dtypes_ranges(fmnist_dir):
    loader = data.make_train_loader("fashion_mnist", fmnist_dir, 32, seed=0, num_threads=2)
    assert loader.process_batch_size == 32 and loader.steps_per_epoch == N // 32
    assert loader.num_batches is None and loader.image_shape == (28, 28, 1)
    for b in _take(loader, 3):
        assert set(b) == {"image", "label"}
        assert b["image"].dtype == np.float32 and b["image"].shape == (32, 28, 28, 1)
        assert b["label"].dtype == np.int32 and b["label"].shape == (32,)
        assert b["label"].min() >= 0 and b["label"].max() < 10
        assert b["image"].min() >= (0 - MEAN) / STD - 1e-5
        assert b["image"].max() <= (1 - MEAN) / STD + 1e-5
    plain = data.make_train_loader("fashion_mnist", fmnist_dir, 32, seed=0, augment=False,
                                   mean=(0.0,), std=(1.0,), num_threads=1)
    x = next(plain)["image"]
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_allclose(x * 255, np.rint(x * 255), atol=1e-3)  # exact pixel values
    big = data.make_train_loader("fashion_mnist", fmnist_dir, 8, seed=0, image_size=32,
                                 num_threads=1)
    assert next(big)["image"].shape == (8, 32, 32, 1)


@needs_fashion
def test_augmentation_is_pad_crop_flip_of_the_stored_image(fmnist_dir):
    kw = dict(seed=3, mean=(0.0,), std=(1.0,), num_threads=1, with_index=True)
    aug = next(data.make_train_loader("fashion_mnist", fmnist_dir, 64, **kw))
    plain = next(data.make_train_loader("fashion_mnist", fmnist_dir, 64, augment=False, **kw))
    np.testing.assert_array_equal(aug["index"], plain["index"])  # same shuffle
    np.testing.assert_array_equal(aug["label"], plain["label"])
    assert not np.array_equal(aug["image"], plain["image"])
    p = data.DATASETS["fashion_mnist"].crop_padding
    for a, x in zip(aug["image"][..., 0], plain["image"][..., 0]):
        padded = np.pad(x, p)
        cands = [c for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 for c in (padded[dy:dy + 28, dx:dx + 28], padded[dy:dy + 28, dx:dx + 28][:, ::-1])]
        assert any(np.array_equal(a, c) for c in cands)


@needs_fashion
def test_train_determinism_and_seed_dependence(fmnist_dir):
    mk = lambda seed, threads: data.make_train_loader(  # noqa: E731
        "fashion_mnist", fmnist_dir, 50, seed=seed, num_threads=threads, with_index=True)
    a, b, c = _take(mk(1, 2), 4), _take(mk(1, 0), 4), _take(mk(2, 2), 4)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(np.concatenate([x["index"] for x in a]),
                              np.concatenate([x["index"] for x in c]))


@needs_fashion
def test_epochs_cover_the_split_and_reshuffle(fmnist_dir):
    loader = data.make_train_loader("fashion_mnist", fmnist_dir, 100, seed=0, num_epochs=2,
                                    num_threads=1, with_index=True)
    assert loader.num_batches == 12
    idx = np.concatenate([b["index"] for b in loader])
    assert idx.shape == (2 * N,)
    e1, e2 = idx[:N], idx[N:]
    assert sorted(e1) == list(range(N)) and sorted(e2) == list(range(N))
    assert not np.array_equal(e1, e2)


@needs_fashion
def test_resume_from_state_mid_epoch_gives_the_same_batches(fmnist_dir):
    mk = lambda: data.make_train_loader(  # noqa: E731
        "fashion_mnist", fmnist_dir, 100, seed=7, num_threads=2, with_index=True)
    first = mk()
    _take(first, 3)                         # 3 of 6 steps of the epoch
    state = json.loads(json.dumps(first.get_state()))   # survives a JSON round trip
    expected = _take(first, 5)              # crosses into the second epoch
    resumed = mk()
    resumed.set_state(state)
    got = _take(resumed, 5)
    for x, y in zip(expected, got):
        for k in ("image", "label", "index"):
            np.testing.assert_array_equal(x[k], y[k])
    resumed.close()
    first.close()


@needs_fashion
@pytest.mark.slow
def test_worker_processes_give_the_same_batches(fmnist_dir):
    mk = lambda workers: data.make_train_loader(  # noqa: E731
        "fashion_mnist", fmnist_dir, 40, seed=5, num_threads=1, worker_count=workers,
        with_index=True)
    with mk(0) as threads, mk(1) as procs:
        _take(procs, 2)
        state = procs.get_state()
        want, got = _take(threads, 4), _take(procs, 2)
        for x, y in zip(want[2:], got):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["index"], y["index"])
    with mk(1) as resumed:
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["index"], want[2]["index"])


@needs_fashion
def test_processes_split_every_global_batch_as_one_process_reads_it(fmnist_dir):
    """Two processes read disjoint halves of every global batch; together they read (and
    augment) exactly the batches one process reads, image for image."""
    def batches(i, count):
        loader = data.make_train_loader(
            "fashion_mnist", fmnist_dir, 100, seed=3, split="train[:599]", num_epochs=1,
            shard_options=ShardOptions(shard_index=i, shard_count=count), num_threads=1,
            with_index=True)
        assert loader.process_batch_size == 100 // count and loader.num_examples == 599
        assert loader.steps_per_epoch == 5 and loader.num_batches == 5
        return list(loader)
    one, halves = batches(0, 1), [batches(i, 2) for i in range(2)]
    assert len(one) == len(halves[0]) == len(halves[1]) == 5
    for b, (a0, a1) in enumerate(zip(*halves)):
        assert a0["image"].shape[0] == a1["image"].shape[0] == 50
        assert not set(a0["index"].tolist()) & set(a1["index"].tolist())
        for key in ("index", "image", "label"):
            np.testing.assert_array_equal(np.concatenate([a0[key], a1[key]]), one[b][key])


# ----------------------------------------------------------------------------------------------
# Eval loader
# ----------------------------------------------------------------------------------------------


@needs_fashion
def test_eval_pass_counts_every_example_once_with_mask(fmnist_dir):
    loader = data.make_eval_loader("fashion_mnist", fmnist_dir, 64, num_threads=2,
                                   with_index=True)
    assert len(loader) == 10 and loader.num_examples == N
    batches = list(loader)
    assert len(batches) == 10
    for b in batches:
        assert b["image"].shape == (64, 28, 28, 1) and b["mask"].dtype == np.bool_
    mask = np.concatenate([b["mask"] for b in batches])
    idx = np.concatenate([b["index"] for b in batches])
    assert mask.sum() == N and sorted(idx[mask]) == list(range(N))
    assert (idx[~mask] == -1).all()
    last = batches[-1]
    assert (last["image"][~last["mask"]] == 0).all() and (last["label"][~last["mask"]] == 0).all()
    # a second pass gives the same batches
    again = list(loader)
    np.testing.assert_array_equal(again[3]["image"], batches[3]["image"])


@needs_fashion
def test_eval_split_per_process_counts_every_example_once(fmnist_dir):
    seen, lengths = [], []
    for i in range(2):
        loader = data.make_eval_loader(
            "fashion_mnist", fmnist_dir, 64, split="test[:599]",
            shard_options=ShardOptions(shard_index=i, shard_count=2), num_threads=1,
            with_index=True)
        batches = list(loader)
        lengths.append(len(batches))
        assert all(b["image"].shape[0] == 32 for b in batches)
        for b in batches:
            seen.extend(b["index"][b["mask"]].tolist())
    assert lengths[0] == lengths[1] == 10          # same number of steps on every process
    assert sorted(seen) == list(range(599))


# ----------------------------------------------------------------------------------------------
# Missing data and bad arguments
# ----------------------------------------------------------------------------------------------


def test_missing_data_names_the_prepare_command(tmp_path, monkeypatch):
    empty = str(tmp_path / "empty")
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.make_train_loader("fashion_mnist", empty, 32)
    assert f"python -m jax_tokens.data prepare --dataset fashion_mnist --data_dir {empty}" \
        in str(e.value)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_SOURCE_DIR",
                        str(tmp_path / "no_debian_files"))
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.dataset_info("fashion_mnist", empty)
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)
    assert "python -m jax_tokens.data prepare" in str(e.value)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.prepare("fashion_mnist", empty, source_dir=str(tmp_path / "no_debian_files"))
    with pytest.raises(data.DatasetNotPreparedError, match="tfds build imagenet2012"):
        data.make_eval_loader("imagenet2012", empty, 32)


@needs_fashion
@pytest.mark.parametrize("batch_size", [0, -4, 2.5, None])
def test_bad_batch_size(fmnist_dir, batch_size):
    with pytest.raises(ValueError, match=f"batch_size={batch_size!r}.*positive int"):
        data.make_train_loader("fashion_mnist", fmnist_dir, batch_size)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_eval_loader("fashion_mnist", fmnist_dir, batch_size)


@needs_fashion
def test_bad_arguments(fmnist_dir):
    with pytest.raises(ValueError, match=r"split='validation'.*allowed: \['test', 'train'\]"):
        data.make_eval_loader("fashion_mnist", fmnist_dir, 32, split="validation")
    with pytest.raises(ValueError, match="split='trian'"):
        data.make_train_loader("fashion_mnist", fmnist_dir, 32, split="trian")
    with pytest.raises(ValueError, match=r"name='no_such_dataset_xyz' is not a known dataset.*"
                                         r"fashion_mnist"):
        data.make_train_loader("no_such_dataset_xyz", fmnist_dir, 32)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        data.make_train_loader("fashion_mnist", fmnist_dir, 33,
                               shard_options=ShardOptions(shard_index=0, shard_count=2))
    with pytest.raises(ValueError, match="num_epochs=0"):
        data.make_train_loader("fashion_mnist", fmnist_dir, 32, num_epochs=0)
    with pytest.raises(ValueError, match="seed=-1"):
        data.make_train_loader("fashion_mnist", fmnist_dir, 32, seed=-1)
    with pytest.raises(ValueError, match="image_size=0"):
        data.make_eval_loader("fashion_mnist", fmnist_dir, 32, image_size=0)
    with pytest.raises(ValueError, match=r"mean=\(0.5, 0.5, 0.5\) must have 1 entry"):
        data.make_train_loader("fashion_mnist", fmnist_dir, 32, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ValueError, match="max_examples_per_split=0"):
        data.prepare("fashion_mnist", fmnist_dir, max_examples_per_split=0)
    with pytest.raises(ValueError, match="batch_size=10000 needs"):
        data.make_train_loader("fashion_mnist", fmnist_dir, 10000, num_epochs=1)


@needs_fashion
def test_command_line(tmp_path, capsys):
    d = str(tmp_path / "cli")
    assert data.main(["prepare", "--dataset", "fashion_mnist", "--data_dir", d,
                      "--max_examples_per_split", "20"]) == 0
    out = capsys.readouterr().out
    assert '"train": 20' in out and "prepared fashion_mnist" in out
    assert data.main(["prepare", "--data_dir", d, "--max_examples_per_split", "30"]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert data.main(["prepare", "--data_dir", d, "--max_examples_per_split", "30",
                      "--overwrite"]) == 0
    assert data.dataset_info("fashion_mnist", d).splits == {"train": 30, "test": 30}
    assert data.main(["info", "--dataset", "fashion_mnist", "--data_dir", str(tmp_path / "x")]) == 1
    assert "python -m jax_tokens.data prepare" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# ImageNet decoding and augmentation on real JPEGs
# ----------------------------------------------------------------------------------------------


def _sample_files(n):
    files = sorted(f for f in os.listdir(IMAGENET_SAMPLES) if f.endswith(".jpg"))
    if len(files) < n:
        pytest.skip(f"ImageNet sample photos missing from {IMAGENET_SAMPLES}")
    step = len(files) // n
    return [os.path.join(IMAGENET_SAMPLES, f) for f in files[::step][:n]]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _reencode(image: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_image_real_jpegs_and_other_modes():
    for path in _sample_files(4):
        x = data.decode_image(_read(path))
        assert x.dtype == np.uint8 and x.shape == (224, 224, 3)
        np.testing.assert_array_equal(x, np.asarray(Image.open(path).convert("RGB")))
    rgb = Image.open(_sample_files(1)[0]).convert("RGB")
    for img, fmt in ((rgb.convert("L"), "JPEG"), (rgb.convert("CMYK"), "JPEG"),
                     (rgb.convert("P"), "PNG"), (rgb.convert("RGBA"), "PNG")):
        x = data.decode_image(_reencode(img, fmt))
        assert x.shape == (224, 224, 3) and x.dtype == np.uint8, (img.mode, fmt)
    with pytest.raises(ValueError, match="could not decode"):
        data.decode_image(b"not an image at all")


def test_sample_crop_box_properties():
    rng = np.random.default_rng(0)
    for width, height in ((224, 224), (500, 333), (333, 500)):
        for _ in range(200):
            left, top, w, h = data.sample_crop_box(width, height, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            assert 0.08 * 0.9 <= w * h / (width * height) <= 1.0
            assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # impossible requests fall back to the largest center crop with an allowed ratio
    assert data.sample_crop_box(1000, 10, rng, scale=(0.9, 1.0)) == (493, 0, 13, 10)
    with pytest.raises(ValueError, match="width=0"):
        data.sample_crop_box(0, 10, rng)


def test_imagenet_train_image_on_real_jpegs():
    for path in _sample_files(6):
        jpeg = _read(path)
        a = data.imagenet_train_image(jpeg, np.random.default_rng(1), 160)
        b = data.imagenet_train_image(jpeg, np.random.default_rng(1), 160)
        c = data.imagenet_train_image(jpeg, np.random.default_rng(2), 160)
        assert a.dtype == np.uint8 and a.shape == (160, 160, 3) and a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    # crop area 1 on a square photo: the whole image, flipped or not
    jpeg = _read(_sample_files(1)[0])
    full = data.decode_image(jpeg)
    outs = [data.imagenet_train_image(jpeg, np.random.default_rng(s), 224, min_crop_area=1.0)
            for s in range(8)]
    flipped = [np.abs(o.astype(int) - full[:, ::-1]).mean() < 1 for o in outs]
    plain = [np.abs(o.astype(int) - full).mean() < 1 for o in outs]
    assert all(f or p for f, p in zip(flipped, plain)) and any(flipped) and any(plain)


def test_imagenet_eval_image_matches_resize_then_center_crop():
    rgb = Image.open(_sample_files(2)[1]).convert("RGB").resize((640, 480), Image.BICUBIC)
    jpeg = _reencode(rgb, quality=95)
    out = data.imagenet_eval_image(jpeg, 224)
    ref = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((341, 256), Image.BICUBIC)
    ref = np.asarray(ref.crop((58, 16, 282, 240)))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref).mean() < 4     # draft-mode decode, sub-pixel offset
    arr = data.imagenet_eval_image(np.asarray(rgb), 96)   # arrays work too
    assert arr.shape == (96, 96, 3)
    rng = np.random.default_rng(0)
    for mode in ("L", "CMYK"):                            # non-RGB JPEGs through the crops
        other = _reencode(rgb.convert(mode))
        assert data.imagenet_eval_image(other, 64).shape == (64, 64, 3)
        assert data.imagenet_train_image(other, rng, 64).shape == (64, 64, 3)


def test_normalize():
    x = np.array([[[0, 255, 51]]], np.uint8)
    np.testing.assert_allclose(data.normalize(x), [[[0.0, 1.0, 0.2]]], rtol=1e-6)
    y = data.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0, 0], (np.array([0, 1, 0.2]) - data.IMAGENET_MEAN)
                               / data.IMAGENET_STD, rtol=1e-5)


class ImagenetSamplesTest(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny ImageNet-like TFDS dataset (JPEG Image feature) from the real sample photos."""

    VERSION = tfds.core.Version("1.0.0")
    files: list = []

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self.files[:24]),
                "validation": self._generate_examples(self.files[24:])}

    def _generate_examples(self, files):
        for path in files:
            label = int(os.path.basename(path)[:4])
            yield label, {"image": path, "label": label}


@pytest.fixture(scope="module")
def imagenet_like_dir(tmp_path_factory):
    ImagenetSamplesTest.files = _sample_files(37)
    d = str(tmp_path_factory.mktemp("inet"))
    ImagenetSamplesTest(data_dir=d, file_format="array_record").download_and_prepare()
    return d


def test_imagenet_pipeline_end_to_end(imagenet_like_dir):
    with open(IMAGENET_SAMPLES / "labels.json") as f:
        labels = {e["file"]: e["label"] for e in json.load(f)}
    want = sorted(labels[os.path.basename(p)] for p in ImagenetSamplesTest.files[24:])
    spec = data.DatasetSpec("imagenet_samples_test", preprocess="imagenet",
                            eval_split="validation", image_size=64, mean=data.IMAGENET_MEAN,
                            std=data.IMAGENET_STD, flip=True)
    train = data.make_train_loader(spec, imagenet_like_dir, 8, seed=0, num_threads=2)
    b = next(train)
    assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.float32
    assert np.isfinite(b["image"]).all() and -2.2 < b["image"].min() and b["image"].max() < 2.7
    ev = data.make_eval_loader(spec, imagenet_like_dir, 8, num_threads=2)
    got = []
    for b in ev:
        got.extend(b["label"][b["mask"]].tolist())
    assert sorted(got) == want and len(ev) == 2
    # a plain TFDS name found in the data dir: variable-size images use the ImageNet recipe
    info = data.dataset_info("imagenet_samples_test", imagenet_like_dir)
    assert info.spec.preprocess == "imagenet" and info.image_shape == (224, 224, 3)
    assert info.splits == {"train": 24, "validation": 13}
