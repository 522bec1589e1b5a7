"""PyramidKV (Cai et al., 2024): SnapKV's scores with a budget that shrinks with depth.

    press = PyramidKV(window=32, capacity=512, beta=20)

`capacity` (C, the window W included) is the *average* budget per layer. With a T-token
prompt and L layers (KVCache-Factory's `PyramidKVCluster`, every number an int):

    T < C                nothing is evicted
    T < 2 (C - W)        every layer keeps C: the top C - W by score + the window (SnapKV)
    otherwise            layer l keeps  max_num - l * steps  + the window, where
                         min_num = (C - W) // beta,  max_num = 2 (C - W) - min_num,
                         (if max_num >= T - W: max_num = T - W, min_num = 2 (C - W) - max_num)
                         steps = (max_num - min_num) // (L - 1)

so the first layers keep up to twice the average and the last ones ~C/beta. Scoring,
pooling, the per-KV-head reduction and the order of the kept slots are SnapKV's
(`snapkv.py`). The cache has one capacity for all layers: the layers that keep fewer slots
leave the rest of theirs empty (the memory saved is the deepest layers' share; a per-layer
capacity is not built).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register
from jax_tokens.reducers.presses.snapkv import SnapKV

__all__ = ["PyramidKV", "pyramid_budget"]


def pyramid_budget(n_prompt: int, capacity: int, window: int, beta: int, layer: int,
                   num_layers: int) -> int:
    """Slots layer `layer` keeps (the window included) of an n_prompt-token prompt."""
    if n_prompt < capacity:
        return n_prompt
    if n_prompt < 2 * (capacity - window):
        return capacity
    min_num = (capacity - window) // beta
    max_num = 2 * (capacity - window) - min_num
    if max_num >= n_prompt - window:
        max_num = n_prompt - window
        min_num = 2 * (capacity - window) - max_num
    steps = (max_num - min_num) // max(num_layers - 1, 1)
    return max_num - layer * steps + window


@register
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV's fields (capacity: the average slots per layer, window included), plus beta
    (the last layer keeps about (capacity - window) / beta)."""

    method: ClassVar[str] = "pyramidkv"
    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        base.check_int("beta", self.beta, 1)

    def n_kept(self, n_prompt: int, layer: int = 0, num_layers: int = 1) -> int:
        cap = base.kept_count(n_prompt, self.capacity, self.compression_ratio)
        if cap <= self.window:
            raise ValueError(f"pyramidkv: an average budget of {cap} slots of a {n_prompt}-"
                             f"token prompt does not exceed press.window={self.window}")
        return pyramid_budget(n_prompt, cap, self.window, self.beta, layer, num_layers)
