"""The registry of KV-cache presses by name (`jax_tokens.reducers.presses` re-exports it)."""

from __future__ import annotations

from typing import Any

from jax_tokens.reducers.presses.base import Press
from jax_tokens.reducers.registry import Registry

__all__ = ["PRESSES", "register", "get", "names", "fields", "from_config"]

PRESSES = Registry(Press, noun="press", plural="presses", key="press",
                   base_path="jax_tokens.reducers.presses.Press")
register = PRESSES.register
names = PRESSES.names
get = PRESSES.get
fields = PRESSES.fields


def from_config(value: Any) -> Press | None:
    """A press from a Press (as is), None or {"method": "none"} (no press: None), or a mapping
    {"method": name, field: value, ...}."""
    if value is None or (hasattr(value, "get") and value.get("method") in ("none", None)
                         and not isinstance(value, Press)):
        return None
    return PRESSES.from_config(value)
