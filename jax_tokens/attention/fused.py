"""Attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel on a GPU) with the
statistics that cost O(N * d) computed beside it, never the N x N probabilities.

    out, st = attention(q, k, v, stats=("cls_probs", "mean_key"), impl="cudnn")

On a GPU the output (and "lse", which the kernel returns as its residual) comes from cuDNN's
flash attention (`implementation="cudnn"`: bfloat16 or float16 inputs, the head widths cuDNN
supports). On a backend without cuDNN the same code calls the function's XLA implementation,
which is how the tests check this path against the oracle (`xla.attention_xla`) on CPU.

Statistics (names as in `attention`):
  "cls_probs"   the probability rows of the queries `query_index`: each row is
                softmax(q_i . K^T * scale + bias_i + log(key_size)) with the causal mask, an
                O(Nk * D) product per head ([B, H, Nk] or [B, H, L, Nk]; fp32, no gradient);
  "lse"         the kernel's log-sum-exp residual [B, H, Nq] (fp32 but computed in the
                inputs' dtype: bfloat16 inputs give a bfloat16-precise lse; no gradient);
  "mean_key", "value_norm", "full_key", "full_cls_probs": from q, k, v as in the oracle.
"key_mass" and "probs" need every probability: ask impl="xla" or a Pallas kernel for them.

Shapes: q [B, Nq, H, D]; k, v [B, Nk, KVH, D] (grouped-query attention as the fused kernel
does it); bias broadcastable to [B, H, Nq, Nk] or with KVH heads; key_size [B, Nk]. The bias
(with log(key_size), ToMe's proportional attention) is passed to the kernel broadcast over
its query and key axes, [B|1, H|1, Nq, Nk] in the inputs' dtype.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_tokens.attention import xla

FUSED_STATS = ("cls_probs", "lse") + xla.INPUT_STATS
"""The statistics impl="cudnn" computes beside the fused kernel."""


def _implementation() -> str:
    """cuDNN on a GPU, jax.nn.dot_product_attention's XLA implementation elsewhere."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def _bias_per_query_head(extra, h: int):
    """logits_bias's [B|1, 1|H|KVH, Nq|1, Nk] -> heads 1 or H (a KV head's bias repeated over
    its group of query heads)."""
    if extra is None or extra.shape[1] in (1, h):
        return extra
    return jnp.repeat(extra, h // extra.shape[1], axis=1)


def cls_probs(q, k, extra, query_index, scale: float, causal: bool):
    """The probability rows [B, H, Nk] (or [B, H, L, Nk]) of the queries `query_index`,
    from those queries and every key: O(Nk * D) per head (fp32, no gradient)."""
    pos = jnp.atleast_1d(jnp.asarray(query_index) % q.shape[1])
    sg = jax.lax.stop_gradient
    probs = jax.nn.softmax(xla.row_logits(sg(q), sg(k), pos, scale, extra=extra,
                                          causal=causal), axis=-1)
    return probs[:, :, 0] if np.ndim(query_index) == 0 else probs


def attention_fused(q, k, v, *, bias=None, key_size=None, causal: bool = False,
                    stats: Sequence[str] = (), query_index=0, scale=None):
    """See the module docstring and `jax_tokens.attention.attention`."""
    unsupported = [s for s in stats if s not in FUSED_STATS]
    if unsupported:
        raise ValueError(f"impl='cudnn' computes {list(FUSED_STATS)} beside the fused kernel; "
                         f"{unsupported} need every attention probability: use impl='xla' or "
                         "a Pallas kernel (impl='auto' on a GPU or TPU)")
    implementation = _implementation()
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"impl='cudnn' runs cuDNN's fused attention, which takes bfloat16 or "
                         f"float16 inputs; got {q.dtype} (set the model's dtype='bfloat16' or "
                         "use impl='pallas_gpu')")
    b, nq, h, d = q.shape
    nk = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    extra = _bias_per_query_head(xla.logits_bias(key_size, bias, False, nq, nk), h)
    kernel_bias = None if extra is None else jnp.broadcast_to(
        extra, (extra.shape[0], extra.shape[1], nq, nk)).astype(q.dtype)
    mask = None          # the oracle's causal mask is bottom-right aligned; is_causal is
    if causal and nq != nk:                  # top-left, so it serves only square attention
        mask = (jnp.arange(nk)[None, :] <= jnp.arange(nq)[:, None] + (nk - nq))[None, None]
    out, lse = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), bias=kernel_bias, mask=mask, scale=scale,
        is_causal=causal and nq == nk, implementation=implementation, return_residual=True)
    result = {}
    if "cls_probs" in stats:
        result["cls_probs"] = jax.lax.stop_gradient(cls_probs(
            q, k, extra, query_index, scale, causal))
    if "lse" in stats:                                      # [B, Nq, H] -> [B, H, Nq]
        result["lse"] = jax.lax.stop_gradient(jnp.swapaxes(lse, 1, 2).astype(jnp.float32))
    result.update(xla.input_stats(q, k, v, stats, key_size=key_size, causal=causal,
                                  query_index=query_index))
    return out, {name: result[name] for name in stats}
