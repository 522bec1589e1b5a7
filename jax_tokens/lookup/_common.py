"""Helpers shared by the lookup modules: sharding metadata and static-argument validation."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jax_tokens import tokens as tok

F32 = jnp.float32
LN_EPS = 1e-6


def _static_float(name: str, value: Any) -> float:
    """A static, finite float > 0."""
    return tok.static_float(name, value, low=0.0, high=None)


def _hidden(name: str, dim: int, ratio: Any) -> int:
    """The hidden width int(dim * ratio) of an MLP, checked to be >= 1."""
    ratio = _static_float(name, ratio)
    hidden = int(dim * ratio)
    if hidden < 1:
        raise ValueError(f"{name}={ratio} is not allowed for dim={dim}: int(dim * {name}) = "
                         f"{hidden} must be >= 1")
    return hidden


def _check_channels(name: str, x: jax.Array, dim: int) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{name} has {x.shape[-1]} channels (shape {tuple(x.shape)}); the "
                         f"module was built with dim={dim}")


def _pair(name: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (height, width) of ints; got {value!r}")
    return (tok.static_int(f"{name}[0]", value[0], low=1),
            tok.static_int(f"{name}[1]", value[1], low=1))
