"""Token bookkeeping shared by every reducer: budgets, sizes, sources and the dense view.

Every fixed-budget reduction in jax_tokens returns a *plan*: a small pytree that says how M
output tokens are formed from N input tokens. All plans expose

  * ``n_in`` / ``n_out``        static token counts;
  * ``assignment``              [B, N] int32: the output slot each input token goes to, or -1
                                when the token is dropped (pruning without fusion);
  * ``matrix(size=None)``       the dense [B, M, N] linear map ``y = W x`` of the plan's default
                                reduction (the contract tests compare the fast paths against);
  * ``apply(x)`` / ``invert(y)``  the reduction of any per-token array, and back to N tokens
                                (the `Plan` protocol below).

Because every input token lands in at most one output slot, the *inverse* of any plan (unmerge,
unprune) is one gather: ``y[assignment]``, zero where the token was dropped. This module holds
the helpers that work on assignments, plus the static-budget validation every public function
uses.
"""

from __future__ import annotations

import numbers
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


# --------------------------------------------------------------------------------------------
# Validation (trace-time errors naming the argument, its value and what is allowed)
# --------------------------------------------------------------------------------------------

def is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def static_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """Checks that a budget is a static Python int in [low, high] and returns it as int."""
    if is_traced(value) or isinstance(value, jax.Array):
        raise TypeError(
            f"{name} must be a static Python int known at trace time; got a traced/array value "
            f"{value!r}. Budgets fix output shapes: pass it as a Python int (mark it static with "
            "jax.jit(..., static_argnames=...)).")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {value!r} of type {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name}={value} is not allowed: it must be >= {low}"
                         + (f" and <= {high}" if high is not None else ""))
    if high is not None and value > high:
        raise ValueError(f"{name}={value} is not allowed: it must be <= {high}"
                         + (f" and >= {low}" if low is not None else ""))
    return value


def static_float(name: str, value: Any, *, low: float, high: float | None,
                 low_open: bool = True) -> float:
    """Checks a static float such as a keep rate in (low, high] (high=None: any finite value
    above low)."""
    if is_traced(value) or isinstance(value, jax.Array):
        raise TypeError(f"{name} must be a static Python float known at trace time; got a "
                        f"traced/array value {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; got {value!r} of type {type(value).__name__}")
    value = float(value)
    above = value > low if low_open else value >= low
    if high is None:
        if not (above and np.isfinite(value)):
            raise ValueError(f"{name}={value} is not allowed: it must be a finite float "
                             f"{'>' if low_open else '>='} {low:g}")
        return value
    if not (above and value <= high) or not np.isfinite(value):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value} is not allowed: it must be in {bracket}{low}, {high}]")
    return value


def as_array(name: str, x: Any) -> jax.Array:
    """`x` as a jax array: NumPy arrays, scalars and nested lists of numbers are converted (as
    `jax.numpy` converts them); anything else is a TypeError naming the argument."""
    if isinstance(x, jax.Array) or is_traced(x):
        return x
    try:
        a = jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array (a jax or NumPy array, or nested lists of "
                        f"numbers); got {type(x).__name__}: {e}") from None
    if not (jnp.issubdtype(a.dtype, jnp.number) or a.dtype == jnp.bool_):
        raise TypeError(f"{name} must hold numbers; got dtype {a.dtype}")
    return a


def check_tokens(name: str, x: Any, *, rank: int = 3, n: int | None = None,
                 batch: int | None = None) -> None:
    """Checks a token array's rank, token count and batch size."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name} must be an array; got {type(x).__name__}")
    if len(shape) != rank:
        want = "[batch, tokens, channels]" if rank == 3 else f"rank {rank}"
        raise ValueError(f"{name} must have rank {rank} {want}; got shape {tuple(shape)}")
    if n is not None and shape[1] != n:
        raise ValueError(f"{name} has {shape[1]} tokens (shape {tuple(shape)}); the plan expects "
                         f"{n}")
    if batch is not None and shape[0] != batch:
        raise ValueError(f"{name} has batch size {shape[0]} (shape {tuple(shape)}); the plan was "
                         f"built for batch size {batch}")


# --------------------------------------------------------------------------------------------
# The plan protocol
# --------------------------------------------------------------------------------------------

@runtime_checkable
class Plan(Protocol):
    """What every plan provides (`MergePlan`, `PrunePlan`, `LookupPlan`, a user reducer's):

    n_in / n_out: static token counts; assignment: [B, N] int32 output slot of each input token
    (-1: dropped); matrix(size=None): the dense [B, M, N] map; apply(x): the reduction applied
    to any per-token array [B, N, ...]; invert(y): [B, M, ...] back to [B, N, ...].
    """

    @property
    def n_in(self) -> int: ...

    @property
    def n_out(self) -> int: ...

    @property
    def assignment(self) -> jax.Array: ...

    def matrix(self, size: jax.Array | None = None) -> jax.Array: ...

    def apply(self, x: jax.Array) -> jax.Array: ...

    def invert(self, y: jax.Array) -> jax.Array: ...


# --------------------------------------------------------------------------------------------
# Assignments: the one representation every plan can produce
# --------------------------------------------------------------------------------------------

def assignment_matrix(assignment: jax.Array, n_out: int, dtype=jnp.float32) -> jax.Array:
    """One-hot [B, M, N]: entry (m, n) is 1 when input token n goes to output slot m."""
    return jax.nn.one_hot(as_array("assignment", assignment), n_out, dtype=dtype, axis=1)


def reduce_by_assignment(x: jax.Array, assignment: jax.Array, n_out: int, mode: str = "sum",
                         weights: jax.Array | None = None) -> jax.Array:
    """Dense-view reduction: [B, N, C] -> [B, M, C] grouping tokens by their output slot.

    mode "sum" adds the members of each slot, "mean" averages them (weighted by `weights`
    [B, N] when given), "amax" takes their elementwise max. Tokens with slot -1 are ignored.
    This is the oracle the specialised plan implementations are tested against.
    """
    x = as_array("x", x)
    w = assignment_matrix(assignment, n_out, jnp.float32)  # [B, M, N]
    if mode == "amax":
        masked = jnp.where(w[..., None] > 0, x[:, None, :, :], -jnp.inf)
        return masked.max(axis=2).astype(x.dtype)
    if weights is not None:
        w = w * weights[:, None, :].astype(jnp.float32)
    if mode == "mean":
        w = w / jnp.maximum(w.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    elif mode != "sum":
        raise ValueError(f"mode={mode!r} is not one of 'sum', 'mean', 'amax'")
    return jnp.einsum("bmn,bnc->bmc", w, x.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, ...] gathered along tokens by idx [B, K] -> [B, K, ...]."""
    x, idx = as_array("x", x), as_array("idx", idx)
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def invert_by_assignment(y: jax.Array, assignment: jax.Array, fill: Any = 0.0) -> jax.Array:
    """Puts output tokens back at input positions: out[b, n] = y[b, assignment[b, n]].

    Input tokens that were dropped (slot -1) get `fill` (a scalar or a [B, C] array).
    """
    y, assignment = as_array("y", y), as_array("assignment", assignment)
    safe = jnp.maximum(assignment, 0)
    out = gather_tokens(y, safe)
    dropped = (assignment < 0).reshape(assignment.shape + (1,) * (y.ndim - 2))
    fill = jnp.asarray(fill, y.dtype)
    if fill.ndim == y.ndim - 1:  # [B, C] per-example fill
        fill = fill[:, None]
    return jnp.where(dropped, fill, out)


# --------------------------------------------------------------------------------------------
# Sizes and sources
# --------------------------------------------------------------------------------------------

@struct.dataclass
class WeightedGroupPlan:
    """N input tokens -> M slots, each the weighted sum of its members: token n goes to slot
    groups[n] (-1: dropped) with weight weights[n]. The plan of reducers that pool groups
    (DPC-KNN's clusters, VisionZip's contextual tokens).

    Attributes:
      groups: [B, N] int32 output slot of each input token.
      weights: [B, N] float32 its weight in that slot.
    `matrix(size)` does not depend on sizes; `group_size` sums the members' sizes; `invert`
    gives every token its slot's value (dropped ones 0).
    """

    groups: jax.Array
    weights: jax.Array
    n_out: int = struct.field(pytree_node=False, default=0)

    @property
    def n_in(self) -> int:
        return self.groups.shape[-1]

    @property
    def assignment(self) -> jax.Array:
        return self.groups

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N]: W[m, n] = weights[n] where token n goes to slot m."""
        del size
        return assignment_matrix(self.groups, self.n_out) * self.weights[..., None, :]

    def apply(self, x: jax.Array) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: `matrix() @ x` (fp32 sums, x's dtype out)."""
        x = as_array("x", x)
        check_tokens("x", x, rank=x.ndim, n=self.n_in)
        flat = x.reshape(x.shape[:2] + (-1,))
        out = reduce_by_assignment(flat, self.groups, self.n_out, "sum", self.weights)
        return out.reshape((x.shape[0], self.n_out) + x.shape[2:])

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: every token gets its slot's value."""
        return invert_by_assignment(y, self.groups)

    def group_size(self, size: jax.Array) -> jax.Array:
        """[B, N, 1] sizes -> [B, M, 1]: the sum over each slot's members (fp32)."""
        return reduce_by_assignment(as_array("size", size).astype(jnp.float32), self.groups,
                                    self.n_out, "sum")


def init_size(x: jax.Array) -> jax.Array:
    """Every input token stands for one patch: ones [B, N, 1] in float32."""
    return jnp.ones(as_array("x", x).shape[:2] + (1,), jnp.float32)


def init_source_index(batch: int, n: int) -> jax.Array:
    """The cheap source map at the input: patch i is in token i. [B, N0] int32."""
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))


def update_source_index(source_index: jax.Array, assignment: jax.Array) -> jax.Array:
    """Composes the source map [B, N0] (patch -> current token) with a plan's assignment.

    A patch whose token was dropped stays -1 from then on.
    """
    source_index = as_array("source_index", source_index)
    assignment = as_array("assignment", assignment)
    safe = jnp.maximum(source_index, 0)
    new = jnp.take_along_axis(assignment, safe, axis=1)
    return jnp.where(source_index < 0, -1, new).astype(jnp.int32)


def source_matrix(source_index: jax.Array, n_tokens: int) -> jax.Array:
    """The dense source [B, M, N0] (ToMe's `source`): 1 where patch n0 is inside token m."""
    return assignment_matrix(source_index, n_tokens, jnp.float32)
