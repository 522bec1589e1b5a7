"""Pictures of what a reducer did to an image's patches (numpy + PIL only).

    img = draw_merge_groups(photo, aux["source_index"][0], grid=16)   # ToMe: merged groups
    img = draw_kept_patches(photo, aux["source_index"][0], grid=16)   # EViT / top-k: kept patches
    side_by_side([photo_pil, img], labels=["input", "ToMe r=16"]).save("fig.png")

Both take the model's `aux["source_index"]` for one image (build the model with
`ViTConfig(trace_source=True)` to get it): [N0] ints, the token each input token ended in after
the last block (-1: dropped), prefix tokens (class, distillation, registers) first and then the
patches in row-major order. Like the ToMe and EViT paper figures:

* merging: every output token's patches form a group drawn in one colour (distinct colours,
  blended with the photo, or ToMe's mean colour of the group) with the group's outline;
* pruning: kept patches as they are, dropped ones greyed and washed out. A token that holds more
  than one patch after pruning can only be EViT's fused token, so its patches are drawn as
  dropped too (with a faint tint: summarised, not kept).
"""

from __future__ import annotations

import colorsys
import os
from typing import Sequence

import numpy as np


def _pil():
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
    return Image, ImageDraw


def palette(n: int, *, seed: int = 0) -> np.ndarray:
    """[n, 3] uint8 distinct colours: hues spaced by the golden ratio, alternating lightness
    and saturation so that neighbours in hue still differ; order shuffled by `seed`."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    out = np.zeros((n, 3), np.uint8)
    phi = 0.618033988749895
    for i in range(n):
        h = (0.11 + i * phi) % 1.0
        s = (0.95, 0.65, 0.80)[i % 3]
        v = (0.95, 0.80, 0.65, 1.0)[(i // 3) % 4]
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    if seed:
        out = out[np.random.default_rng(seed).permutation(n)]
    return out


def _check(image, source_index, grid, num_prefix_tokens):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape [H, W, 3]; got {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8; got {image.dtype}")
    gh, gw = (grid, grid) if np.isscalar(grid) else tuple(int(g) for g in grid)
    src = np.asarray(source_index)
    if src.ndim != 1:
        raise ValueError(f"source_index must have shape [N0] (one image); got {src.shape} "
                         "(pass aux['source_index'][i])")
    if src.shape[0] != num_prefix_tokens + gh * gw:
        raise ValueError(f"source_index has {src.shape[0]} entries; expected num_prefix_tokens="
                         f"{num_prefix_tokens} + grid {gh}x{gw} = {num_prefix_tokens + gh * gw}")
    return image, src.astype(np.int64), gh, gw


def patch_groups(source_index, grid, *, num_prefix_tokens: int = 1) -> np.ndarray:
    """[gh, gw] output token of each patch (-1 dropped), from one image's source_index."""
    src = np.asarray(source_index)
    gh, gw = (grid, grid) if np.isscalar(grid) else tuple(int(g) for g in grid)
    if src.ndim != 1 or src.shape[0] != num_prefix_tokens + gh * gw:
        raise ValueError(f"source_index must have shape [{num_prefix_tokens + gh * gw}]; got "
                         f"{src.shape}")
    return src[num_prefix_tokens:].reshape(gh, gw).astype(np.int64)


def _pixel_map(groups: np.ndarray, h: int, w: int) -> np.ndarray:
    """[H, W] group of each pixel (nearest patch; exact when H, W are multiples of the grid)."""
    gh, gw = groups.shape
    rows = np.minimum(np.arange(h) * gh // h, gh - 1)
    cols = np.minimum(np.arange(w) * gw // w, gw - 1)
    return groups[rows[:, None], cols[None, :]]


def _edges(pix: np.ndarray, width: int = 1) -> np.ndarray:
    """[H, W] True on pixels next to (4-neighbour) a pixel of another group, grown to `width`
    pixels on each side."""
    e = np.zeros(pix.shape, bool)
    e[:-1] |= pix[:-1] != pix[1:]
    e[1:] |= pix[1:] != pix[:-1]
    e[:, :-1] |= pix[:, :-1] != pix[:, 1:]
    e[:, 1:] |= pix[:, 1:] != pix[:, :-1]
    for _ in range(max(width, 1) - 1):
        g = e.copy()
        g[:-1] |= e[1:]
        g[1:] |= e[:-1]
        g[:, :-1] |= e[:, 1:]
        g[:, 1:] |= e[:, :-1]
        e = g
    return e


def _finish(arr: np.ndarray, path):
    Image, _ = _pil()
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        out.save(path)
    return out


def draw_merge_groups(image, source_index, grid, *, num_prefix_tokens: int = 1,
                      fill: str = "color", alpha: float = 0.5, borders: bool = True,
                      border_width: int = 1, seed: int = 0, path=None):
    """ToMe-style picture of merged groups.

    Args:
      image: [H, W, 3] uint8 photo (the model's input before normalisation).
      source_index: [N0] token each input token ended in (-1: dropped), prefix tokens first.
      grid: patch grid side (int) or (rows, cols).
      fill: "color" blends each group's distinct colour with the photo (weight `alpha`);
        "mean" paints each group with the photo's mean colour over the group (ToMe's figure).
      borders: outline every group in its colour. Dropped patches (if any) are greyed.
      path: also save a PNG there.
    Returns a PIL image of the same size.
    """
    if fill not in ("color", "mean"):
        raise ValueError(f"fill={fill!r} is not one of 'color', 'mean'")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    image, src, gh, gw = _check(image, source_index, grid, num_prefix_tokens)
    groups = src[num_prefix_tokens:].reshape(gh, gw)
    h, w = image.shape[:2]
    pix = _pixel_map(groups, h, w)
    ids, inverse = np.unique(pix, return_inverse=True)
    inverse = inverse.reshape(h, w)
    colors = palette(len(ids), seed=seed).astype(np.float64)
    img = image.astype(np.float64)
    if fill == "mean":
        sums = np.zeros((len(ids), 3))
        np.add.at(sums, inverse.ravel(), img.reshape(-1, 3))
        counts = np.bincount(inverse.ravel(), minlength=len(ids))[:, None]
        out = (sums / np.maximum(counts, 1))[inverse]
    else:
        out = (1.0 - alpha) * img + alpha * colors[inverse]
    dropped = pix < 0
    if dropped.any():
        out[dropped] = _washed_out(img[dropped], 0.35)
    if borders:
        edge = _edges(pix, border_width) & ~dropped
        out[edge] = colors[inverse[edge]]
    return _finish(out, path)


def _washed_out(rgb: np.ndarray, dim: float) -> np.ndarray:
    """Greyscale, contrast reduced towards light grey by `dim` (0: white, 1: plain grey)."""
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    v = 255.0 - (255.0 - grey) * dim
    return np.repeat(v[..., None], 3, axis=-1)


def draw_kept_patches(image, source_index, grid, *, num_prefix_tokens: int = 1,
                      dim: float = 0.35, fused_tint=(70, 110, 200), borders: bool = True,
                      path=None):
    """EViT-style picture of pruning: kept patches in colour, dropped ones greyed out.

    A patch counts as kept when its token holds that patch alone; -1 (dropped) and patches in
    a multi-patch token (EViT's fused token) are greyed, the fused ones with a faint
    `fused_tint` (None: plain grey). `dim` in [0, 1] sets how dark the greyed patches stay.
    Returns a PIL image (and saves a PNG at `path`).
    """
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim={dim} must be in [0, 1]")
    image, src, gh, gw = _check(image, source_index, grid, num_prefix_tokens)
    groups = src[num_prefix_tokens:].reshape(gh, gw)
    valid = groups[groups >= 0]
    counts = np.bincount(valid, minlength=int(valid.max(initial=-1)) + 1) if valid.size \
        else np.zeros(0, np.int64)
    alone = counts[np.maximum(groups, 0)] == 1 if counts.size else np.zeros(groups.shape, bool)
    state = np.where(groups < 0, 0, np.where(alone, 2, 1))  # 0 dropped, 1 fused, 2 kept
    h, w = image.shape[:2]
    pix = _pixel_map(state, h, w)
    img = image.astype(np.float64)
    out = img.copy()
    gone = pix < 2
    out[gone] = _washed_out(img[gone], dim)
    if fused_tint is not None:
        fused = pix == 1
        out[fused] = 0.75 * out[fused] + 0.25 * np.asarray(fused_tint, np.float64)
    if borders:
        edge = _edges(pix == 2, 1) & (pix == 2)
        out[edge] = 0.5 * out[edge] + 0.5 * 255.0
    return _finish(out, path)


def side_by_side(images: Sequence, *, cols: int | None = None, pad: int = 4,
                 labels: Sequence[str] | None = None, background=(255, 255, 255), path=None):
    """Tiles PIL images (or uint8 arrays) in a grid, with optional captions above each."""
    Image, ImageDraw = _pil()
    ims = [im if hasattr(im, "size") and not isinstance(im, np.ndarray)
           else Image.fromarray(np.asarray(im, np.uint8)) for im in images]
    if not ims:
        raise ValueError("images is empty")
    cols = len(ims) if cols is None else int(cols)
    rows = -(-len(ims) // cols)
    cw, ch = max(im.size[0] for im in ims), max(im.size[1] for im in ims)
    cap = 14 if labels else 0
    sheet = Image.new("RGB", (cols * cw + (cols + 1) * pad,
                              rows * (ch + cap) + (rows + 1) * pad), tuple(background))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(ims):
        r, c = divmod(i, cols)
        x, y = pad + c * (cw + pad), pad + r * (ch + cap + pad)
        if labels and i < len(labels) and labels[i]:
            draw.text((x + 2, y), str(labels[i]), fill=(0, 0, 0))
        sheet.paste(im.convert("RGB"), (x, y + cap))
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        sheet.save(path)
    return sheet
