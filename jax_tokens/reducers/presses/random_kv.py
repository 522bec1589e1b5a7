"""Random eviction (the floor every press should beat).

    press = RandomKV(compression_ratio=0.5, seed=0)

Uniform scores from `jax.random.uniform(fold_in(key(seed), layer))` per KV head and slot,
the top n_kept kept in position order; padding is never kept over a real token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["RandomKV"]


@register
@dataclasses.dataclass(frozen=True)
class RandomKV(base.RatioPress):
    """Fields: compression_ratio (share evicted) or capacity (slots kept), seed."""

    method: ClassVar[str] = "random_kv"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"press.seed={self.seed!r} must be an int")

    def plan(self, inputs: base.PressInputs) -> base.KVPlan:
        t = inputs.n_prompt
        b, c, kvh = inputs.valid.shape
        key = jax.random.fold_in(jax.random.key(self.seed), inputs.layer)
        s = base.mask_invalid(jax.random.uniform(key, (b, kvh, t)), inputs.valid)
        return base.topk_plan(s, self.n_kept(t), c, sort=True)
