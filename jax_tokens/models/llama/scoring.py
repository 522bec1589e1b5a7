"""Log-probabilities of a continuation given a context held in the KV cache.

    logp = continuation_logprobs(model, contexts, continuations)   # [B, T] float32
    nll = -logp.mean(axis=1)                                        # per example

The context is prefilled into a KV cache (compressed by a `press` when one is given: this is
how a press is measured, kvpress-style: the model reads the continuation through the cache
the press left), then the T continuation tokens go through the model in one call over that
cache. `logp[:, 0]` comes from the prefill's last logits (the full context), `logp[:, i]`
from the continuation's own logits at i - 1. Without a press this is the plain forward
pass's log-probabilities of the concatenated sequence (tested).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokens import sharding as shd
from jax_tokens.models.llama import cache as kvc
from jax_tokens.models.llama.generation import TRACES, _prefill, _prompts
from jax_tokens.models.llama.model import Llama

__all__ = ["continuation_logprobs", "continuation_cache"]


@partial(jax.jit, static_argnames=("graphdef", "capacity", "press", "cache_dtype", "rules"))
def _score_jit(graphdef, params, context, mask, continuation, *, capacity, press, cache_dtype,
               rules):
    del rules   # part of the cache key only (see generation.py)
    TRACES["score"] += 1
    model = nnx.merge(graphdef, params)
    # the continuation is read in one call: a press compresses the context only (no
    # eviction while the continuation is read, as kvpress measures)
    state, _ = _prefill(model, context, mask, capacity=capacity, press=press,
                        cache_dtype=cache_dtype, decoding=False)
    t = continuation.shape[1]
    positions = state.next_pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    logits, _ = model(continuation, positions=positions, cache=state.cache, logits="all")
    logits = jnp.concatenate([state.logits[:, None], logits[:, :-1]], axis=1)   # [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, continuation[..., None], axis=-1)[..., 0]


def continuation_logprobs(model: Llama, contexts, continuations, *, mask=None,
                          press: kvc.Press | None = None, pad_id: int = 0,
                          pad_multiple: int = 64, cache_dtype=None) -> jax.Array:
    """log p(continuation[b, i] | context[b], continuation[b, :i]): [B, T] float32.

    contexts: token-id lists (left-padded here to a multiple of `pad_multiple`) or a
    left-padded [B, L] array with its `mask`; continuations: [B, T] token ids (one length
    for the batch, no padding). press: compresses the context's cache before the
    continuation is read (None: the full cache). The cache holds L + T slots (rounded up
    to 64); L + T must fit the model's context.
    """
    tokens, mask = _prompts(contexts, mask, pad_id, pad_multiple, None)
    cont = np.asarray(continuations, np.int32)
    if cont.ndim != 2 or cont.shape[0] != tokens.shape[0] or cont.shape[1] < 1:
        raise ValueError(f"continuations must be [batch={tokens.shape[0]}, T >= 1] token ids; "
                         f"got shape {cont.shape}")
    vocab = model.cfg.vocab_size
    if cont.min() < 0 or cont.max() >= vocab:
        raise ValueError(f"continuation token ids must lie in [0, {vocab}); got "
                         f"[{cont.min()}, {cont.max()}]")
    capacity = kvc.default_capacity(tokens.shape[1] + cont.shape[1])
    limit = model.cfg.max_position_embeddings
    if tokens.shape[1] + cont.shape[1] > limit:
        raise ValueError(f"the context ({tokens.shape[1]} tokens, padded) plus the continuation "
                         f"({cont.shape[1]} tokens) exceed the model's context of {limit} "
                         "positions")
    graphdef, params = nnx.split(model)
    return _score_jit(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask),
                      jnp.asarray(cont), capacity=capacity, press=press,
                      cache_dtype=jnp.dtype(cache_dtype or model.cfg.dtype).name,
                      rules=shd.current_rules())


def continuation_cache(model: Llama, n_context: int, n_continuation: int, *,
                       press: kvc.Press | None = None, cache_dtype=None) -> kvc.KVCache:
    """The cache one sequence's continuation is read through (after `press`), as shapes
    (`jax.ShapeDtypeStruct`, from `jax.eval_shape`: nothing is computed); `.nbytes()` is the
    memory a sequence's cache takes."""
    capacity = kvc.default_capacity(n_context + n_continuation)
    dtype = jnp.dtype(cache_dtype or model.cfg.dtype).name
    state, _ = jax.eval_shape(
        lambda t, m: _prefill(model, t, m, capacity=capacity, press=press, cache_dtype=dtype,
                              decoding=False),
        jax.ShapeDtypeStruct((1, n_context), jnp.int32), jax.ShapeDtypeStruct((1, n_context),
                                                                              bool))
    return state.cache
