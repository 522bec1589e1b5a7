"""Reference attention in plain XLA: materialises the [B, H, Nq, Nk] probabilities.

This is the oracle the Pallas kernels are tested against, and the implementation used on CPU.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def logits_bias(key_size, bias, causal, nq, nk):
    """The additive bias [B|1, H|1, Nq|1, Nk] from key sizes, a user bias and the causal mask."""
    total = None
    if key_size is not None:
        total = jnp.log(key_size.astype(jnp.float32))[:, None, None, :]
    if bias is not None:
        b = bias.astype(jnp.float32)
        total = b if total is None else total + b
    if causal:
        qi = jnp.arange(nq)[:, None] + (nk - nq)
        kj = jnp.arange(nk)[None, :]
        mask = jnp.where(kj <= qi, 0.0, -jnp.inf).astype(jnp.float32)[None, None]
        total = mask if total is None else total + mask
    return total


def _grouped(q, k, v, extra, scale):
    """Grouped-query attention without repeating k / v: q [B, Nq, H, D] as [B, Nq, KVH, G, D]
    (query head i = KV head i // G, group member i % G). Returns the output [B, Nq, H, D] and
    probs / lse in the [B, H, Nq, Nk] / [B, H, Nq] layout of the plain path."""
    b, nq, h, d = q.shape
    nk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q.reshape(b, nq, kvh, g, d), k,
                        preferred_element_type=jnp.float32) * scale
    if extra is not None:            # [B|1, 1|H|KVH, Nq|1, Nk] -> [B|1, 1|KVH, 1|G, Nq|1, Nk]
        e = extra
        if e.shape[1] == h and g > 1:
            e = e.reshape(e.shape[0], kvh, g, *e.shape[2:])
        else:
            e = e[:, :, None]
        logits = logits + e
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32).astype(q.dtype)
    return out.reshape(b, nq, h, d), probs.reshape(b, h, nq, nk), lse.reshape(b, h, nq)


def attention_xla(q, k, v, *, bias=None, key_size=None, causal: bool = False,
                  stats: Sequence[str] = (), query_index=0, scale=None):
    """See `jax_tokens.attention.attention`."""
    b, nq, h, d = q.shape
    nk, kvh = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    extra = logits_bias(key_size, bias, causal, nq, nk)
    if kvh == h:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        if extra is not None:
            logits = logits + extra
        lse = jax.nn.logsumexp(logits, axis=-1)
        probs = jnp.exp(logits - lse[..., None])
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                         preferred_element_type=jnp.float32).astype(q.dtype)
    else:
        out, probs, lse = _grouped(q, k, v, extra, scale)
    result = probability_stats(probs, stats, query_index=query_index)
    if "lse" in stats:
        result["lse"] = jax.lax.stop_gradient(lse)
    result.update(input_stats(q, k, v, stats, key_size=key_size, causal=causal,
                              query_index=query_index))
    return out, {name: result[name] for name in stats}


def row_logits(q, k, pos, scale: float, *, extra=None, causal: bool = False):
    """The logits [B, H, L, Nk] (fp32) of the queries at positions `pos` [L] against every
    key, O(L * Nk * D) per head: q [B, Nq, H, D], k [B, Nk, KVH, D] (grouped-query attention
    when KVH < H), plus the rows of `extra` (an fp32 bias broadcastable to [B, H, Nq, Nk]) and
    the causal mask (-inf). The kernels' and the fused path's CLS rows start from these."""
    b, nq, h, d = q.shape
    nk, kvh = k.shape[1], k.shape[2]
    rows = jnp.take(q, pos, axis=1).reshape(b, -1, kvh, h // kvh, d)     # [B, L, KVH, G, D]
    logits = jnp.einsum("blhgd,bkhd->bhglk", rows, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, h, -1, nk) * scale
    if extra is not None:
        logits = logits + (extra if extra.shape[2] == 1 else jnp.take(extra, pos, axis=2))
    if causal:
        visible = jnp.arange(nk)[None, :] <= pos[:, None] + (nk - nq)
        logits = jnp.where(visible, logits, -jnp.inf)
    return logits


INPUT_STATS = ("mean_key", "value_norm", "full_key", "full_cls_probs")
"""The statistics computed from the q, k, v inputs alone, the same way by every
implementation (outside any kernel)."""


def input_stats(q, k, v, stats, *, key_size=None, causal: bool = False,
                query_index=0) -> dict:
    """The statistics of `stats` in INPUT_STATS: "mean_key" [B, Nk, D] (k averaged over its
    heads), "value_norm" [B, Nk] and the full-width ones (`full_width_stats`), from q
    [B, Nq, H, D], k and v [B, Nk, KVH, D]; other names are skipped."""
    out = {}
    if "mean_key" in stats:
        out["mean_key"] = k.mean(axis=2)
    if "value_norm" in stats:
        out["value_norm"] = value_norm(v, q.shape[2])
    out.update(full_width_stats(q, k, stats, key_size=key_size, causal=causal,
                                query_index=query_index))
    return out


def value_norm(v, num_heads: int):
    """The "value_norm" statistic: values [B, Nk, KVH, D] -> [B, Nk] fp32, the L2 norm of each
    key's value concatenated over the `num_heads` query heads (a KV head counted once per query
    head it serves: H / KVH times), with no gradient (a selection weight)."""
    v = jax.lax.stop_gradient(v).astype(jnp.float32)
    return jnp.sqrt(jnp.sum(v * v, axis=(2, 3)) * (num_heads // v.shape[2]))


FULL_WIDTH_STATS = ("full_key", "full_cls_probs")
"""The statistics of one head over the full width (the heads concatenated), from q and k."""


def full_width_stats(q, k, stats, *, key_size=None, causal: bool = False,
                     query_index=0) -> dict:
    """The statistics of `stats` that treat the heads as one head of width C = H * D (LLaVA-
    PruMerge's attention on a CLIP layer's raw q_proj / k_proj outputs), from q [B, Nq, H, D]
    and k [B, Nk, H, D] (the same head count; `check_inputs` enforces it):
    "full_key" [B, Nk, C] the keys with their heads concatenated (k's dtype, differentiable
    like "mean_key"); "full_cls_probs" [B, Nk] (or [B, L, Nk] for a sequence of indices)
    softmax(q_full[query_index] . k_full^T * C**-0.5 + log(key_size)) with the causal mask
    (fp32, no gradient; the `scale` of the per-head attention does not apply). Other names are
    skipped."""
    out = {}
    b, nk = k.shape[0], k.shape[1]
    if "full_key" in stats:
        out["full_key"] = k.reshape(b, nk, -1)
    if "full_cls_probs" in stats:
        nq = q.shape[1]
        pos = jnp.asarray(query_index) % nq
        rows = jax.lax.stop_gradient(jnp.take(q, pos, axis=1)).reshape(
            b, *jnp.shape(pos), -1)                                    # [B, (L,) C]
        keys = jax.lax.stop_gradient(k).reshape(b, nk, -1)
        logits = jnp.einsum("b...c,bkc->b...k", rows, keys, preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST) * keys.shape[-1] ** -0.5
        if key_size is not None:
            kb = jnp.log(jax.lax.stop_gradient(key_size).astype(jnp.float32))
            logits = logits + kb.reshape((b,) + (1,) * (logits.ndim - 2) + (nk,))
        if causal:
            visible = jnp.arange(nk) <= pos[..., None] + (nk - nq)
            logits = jnp.where(visible, logits, -jnp.inf)
        out["full_cls_probs"] = jax.nn.softmax(logits, axis=-1)
    return out


PROBABILITY_STATS = ("cls_probs", "key_mass", "probs")
"""The statistics that derive from the probability matrix alone."""


def probability_stats(probs, stats, *, query_index=0) -> dict:
    """The statistics of `stats` that derive from probabilities [B, H, Nq, Nk] (fp32, no
    gradient): "cls_probs" (rows `query_index`), "key_mass" (summed over queries), "probs";
    other names are skipped."""
    out = {}
    if "cls_probs" in stats:
        out["cls_probs"] = jax.lax.stop_gradient(probs[:, :, query_index, :])
    if "key_mass" in stats:
        out["key_mass"] = jax.lax.stop_gradient(probs.sum(axis=2))
    if "probs" in stats:
        out["probs"] = jax.lax.stop_gradient(probs)
    return out
