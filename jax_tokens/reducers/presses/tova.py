"""TOVA (Oren et al., 2024): keep the tokens the newest query attends to most.

    press = TOVA(cache_size=512)

The score of a slot is the attention of the *last* prompt query, averaged over all query
heads (the prefill's "cls_probs" at query_index = T - 1, [B, H, C] -> [B, C]); the top
`cache_size` slots, **in position order**, are kept, the same slots for every KV head (one
selection per sequence, as the official `TOVACache.reduce`). No sinks and no recent window:
the budget counts everything. A prompt of at most cache_size tokens is kept whole.

While decoding (`decode_update`): after each new token is written, a sequence holding more
than cache_size tokens evicts the slot the new query attends to least (head mean), which may
be the new token itself, as the official cache does at every step.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["TOVA"]


@register
@dataclasses.dataclass(frozen=True)
class TOVA(base.Press):
    """Fields: cache_size (slots kept per sequence)."""

    method: ClassVar[str] = "tova"
    decode_stats: ClassVar[tuple[str, ...]] = ("key_mass",)
    cache_size: int = 512

    def __post_init__(self):
        base.check_int("cache_size", self.cache_size, 1)

    def n_kept(self, n_prompt: int, layer: int = 0, num_layers: int = 1) -> int:
        del layer, num_layers
        return min(self.cache_size, n_prompt)

    def request(self, n_prompt: int) -> base.PressRequest:
        return base.PressRequest(stats=("cls_probs",), query_index=n_prompt - 1)

    def plan(self, inputs: base.PressInputs) -> base.KVPlan:
        t = inputs.n_prompt
        b, c, kvh = inputs.valid.shape
        if t <= self.cache_size:
            return base.positions_plan(t, b, kvh, c)
        s = inputs.stats["cls_probs"].astype(jnp.float32).mean(axis=1)[:, None, :t]  # [B,1,T]
        s = base.mask_invalid(s, inputs.valid[..., :1])
        plan = base.topk_plan(s, self.cache_size, c, sort=True)
        return base.KVPlan(kept_idx=jnp.broadcast_to(plan.kept_idx, (b, kvh, self.cache_size)),
                           n_in=c)

    def decode_budget(self) -> int:
        return self.cache_size

    def decode_update(self, state, valid, positions, stats, groups):
        v = jnp.moveaxis(valid, 2, 3)                                     # [L, B, KVH, C]
        s = stats["key_mass"].astype(jnp.float32).mean(axis=2)[:, :, None]  # [L, B, 1, C]
        full = base.fill_count(valid) > self.cache_size
        return base.evict_where(jnp.broadcast_to(s, v.shape), v, full), state
