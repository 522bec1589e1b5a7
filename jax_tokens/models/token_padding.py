"""Token counts rounded up to a multiple, with padding tokens that attention masks out.

A reduced ViT's token counts (ToMe r=16 at 224: 197, 181, 165, ...) are rarely multiples of 8,
the granularity of tensor-core tiles and of TPU sublanes. With `ViTConfig.token_multiple = m`
the model carries every block's tokens in arrays rounded up to a multiple of m: the first
`valid` rows are the real tokens, the rest are padding (zeros, size 0). What the model computes
for the real tokens does not change:

* attention masks the padding keys (a key size of 0 adds log 0 = -inf to their logits), so
  the padding never enters a real token's output, gradient or statistic;
* the statistics a reducer gets are sliced to the real tokens, and "key_mass" (attention
  received per key, a sum over queries) has the padding queries' rows taken out;
* reducers run on the real tokens only (sliced), and their output is padded again;
* the padding rows of the MLP are computed and thrown away.

So the model's logits equal the unpadded model's to float precision (the tests check it), and
the padding only costs the extra rows. Whether the aligned shapes pay for them is a property of
the device; `benchmarks/token_padding.py` measures it.

Shapes: x [B, n, C] -> [B, round_up(n, m), C]; size [B, n, 1] likewise; key sizes [B, P].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_tokens.attention import xla as attention_xla

__all__ = ["round_up", "pad", "key_size", "valid_stats", "pad_probs"]


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def pad(x: jax.Array, size: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array]:
    """x [B, n, C], size [B, n, 1] -> both with round_up(n, multiple) rows: padding tokens of
    zeros with size 0 after the real ones (unchanged when n is already a multiple)."""
    extra = round_up(x.shape[1], multiple) - x.shape[1]
    if extra == 0:
        return x, size
    return (jnp.pad(x, ((0, 0), (0, extra), (0, 0))),
            jnp.pad(size, ((0, 0), (0, extra), (0, 0))))


def pad_probs(probs: jax.Array, rows: int) -> jax.Array:
    """Attention probabilities [B, H, n, n] of the real tokens -> [B, H, rows, rows], zero for
    the padding (no real query attends to it; padding queries output zeros)."""
    extra = rows - probs.shape[-1]
    return probs if extra == 0 else jnp.pad(probs, ((0, 0), (0, 0), (0, extra), (0, extra)))


def key_size(size: jax.Array, valid: int, proportional: bool) -> jax.Array:
    """The key sizes [B, P] attention gets for sizes [B, P, 1] whose first `valid` rows are
    real: the real tokens' sizes (proportional attention) or ones, and 0 for the padding, whose
    logits become log 0 = -inf. The `where` keeps the padding's (undefined) gradient of log 0
    out of the real sizes' gradients."""
    real = jnp.arange(size.shape[1]) < valid
    s = size[..., 0] if proportional else jnp.ones(size.shape[:2], size.dtype)
    return jnp.where(real[None, :], s, jnp.zeros_like(s))


# The token axes of every statistic (`jax_tokens.attention.STATS`): which axes to slice to the
# real tokens. "cls_probs" / "full_cls_probs" may carry a row axis before the keys (a sequence
# of query indices); the keys are always last.
_TOKEN_AXES = {"lse": (-1,), "cls_probs": (-1,), "key_mass": (-1,), "probs": (-2, -1),
               "value_norm": (-1,), "full_cls_probs": (-1,), "mean_key": (1,),
               "full_key": (1,)}


def valid_stats(stats: dict, valid: int, q: jax.Array, k: jax.Array, key_sizes: jax.Array,
                scale: float) -> dict:
    """The statistics of the real tokens from those attention computed on padded arrays.

    stats: from `attention(q, k, v, key_size=key_sizes, stats=...)` with q [B, P, H, D], k
      [B, P, KVH, D] and key_sizes [B, P] (`key_size`: 0 for the padding);
    valid: the real tokens (the first `valid` of P).

    Every statistic is sliced to the real tokens (the padding keys already have probability
    0). "key_mass" sums every query's row, the padding queries' included; their rows,
    O((P - valid) * P * D), are recomputed here and subtracted.
    """
    p = q.shape[1]
    if valid == p:
        return stats
    out = {}
    for name, value in stats.items():
        if name == "key_mass":
            real = jnp.arange(p) < valid
            log_size = jnp.where(real, jnp.log(jnp.where(real, key_sizes, 1).astype(jnp.float32)),
                                 -jnp.inf)
            rows = attention_xla.row_logits(q, k, jnp.arange(valid, p), scale,
                                            extra=log_size[:, None, None, :])
            value = value - jax.nn.softmax(rows, axis=-1).sum(axis=2)
        for axis in _TOKEN_AXES[name]:
            value = jax.lax.slice_in_dim(value, 0, valid, axis=axis % value.ndim)
        out[name] = value
    return out
