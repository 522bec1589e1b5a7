"""Image normalisation shared by the data pipeline and the weight importers (one copy).

`IMAGENET_MEAN` / `IMAGENET_STD` are the RGB statistics timm, torchvision and Hugging Face
normalise ImageNet-trained models with.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: np.ndarray, mean=None, std=None) -> np.ndarray:
    """uint8 [..., C] -> float32 [..., C]: x / 255, then (x - mean) / std per channel if given
    (torchvision's `Normalize` order: subtract, then divide)."""
    x = np.asarray(images).astype(np.float32) / np.float32(255.0)
    if mean is not None:
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.astype(np.float32, copy=False)
