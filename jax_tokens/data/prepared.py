"""Preparing datasets once (array_record) and opening prepared ones: `prepare`,
`dataset_info`, and the checks and error messages (naming the command that prepares a missing
dataset) that the loaders share.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import tensorflow_datasets as tfds

from jax_tokens.data import fashion_mnist   # FASHION_MNIST_SOURCE_DIR, read when needed
from jax_tokens.data.fashion_mnist import (APT_COMMAND, _FASHION_FILES, FashionMnistLocal,
                                           _fashion_sources_missing)
from jax_tokens.data.specs import (IMAGENET_MEAN, IMAGENET_STD, DatasetNotPreparedError,
                                   DatasetSpec, _check_data_dir, _resolve)


# ----------------------------------------------------------------------------------------------
# Opening a prepared dataset
# ----------------------------------------------------------------------------------------------


def _prepare_command(key: str, spec: DatasetSpec, data_dir: str) -> str:
    if spec.tfds_name == FashionMnistLocal.name:
        return f"python -m jax_tokens.data prepare --dataset fashion_mnist --data_dir {data_dir}"
    if spec.tfds_name == "imagenet2012":
        return (f"tfds build imagenet2012 --data_dir {data_dir} --file_format array_record "
                f"--manual_dir DIR_WITH_ILSVRC2012_TARS   (TFDS's ImageNet builder needs "
                f"TensorFlow while preparing; reading here does not)")
    return f"python -m jax_tokens.data prepare --dataset {key} --data_dir {data_dir}"


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
            missing = _fashion_sources_missing(fashion_mnist.FASHION_MNIST_SOURCE_DIR)
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
# Preparing a dataset
# ----------------------------------------------------------------------------------------------


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
