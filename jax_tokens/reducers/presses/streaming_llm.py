"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a recent window.

    press = StreamingLLM(sinks=4, window=508)

Kept: the first `sinks` tokens and the last `window` tokens of the prompt, in position order,
the same for every head (the official `StartRecentKVCache`: positions [0, start) and
[T - recent, T); KVCache-Factory's `StreamingLLMKVCluster` is sinks = capacity - window). A
prompt of at most sinks + window tokens is kept whole. With left padding the sinks are the
first *real* tokens of each row (their positions are 0 .. sinks - 1).

While decoding, every new token's query sees the sinks and the last `window` tokens, itself
included, as with the official cache's `evict_for_space(num_coming=1)` before each token:
after the prefill (`decode_plan`) and after each step (`decode_update`) the oldest token
that is not a sink is evicted down to sinks + window - 1 (a ring buffer over the window with
the sinks pinned; the slot it frees takes the next token).

Positions (`reindex`, default True, as the paper): the paper numbers the cached tokens by
their place in the cache (sinks 0..S-1, then the window) and the query after them, rotating
keys with those numbers at attention time. The window ends at the query, so its distances to
the query are the same under true positions; only the sinks' differ. This library's cache
keeps keys rotated at their true positions and tokens continue at their true positions; with
`reindex` the sinks' keys are rotated on, at read time, to sit just before the oldest window
token (`cache.reindex_sink_keys`), which gives every query-key pair the paper's distance.
`reindex=False` keeps true positions for the sinks too (KVCache-Factory's StreamingLLM, which
evicts without re-indexing). The kept slots are the same either way.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["StreamingLLM"]


@register
@dataclasses.dataclass(frozen=True)
class StreamingLLM(base.Press):
    """Fields: sinks (first tokens always kept), window (most recent tokens kept), reindex
    (positions inside the cache, as the paper; see the module docstring)."""

    method: ClassVar[str] = "streaming_llm"
    sinks: int = 4
    window: int = 508
    reindex: bool = True

    def __post_init__(self):
        base.check_int("sinks", self.sinks, 0)
        base.check_int("window", self.window, 0)
        if self.sinks + self.window < 1:
            raise ValueError("press.sinks + press.window must be >= 1")
        if not isinstance(self.reindex, bool):
            raise ValueError(f"press.reindex={self.reindex!r} must be True or False")

    def reindexed_sinks(self) -> int:
        return self.sinks if self.reindex else 0

    def n_kept(self, n_prompt: int, layer: int = 0, num_layers: int = 1) -> int:
        del layer, num_layers
        return min(self.sinks + self.window, n_prompt)

    def plan(self, inputs: base.PressInputs) -> base.KVPlan:
        return self.plan_for(inputs, coming=0)

    def decode_plan(self, inputs: base.PressInputs) -> base.KVPlan:
        return self.plan_for(inputs, coming=1)

    def plan_for(self, inputs: base.PressInputs, coming: int) -> base.KVPlan:
        """Room for `coming` more tokens: keeps the sinks and the last window - coming
        tokens once the prompt is longer than sinks + window - coming (the official
        `evict_for_space(num_coming)`; coming = 0 is its `__call__`)."""
        t, window = inputs.n_prompt, self.window - coming
        b, c, kvh = inputs.valid.shape
        if window < 0:
            raise ValueError(f"press.window={self.window} leaves no room for {coming} tokens")
        if t <= self.sinks + window:
            return base.positions_plan(t, b, kvh, c)
        # sinks: the real tokens at positions < sinks (slots where the row's text begins)
        pos = jnp.swapaxes(inputs.positions[:, :t], 1, 2)                 # [B, KVH, T]
        real = jnp.swapaxes(inputs.valid[:, :t], 1, 2)
        is_sink = real & (pos < self.sinks) & (jnp.arange(t) < t - window)
        # the sinks first (position order): score them by -position, the rest -inf
        s = jnp.where(is_sink, -pos.astype(jnp.float32), -jnp.inf)
        sinks = jax.lax.top_k(s, self.sinks)[1] if self.sinks else jnp.zeros((b, kvh, 0), int)
        sinks = jnp.sort(sinks, axis=-1).astype(jnp.int32)
        win = jnp.broadcast_to(jnp.arange(t - window, t, dtype=jnp.int32), (b, kvh, window))
        return base.KVPlan(kept_idx=jnp.concatenate([sinks, win], axis=-1), n_in=c)

    def decode_budget(self) -> int:
        if self.window < 1:
            raise ValueError("decoding with streaming_llm needs press.window >= 1 (the new "
                             "token is part of the window)")
        return self.sinks + self.window - 1

    def decode_update(self, state, valid, positions, stats, groups):
        v, p = jnp.moveaxis(valid, 2, 3), jnp.moveaxis(positions, 2, 3)   # [L, B, KVH, C]
        full = base.fill_count(valid) > self.decode_budget()
        return base.evict_where(p.astype(jnp.float32), v & (p >= self.sinks), full), state
