"""Resampling a position-embedding table to another patch grid, as the source libraries do it
at run time (transformers / DINOv2 bicubic, timm's antialiased bicubic), in float64."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RESAMPLE_METHODS", "bicubic_matrix", "bicubic_aa_matrix", "resample_pos_embed"]


RESAMPLE_METHODS = ("hf", "dinov2", "timm")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (torch: -0.75; PIL / antialias: -0.5)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, *, scale_factor: float | None = None,
                   a: float = -0.75) -> np.ndarray:
    """[n_out, n_in] weights of 1-D bicubic resampling without antialiasing.

    torch `F.interpolate(mode="bicubic", align_corners=False)` and ONNX `Resize(mode="cubic",
    coordinate_transformation_mode="half_pixel")`: output i samples the input at
    (i + 0.5) * s - 0.5 with s = n_in / n_out (or 1 / scale_factor when one is given), from the
    4 nearest inputs, indices past the border clamped to it.
    """
    s = (1.0 / scale_factor) if scale_factor else n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        x = (i + 0.5) * s - 0.5
        x0 = math.floor(x)
        t = x - x0
        w = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), a)
        for k in range(4):
            m[i, min(max(x0 - 1 + k, 0), n_in - 1)] += w[k]
    return m


def bicubic_aa_matrix(n_in: int, n_out: int, *, a: float = -0.5) -> np.ndarray:
    """[n_out, n_in] weights of torch's antialiased bicubic (`antialias=True`, PIL's filter).

    The kernel is stretched by s = n_in / n_out when downsampling (support 2 * s), evaluated at
    input centres, truncated to the input range and renormalised to sum to one.
    """
    s = n_in / n_out
    support = 2.0 * s if s >= 1.0 else 2.0
    inv = 1.0 / s if s >= 1.0 else 1.0
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = s * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) * inv, a)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


def _grid_hw(grid) -> tuple[int, int]:
    if isinstance(grid, (tuple, list)):
        if len(grid) != 2:
            raise ValueError(f"grid={grid!r} must be an int or a (height, width) pair")
        return int(grid[0]), int(grid[1])
    return int(grid), int(grid)


def resample_pos_embed(pos_embed: np.ndarray, new_grid, *, num_prefix_tokens: int = 1,
                       old_grid=None, method: str = "hf") -> np.ndarray:
    """Resamples a learned position table [1, P + H*W, D] to [1, P + h*w, D].

    The P prefix rows (class / distillation token positions) are kept; the H x W grid is
    resampled per channel with the source library's rule:

      "hf"      transformers' ViT / DINOv2 `interpolate_pos_encoding`: bicubic to size (h, w),
                a = -0.75, half-pixel centres, border clamped, no antialiasing. Also what the
                ONNX export of it (Resize, mode cubic, half_pixel, sizes) computes.
      "dinov2"  facebookresearch/dinov2 (interpolate_offset 0.1) and transformers <= 4.4x:
                the same kernel with scale factor (h + 0.1) / H, i.e. input positions
                (i + 0.5) * H / (h + 0.1) - 0.5.
      "timm"    timm `resample_abs_pos_embed`: bicubic with antialias=True (PIL's a = -0.5
                kernel, widened by H / h when downsampling, renormalised).

    Computed in float64 and returned in the input dtype.
    """
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"method={method!r} is not one of {RESAMPLE_METHODS}")
    pos = np.asarray(pos_embed)
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, tokens, dim]; got {pos.shape}")
    n_grid = pos.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(n_grid, 0))
        if side * side != n_grid:
            raise ValueError(f"pos_embed has {n_grid} grid rows after {num_prefix_tokens} prefix "
                             "rows, not a square: pass old_grid=(height, width)")
        old_grid = side
    (oh, ow), (nh, nw) = _grid_hw(old_grid), _grid_hw(new_grid)
    if oh * ow != n_grid:
        raise ValueError(f"old_grid={old_grid!r} has {oh * ow} cells but pos_embed has {n_grid} "
                         "grid rows")
    if (oh, ow) == (nh, nw):
        return pos.copy()
    dim = pos.shape[-1]
    grid = pos[0, num_prefix_tokens:].astype(np.float64).reshape(oh, ow, dim)
    axis_matrix = _RESAMPLE_AXIS[method]       # (old size, new size) -> [new, old] weights
    mh, mw = axis_matrix(oh, nh), axis_matrix(ow, nw)
    out = np.einsum("ih,hwc,jw->ijc", mh, grid, mw).reshape(1, nh * nw, dim)
    return np.concatenate([pos[:, :num_prefix_tokens].astype(np.float64), out],
                          axis=1).astype(pos.dtype)


_RESAMPLE_AXIS = {
    "hf": bicubic_matrix,
    "dinov2": lambda n_in, n_out: bicubic_matrix(n_in, n_out, scale_factor=(n_out + 0.1) / n_in),
    "timm": bicubic_aa_matrix,
}
"""One axis of each resampling method of `resample_pos_embed` (the 2-D map is separable)."""
