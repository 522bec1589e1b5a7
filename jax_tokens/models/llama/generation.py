"""Prefill and decoding with a static-shape KV cache, compiled once per shape.

    out = generate(model, [ids_a, ids_b], max_new_tokens=32, pad_multiple=64,
                   sampling=Sampling(temperature=0.7, top_k=50, top_p=0.9),
                   key=jax.random.key(0), stop_tokens=(2,), pad_id=2)
    out.tokens          # [B, max_new_tokens] int32, pad_id after a stop token
    out.num_tokens      # [B] tokens generated per example (a stop token included)

`generate` is one `jax.jit`: prefill of the left-padded prompt batch into a cache of fixed
capacity, then a `lax.while_loop` that samples a token, runs the model on it (one slot of
the cache per step) and stops when every example emitted a stop token or `max_new_tokens`
tokens were made. `prefill` and `decode` are the two halves, each jitted alone (benchmarks
time them separately; `decode` continues from any `DecodeState`).

Static (a new value compiles again): the padded prompt length, the batch size, the cache
capacity, max_new_tokens, top_k, whether sampling is greedy and whether top-p is on, the
number of stop tokens, the press. Dynamic (no recompile): the prompt ids and mask, the PRNG
key, temperature, top_p, the stop token ids. Prompts padded to one length (`pad_multiple`)
share one compiled program; `TRACES` counts how often each function was traced.

Sharding: place the model on a mesh (`model.shard(model, mesh, rules)`) and call these under
`jax_tokens.sharding.use_mesh(mesh, rules)`: the batch is split over the rules' "batch" axes,
the parameters and the KV cache as their logical names say (KV heads over "tensor" under
"fsdp_tp"). The active rules are part of every jit's cache key, so one process can generate
under several rule sets.

Sampling (`Sampling`): temperature 0 is greedy (argmax); otherwise logits / temperature,
restricted to the top_k largest (0: all), then to the smallest set whose probability reaches
top_p (1.0: all), sampled with `jax.random.categorical` and the step's key
(`fold_in(key, step)`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import time
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jax_tokens import sharding as shd
from jax_tokens.models.llama import cache as kvc
from jax_tokens.models.llama.model import Llama, rope_inv_freq

__all__ = ["Sampling", "DecodeState", "GenerationOutput", "generate", "prefill", "decode",
           "sample_logits", "TRACES", "check_lengths"]

TRACES: collections.Counter = collections.Counter()
"""How many times each jitted function ("prefill", "decode", "generate") was traced."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature >= 0 (0: greedy), top_k in [0, vocab] (0: off), top_p in (0, 1]."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) \
                or t < 0:
            raise ValueError(f"temperature={t!r} must be a finite float >= 0 (0: greedy)")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise ValueError(f"top_k={k!r} must be an int >= 0 (0: no top-k)")
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0 < p <= 1):
            raise ValueError(f"top_p={p!r} must be a float in (0, 1] (1: no top-p)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check_vocab(self, vocab_size: int) -> None:
        if self.top_k > vocab_size:
            raise ValueError(f"top_k={self.top_k} is larger than the vocabulary "
                             f"({vocab_size}); allowed: 0 (off) to {vocab_size}")


def sample_logits(logits: jax.Array, key: jax.Array | None, temperature, top_p, *, top_k: int,
                  greedy: bool, use_top_p: bool) -> jax.Array:
    """One token per row of logits [B, V] (float32) -> [B] int32; see the module docstring."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    idx = None
    if top_k or use_top_p:
        logits, idx = jax.lax.top_k(logits, top_k or logits.shape[-1])   # sorted, descending
    if use_top_p:
        probs = jax.nn.softmax(logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs       # mass of the better tokens
        logits = jnp.where(before < top_p, logits, -jnp.inf)
    choice = jax.random.categorical(key, logits, axis=-1)
    if idx is not None:
        choice = jnp.take_along_axis(idx, choice[:, None], axis=1)[:, 0]
    return choice.astype(jnp.int32)


@struct.dataclass
class DecodeState:
    """What decoding continues from: the cache, the logits of the last prompt position
    [B, V] and the next position of every example [B]."""

    cache: kvc.KVCache
    logits: jax.Array
    next_pos: jax.Array
    press_state: jax.Array | None = None   # a press's decoding state (H2O's scores)


@struct.dataclass
class GenerationOutput:
    tokens: jax.Array       # [B, N] int32 (pad_id after a stop token)
    num_tokens: jax.Array   # [B] int32 tokens generated, a stop token included
    finished: jax.Array     # [B] bool: a stop token was emitted
    plans: list = struct.field(default_factory=list)   # the press's plans, one per layer


def check_lengths(prompt_len: int, max_new_tokens: int, capacity: int,
                  max_positions: int | None = None) -> None:
    """ValueError naming the numbers when the prompt and the new tokens do not fit."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    need = prompt_len + max_new_tokens - 1
    if need > capacity:
        raise ValueError(f"the prompt ({prompt_len} tokens, padded) plus max_new_tokens="
                         f"{max_new_tokens} needs {need} cache slots, more than the cache "
                         f"capacity {capacity}; allowed: prompt + max_new_tokens - 1 <= "
                         f"{capacity}")
    if max_positions is not None and prompt_len + max_new_tokens > max_positions:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus max_new_tokens="
                         f"{max_new_tokens} exceeds the model's context of {max_positions} "
                         "positions")


# --------------------------------------------------------------------------------------------
# The traced bodies (graphdef / static settings are static arguments)
# --------------------------------------------------------------------------------------------

def _forward_dropping(model: Llama, tokens, positions, mask, cache, press):
    """The prefill with a prompt-token-dropping press (FastV, PyramidDrop): the layers run in
    segments; before each drop layer K the span's tokens are scored by the last token's
    head-mean attention in layer K - 1 and only the kept ones go on (residual stream and the
    cache of layers K..L-1; positions kept). Returns (last logits [B, V], cache)."""
    from jax_tokens.reducers.presses.token_drop import select_span  # pylint: disable=C0415
    t = tokens.shape[1]
    start, end = press.span_slots(t)
    x, layer = model.embed_tokens(tokens), 0
    for k, keep in press.stages(t, model.cfg.num_layers):
        n = x.shape[1]
        x, cache, st = model.run_layers(x, positions, mask=mask, cache=cache, start=layer,
                                        stop=k, stats=("cls_probs",), query_index=n - 1)
        # slots [0, n) of layer k - 1 hold the current tokens (the prefill wrote from slot 0)
        scores = st["cls_probs"][-1].astype(jnp.float32).mean(axis=1)[:, :n]     # [B, n]
        idx = select_span(scores, start, end, keep)
        x = jnp.take_along_axis(x, idx[..., None], axis=1)
        positions = jnp.take_along_axis(positions, idx, axis=1)
        mask = None if mask is None else jnp.take_along_axis(mask, idx, axis=1)
        end, layer = start + keep, k
    x, cache, _ = model.run_layers(x, positions, mask=mask, cache=cache, start=layer)
    return model.logits(model.norm(x)[:, -1]), cache


def _prefill(model: Llama, tokens, mask, *, capacity: int, press, cache_dtype,
             decoding: bool = True):
    cfg = model.cfg
    b, t = tokens.shape
    cache = kvc.KVCache.create(cfg, b, capacity, cache_dtype)
    positions = kvc.padding_positions(mask)
    if getattr(press, "drops_tokens", False):
        logits, cache = _forward_dropping(model, tokens, positions, mask, cache, press)
        return DecodeState(cache=cache, logits=logits, next_pos=positions[:, -1] + 1), []
    req = press.request(t) if press is not None else kvc.PressRequest()
    logits, aux = model(tokens, positions=positions, mask=mask, cache=cache, stats=req.stats,
                        query_index=req.query_index, want_qkv=req.queries, logits="last")
    cache, plans, press_state = aux["cache"], [], None
    if press is not None:
        # the compressed cache keeps the slots the caller reserved for new tokens (with a
        # press that evicts while decoding: its budget + the slot being written)
        cache, plans, press_state = kvc.compress(cache, press, aux["stats"], positions,
                                                 cfg.kv_groups, room=capacity - t,
                                                 decoding=decoding,
                                                 inv_freq=rope_inv_freq(cfg))
    return DecodeState(cache=cache, logits=logits, next_pos=positions[:, -1] + 1,
                       press_state=press_state), plans


def _decode(model: Llama, state: DecodeState, key, temperature, top_p, stop_ids, *,
            max_new_tokens: int, top_k: int, greedy: bool, use_top_p: bool, pad_id: int,
            press=None):
    b = state.logits.shape[0]
    evicting = kvc.decode_budget(press) is not None
    step_stats = tuple(press.decode_stats) if evicting else ()
    pick = partial(sample_logits, temperature=temperature, top_p=top_p, top_k=top_k,
                   greedy=greedy, use_top_p=use_top_p)

    def choose(logits, step, done):
        tok = pick(logits, None if greedy else jax.random.fold_in(key, step))
        tok = jnp.where(done, pad_id, tok)
        stop = (tok[:, None] == stop_ids[None, :]).any(-1) & ~done
        return tok, stop

    done0 = jnp.zeros((b,), bool)
    tok0, stop0 = choose(state.logits, 0, done0)
    out0 = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok0)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, pos, prev, done, out, pstate = carry
        logits, aux = model(prev[:, None], positions=pos[:, None], cache=cache, logits="last",
                            stats=step_stats)
        cache = aux["cache"]
        if evicting:
            cache, pstate = kvc.decode_evict(cache, press, aux["stats"], pstate,
                                             model.cfg.kv_groups)
        tok, stop = choose(logits, step, done)
        num_done = done | stop
        return step + 1, cache, pos + 1, tok, num_done, out.at[:, step].set(tok), pstate

    carry = (jnp.asarray(1, jnp.int32), state.cache, state.next_pos, tok0, stop0, out0,
             state.press_state)
    _, _, _, _, done, out, _ = jax.lax.while_loop(cond, body, carry)
    num = jnp.minimum(_first_stop(out, stop_ids)[:, 0] + 1, max_new_tokens)
    return GenerationOutput(tokens=out, num_tokens=num.astype(jnp.int32), finished=done)


def _first_stop(out, stop_ids):
    """[B, 1] index of the first stop token in each row (N when none)."""
    n = out.shape[1]
    is_stop = (out[..., None] == stop_ids[None, None, :]).any(-1)
    return jnp.where(is_stop, jnp.arange(n)[None], n).min(axis=1, keepdims=True)


@partial(jax.jit, static_argnames=("graphdef", "capacity", "press", "cache_dtype", "rules"))
def _prefill_jit(graphdef, params, tokens, mask, *, capacity, press, cache_dtype, rules):
    TRACES["prefill"] += 1
    return _prefill(nnx.merge(graphdef, params), tokens, mask, capacity=capacity, press=press,
                    cache_dtype=cache_dtype)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "greedy",
                                   "use_top_p", "pad_id", "rules", "press"))
def _decode_jit(graphdef, params, state, key, temperature, top_p, stop_ids, *, max_new_tokens,
                top_k, greedy, use_top_p, pad_id, rules, press):
    TRACES["decode"] += 1
    return _decode(nnx.merge(graphdef, params), state, key, temperature, top_p, stop_ids,
                   max_new_tokens=max_new_tokens, top_k=top_k, greedy=greedy,
                   use_top_p=use_top_p, pad_id=pad_id, press=press)


@partial(jax.jit, static_argnames=("graphdef", "capacity", "press", "cache_dtype",
                                   "max_new_tokens", "top_k", "greedy", "use_top_p", "pad_id",
                                   "rules"))
def _generate_jit(graphdef, params, tokens, mask, key, temperature, top_p, stop_ids, *,
                  capacity, press, cache_dtype, max_new_tokens, top_k, greedy, use_top_p,
                  pad_id, rules):
    TRACES["generate"] += 1
    model = nnx.merge(graphdef, params)
    state, plans = _prefill(model, tokens, mask, capacity=capacity, press=press,
                            cache_dtype=cache_dtype)
    out = _decode(model, state, key, temperature, top_p, stop_ids,
                  max_new_tokens=max_new_tokens, top_k=top_k, greedy=greedy,
                  use_top_p=use_top_p, pad_id=pad_id, press=press)
    return out.replace(plans=plans)


@partial(jax.jit, static_argnames=("graphdef", "rules"), donate_argnames=("cache",))
def _chunk_jit(graphdef, params, cache, tokens, mask, positions, *, rules):
    TRACES["prefill_chunk"] += 1
    logits, aux = nnx.merge(graphdef, params)(tokens, positions=positions, mask=mask,
                                              cache=cache, logits="last")
    return aux["cache"], logits


def _run(fn, args, kwargs, timings, name):
    """fn(*args, **kwargs); with a timings dict, compiled ahead of time first so that the
    compile and run seconds are recorded apart (timings[name + "_compile_s"], [name + "_s"])."""
    if timings is None:
        return fn(*args, **kwargs)
    t0 = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    t1 = time.perf_counter()
    dynamic = [a for a in args if not isinstance(a, nnx.graph.GraphDef)]
    out = jax.block_until_ready(compiled(*dynamic))
    timings[name + "_compile_s"] = timings.get(name + "_compile_s", 0.0) + t1 - t0
    timings[name + "_s"] = timings.get(name + "_s", 0.0) + time.perf_counter() - t1
    return out


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def _prompts(prompts, mask, pad_id, pad_multiple, prompt_length):
    if mask is not None:
        tokens = np.asarray(prompts, np.int32)
        mask = np.asarray(mask, bool)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"tokens {tokens.shape} and mask {mask.shape} must both be "
                             "[batch, length]")
        if not mask[:, -1].all():
            raise ValueError("prompts must be left-padded: mask[:, -1] must be True for "
                             "every example")
        return tokens, mask
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        prompts = np.asarray(prompts).tolist()
    elif prompts and isinstance(prompts[0], numbers.Integral):
        prompts = [prompts]
    return kvc.pad_prompts(prompts, pad_id=pad_id, length=prompt_length, multiple=pad_multiple)


def _settings(model, sampling, stop_tokens, pad_id, key):
    sampling = Sampling() if sampling is None else sampling
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling; got {type(sampling).__name__}")
    vocab = model.cfg.vocab_size
    sampling.check_vocab(vocab)
    stops = tuple(int(s) for s in stop_tokens)
    for s in stops + (pad_id,):
        if not 0 <= s < vocab:
            raise ValueError(f"token id {s} (stop token or pad_id) is outside the vocabulary "
                             f"[0, {vocab})")
    if key is None:
        if not sampling.greedy:
            raise ValueError("sampling with temperature > 0 needs key=jax.random.key(...)")
        key = jax.random.key(0)
    stop_ids = jnp.asarray(stops if stops else (-1,), jnp.int32)
    dyn = (key, jnp.float32(max(sampling.temperature, 1e-6)), jnp.float32(sampling.top_p),
           stop_ids)
    static = dict(top_k=int(sampling.top_k), greedy=sampling.greedy,
                  use_top_p=sampling.top_p < 1.0, pad_id=int(pad_id), rules=shd.current_rules())
    return dyn, static


def prefill(model: Llama, prompts, *, mask=None, capacity: int, max_new_tokens: int = 1,
            pad_id: int = 0, pad_multiple: int = 64, prompt_length: int | None = None,
            press: kvc.Press | None = None, cache_dtype=None, chunk_size: int | None = None,
            progress: Callable[[int, int], None] | None = None, timings: dict | None = None):
    """Jitted prefill of a prompt batch: (DecodeState, tokens [B, L], mask [B, L], plans).

    `prompts` is a list of token-id lists (left-padded here to a multiple of `pad_multiple`,
    or to `prompt_length`), or a [B, L] array with its `mask` (left-padded already).
    With `chunk_size`, the prompt goes through the model in chunks of that many tokens (one
    compiled program; L is rounded up to a multiple of it) and `progress(done, total)` is
    called after each chunk; a press needs the whole prompt at once (no chunks). With a
    `timings` dict, compile and run seconds are recorded in it ("prefill_compile_s",
    "prefill_s").
    """
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive int")
        if press is not None:
            raise ValueError("a press needs the whole prompt's attention: use chunk_size=None")
        pad_multiple = chunk_size
    tokens, mask = _prompts(prompts, mask, pad_id, pad_multiple, prompt_length)
    check_lengths(tokens.shape[1], max_new_tokens, capacity, model.cfg.max_position_embeddings)
    graphdef, params = nnx.split(model)
    dtype = jnp.dtype(cache_dtype or model.cfg.dtype).name
    if chunk_size is None or tokens.shape[1] <= chunk_size:
        state, plans = _run(_prefill_jit, (graphdef, params, jnp.asarray(tokens),
                                           jnp.asarray(mask)),
                            dict(capacity=capacity, press=press, cache_dtype=dtype,
                                 rules=shd.current_rules()),
                            timings, "prefill")
        if progress is not None:
            progress(tokens.shape[1], tokens.shape[1])
        return state, tokens, mask, plans
    if tokens.shape[1] % chunk_size:
        raise ValueError(f"with chunk_size={chunk_size} the padded prompt length "
                         f"{tokens.shape[1]} must be a multiple of it")
    cache = kvc.KVCache.create(model.cfg, tokens.shape[0], capacity, dtype)
    positions = np.asarray(kvc.padding_positions(jnp.asarray(mask)))
    compiled, total = None, tokens.shape[1]
    for start in range(0, total, chunk_size):
        sl = slice(start, start + chunk_size)
        args = (graphdef, params, cache, jnp.asarray(tokens[:, sl]), jnp.asarray(mask[:, sl]),
                jnp.asarray(positions[:, sl]))
        if timings is None:
            cache, logits = _chunk_jit(*args, rules=shd.current_rules())
        else:
            if compiled is None:
                t0 = time.perf_counter()
                compiled = _chunk_jit.lower(*args, rules=shd.current_rules()).compile()
                timings["prefill_compile_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            cache, logits = jax.block_until_ready(compiled(*args[1:]))
            timings["prefill_s"] = timings.get("prefill_s", 0.0) + time.perf_counter() - t0
        if progress is not None:
            progress(min(start + chunk_size, total), total)
    state = DecodeState(cache=cache, logits=logits,
                        next_pos=jnp.asarray(positions[:, -1] + 1, jnp.int32))
    return state, tokens, mask, []


def decode(model: Llama, state: DecodeState, *, max_new_tokens: int,
           sampling: Sampling | None = None, key: jax.Array | None = None,
           stop_tokens: Sequence[int] = (), pad_id: int = 0, press: kvc.Press | None = None,
           timings: dict | None = None) -> GenerationOutput:
    """Jitted decoding (`lax.while_loop`) from a `DecodeState`; the cache must have room for
    max_new_tokens - 1 more tokens (checked), unless `press` (the one given to `prefill`)
    evicts while decoding. `timings` as in `prefill` ("decode_compile_s", "decode_s")."""
    if (kvc.decode_budget(press) is not None) != (state.cache.free is not None):
        raise ValueError("decode(press=...) must be the press given to prefill when that "
                         "press evicts while decoding (H2O, TOVA, StreamingLLM), and only then")
    room = state.cache.capacity - int(np.max(np.asarray(state.cache.index)))
    if state.cache.free is None and max_new_tokens - 1 > room:
        raise ValueError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens - 1} free "
                         f"cache slots; the cache has {room}")
    dyn, static = _settings(model, sampling, stop_tokens, pad_id, key)
    graphdef, params = nnx.split(model)
    return _run(_decode_jit, (graphdef, params, state) + tuple(dyn),
                dict(max_new_tokens=int(max_new_tokens), press=press, **static), timings,
                "decode")


def generate(model: Llama, prompts, *, max_new_tokens: int, mask=None,
             capacity: int | None = None, sampling: Sampling | None = None,
             key: jax.Array | None = None, stop_tokens: Sequence[int] = (), pad_id: int = 0,
             pad_multiple: int = 64, prompt_length: int | None = None,
             press: kvc.Press | None = None, cache_dtype=None) -> GenerationOutput:
    """Prefill + decode under one `jax.jit` (see the module docstring).

    capacity defaults to the padded prompt length + max_new_tokens rounded up to 64. Raises
    ValueError (before tracing) when the prompt and the new tokens do not fit the cache or
    the model's context, for sampling parameters out of range, and for token ids outside the
    vocabulary.
    """
    tokens, mask = _prompts(prompts, mask, pad_id, pad_multiple, prompt_length)
    if capacity is None:
        capacity = kvc.default_capacity(tokens.shape[1] + max_new_tokens)
    check_lengths(tokens.shape[1], max_new_tokens, capacity, model.cfg.max_position_embeddings)
    dyn, static = _settings(model, sampling, stop_tokens, pad_id, key)
    graphdef, params = nnx.split(model)
    return _generate_jit(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), *dyn,
                         capacity=int(capacity), press=press,
                         cache_dtype=jnp.dtype(cache_dtype or model.cfg.dtype).name,
                         max_new_tokens=int(max_new_tokens), **static)
