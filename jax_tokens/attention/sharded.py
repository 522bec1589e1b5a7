"""`attention` under a device mesh: the Pallas kernels run inside `jax.shard_map`.

XLA partitions the plain implementation by itself; a Pallas kernel is opaque to it, so under an
active mesh every device runs the kernel on its own shard of the batch (and heads, under the
"fsdp_tp" rules). Without a mesh, or with the XLA implementation, this is `attention.api.attention`.
"""

from __future__ import annotations

from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P

from jax_tokens import sharding as shd
from jax_tokens.attention import api, xla

__all__ = ["attention"]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto",
              bias: jax.Array | None = None, key_size: jax.Array | None = None,
              causal: bool = False, stats: Sequence[str] = (),
              query_index: int | Sequence[int] = 0, scale: float | None = None,
              mesh=None, rules=None):
    """`jax_tokens.attention.attention`, with Pallas kernels wrapped in `jax.shard_map` when a
    mesh is active.

    With impl "pallas_tpu" / "pallas_gpu" (or "auto" resolving to one) and a mesh of more than
    one device (`mesh`, or the one `jax.set_mesh` / `use_mesh` set), every device runs the
    kernel on its shard: the batch split over the rules' "batch" axes (data, fsdp) and the
    heads over the "heads" axes (tensor, under "fsdp_tp"), where they divide. "mean_key",
    "value_norm", "full_key" and "full_cls_probs" (over all heads) are computed outside the
    shard_map. Otherwise this is a plain call.
    """
    resolved = api.resolve_impl(impl)
    kwargs = dict(bias=bias, key_size=key_size, causal=causal, query_index=query_index,
                  scale=scale)
    ctx = mesh if mesh is not None else shd.context_mesh()
    if resolved not in ("pallas_tpu", "pallas_gpu") or ctx is None or ctx.size == 1:
        return api.attention(q, k, v, stats=stats, impl=impl, **kwargs)
    return _shard_mapped_attention(q, k, v, stats=tuple(stats), impl=resolved, mesh=mesh,
                                   sizes=shd.mesh_sizes(ctx),
                                   rules=shd.current_rules() if rules is None else rules, **kwargs)


def _shard_mapped_attention(q, k, v, *, stats, impl, mesh, sizes, rules, bias, key_size,
                            causal, query_index, scale):
    k, v, bias = api.repeat_kv_heads(q, k, v, bias)
    table = shd.rules_dict(rules)
    b, _, h, d = q.shape
    bx = shd.split_axes(table.get("batch", ()), b, sizes)
    hx = shd.split_axes([a for a in table.get("heads", ()) if a not in bx], h, sizes)
    bs, hs = shd.spec_entry(bx), shd.spec_entry(hx)
    qkv_spec = P(bs, None, hs, None)
    outside = ("mean_key", "value_norm") + xla.FULL_WIDTH_STATS   # over all heads: outside
    inner_stats = tuple(s for s in stats if s not in outside)
    scale = float(d ** -0.5 if scale is None else scale)

    args = [q, k, v]
    specs = [qkv_spec, qkv_spec, qkv_spec]
    has_ks, has_bias = key_size is not None, bias is not None
    if has_ks:
        args.append(key_size)
        specs.append(P(bs, None))
    if has_bias:
        args.append(bias)
        specs.append(P(bs if bias.shape[0] == b else None, hs if bias.shape[1] == h else None))

    def local(*xs):
        lq, lk, lv, rest = xs[0], xs[1], xs[2], list(xs[3:])
        ks = rest.pop(0) if has_ks else None
        bi = rest.pop(0) if has_bias else None
        return api.attention(lq, lk, lv, bias=bi, key_size=ks, causal=causal,
                             stats=inner_stats, query_index=query_index, scale=scale,
                             impl=impl)

    out_specs = (qkv_spec, {s: P(bs, hs) for s in inner_stats})
    fn = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs,
                       check_vma=False)
    out, st = fn(*args)
    st = dict(st)
    st.update(xla.input_stats(q, k, v, stats, key_size=key_size, causal=causal,
                              query_index=query_index))
    return out, {s: st[s] for s in stats}
