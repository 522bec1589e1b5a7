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
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["H2O"]


@register
@dataclasses.dataclass(frozen=True)
class H2O(base.Press):
    """Fields: heavy (heavy-hitter slots kept), recent (the most recent slots always kept),
    gqa_agg ("mean", "max", "sum": a group's query-head scores -> its KV head's)."""

    method: ClassVar[str] = "h2o"
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
