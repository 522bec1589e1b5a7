"""H2O (Zhang et al., NeurIPS 2023): heavy hitters by accumulated attention, plus a recent
window.

    press = H2O(heavy=96, recent=32)

At prefill the score of a slot is the attention it received, summed over every prompt query
(the prefill's "key_mass" [B, H, C], causal; the official `H2OKVCache_LayerWise` sums over
the query rows, KVCache-Factory's `H2OKVCluster` the same before its top-k) and reduced over
each group of query heads to its KV head (`gqa_agg`, KVCache-Factory's kv_head granularity;
the official code handles one batch row and no grouped heads). Kept: the `heavy` best slots
of the first T - recent, **in position order** (the official cache keeps position order;
KVCache-Factory's one-shot version orders them by score, the same set), then the last
`recent` slots. A prompt of at most heavy + recent tokens is kept whole.

While decoding (`decode_update`, the official cache's later calls): every slot's score grows
by the attention the new token's query gives it (the step's "key_mass", one query row; the
new token starts with its own column), and once a head holds more than heavy + recent
tokens it evicts the lowest-scored slot outside the recent window (the `recent` newest
positions), so the cache never exceeds heavy + recent (+ the slot being written). Scores are
per example (the official code sums over the batch, which only works for one row).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["H2O"]


@register
@dataclasses.dataclass(frozen=True)
class H2O(base.Press):
    """Fields: heavy (heavy-hitter slots kept), recent (the most recent slots always kept),
    gqa_agg ("mean", "max", "sum": a group's query-head scores -> its KV head's)."""

    method: ClassVar[str] = "h2o"
    decode_stats: ClassVar[tuple[str, ...]] = ("key_mass",)
    heavy: int = 64
    recent: int = 64
    gqa_agg: str = "mean"

    def __post_init__(self):
        base.check_int("heavy", self.heavy, 0)
        base.check_int("recent", self.recent, 0)
        if self.heavy + self.recent < 1:
            raise ValueError("press.heavy + press.recent must be >= 1")
        base.check_choice("gqa_agg", self.gqa_agg, base.GQA_AGGREGATIONS)

    def n_kept(self, n_prompt: int, layer: int = 0, num_layers: int = 1) -> int:
        del layer, num_layers
        return min(self.heavy + self.recent, n_prompt)

    def request(self, n_prompt: int) -> base.PressRequest:
        return base.PressRequest(stats=("key_mass",))

    def plan(self, inputs: base.PressInputs) -> base.KVPlan:
        t = inputs.n_prompt
        b, c, kvh = inputs.valid.shape
        if t <= self.heavy + self.recent:
            return base.positions_plan(t, b, kvh, c)
        s = inputs.stats["key_mass"].astype("float32")[..., :t - self.recent]
        s = base.mask_invalid(base.group_scores(s, inputs.groups, self.gqa_agg), inputs.valid)
        return base.topk_plan(s, self.heavy, c, tail=(t - self.recent, t), sort=True)

    def decode_budget(self) -> int:
        return self.heavy + self.recent

    def decode_init(self, inputs: base.PressInputs, plan: base.KVPlan) -> jax.Array:
        s = base.group_scores(inputs.stats["key_mass"].astype(jnp.float32), inputs.groups,
                              self.gqa_agg)                                 # [B, KVH, C]
        return jnp.take_along_axis(s, plan.kept_idx, axis=-1)

    def decode_update(self, state, valid, positions, stats, groups):
        v, p = jnp.moveaxis(valid, 2, 3), jnp.moveaxis(positions, 2, 3)   # [L, B, KVH, C]
        mass = base.group_scores(stats["key_mass"].astype(jnp.float32), groups, self.gqa_agg)
        state = jnp.where(v, state + mass, 0.0)
        newest = jnp.max(jnp.where(v, p, -1), axis=-1, keepdims=True)
        recent = p > newest - self.recent
        full = base.fill_count(valid) > self.heavy + self.recent
        evict = base.evict_where(state, v & ~recent, full)
        state = jnp.where(jnp.arange(state.shape[-1]) == evict[..., None], 0.0, state)
        return evict, state
