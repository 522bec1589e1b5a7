"""Multi-process start-up (`jax.distributed`) and collective counting in compiled HLO.

    maybe_initialize_distributed(config)     # first thing in train.py, before any device use
    collective_counts(compiled.as_text())    # {"all-gather": 0, "all-reduce": 2, ...}
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import jax

__all__ = ["maybe_initialize_distributed", "collective_counts"]


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on")


def maybe_initialize_distributed(config: Any = None, *, initialize: Callable | None = None
                                 ) -> bool:
    """Calls `jax.distributed.initialize()` when the run is multi-process; returns whether
    the distributed runtime is (now) initialized. Call it before anything touches a device.

    Multi-process when `config.distributed` is true (a bool, or a group with
    `coordinator_address` / `num_processes` / `process_id` / `heartbeat_timeout_seconds` /
    `initialization_timeout`), or the environment sets JAX_COORDINATOR_ADDRESS (with
    JAX_NUM_PROCESSES, JAX_PROCESS_ID, optionally JAX_HEARTBEAT_TIMEOUT_SECONDS and
    JAX_INITIALIZATION_TIMEOUT) or JAX_DISTRIBUTED=1. The heartbeat timeout bounds how long the
    surviving processes wait when one dies (JAX's default: 100 s).
    On a Cloud TPU pod slice, `distributed=True` with no addresses is enough: JAX finds the
    coordinator and the process ids itself.
    """
    init = jax.distributed.initialize if initialize is None else initialize
    if initialize is None and jax.distributed.is_initialized():
        return True
    dist = getattr(config, "distributed", None) if config is not None else None
    if dist is None and isinstance(config, Mapping):
        dist = config.get("distributed")
    kwargs: dict[str, Any] = {}
    wanted = False
    if isinstance(dist, bool) or dist is None:
        wanted = bool(dist)
    elif hasattr(dist, "get") or hasattr(dist, "coordinator_address"):
        get = dist.get if hasattr(dist, "get") else (lambda k, d=None: getattr(dist, k, d))
        wanted = bool(get("enabled", True))
        for key in ("coordinator_address", "num_processes", "process_id",
                    "heartbeat_timeout_seconds", "initialization_timeout"):
            if get(key, None) is not None:
                kwargs[key] = get(key)
    else:
        raise ValueError(f"config.distributed={dist!r} must be a bool or a group with "
                         "coordinator_address / num_processes / process_id")
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or _truthy(env.get("JAX_DISTRIBUTED", "")):
        wanted = True
    if not wanted:
        return False
    kwargs.setdefault("coordinator_address", env.get("JAX_COORDINATOR_ADDRESS") or None)
    for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"),
                     ("heartbeat_timeout_seconds", "JAX_HEARTBEAT_TIMEOUT_SECONDS"),
                     ("initialization_timeout", "JAX_INITIALIZATION_TIMEOUT")):
        if key not in kwargs and env.get(var):
            try:
                kwargs[key] = int(env[var])
            except ValueError:
                raise ValueError(f"{var}={env[var]!r} must be an int") from None
    init(**{k: v for k, v in kwargs.items() if v is not None})
    return True


# ----------------------------------------------------------------------------------------------
# Inspecting compiled steps
# ----------------------------------------------------------------------------------------------

_COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter",
                "collective-permute")
_OP = re.compile(r"\s(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)"
                 r"(-start)?\(")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each collective an HLO module text (`compiled.as_text()`) has (an async
    pair `-start` / `-done` counts once)."""
    counts = {name: 0 for name in _COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m:
            counts[m.group(1)] += 1
    return counts
