"""The registry of reducers by name (`jax_tokens.reducers` re-exports it)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jax_tokens.reducers.base import Reducer

__all__ = ["Registry", "REDUCERS", "register", "get", "names", "fields", "from_config",
           "upgrade_legacy"]

class Registry:
    """Classes by name: the reducers here, the KV-cache presses in `reducers.presses`.

    `noun` / `key` / `base` word the errors ("reducer", "reduction", the base class): a name
    not registered, a config field the class does not have, a class that is not a frozen
    dataclass subclassing `base`."""

    def __init__(self, base: type, *, noun: str, key: str, base_path: str,
                 plural: str | None = None):
        self.base, self.noun, self.key, self.base_path = base, noun, key, base_path
        self.plural = plural or noun + "s"
        self._classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: makes `cls` available by `cls.method`. Re-registering a name
        replaces it only for the same class path (module reloads); another class under a taken
        name is an error."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register() takes a subclass of {self.base_path}; got {cls!r}")
        params = cls.__dict__.get("__dataclass_params__")   # the class itself, not a base
        if params is None or not params.frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass (@dataclasses.dataclass("
                            "frozen=True)) so that it can be a static jit argument")
        name = cls.method
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{cls.__name__}.method={name!r} must be an identifier-like string")
        old = self._classes.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                      cls.__qualname__):
            raise ValueError(f"a {self.noun} named {name!r} is already registered "
                             f"({old.__module__}.{old.__qualname__})")
        self._classes[name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        """The registered method names, sorted."""
        return tuple(sorted(self._classes))

    def get(self, name: str) -> type:
        """The class registered as `name` (ValueError listing the registered names)."""
        if name not in self._classes:
            raise ValueError(f"{self.key}.method={name!r} is not one of the registered "
                             f"{self.plural} {self.names()}")
        return self._classes[name]

    def fields(self, name: str) -> tuple[str, ...]:
        """The config keys of `name`: "method" and its dataclass fields."""
        return ("method",) + tuple(f.name for f in dataclasses.fields(self.get(name)))

    def from_config(self, value: Any, default: str | None = None):
        """An instance from an instance (returned as is), None (`default`'s class with its
        defaults) or a mapping {"method": name, field: value, ...} (an ml_collections
        ConfigDict works too). Unknown fields are a ValueError listing the valid ones; lists
        become tuples (hashable, static)."""
        if isinstance(value, self.base):
            return value
        if value is None and default is not None:
            return self.get(default)()
        if not isinstance(value, Mapping) and not hasattr(value, "items"):
            raise TypeError(f"{self.key} must be a {self.base.__name__} or a dict with a "
                            f"'method'; got {type(value).__name__}")
        d = {k: _tupled(v) for k, v in dict(value.items()).items()}
        if "method" not in d:
            raise ValueError(f"{self.key} {d!r} has no 'method'; registered {self.plural}: "
                             f"{self.names()}")
        cls = self.get(d.pop("method"))
        valid = self.fields(cls.method)
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"{self.key}.{unknown[0]} is not a field of {self.noun} "
                             f"{cls.method!r}; valid fields: {', '.join(valid)}")
        return cls(**d)


def _tupled(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tupled(e) for e in v)
    return v


REDUCERS = Registry(Reducer, noun="reducer", key="reduction",
                    base_path="jax_tokens.reducers.Reducer")
register = REDUCERS.register
names = REDUCERS.names
get = REDUCERS.get
fields = REDUCERS.fields


def from_config(value: Any) -> Reducer:
    """A Reducer from a Reducer (returned as is), None (no reduction) or a mapping
    {"method": name, field: value, ...} (an ml_collections ConfigDict works too). Unknown
    fields are a ValueError listing the valid ones; lists become tuples (hashable, static)."""
    return REDUCERS.from_config(value, default="none")


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
