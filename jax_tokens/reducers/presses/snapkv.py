"""SnapKV (Li et al., 2024): keep the prompt tokens the last W queries attend to.

    press = SnapKV(window=32, capacity=1024, kernel_size=5, pooling="avgpool")

Scores (the official FasterDecoding/SnapKV `SnapKVCluster.update_kv`, and KVCache-Factory's):

    probs   [B, H, W, C]   attention of the last W prompt queries over the cache slots (the
                           prefill's "cls_probs" at query_index = T-W .. T-1; causal inside
                           the window, fp32 softmax over all keys)
    s       [B, H, T-W]    probs summed over the W queries, the columns of the first T-W slots
    s       [B, KVH, T-W]  reduced over each group of query heads (`gqa_agg`: mean / max /
                           sum, KVCache-Factory's kv_head granularity) *before* pooling
    s       [B, KVH, T-W]  pooled along the sequence (stride 1, padding K // 2; avg counts the
                           zero padding, max pads with -inf)
    kept    [B, KVH, cap]  top (cap - W) of s in descending score order, then the W window
                           slots in position order: `capacity` counts the window (the
                           reference's max_capacity_prompt); no sinks.

With T <= capacity nothing is evicted (the reference returns its inputs unchanged when
T < capacity and re-orders at T == capacity; here the whole prompt is kept in position
order in both cases). The official SnapKV selects per *query* head (its k / v were repeated
to the query heads): that is `groups == 1` here, i.e. a cache that holds every query head's
keys; this library's cache keeps the KV heads, so its selection is per KV head.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["SnapKV", "snapkv_scores"]


def snapkv_scores(window_probs: jnp.ndarray, n_prompt: int, window: int, *, groups: int,
                  gqa_agg: str, kernel_size: int, pooling: str) -> jnp.ndarray:
    """window_probs [B, H, W, C] -> pooled per-KV-head scores [B, H // groups, T - W]."""
    s = window_probs.astype(jnp.float32).sum(axis=2)[..., :n_prompt - window]
    s = base.group_scores(s, groups, gqa_agg)
    return base.pool1d(s, kernel_size, pooling)


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(base.Press):
    """Fields: window (W, the observation window and the recent tokens always kept),
    capacity (slots kept per KV head, the window included) or compression_ratio (share of
    the prompt evicted), kernel_size (odd), pooling ("avgpool", "maxpool", "none"), gqa_agg
    (how a group's query-head scores become its KV head's: "mean", "max", "sum")."""

    method: ClassVar[str] = "snapkv"
    window: int = 32
    capacity: int | None = None
    compression_ratio: float | None = None
    kernel_size: int = 5
    pooling: str = "avgpool"
    gqa_agg: str = "mean"

    def __post_init__(self):
        base.check_int("window", self.window, 1)
        base.check_budget(self.method, self.capacity, self.compression_ratio)
        base.check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"press.kernel_size={self.kernel_size} must be odd (stride-1 "
                             "pooling with padding kernel_size // 2 keeps the length)")
        base.check_choice("pooling", self.pooling, base.POOLINGS)
        base.check_choice("gqa_agg", self.gqa_agg, base.GQA_AGGREGATIONS)
        if self.capacity is not None and self.capacity <= self.window:
            raise ValueError(f"press.capacity={self.capacity} must be larger than "
                             f"press.window={self.window} (the window is part of the budget)")

    def n_kept(self, n_prompt: int, layer: int = 0, num_layers: int = 1) -> int:
        """Slots kept of a T-token prompt (the window included)."""
        del layer, num_layers
        return base.kept_count(n_prompt, self.capacity, self.compression_ratio)

    def request(self, n_prompt: int) -> base.PressRequest:
        return base.PressRequest(stats=("cls_probs",),
                                 query_index=base.window_query_index(n_prompt, self.window))

    def _check_prompt(self, n_prompt: int) -> None:
        if n_prompt <= self.window:
            raise ValueError(f"press.window={self.window} is not shorter than the prompt "
                             f"({n_prompt} tokens, padded): nothing would be scored")

    def plan(self, inputs: base.PressInputs) -> base.KVPlan:
        t = inputs.n_prompt
        self._check_prompt(t)
        keep = self.n_kept(t, inputs.layer, inputs.num_layers)
        b, c, kvh = inputs.valid.shape
        if keep >= t:
            return base.positions_plan(t, b, kvh, c)
        if keep < self.window:
            raise ValueError(f"{self.method}: {keep} slots kept of a {t}-token prompt at layer "
                             f"{inputs.layer} are fewer than press.window={self.window}")
        s = snapkv_scores(inputs.stats["cls_probs"], t, self.window, groups=inputs.groups,
                          gqa_agg=self.gqa_agg, kernel_size=self.kernel_size,
                          pooling=self.pooling)
        s = base.mask_invalid(s, inputs.valid)
        return base.topk_plan(s, keep - self.window, c, tail=(t - self.window, t))
