"""Input checks and statistic names shared by every attention implementation."""

from __future__ import annotations

STATS = ("lse", "cls_probs", "key_mass", "mean_key", "probs", "value_norm", "full_key",
         "full_cls_probs")


def check_inputs(q, k, v, bias, key_size, stats) -> None:
    """Shapes and statistic names every implementation requires (the Pallas kernels add their
    own dtype, scale and block checks on top)."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 4:
            raise ValueError(f"{name} must have rank 4 [batch, tokens, heads, head_dim]; "
                             f"got shape {getattr(a, 'shape', None)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {k.shape}, v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch and head_dim")
    b, nq, h, _ = q.shape
    nk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"k has {kvh} heads, which must divide q's {h} heads (grouped-query "
                         "attention: query head i reads key/value head i // (q heads / k heads))")
    if key_size is not None and tuple(key_size.shape) != (b, nk):
        raise ValueError(f"key_size must have shape [batch, keys] = {(b, nk)}; "
                         f"got {tuple(key_size.shape)}")
    if bias is not None:
        want = (b, h, nq, nk)
        heads_ok = bias.ndim == 4 and bias.shape[1] in (1, h, kvh)
        if bias.ndim != 4 or not heads_ok or any(
                s not in (1, w) for i, (s, w) in enumerate(zip(bias.shape, want)) if i != 1):
            raise ValueError(f"bias must broadcast to [batch, heads, queries, keys] = {want} "
                             f"(or have k's {kvh} heads); got shape {tuple(bias.shape)}")
    full = [s for s in stats if s in ("full_key", "full_cls_probs")]
    if full and kvh != h:
        raise ValueError(f"stats {full} treat the heads as one full-width head: they need as "
                         f"many key heads as query heads; got k with {kvh}, q with {h}")
    if "full_cls_probs" in stats and bias is not None:
        raise ValueError("stats 'full_cls_probs' (one head over the full width) takes no bias: "
                         "a bias is per head; key_size and causal apply")
    bad = [s for s in stats if s not in STATS]
    if bad:
        raise ValueError(f"stats={tuple(stats)!r} contains unknown {bad}; allowed: {STATS}")
