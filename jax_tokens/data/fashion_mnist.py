"""The local Fashion-MNIST TFDS builder: reads the raw IDX files of the Debian package
``dataset-fashion-mnist`` and is registered in TFDS as ``"fashion_mnist_local"`` (TFDS's own
``fashion_mnist`` downloads from the internet).

`FASHION_MNIST_SOURCE_DIR` is read when a builder is made or a missing dataset is reported, so
patching this module's attribute changes where the raw files are looked for.
"""

from __future__ import annotations

import gzip
import math
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

FASHION_MNIST_SOURCE_DIR = os.environ.get(
    "JAX_TOKENS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
"""Where the Debian package `dataset-fashion-mnist` installs the raw gzipped IDX files."""

APT_COMMAND = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_FILES = {  # split -> (images, labels, count)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}


def _fashion_sources_missing(source_dir: str) -> list[str]:
    return [os.path.join(source_dir, f) for images, labels, _ in _FASHION_FILES.values()
            for f in (images, labels) if not os.path.isfile(os.path.join(source_dir, f))]


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
