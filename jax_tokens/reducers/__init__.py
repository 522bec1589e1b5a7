"""Token reducers by name: one file per method, one registry.

    from jax_tokens import reducers
    reducers.names()                                   # ('evit', 'none', 'token_learner', ...)
    red = reducers.get("tome")(r=13)                   # a frozen dataclass: config + behaviour
    red = reducers.from_config(dict(method="tome", r=13, prop_attn=True))   # the same

Every reducer subclasses `Reducer` (see `base.py` for the protocol). Register your own with the
decorator, and every model, trainer, config check, warm-up, sweep and FLOP count picks it up:

    @reducers.register
    @dataclasses.dataclass(frozen=True)
    class MyReducer(reducers.Reducer):
        method: ClassVar[str] = "mine"
        k: int = 8
        def schedule(self, layout): ...
        def reduce(self, layout, spec, x, size, stats, *, key=None, module=None): ...
"""

from __future__ import annotations

from jax_tokens.reducers.base import LayerSpec, Reducer, TokenLayout, check_layers
from jax_tokens.reducers.registry import (fields, from_config, get, names, register,
                                          upgrade_legacy)

# The built-in reducers register themselves on import (one file per method).
from jax_tokens.reducers import identity, tome, topk, evit, token_learner  # noqa: E402,F401
from jax_tokens.reducers import tofu, diffrate, ppt, atc, pitome  # noqa: E402,F401
from jax_tokens.reducers import kmedoids, dpcknn, mctf  # noqa: E402,F401
from jax_tokens.reducers import dynamicvit, cropr  # noqa: E402,F401
from jax_tokens.reducers import ats  # noqa: E402,F401
from jax_tokens.reducers import fastervlm, visionzip, divprune, prumerge  # noqa: E402,F401

__all__ = ["Reducer", "TokenLayout", "LayerSpec", "register", "get", "names", "fields",
           "from_config", "upgrade_legacy", "check_layers"]
