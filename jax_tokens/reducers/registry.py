"""The registry of reducers by name (`jax_tokens.reducers` re-exports it)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jax_tokens.reducers.base import Reducer

__all__ = ["register", "get", "names", "fields", "from_config", "upgrade_legacy"]

_REGISTRY: dict[str, type[Reducer]] = {}


def register(cls: type[Reducer]) -> type[Reducer]:
    """Class decorator: makes `cls` available by `cls.method`. Re-registering a name replaces
    it only for the same class path (module reloads); another class under a taken name is an
    error."""
    if not (isinstance(cls, type) and issubclass(cls, Reducer)):
        raise TypeError(f"register() takes a subclass of jax_tokens.reducers.Reducer; got {cls!r}")
    params = cls.__dict__.get("__dataclass_params__")   # the class itself, not a base
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass (@dataclasses.dataclass("
                        "frozen=True)) so that it can be a static jit argument")
    name = cls.method
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}.method={name!r} must be an identifier-like string")
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                  cls.__qualname__):
        raise ValueError(f"a reducer named {name!r} is already registered "
                         f"({old.__module__}.{old.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def names() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> type[Reducer]:
    """The reducer class registered as `name` (ValueError listing the registered names)."""
    if name not in _REGISTRY:
        raise ValueError(f"reduction.method={name!r} is not one of the registered reducers "
                         f"{names()}")
    return _REGISTRY[name]


def fields(name: str) -> tuple[str, ...]:
    """The config keys of reducer `name`: "method" and its dataclass fields."""
    return ("method",) + tuple(f.name for f in dataclasses.fields(get(name)))


def _tupled(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tupled(e) for e in v)
    return v


def from_config(value: Any) -> Reducer:
    """A Reducer from a Reducer (returned as is), None (no reduction) or a mapping
    {"method": name, field: value, ...} (an ml_collections ConfigDict works too). Unknown
    fields are a ValueError listing the valid ones; lists become tuples (hashable, static)."""
    if isinstance(value, Reducer):
        return value
    if value is None:
        return get("none")()
    if not isinstance(value, Mapping) and not hasattr(value, "items"):
        raise TypeError(f"reduction must be a Reducer or a dict with a 'method'; got "
                        f"{type(value).__name__}")
    d = {k: _tupled(v) for k, v in dict(value.items()).items()}
    if "method" not in d:
        raise ValueError(f"reduction {d!r} has no 'method'; registered reducers: {names()}")
    cls = get(d.pop("method"))
    valid = fields(cls.method)
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"reduction.{unknown[0]} is not a field of reducer {cls.method!r}; "
                         f"valid fields: {', '.join(valid)}")
    return cls(**d)


_LEGACY_KEYS = frozenset({"method", "r", "prop_attn", "keep_rate", "layers", "score", "order",
                          "fuse", "num_tokens"})


def upgrade_legacy(d: Mapping[str, Any]) -> dict[str, Any]:
    """The reduction dict of a config, checkpoint or export written before the registry
    (one flat ReductionConfig with every method's fields, methods "none", "tome", "prune",
    "lookup", and the trainer's clamp_r) in the registry's form. Other dicts pass unchanged."""
    d = dict(d)
    if not _LEGACY_KEYS <= set(d) or set(d) - _LEGACY_KEYS - {"clamp_r"}:
        return d
    method = d["method"]
    if method == "tome":
        return {"method": "tome", "r": d["r"], "prop_attn": d["prop_attn"],
                "clamp_r": bool(d.get("clamp_r", False))}
    if method == "prune":
        return {"method": "topk", "keep_rate": d["keep_rate"], "layers": d["layers"],
                "score": d["score"], "order": d["order"], "fuse": d["fuse"]}
    if method == "lookup":
        return {"method": "token_learner", "layers": d["layers"],
                "num_tokens": d["num_tokens"]}
    return {"method": "none"}
