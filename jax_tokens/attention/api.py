"""The one attention entry point: output plus the statistics a reducer asked for."""

from __future__ import annotations

from typing import Sequence

import jax

from jax_tokens.attention import xla

STATS = ("lse", "cls_probs", "key_mass", "mean_key")
IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def check_inputs(q, k, v, bias, key_size, stats) -> None:
    """Shapes and statistic names every implementation requires (the Pallas kernels add their
    own dtype, scale and block checks on top)."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, tokens, heads, head_dim]; "
                             f"got shape {getattr(a, 'shape', None)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {k.shape}, v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch, heads and head_dim")
    b, nq, h, _ = q.shape
    nk = k.shape[1]
    if key_size is not None and tuple(key_size.shape) != (b, nk):
        raise ValueError(f"key_size must have shape [batch, keys] = {(b, nk)}; "
                         f"got {tuple(key_size.shape)}")
    if bias is not None:
        want = (b, h, nq, nk)
        if bias.ndim != 4 or any(s not in (1, w) for s, w in zip(bias.shape, want)):
            raise ValueError(f"bias must broadcast to [batch, heads, queries, keys] = {want}; "
                             f"got shape {tuple(bias.shape)}")
    bad = [s for s in stats if s not in STATS]
    if bad:
        raise ValueError(f"stats={tuple(stats)!r} contains unknown {bad}; allowed: {STATS}")


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None = None,
              key_size: jax.Array | None = None, causal: bool = False,
              stats: Sequence[str] = (), query_index: int | Sequence[int] = 0,
              scale: float | None = None, impl: str = "auto"):
    """Scaled dot-product attention that also returns importance statistics.

    Args:
      q: [B, Nq, H, D] queries.
      k, v: [B, Nk, H, D] keys and values.
      bias: optional additive logits bias broadcastable to [B, H, Nq, Nk].
      key_size: optional [B, Nk] token sizes; adds log(size) to every logit of that key
        (ToMe's proportional attention).
      causal: mask keys after the query (query i sees keys j <= i + Nk - Nq).
      stats: names from STATS to return:
        "lse" [B, H, Nq] natural-log log-sum-exp of each query's logits (fp32);
        "cls_probs" [B, H, Nk] the probability row of query `query_index` (or
          [B, H, len(query_index), Nk] for a sequence of indices) (fp32);
        "key_mass" [B, H, Nk] attention each key receives, summed over queries (fp32);
        "mean_key" [B, Nk, D] keys averaged over heads (ToMe's merge metric).
      query_index: which query row(s) "cls_probs" returns.
      scale: logits scale, default D ** -0.5.
      impl: "xla" (materialises probabilities; the oracle), "pallas_tpu", "pallas_gpu",
        or "auto" (Pallas on TPU/GPU, XLA on CPU).

    Returns:
      (out [B, Nq, H, D] in q's dtype, dict of the requested statistics).
    """
    stats = tuple(stats)
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    check_inputs(q, k, v, bias, key_size, stats)
    impl = resolve_impl(impl)
    kwargs = dict(bias=bias, key_size=key_size, causal=causal, stats=stats,
                  query_index=query_index, scale=scale)
    if impl == "xla":
        return xla.attention_xla(q, k, v, **kwargs)
    if impl in ("pallas_tpu", "pallas_gpu"):
        try:
            from jax_tokens.attention import pallas  # pylint: disable=import-outside-toplevel
        except ImportError as e:  # pragma: no cover - until the kernels land
            raise ValueError(f"impl={impl!r} is not available in this build: {e}") from e
        return pallas.attention_pallas(q, k, v, backend=impl.split("_")[1], **kwargs)
    raise AssertionError(impl)
