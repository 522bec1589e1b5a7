"""Merging by group assignment: the plan of every clustering reducer (ATC, K-Medoids, DPC-KNN,
DiffRate, ...).

A clustering gives each input token a group id in [0, M) (or -1: dropped); the M groups are the
output tokens. `GroupPlan` holds that assignment plus optional per-token merge weights, and the
operations are plain functions of it:

    plan = GroupPlan(assignment=labels, n_groups=M)     # labels [B, N] int32
    x, size = merge_groups(plan, x, size)               # size-weighted mean, sizes summed
    plan.apply(x) / plan.invert(y) / plan.matrix(size)  # the `tokens.Plan` protocol

The sums are a one-hot matmul ([B, M, N] x [B, N, C]); it maps onto the MXU / tensor cores and
is the oracle `matrix()` describes exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jax_tokens import tokens as tk

__all__ = ["GroupPlan", "merge_groups", "group_sum"]


@struct.dataclass
class GroupPlan:
    """N input tokens -> M groups.

    Attributes:
      groups: [B, N] int32 output slot of each input token (-1: dropped).
      weights: optional [B, N] float32 merge weights of each token (on top of the sizes):
        `merge_groups` averages with size * weight, and the merged size is still the sum of the
        sizes. None: weight 1.
      n_out: the number of groups M (static).
    """

    groups: jax.Array
    weights: jax.Array | None = None
    n_out: int = struct.field(pytree_node=False, default=0)

    @property
    def batch(self) -> int:
        return self.groups.shape[0]

    @property
    def n_in(self) -> int:
        return self.groups.shape[1]

    @property
    def assignment(self) -> jax.Array:
        return self.groups

    def _weights(self, size: jax.Array | None) -> jax.Array:
        w = jnp.ones(self.groups.shape, jnp.float32) if self.weights is None \
            else self.weights.astype(jnp.float32)
        if size is not None:
            w = w * size[..., 0].astype(jnp.float32)
        return w

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N] map of `merge_groups`: each row averages its group, weighted by
        size * weight (by the plan's weights alone when size is None)."""
        w = tk.assignment_matrix(self.groups, self.n_out) * self._weights(size)[:, None, :]
        return w / jnp.maximum(w.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)

    def apply(self, x: jax.Array, size: jax.Array | None = None) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: `matrix(size) @ x`."""
        return merge_groups(self, x, size)[0]

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: every input token gets its group's value (0 if dropped)."""
        return tk.invert_by_assignment(y, self.groups)


def group_sum(plan: GroupPlan, x: jax.Array) -> jax.Array:
    """[B, N, ...] -> [B, M, ...] sum of each group's members (dropped tokens ignored), in fp32."""
    x = tk.as_array("x", x)
    if x.ndim < 2 or x.shape[:2] != plan.groups.shape:
        raise ValueError(f"x must have shape [{plan.batch}, {plan.n_in}, ...] (the plan's "
                         f"input); got {x.shape}")
    onehot = tk.assignment_matrix(plan.groups, plan.n_out)          # [B, M, N]
    flat = x.reshape(x.shape[:2] + (-1,)).astype(jnp.float32)
    out = jnp.einsum("bmn,bnc->bmc", onehot, flat, precision=jax.lax.Precision.HIGHEST)
    return out.reshape((x.shape[0], plan.n_out) + x.shape[2:])


def merge_groups(plan: GroupPlan, x: jax.Array,
                 size: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Weighted mean of each group. x [B, N, C], size [B, N, 1] (ones when None) ->
    (x [B, M, C] in x's dtype, size [B, M, 1] fp32: the sum of the members' sizes).

    The mean weights are size * plan.weights; an empty group (or one whose weights sum to zero)
    comes out as zeros, not NaN.
    """
    x = tk.as_array("x", x)
    if size is None:
        size = tk.init_size(x)
    size = tk.as_array("size", size).astype(jnp.float32)
    w = plan._weights(size)[..., None]                              # [B, N, 1]
    c = x.shape[-1]
    both = group_sum(plan, jnp.concatenate([x.astype(jnp.float32) * w, w, size], axis=-1))
    total_w, new_size = both[..., c:c + 1], both[..., c + 1:]
    safe = jnp.where(total_w != 0, total_w, 1.0)
    return (both[..., :c] / safe).astype(x.dtype), new_size
