"""A static-shape KV cache for the decoder, and the interface KV-cache *presses* plug into.

    cache = KVCache.create(cfg, batch=2, capacity=512)          # every slot empty
    logits, aux = model(tokens, positions=pos, mask=mask, cache=cache)   # prefill: write T slots
    cache = aux["cache"]
    logits, aux = model(next_tok[:, None], positions=next_pos[:, None], cache=cache)  # decode

Layout (per layer, `LayerCache`; `KVCache` stacks the L layers on a leading axis, as the
model stacks its layers' parameters and scans over them):

    k, v    [B, C, KVH, hd]   keys (RoPE applied) and values, KV heads not repeated
    pos     [B, C, KVH] int32 the position of the token in each slot (-1: never written)
    valid   [B, C, KVH] bool  whether a slot holds a real token (padding and empty: False)
    index   int32 scalar      the next slot to write (the same for every example and head)

Every array has a fixed shape: C (capacity) is a Python int chosen before tracing. Writing T
new tokens puts them in slots [index, index + T) (`lax.dynamic_update_slice`); the caller
makes sure index + T <= C (generation checks it before tracing). Queries attend over all C
slots, masked by `attention_bias`: slot c is visible to a real query at position p when it is
valid and pos[c] <= p; a padding query sees only its own slot (so its row is finite, and
nothing depends on how the prompt was split into chunks), and no real query sees padding.
Positions and validity are per KV head because a press may keep different tokens in each
head.

Batches of prompts of different lengths are *left*-padded to one length (`pad_prompts`):
every prompt then ends in the same slot, the next token of every example is written to the
same slot, and positions (`padding_positions`) count real tokens only, so an example's
logits do not depend on how much padding it got.

Presses (`jax_tokens.reducers.presses`: SnapKV, PyramidKV, H2O, TOVA, StreamingLLM, Knorm,
random; the protocol in `reducers/presses/base.py`, re-exported here) plug in after prefill
(`compress`, called by `generation.prefill(..., press=...)`): each layer's plan keeps K slots
per KV head (`KVPlan.kept_idx [B, KVH, K]`, K static). Eviction (`evict`) is a gather: kept
slots move to [0, K) in the plan's order, the rest of the capacity is emptied (valid False,
pos -1), and `index` becomes K, so decoding continues at slot K. `compress(..., room=)`
evicts into a smaller cache (the kept slots + room for the new tokens: the memory a press
saves while decoding; `generation.prefill` does this). Presses that act during decoding
(H2O's running scores, TOVA's per-step eviction, StreamingLLM's ring buffer) carry their state through the decode loop: the cache then holds their budget + 1 slots and
each head writes its next token into the slot the press freed (`KVCache.free`,
`decode_evict`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_tokens import sharding as shd
from jax_tokens.models.llama.rope import apply_rope, rope_tables
from jax_tokens.reducers.presses.base import KVPlan, Press, PressInputs, PressRequest

__all__ = ["LayerCache", "KVCache", "KVPlan", "PressRequest", "PressInputs", "Press",
           "evict", "compress", "decode_evict", "decode_budget", "default_capacity",
           "pad_prompts", "padding_positions",
           "self_attention_bias", "reindex_sink_keys", "NEG_INF"]

_KV_AXES = (None, "batch", None, "kv_heads", None)   # [L, B, C, KVH, hd]

NEG_INF = -1e30
"""The additive bias of a masked logit (finite: a fully masked row never makes NaNs)."""


@struct.dataclass
class LayerCache:
    """One layer's cache; see the module docstring for the layout."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array
    index: jax.Array
    free: jax.Array | None = None     # [B, KVH]: the slot the last token went to (see KVCache)
    sink_shift: int = struct.field(pytree_node=False, default=0)   # see KVCache.sink_shift

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @classmethod
    def create(cls, batch: int, capacity: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "LayerCache":
        shape = (batch, capacity, kv_heads)
        return cls(k=jnp.zeros(shape + (head_dim,), dtype), v=jnp.zeros(shape + (head_dim,), dtype),
                   pos=jnp.full(shape, -1, jnp.int32), valid=jnp.zeros(shape, bool),
                   index=jnp.zeros((), jnp.int32))

    def attention_bias(self, q_positions: jax.Array, n_new: int,
                       q_mask: jax.Array | None = None) -> jax.Array:
        """Additive bias [B, KVH, T, C] (float32) for the T queries just written (call after
        `KVCache.write_layer`): a real query sees the valid slots whose position is <= its own; a padding
        query (q_mask False) sees only its own slot."""
        c = self.capacity
        if self.free is not None:                # one token, written to a free slot per head
            own = (jnp.arange(c)[None, None, :] == self.free[..., None])[:, :, None]
        else:
            own = (jnp.arange(c)[None, :] == (self.index - n_new + jnp.arange(n_new))[:, None]
                   )[None, None]
        pos = jnp.moveaxis(self.pos, 2, 1)[:, :, None, :]           # [B, KVH, 1, C]
        valid = jnp.moveaxis(self.valid, 2, 1)[:, :, None, :]
        seen = valid & (pos <= q_positions[:, None, :, None])
        if q_mask is not None:
            seen = seen & q_mask.astype(bool)[:, None, :, None]
        seen = seen | own
        return jnp.where(seen, 0.0, NEG_INF).astype(jnp.float32)

@struct.dataclass
class KVCache:
    """The whole decoder's cache: every layer's `LayerCache` stacked on a leading layer axis
    (k, v [L, B, C, KVH, hd], pos, valid [L, B, C, KVH], index [L]); the model scans over it
    with its stacked layers. `layer(l)` / `set_layer(l, ...)` read and write one layer (l
    may be traced). Every layer has the same capacity C; a press that keeps fewer tokens in
    some layers (PyramidKV) leaves the rest of those layers' slots invalid."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array
    index: jax.Array
    # [L, B, KVH] or None: with a press that evicts while decoding, the slot each head writes
    # its next token to (a slot freed by the press, or never used); None: slot `index`.
    free: jax.Array | None = None
    # S > 0: StreamingLLM's re-indexing (`reindex_sink_keys`): the keys of the S attention
    # sinks are read as if they sat just before the oldest window token. 0: keys as stored.
    sink_shift: int = struct.field(pytree_node=False, default=0)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def create(cls, cfg, batch: int, capacity: int, dtype=None) -> "KVCache":
        """An empty cache for a `LlamaConfig` (dtype: the config's compute dtype)."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} must be a positive int")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch={batch!r} must be a positive int")
        dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
        return cls.empty(cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim, dtype)

    @classmethod
    def empty(cls, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
              dtype) -> "KVCache":
        """An empty cache of these sizes (every slot invalid), split as `constrain` says."""
        shape = (num_layers, batch, capacity, kv_heads)
        return cls(k=jnp.zeros(shape + (head_dim,), dtype), v=jnp.zeros(shape + (head_dim,), dtype),
                   pos=jnp.full(shape, -1, jnp.int32), valid=jnp.zeros(shape, bool),
                   index=jnp.zeros((num_layers,), jnp.int32)).constrain()

    def constrain(self) -> "KVCache":
        """Under an active mesh (`sharding.use_mesh`), keeps the cache split like the
        activations that write it: the batch over the rules' "batch" axes and the KV heads
        over their "kv_heads" axes (tensor, under "fsdp_tp"); the identity without a mesh."""
        return self.replace(k=shd.constrain(self.k, _KV_AXES), v=shd.constrain(self.v, _KV_AXES),
                            pos=shd.constrain(self.pos, _KV_AXES[:4]),
                            valid=shd.constrain(self.valid, _KV_AXES[:4]))

    def write_layer(self, l, k: jax.Array, v: jax.Array, positions: jax.Array,
                    mask: jax.Array | None = None) -> "KVCache":
        """Writes T new tokens of layer l (k, v [B, T, KVH, hd], positions [B, T], mask [B, T]
        or None: all valid) into slots [index, index + T) of that layer, in place: only those
        slots of the stacked arrays are written; index advances by T. With `free` set, one
        token per head goes into its free slot instead."""
        b, t, kvh, _ = k.shape
        if t > self.capacity:
            raise ValueError(f"cannot write {t} tokens into a KV cache of capacity "
                             f"{self.capacity}")
        if self.free is not None:
            return self._write_free(l, k, v, positions, mask)
        at = (l, 0, self.index[l], 0, 0)
        valid = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        pos = jnp.broadcast_to(positions.astype(jnp.int32)[..., None], (b, t, kvh))
        valid = jnp.broadcast_to(valid[..., None], (b, t, kvh))
        return self.replace(
            k=jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at),
            v=jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at),
            pos=jax.lax.dynamic_update_slice(self.pos, pos[None], at[:4]),
            valid=jax.lax.dynamic_update_slice(self.valid, valid[None], at[:4]),
            index=jax.lax.dynamic_update_index_in_dim(self.index, self.index[l] + t, l, 0))

    def _write_free(self, l, k, v, positions, mask):
        """One token per example into each head's free slot (a scatter)."""
        b, t, kvh, _ = k.shape
        if t != 1:
            raise ValueError(f"a cache that evicts while decoding takes one token per call; "
                             f"got {t}")
        bi, hi, f = jnp.arange(b)[:, None], jnp.arange(kvh)[None, :], self.free[l]
        valid = jnp.ones((b,), bool) if mask is None else mask[:, 0].astype(bool)
        return self.replace(
            k=self.k.at[l, bi, f, hi].set(k[:, 0].astype(self.k.dtype)),
            v=self.v.at[l, bi, f, hi].set(v[:, 0].astype(self.v.dtype)),
            pos=self.pos.at[l, bi, f, hi].set(
                jnp.broadcast_to(positions[:, :1].astype(jnp.int32), (b, kvh))),
            valid=self.valid.at[l, bi, f, hi].set(jnp.broadcast_to(valid[:, None], (b, kvh))),
            index=jax.lax.dynamic_update_index_in_dim(self.index, self.index[l] + 1, l, 0))

    def layer(self, l) -> LayerCache:
        """Layer l's cache (a view: k, v [B, C, KVH, hd], ...)."""
        return LayerCache(k=self.k[l], v=self.v[l], pos=self.pos[l], valid=self.valid[l],
                          index=self.index[l], free=None if self.free is None else self.free[l],
                          sink_shift=self.sink_shift)

    def set_layer(self, l, layer: LayerCache) -> "KVCache":
        """This cache with layer l replaced (in place under jit)."""
        def put(a, x):
            return jax.lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), l, 0)
        return self.replace(k=put(self.k, layer.k), v=put(self.v, layer.v),
                            pos=put(self.pos, layer.pos), valid=put(self.valid, layer.valid),
                            index=put(self.index, layer.index))

    def nbytes(self) -> int:
        """Bytes held by the cache (keys, values, positions, validity, indices)."""
        arrays = (self.k, self.v, self.pos, self.valid, self.index) + (
            () if self.free is None else (self.free,))
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)

    def with_free_slots(self) -> "KVCache":
        """This cache with `free` set to each head's first empty slot (decode-time eviction)."""
        free = jnp.argmax(~self.valid, axis=2).astype(jnp.int32)          # [L, B, KVH]
        return self.replace(free=shd.constrain(free, (None, "batch", "kv_heads")))


# --------------------------------------------------------------------------------------------
# Masks and padding
# --------------------------------------------------------------------------------------------

def self_attention_bias(positions: jax.Array, mask: jax.Array) -> jax.Array:
    """Bias [B, 1, T, T] for attention among T tokens without a cache: a real query q sees
    the real keys k with positions[k] <= positions[q]; a padding query sees only itself."""
    t = positions.shape[1]
    mask = mask.astype(bool)
    seen = mask[:, None, :] & mask[:, :, None] & (positions[:, None, :] <= positions[:, :, None])
    seen = seen | jnp.eye(t, dtype=bool)[None]
    return jnp.where(seen, 0.0, NEG_INF).astype(jnp.float32)[:, None]


def padding_positions(mask: jax.Array) -> jax.Array:
    """Positions [B, T] of left-padded tokens: real tokens count 0, 1, 2, ...; padding gets 0."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int, length: int | None = None,
                multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to one length: (tokens [B, L] int32, mask [B, L] bool).

    L is `length` if given, else the longest prompt rounded up to `multiple` (prompts of
    different lengths then share one compiled program). ValueError for an empty prompt or
    one longer than `length`.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} has no tokens")
    longest = max(len(p) for p in prompts)
    if length is None:
        length = -(-longest // multiple) * multiple
    elif longest > length:
        raise ValueError(f"a prompt has {longest} tokens, more than length={length}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p):] = p
        mask[i, length - len(p):] = True
    return tokens, mask


def reindex_sink_keys(keys: jax.Array, pos: jax.Array, valid: jax.Array, sinks: int,
                      inv_freq) -> jax.Array:
    """StreamingLLM's positions inside the cache, at read time. The paper numbers the cached
    tokens 0, 1, ... in cache order (sinks first, then the window) and the query next, and
    rotates keys with those numbers. The window ends at the query, so its distances to the
    query are the same under true positions; only the sinks differ. Their keys (stored
    rotated at their true positions 0..S-1) are rotated on by w0 - S, w0 the position of the
    oldest window token, so every query-key distance is the paper's. keys [B, C, KVH, hd]
    (RoPE applied), pos / valid [B, C, KVH]; the stored cache is not changed."""
    big = jnp.iinfo(jnp.int32).max
    window_start = jnp.min(jnp.where(valid & (pos >= sinks), pos, big), axis=1, keepdims=True)
    shift = jnp.where(valid & (pos < sinks) & (window_start < big), window_start - sinks, 0)
    b, c, kvh = shift.shape
    cos, sin = rope_tables(shift.reshape(b, c * kvh), inv_freq)       # [B, C*KVH, 1, hd]
    return apply_rope(keys, cos.reshape(keys.shape), sin.reshape(keys.shape))


# --------------------------------------------------------------------------------------------
# Presses: plans and eviction
# --------------------------------------------------------------------------------------------

def evict(layer: LayerCache, plan: KVPlan, capacity: int | None = None) -> LayerCache:
    """Keeps the plan's slots: they move to slots [0, K) of a cache of `capacity` (default:
    the same capacity), the rest is emptied, and writing continues at slot K."""
    c = layer.capacity if capacity is None else capacity
    if plan.n_in != layer.capacity:
        raise ValueError(f"the plan was made for {plan.n_in} slots; the cache has "
                         f"{layer.capacity}")
    k_out = plan.n_out
    if k_out > c:
        raise ValueError(f"the plan keeps {k_out} slots; capacity={c} cannot hold them")
    fresh = LayerCache.create(layer.k.shape[0], c, layer.k.shape[2], layer.k.shape[3],
                              layer.k.dtype)
    at = (0, 0, 0, 0)
    return fresh.replace(
        k=jax.lax.dynamic_update_slice(fresh.k, plan.apply(layer.k), at),
        v=jax.lax.dynamic_update_slice(fresh.v, plan.apply(layer.v), at),
        pos=jax.lax.dynamic_update_slice(fresh.pos, plan.apply(layer.pos), at[:3]),
        valid=jax.lax.dynamic_update_slice(fresh.valid, plan.apply(layer.valid), at[:3]),
        index=jnp.asarray(k_out, jnp.int32))


def default_capacity(n_tokens: int) -> int:
    """Cache slots for n_tokens, rounded up to a multiple of 64 (nearby lengths share one
    compiled program)."""
    return -(-n_tokens // 64) * 64


def decode_budget(press) -> int | None:
    """The slots per head a press keeps while decoding, or None when it acts at prefill only
    (presses without the decoding hooks included)."""
    return None if press is None else getattr(press, "decode_budget", lambda: None)()


def reindexed_sinks(press) -> int:
    """The sinks whose keys the cache reads re-indexed (`Press.reindexed_sinks`); 0 for a
    press without that hook (a press need not subclass `Press`, see `decode_budget`)."""
    return 0 if press is None else getattr(press, "reindexed_sinks", lambda: 0)()


def compress(cache: KVCache, press: Press, layer_stats: dict, query_positions: jax.Array,
             groups: int, *, room: int | None = None, decoding: bool = False,
             inv_freq=None) -> tuple[KVCache, list[KVPlan], jax.Array | None]:
    """Runs a press on every layer after prefill: builds its `PressInputs` from the cache and
    the statistics the prefill recorded (`layer_stats`: name -> [L, ...], with "queries" when
    requested), asks for a plan (a Python loop over layers: each layer's plan may keep a
    different static number of slots) and evicts. With `room`, into a new cache of the
    longest layer's kept slots + room (the memory a press saves while decoding); without, into
    a cache of the same capacity. With `decoding` and a press that evicts while decoding
    (`press.decode_budget()` not None), the new cache holds at most budget + 1 slots, `free`
    points at each head's first empty slot and the press's decoding state is returned
    ([L, B, KVH, C] or None). Returns (cache, plans, state)."""
    plans, inits = [], []
    budget = decode_budget(press) if decoding else None
    for l in range(cache.num_layers):
        st = {name: a[l] for name, a in layer_stats.items()}
        queries = st.pop("queries", None)
        lc = cache.layer(l)
        inputs = PressInputs(keys=lc.k, values=lc.v, positions=lc.pos, valid=lc.valid,
                             stats=st, queries=queries, query_positions=query_positions,
                             layer=l, groups=groups, num_layers=cache.num_layers,
                             inv_freq=None if inv_freq is None else jnp.asarray(inv_freq))
        plans.append(press.plan(inputs) if budget is None else press.decode_plan(inputs))
        if budget is not None:
            inits.append(press.decode_init(inputs, plans[-1]))
    longest = max(p.n_out for p in plans)
    c = cache.capacity if room is None else longest + room
    if budget is not None:
        c = min(c, budget + 1)
    if longest > c or (budget is not None and longest > budget):
        raise ValueError(f"the press keeps up to {longest} slots in a layer; a cache of "
                         f"capacity {c} (decoding budget {budget}) cannot hold them")
    nl, b, _, kvh, hd = cache.k.shape
    out = cache if c == cache.capacity else KVCache.empty(nl, b, c, kvh, hd, cache.k.dtype)
    for l, plan in enumerate(plans):
        out = out.set_layer(l, evict(cache.layer(l), plan, c))
    out = out.replace(sink_shift=reindexed_sinks(press))
    state = None
    if budget is not None:
        out = out.with_free_slots()
        if any(x is not None for x in inits):
            state = jnp.stack([jnp.pad(x.astype(jnp.float32),
                                       ((0, 0), (0, 0), (0, c - x.shape[-1]))) for x in inits])
    return out, plans, state


def decode_evict(cache: KVCache, press: Press, stats: dict, state, groups: int
                 ) -> tuple[KVCache, jax.Array | None]:
    """After a decoding step: the press picks a slot per head to evict (`decode_update`), the
    slot is emptied and becomes the head's next free slot. Returns (cache, state)."""
    evicted, state = press.decode_update(state, cache.valid, cache.pos, stats, groups)
    c = cache.capacity
    gone = jnp.moveaxis(jnp.arange(c) == evicted[..., None], 3, 2)     # [L, B, C, KVH]
    cache = cache.replace(valid=cache.valid & ~gone, pos=jnp.where(gone, -1, cache.pos))
    return cache.with_free_slots(), state
