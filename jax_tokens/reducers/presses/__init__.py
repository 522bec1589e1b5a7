"""KV-cache presses by name: one file per method, one registry (`registry.PRESSES`).

    from jax_tokens.reducers import presses
    presses.names()        # ('h2o', 'knorm', 'pyramidkv', 'random_kv', 'snapkv', ...)
    press = presses.get("snapkv")(window=32, capacity=512)
    press = presses.from_config(dict(method="snapkv", window=32, capacity=512))
    out = llama.generate(model, prompts, max_new_tokens=64, press=press)

A press compresses each layer's KV cache after the prefill (see `base.py` for the protocol:
`request(n_prompt)` names the prefill statistics it needs, `plan(PressInputs)` returns the
slots each KV head keeps). Budgets are Python ints (or ratios made ints from the prompt's
static length), so every press compiles once per (press, padded prompt length).
"""

from __future__ import annotations

from jax_tokens.reducers.presses.base import KVPlan, Press, PressInputs, PressRequest
from jax_tokens.reducers.presses.registry import PRESSES, fields, from_config, get, names, register

# The built-in presses register themselves on import (one file per method).
from jax_tokens.reducers.presses import snapkv, pyramidkv, h2o, tova  # noqa: E402,F401
from jax_tokens.reducers.presses import streaming_llm, knorm, random_kv  # noqa: E402,F401
from jax_tokens.reducers.presses import expected_attention, token_drop  # noqa: E402,F401

__all__ = ["Press", "PressRequest", "PressInputs", "KVPlan", "PRESSES", "register", "get",
           "names", "fields", "from_config"]
