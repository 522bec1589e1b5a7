"""Image preprocessing in NumPy / Pillow: decoding, ImageNet-style random-resized-crop and
center-crop, normalisation, and the pad-crop-flip augmentation of small fixed-size images.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from jax_tokens.images import normalize


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


def _resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C] (bilinear)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    out = np.asarray(_to_pil(image).resize((size, size), Image.BILINEAR))
    return out.reshape(size, size, image.shape[-1])


def _pad_crop_flip(images: np.ndarray, rngs: Sequence[np.random.Generator], padding: int,
                   flip: bool) -> np.ndarray:
    """uint8 [B, H, W, C] -> same shape: zero-pad, crop at random offsets, random h-flip;
    example i draws from rngs[i]."""
    b, h, w, _ = images.shape
    if len(rngs) != b:
        raise ValueError(f"rngs has {len(rngs)} generators for {b} images")
    if padding:
        padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        oy = np.asarray([r.integers(0, 2 * padding + 1) for r in rngs], np.int64).reshape(b)
        ox = np.asarray([r.integers(0, 2 * padding + 1) for r in rngs], np.int64).reshape(b)
        rows = (oy[:, None] + np.arange(h))[:, :, None]
        cols = (ox[:, None] + np.arange(w))[:, None, :]
        images = padded[np.arange(b)[:, None, None], rows, cols]
    if flip:
        flips = np.asarray([r.random() < 0.5 for r in rngs], bool).reshape(b)
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return images
