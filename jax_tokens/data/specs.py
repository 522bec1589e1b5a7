"""Dataset specs: which TFDS datasets are known by name, how each is preprocessed, and where
datasets live (the data dir).

`DatasetSpec` describes how to read and preprocess one TFDS image-classification dataset;
`DATASETS` holds the specs known by name; `IMAGENET_MEAN` / `IMAGENET_STD` are the ImageNet
normalisation statistics used by the data package.
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow_datasets as tfds

from jax_tokens.images import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_DATA_DIR = os.path.expanduser(
    os.environ.get("JAX_TOKENS_DATA_DIR") or os.path.join("~", "tensorflow_datasets"))
"""Where datasets are prepared and read when `data_dir` is None: $JAX_TOKENS_DATA_DIR, else
~/tensorflow_datasets."""

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
