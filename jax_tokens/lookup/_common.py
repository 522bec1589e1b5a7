"""Helpers shared by the lookup modules: sharding metadata and static-argument validation."""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_tokens import tokens as tok

F32 = jnp.float32
LN_EPS = 1e-6


def _axes(*names):
    """NNX metadata: logical axis names (see jax_tokens.sharding), applied when sharding."""
    return {"out_sharding": names, "eager_sharding": False}


def _ln_axes():
    return dict(scale_metadata=_axes("norm"), bias_metadata=_axes("norm"))


def _lin_axes(din, dout):
    """Linear kernel / bias metadata for (input, output) logical names."""
    return dict(kernel_metadata=_axes(din, dout), bias_metadata=_axes(dout))


def _static_float(name: str, value: Any, *, positive: bool = True) -> float:
    if tok.is_traced(value) or isinstance(value, jax.Array):
        raise TypeError(f"{name} must be a static Python float known at trace time; got a "
                        f"traced/array value {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}={value} is not allowed: it must be a finite float > 0")
    return value


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
