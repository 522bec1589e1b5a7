"""LookupViT's initial lookup tokens: adaptive average pooling of the patch grid."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_tokens import tokens as tok
from jax_tokens.lookup._common import F32, _pair
from jax_tokens.lookup.plan import LookupPlan


def _pool_bins(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging matrix of 1-D adaptive average pooling (PyTorch's bins)."""
    mat = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)  # ceil((i + 1) * n_in / n_out)
        mat[i, lo:hi] = 1.0 / (hi - lo)
    return mat


def adaptive_pool_matrix(grid_hw: tuple[int, int], m_hw: tuple[int, int]) -> np.ndarray:
    """The static [M, N] matrix of 2-D adaptive average pooling of a row-major grid.

    Output cell (i, j) averages rows [floor(i H / mh), ceil((i + 1) H / mh)) and the analogous
    columns (PyTorch ``adaptive_avg_pool2d`` bins; bins overlap when the sizes do not divide).
    """
    gh, gw = _pair("grid_hw", grid_hw)
    mh, mw = _pair("m_hw", m_hw)
    if mh > gh or mw > gw:
        raise ValueError(f"m_hw={(mh, mw)} is not allowed for grid_hw={(gh, gw)}: the lookup "
                         "grid must be no larger than the patch grid in each dimension")
    return np.kron(_pool_bins(gh, mh), _pool_bins(gw, mw))


def init_lookup_tokens(hr_tokens: jax.Array, grid_hw: tuple[int, int], m_hw: tuple[int, int],
                       *, return_plan: bool = False):
    """The M = mh * mw initial lookup tokens: the patch grid average-pooled to mh x mw.

    LookupViT starts its compressed tokens from the high-resolution patch grid resized down to
    the small grid. We use adaptive average pooling (non-divisible sizes use PyTorch's
    overlapping bins); the lucidrains port resizes bilinearly instead. The tokens must be the
    patch grid only, row-major (drop a class token first).

    Args:
      hr_tokens: [B, N, C] with N == grid_hw[0] * grid_hw[1].
      grid_hw: (H, W) of the patch grid.
      m_hw: (mh, mw) of the lookup grid, 1 <= mh <= H, 1 <= mw <= W.
      return_plan: also return the LookupPlan [B, M, N] of the pooling.

    Returns:
      [B, M, C] in hr_tokens' dtype (and the plan when asked).
    """
    tok.check_tokens("hr_tokens", hr_tokens)
    pool = adaptive_pool_matrix(grid_hw, m_hw)
    (gh, gw), (mh, mw) = _pair("grid_hw", grid_hw), _pair("m_hw", m_hw)
    b, n, c = hr_tokens.shape
    if n != gh * gw:
        raise ValueError(f"hr_tokens has {n} tokens (shape {tuple(hr_tokens.shape)}) but "
                         f"grid_hw={(gh, gw)} needs {gh * gw}; pass only the patch tokens")
    if gh % mh == 0 and gw % mw == 0:  # exact reshape-mean
        grid = hr_tokens.astype(F32).reshape(b, mh, gh // mh, mw, gw // mw, c)
        y = grid.mean(axis=(2, 4)).reshape(b, mh * mw, c).astype(hr_tokens.dtype)
    else:
        y = jnp.einsum("mn,bnc->bmc", jnp.asarray(pool), hr_tokens.astype(F32),
                       precision=jax.lax.Precision.HIGHEST).astype(hr_tokens.dtype)
    if not return_plan:
        return y
    return y, LookupPlan(weights=jnp.broadcast_to(jnp.asarray(pool), (b,) + pool.shape))


def lookup_grid(m: int) -> tuple[int, int]:
    """(s, s) for a perfect-square budget M = s * s; raises otherwise."""
    m = tok.static_int("m", m, low=1)
    s = math.isqrt(m)
    if s * s != m:
        raise ValueError(f"m={m} is not allowed: a square lookup grid needs a perfect square "
                         f"(nearest: {s * s} or {(s + 1) ** 2}); pass m_hw explicitly otherwise")
    return s, s
