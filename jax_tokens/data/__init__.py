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

The package, by responsibility (imports run one way, top to bottom)::

    specs.py          DatasetSpec, DATASETS, DEFAULT_DATA_DIR, DatasetNotPreparedError,
                      IMAGENET_MEAN / IMAGENET_STD
    fashion_mnist.py  FashionMnistLocal (the local TFDS builder), read_idx, its source files
    prepared.py       prepare, dataset_info / DatasetSummary, opening prepared datasets
    preprocess.py     NumPy / Pillow decoding, cropping, normalisation, augmentation
    loaders.py        make_train_loader / make_eval_loader (Grain)
    cli.py            main (``python -m jax_tokens.data``, via __main__.py)

Everything public is re-exported here: ``from jax_tokens import data; data.make_train_loader``.
`FASHION_MNIST_SOURCE_DIR` is read from `jax_tokens.data.fashion_mnist` when needed; patch it there.
"""

from jax_tokens.data.cli import main
from jax_tokens.data.fashion_mnist import (APT_COMMAND, FASHION_MNIST_CLASSES,
                                           FASHION_MNIST_SOURCE_DIR, FashionMnistLocal, read_idx)
# Private, but read by tests/test_data.py on the old module:
from jax_tokens.data.fashion_mnist import _FASHION_FILES, _fashion_sources_missing
from jax_tokens.data.loaders import EvalLoader, TrainLoader, make_eval_loader, make_train_loader
from jax_tokens.data.prepared import DatasetSummary, dataset_info, prepare
from jax_tokens.data.preprocess import (decode_image, imagenet_eval_image, imagenet_train_image,
                                        normalize, sample_crop_box)
from jax_tokens.data.specs import (DATASETS, DEFAULT_DATA_DIR, IMAGENET_MEAN, IMAGENET_STD,
                                   DatasetNotPreparedError, DatasetSpec)

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
    "decode_image",
    "sample_crop_box",
    "imagenet_train_image",
    "imagenet_eval_image",
    "normalize",
]
