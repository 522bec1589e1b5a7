"""The KV-cache press protocol: what a press asks the prefill for, what it sees, the plan it
returns, and the scoring and selection pieces the presses share.

A press runs after the prefill, once per layer (`jax_tokens.models.llama.cache.compress`):

    req = press.request(n_prompt)          # PressRequest: statistics the prefill must record
    plan = press.plan(inputs)              # PressInputs -> KVPlan (kept slots per KV head)

Layout (one layer; C cache slots, the T prompt tokens in slots [0, T), left-padded batches
have their padding first, marked invalid):

    keys, values        [B, C, KVH, hd]   RoPE applied to the keys
    positions, valid    [B, C, KVH]       token positions (-1 empty), real tokens
    stats               name -> array     per *query* head, over the C slots: "cls_probs"
                                          [B, H, W, C] for query_index=(T-W, ..., T-1),
                                          "key_mass" [B, H, C] summed over the T queries
    queries             [B, T, H, hd]     with PressRequest(queries=True) (RoPE applied;
                                          queries="raw": before RoPE)
    inv_freq            [hd // 2]         the model's RoPE frequencies
    query_positions     [B, T]
    groups              H // KVH          query heads per KV head

A plan keeps K slots per KV head (K a Python int: a function of T and the press's budget,
fixed at trace time): `KVPlan.kept_idx [B, KVH, K]`, in the order the new cache holds them.
Scores of invalid slots are -inf before selection, so padding is never kept over a real
token; a budget larger than a row's real tokens keeps some invalid slots, which stay
invalid after the gather.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["KVPlan", "PressRequest", "PressInputs", "Press", "RatioPress", "kept_count",
           "group_scores",
           "check_budget", "check_int", "check_choice", "fill_count", "evict_where",
           "pool1d", "mask_invalid", "topk_plan", "positions_plan", "window_query_index",
           "GQA_AGGREGATIONS", "POOLINGS"]

GQA_AGGREGATIONS = ("mean", "max", "sum")
POOLINGS = ("avgpool", "maxpool", "none")


@struct.dataclass
class KVPlan:
    """Which cache slots each KV head keeps: kept_idx [B, KVH, K] int32 (K static, the plan's
    order is the order in the new cache; sort it to keep position order)."""

    kept_idx: jax.Array
    n_in: int = struct.field(pytree_node=False)

    @property
    def n_out(self) -> int:
        return self.kept_idx.shape[-1]

    @property
    def assignment(self) -> jax.Array:
        """[B, KVH, C] int32: the new slot of each old slot, -1 where evicted."""
        k = self.kept_idx.shape[-1]
        onehot = self.matrix(jnp.int32)                      # [B, KVH, K, C]
        slot = jnp.arange(k, dtype=jnp.int32)[None, None, :, None]
        return jnp.where(onehot.sum(2) > 0, (onehot * slot).sum(2), -1).astype(jnp.int32)

    def matrix(self, dtype=jnp.float32) -> jax.Array:
        """The dense one-hot view [B, KVH, K, C]."""
        return jax.nn.one_hot(self.kept_idx, self.n_in, dtype=dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """Gathers a per-slot array x [B, C, KVH, ...] -> [B, K, KVH, ...]."""
        idx = jnp.swapaxes(self.kept_idx, 1, 2)                # [B, K, KVH]
        idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
        return jnp.take_along_axis(x, idx, axis=1)


@dataclasses.dataclass(frozen=True)
class PressRequest:
    """What a press needs recorded during prefill, for every layer."""

    stats: tuple[str, ...] = ()
    query_index: Any = 0
    queries: bool | str = False     # True: queries with RoPE; "raw": before RoPE


@struct.dataclass
class PressInputs:
    """What a press sees for one layer after prefill (see the module docstring)."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    valid: jax.Array
    stats: dict
    queries: jax.Array | None
    query_positions: jax.Array
    layer: int = struct.field(pytree_node=False)
    groups: int = struct.field(pytree_node=False)
    num_layers: int = struct.field(pytree_node=False, default=1)
    inv_freq: Any = None            # [hd // 2] the model's RoPE frequencies (rotate-half)

    @property
    def n_prompt(self) -> int:
        """T, the prompt's (padded) length: its tokens sit in slots [0, T)."""
        return self.query_positions.shape[1]


@dataclasses.dataclass(frozen=True)
class Press:
    """Base class of the registered presses (frozen dataclasses: hashable, static under jit).
    Subclasses set `method`, their budget fields, `request` and `plan`."""

    method: ClassVar[str] = ""
    decode_stats: ClassVar[tuple[str, ...]] = ()
    """Statistics a decoding step must record for `decode_update` (over the cache slots)."""

    def request(self, n_prompt: int) -> PressRequest:
        del n_prompt
        return PressRequest()

    def plan(self, inputs: PressInputs) -> KVPlan:
        raise NotImplementedError

    def reindexed_sinks(self) -> int:
        """Sinks whose keys the cache reads re-indexed (`cache.reindex_sink_keys`; StreamingLLM
        with `reindex`); 0: keys are read as stored."""
        return 0

    # -- eviction while decoding (H2O, TOVA, StreamingLLM): optional --------------------------

    def decode_plan(self, inputs: PressInputs) -> KVPlan:
        """The prefill's plan when decoding follows (default: `plan`)."""
        return self.plan(inputs)

    def decode_budget(self) -> int | None:
        """Slots per head the cache may hold while decoding (it gets one more, the slot the
        next token is written to); None: the press acts at prefill only."""
        return None

    def decode_init(self, inputs: PressInputs, plan: KVPlan) -> jax.Array | None:
        """The decoding state of one layer in the plan's slot order ([B, KVH, K]), or None."""
        del inputs, plan
        return None

    def decode_update(self, state, valid: jax.Array, positions: jax.Array, stats: dict,
                      groups: int) -> tuple[jax.Array, Any]:
        """After a decoding step wrote one token per example into every layer: which slot each
        head evicts ([L, B, KVH] int32, -1: none) and the new state. valid / positions
        [L, B, C, KVH] (the new token included), stats name -> [L, B, H, C] (`decode_stats`
        of the new token's query), state [L, B, KVH, C] or None."""
        raise NotImplementedError


def fill_count(valid: jax.Array) -> jax.Array:
    """Valid slots per head: valid [L, B, C, KVH] -> [L, B, KVH]."""
    return valid.sum(axis=2)


def evict_where(scores: jax.Array, candidates: jax.Array, full: jax.Array) -> jax.Array:
    """The slot (argmin of scores [L, B, KVH, C] over the candidate slots) each full head
    evicts, -1 where it is not full."""
    slot = jnp.argmin(jnp.where(candidates, scores, jnp.inf), axis=-1).astype(jnp.int32)
    return jnp.where(full, slot, -1)


# --------------------------------------------------------------------------------------------
# Budgets and validation
# --------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_budget(name: str, capacity, compression_ratio, *, least: int = 1) -> None:
    """Exactly one of `capacity` (an int >= least: slots kept) and `compression_ratio` (a
    float in [0, 1): the share of prompt tokens evicted, kvpress's convention)."""
    if (capacity is None) == (compression_ratio is None):
        raise ValueError(f"press.{name}: give exactly one of capacity (slots kept) and "
                         f"compression_ratio (share evicted); got capacity={capacity!r}, "
                         f"compression_ratio={compression_ratio!r}")
    if capacity is not None and (not _is_int(capacity) or capacity < least):
        raise ValueError(f"press.capacity={capacity!r} must be an int >= {least}")
    if compression_ratio is not None and (
            isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float))
            or not 0.0 <= compression_ratio < 1.0):
        raise ValueError(f"press.compression_ratio={compression_ratio!r} must be a float in "
                         "[0, 1)")


def check_int(name: str, value, least: int = 0) -> None:
    if not _is_int(value) or value < least:
        raise ValueError(f"press.{name}={value!r} must be an int >= {least}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"press.{name}={value!r} is not one of {tuple(allowed)}")


def kept_count(n_prompt: int, capacity, compression_ratio) -> int:
    """Slots kept out of n_prompt: `capacity`, or int(n_prompt * (1 - compression_ratio))
    (kvpress), never more than n_prompt."""
    if capacity is not None:
        return min(capacity, n_prompt)
    return min(int(n_prompt * (1.0 - compression_ratio)), n_prompt)


def window_query_index(n_prompt: int, window: int) -> tuple[int, ...]:
    """The last `window` query rows of a prompt of n_prompt tokens."""
    return tuple(range(max(n_prompt - window, 0), n_prompt))


@dataclasses.dataclass(frozen=True)
class RatioPress(Press):
    """A press whose budget is `compression_ratio` (the share of the prompt evicted, kvpress's
    convention) or `capacity` (slots kept): exactly one of them."""

    compression_ratio: float | None = None
    capacity: int | None = None

    def __post_init__(self):
        check_budget(self.method, self.capacity, self.compression_ratio)

    def n_kept(self, n_prompt: int, layer: int = 0, num_layers: int = 1) -> int:
        del layer, num_layers
        return kept_count(n_prompt, self.capacity, self.compression_ratio)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

def group_scores(scores: jax.Array, groups: int, agg: str) -> jax.Array:
    """Per-query-head scores [..., H, N] -> per-KV-head [..., H // groups, N]: the `agg`
    (mean / max / sum) over each group of `groups` consecutive query heads."""
    if groups == 1:
        return scores
    *lead, h, n = scores.shape
    g = scores.reshape(*lead, h // groups, groups, n)
    return {"mean": g.mean, "max": g.max, "sum": g.sum}[agg](axis=-2)


def pool1d(x: jax.Array, kernel: int, kind: str) -> jax.Array:
    """Stride-1 pooling along the last axis with padding kernel // 2 (kernel odd): "avgpool"
    counts the zero padding (sum / kernel, torch's avg_pool1d default), "maxpool" pads with
    -inf, "none" returns x."""
    if kind == "none" or kernel == 1:
        return x
    pad = [(0, 0)] * (x.ndim - 1) + [(kernel // 2, kernel // 2)]
    window = (1,) * (x.ndim - 1) + (kernel,)
    if kind == "avgpool":
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1,) * x.ndim, pad) / kernel
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, (1,) * x.ndim, pad)


def mask_invalid(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """scores [B, KVH, N] with -inf where valid [B, N, KVH] (the first N slots) is False."""
    v = jnp.swapaxes(valid[:, :scores.shape[-1]], 1, 2)
    return jnp.where(v, scores, -jnp.inf)


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------

def topk_plan(scores: jax.Array, k: int, n_in: int, *, tail: tuple[int, int] | None = None,
              sort: bool = False) -> KVPlan:
    """Keeps the k highest `scores` [B, KVH, N] (slots 0..N-1) per KV head, in descending
    score order (`sort`: position order), followed by the slots [tail[0], tail[1]) (a recent
    window, in position order)."""
    b, h, _ = scores.shape
    idx = jax.lax.top_k(scores, k)[1] if k > 0 else jnp.zeros((b, h, 0), jnp.int32)
    if sort:
        idx = jnp.sort(idx, axis=-1)
    if tail is not None and tail[1] > tail[0]:
        win = jnp.broadcast_to(jnp.arange(*tail, dtype=jnp.int32), (b, h, tail[1] - tail[0]))
        idx = jnp.concatenate([idx.astype(jnp.int32), win], axis=-1)
    return KVPlan(kept_idx=idx.astype(jnp.int32), n_in=n_in)


def positions_plan(n_prompt: int, batch: int, kv_heads: int, n_in: int) -> KVPlan:
    """Keeps the whole prompt, slots [0, n_prompt), in position order (nothing to evict)."""
    idx = jnp.broadcast_to(jnp.arange(n_prompt, dtype=jnp.int32), (batch, kv_heads, n_prompt))
    return KVPlan(kept_idx=idx, n_in=n_in)
