"""Knorm (kvpress's `KnormPress`): keep the keys with the smallest L2 norm.

    press = Knorm(compression_ratio=0.5)

score = -||k||_2 over the head dimension, per KV head and slot ([B, KVH, T]); the top
`n_kept` per KV head, in descending score order (ascending norm), as kvpress's `compress`.
n_kept = int(T * (1 - compression_ratio)) (kvpress) or `capacity`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["Knorm"]


@register
@dataclasses.dataclass(frozen=True)
class Knorm(base.RatioPress):
    """Fields: compression_ratio (share of the prompt evicted) or capacity (slots kept)."""

    method: ClassVar[str] = "knorm"

    def plan(self, inputs: base.PressInputs) -> base.KVPlan:
        t = inputs.n_prompt
        k = inputs.keys[:, :t].astype(jnp.float32)                       # [B, T, KVH, hd]
        s = -jnp.sqrt(jnp.sum(k * k, axis=-1))
        s = base.mask_invalid(jnp.swapaxes(s, 1, 2), inputs.valid)
        return base.topk_plan(s, self.n_kept(t), inputs.keys.shape[1])
