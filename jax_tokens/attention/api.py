"""The one attention entry point: output plus the statistics a reducer asked for."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jax_tokens.attention import fused, xla
from jax_tokens.attention.checks import check_inputs

IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu", "cudnn")


def resolve_impl(impl: str) -> str:
    """'auto' picks the Pallas kernel on TPU/GPU and XLA elsewhere."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "tpu":
        return "pallas_tpu"
    if backend == "gpu":
        return "pallas_gpu"
    return "xla"


def repeat_kv_heads(q, k, v, bias):
    """k, v (and a bias with KVH heads) repeated to q's H heads, for implementations without
    grouped-query attention; unchanged when the head counts agree."""
    h, kvh = q.shape[2], k.shape[2]
    if kvh == h:
        return k, v, bias
    g = h // kvh
    if bias is not None and bias.shape[1] == kvh and kvh > 1:
        bias = jnp.repeat(bias, g, axis=1)
    return jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), bias


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
              key_size: jax.Array | None = None, causal: bool = False,
              stats: Sequence[str] = (), query_index: int | Sequence[int] = 0,
              scale: float | None = None, impl: str = "auto"):
    """Scaled dot-product attention that also returns importance statistics.

    Args:
      q: [B, Nq, H, D] queries.
      k, v: [B, Nk, KVH, D] keys and values; KVH = H, or a divisor of H for grouped-query
        attention (query head i reads KV head i // (H / KVH); the XLA path never repeats
        k and v, the Pallas kernels get them repeated).
      bias: optional additive logits bias broadcastable to [B, H, Nq, Nk] (or with KVH heads:
        one bias per KV head, shared by its group).
      key_size: optional [B, Nk] token sizes; adds log(size) to every logit of that key
        (ToMe's proportional attention).
      causal: mask keys after the query (query i sees keys j <= i + Nk - Nq).
      stats: names from STATS to return:
        "lse" [B, H, Nq] natural-log log-sum-exp of each query's logits (fp32);
        "cls_probs" [B, H, Nk] the probability row of query `query_index` (or
          [B, H, len(query_index), Nk] for a sequence of indices) (fp32);
        "key_mass" [B, H, Nk] attention each key receives, summed over queries (fp32);
        "mean_key" [B, Nk, D] keys averaged over heads (ToMe's merge metric);
        "probs" [B, H, Nq, Nk] the whole probability matrix (fp32; MCTF's one-step-ahead
          attention). It is N x N by definition: the kernels rebuild it from their lse
          outside the kernel, so ask for it only where a method needs every entry.
        "value_norm" [B, Nk] the L2 norm of each key's value vector concatenated over the H
          query heads (fp32, no gradient; with grouped-query attention a KV head counts once
          per query head it serves): ATS's significance weight ||v_j||.
        "full_key" [B, Nk, H * D] the keys with their heads concatenated (a CLIP layer's
          k_proj output; differentiable like "mean_key");
        "full_cls_probs" [B, Nk] the probability row of query `query_index` (or [B, L, Nk])
          of one head over the full width: softmax(q_full k_full^T * (H * D) ** -0.5), with
          log(key_size) and the causal mask, without `bias` or `scale` (fp32, no gradient;
          LLaVA-PruMerge's CLS attention). Both need KVH = H.
      query_index: which query row(s) "cls_probs" returns.
      scale: logits scale, default D ** -0.5.
      impl: "xla" (materialises probabilities; the oracle), "pallas_tpu", "pallas_gpu",
        "cudnn" (jax.nn.dot_product_attention, cuDNN's fused kernel on a GPU, with the
        statistics that need no probability matrix: see `fused.FUSED_STATS`), or "auto"
        (Pallas on TPU/GPU, XLA on CPU).

    Returns:
      (out [B, Nq, H, D] in q's dtype, dict of the requested statistics).
    """
    stats = tuple(stats)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    # NumPy arrays and nested lists are accepted, as jax.numpy accepts them.
    q, k, v, bias, key_size = (a if a is None or isinstance(a, jax.Array) else jnp.asarray(a)
                               for a in (q, k, v, bias, key_size))
    check_inputs(q, k, v, bias, key_size, stats)
    impl = resolve_impl(impl)
    kwargs = dict(bias=bias, key_size=key_size, causal=causal, stats=stats,
                  query_index=query_index, scale=scale)
    if impl == "xla":
        return xla.attention_xla(q, k, v, **kwargs)
    if impl == "cudnn":
        return fused.attention_fused(q, k, v, **kwargs)
    if impl in ("pallas_tpu", "pallas_gpu"):
        from jax_tokens.attention import pallas  # pylint: disable=import-outside-toplevel
        k, v, kwargs["bias"] = repeat_kv_heads(q, k, v, bias)
        return pallas.attention_pallas(q, k, v, backend=impl.split("_")[1], **kwargs)
    raise AssertionError(impl)
