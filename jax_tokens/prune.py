"""Token pruning: importance scores, top-k selection and EViT's fusion of the dropped tokens.

Scores and selection are separate functions; a method is a combination:

    scores = cls_attention(stats["cls_probs"], protected=1)     # EViT: head-mean CLS attention
    plan = topk(scores, k, protected=1, fuse=True)              # keep k, fuse the rest into one
    x = prune(plan, x)                                          # [B, 1 + k + 1, C]
    size = prune_size(plan, size)                               # sizes still sum to N
    x_full = unprune(plan, x, fill="fused")                     # back to N tokens

The first `protected` tokens (class, distillation, registers) are always kept, in front.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jax_tokens import tokens as tk
from jax_tokens.schedule import keep_count

__all__ = [
    "PrunePlan", "cls_attention", "key_mass", "l2_norm", "random_scores", "topk", "prune",
    "prune_size", "unprune", "keep_count",
]

_ORDERS = ("score", "position")


# --------------------------------------------------------------------------------------------
# Importance scores: [B, N - protected] float32, higher = more important
# --------------------------------------------------------------------------------------------

def _check_stat(name, a, rank=3):
    a = tk.as_array(name, a)
    if getattr(a, "ndim", None) != rank:
        raise ValueError(f"{name} must have rank {rank} [batch, heads, tokens]; got shape "
                         f"{getattr(a, 'shape', a)}")
    return a


def cls_attention(cls_probs: jax.Array, protected: int = 1) -> jax.Array:
    """EViT's score: the class token's attention to each token, averaged over heads.

    cls_probs: [B, H, N] the attention row of query 0 (`attention(..., stats=("cls_probs",))`).
    Returns [B, N - protected] (not renormalised after dropping the protected columns).
    """
    cls_probs = _check_stat("cls_probs", cls_probs)
    protected = tk.static_int("protected", protected, low=0, high=cls_probs.shape[-1] - 1)
    return cls_probs.astype(jnp.float32).mean(axis=1)[:, protected:]


def key_mass(mass: jax.Array, protected: int = 1) -> jax.Array:
    """Attention received per key (summed over queries), averaged over heads: [B, N - p]."""
    mass = _check_stat("key_mass", mass)
    protected = tk.static_int("protected", protected, low=0, high=mass.shape[-1] - 1)
    return mass.astype(jnp.float32).mean(axis=1)[:, protected:]


def l2_norm(x: jax.Array, protected: int = 1) -> jax.Array:
    """Token L2 norm of x [B, N, C]: [B, N - protected]."""
    x = tk.as_array("x", x)
    tk.check_tokens("x", x)
    protected = tk.static_int("protected", protected, low=0, high=x.shape[1] - 1)
    return jnp.linalg.norm(x.astype(jnp.float32), axis=-1)[:, protected:]


def random_scores(key: jax.Array, batch: int, n: int) -> jax.Array:
    """Uniform random scores [batch, n] (random pruning baseline)."""
    batch = tk.static_int("batch", batch, low=1)
    n = tk.static_int("n", n, low=1)
    return jax.random.uniform(key, (batch, n), jnp.float32)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------

@struct.dataclass
class PrunePlan:
    """Which tokens survive a top-k selection.

    Attributes:
      kept_idx: [B, k] indices into the prunable (non-protected) tokens, in output order.
      fuse_weights: [B, N - protected] weights of the dropped tokens in the fused token (zero
        at kept positions), or None without fusion.
      n_in: input token count N (protected included).
      protected: number of leading tokens always kept.
    """

    kept_idx: jax.Array
    fuse_weights: jax.Array | None = None
    n_in: int = struct.field(pytree_node=False, default=0)
    protected: int = struct.field(pytree_node=False, default=1)

    @property
    def batch(self) -> int:
        return self.kept_idx.shape[0]

    @property
    def k(self) -> int:
        return self.kept_idx.shape[1]

    @property
    def fuse(self) -> bool:
        return self.fuse_weights is not None

    @property
    def n_out(self) -> int:
        return self.protected + self.k + int(self.fuse)

    @property
    def keep_positions(self) -> jax.Array:
        """[B, protected + k] input positions of the kept tokens, in output order."""
        front = jnp.broadcast_to(jnp.arange(self.protected, dtype=jnp.int32),
                                 (self.batch, self.protected))
        return jnp.concatenate([front, self.kept_idx + self.protected], axis=1)

    @property
    def assignment(self) -> jax.Array:
        """[B, N] output slot of each input token: kept -> its slot, dropped -> the fused
        token's slot (or -1 without fusion)."""
        drop_slot = self.n_out - 1 if self.fuse else -1
        out = jnp.full((self.batch, self.n_in), drop_slot, jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(self.protected + self.k, dtype=jnp.int32),
                                 (self.batch, self.protected + self.k))
        return out.at[jnp.arange(self.batch)[:, None], self.keep_positions].set(slots)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N] map of `prune`: one-hot rows for kept tokens, the fusion weights
        as the last row when fusing (sizes do not change it; `prune_size` adds them up)."""
        del size
        kept = jax.nn.one_hot(self.keep_positions, self.n_in, dtype=jnp.float32)
        if not self.fuse:
            return kept
        w = jnp.pad(self.fuse_weights.astype(jnp.float32), ((0, 0), (self.protected, 0)))
        return jnp.concatenate([kept, w[:, None, :]], axis=1)


    def apply(self, x: jax.Array) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: `prune` (== `matrix() @ x`)."""
        return prune(self, x)

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: kept tokens back at their positions, dropped ones as the
        fused token (fusion) or zeros; `unprune` offers other fills."""
        return tk.invert_by_assignment(y, self.assignment)


def topk(scores: jax.Array, k: int, *, protected: int = 1, order: str = "score",
         fuse: bool = False, fuse_weights: jax.Array | None = None) -> PrunePlan:
    """Keeps the k highest-scoring prunable tokens.

    Args:
      scores: [B, N - protected] importance of each prunable token.
      k: tokens to keep, static int in [1, N - protected].
      protected: leading tokens always kept (class, distillation, registers).
      order: "score" keeps tokens in descending score order (EViT); "position" keeps their
        input order (FasterVLM, VisionZip).
      fuse: also emit one token that is the sum of the dropped tokens weighted by
        `fuse_weights` (default: `scores`, i.e. EViT's CLS attention, not renormalised).
    """
    scores = tk.as_array("scores", scores)
    if fuse_weights is not None:
        fuse_weights = tk.as_array("fuse_weights", fuse_weights)
    if getattr(scores, "ndim", None) != 2:
        raise ValueError(f"scores must have rank 2 [batch, prunable tokens]; got shape "
                         f"{getattr(scores, 'shape', scores)}")
    n = scores.shape[1]
    k = tk.static_int("k", k, low=1, high=n)
    protected = tk.static_int("protected", protected, low=0)
    if order not in _ORDERS:
        raise ValueError(f"order={order!r} is not one of {_ORDERS}")
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores.astype(jnp.float32)), k)
    if order == "position":
        idx = jnp.sort(idx, axis=1)
    idx = idx.astype(jnp.int32)
    weights = None
    if fuse:
        base = scores if fuse_weights is None else fuse_weights
        if base.shape != scores.shape:
            raise ValueError(f"fuse_weights must have shape {scores.shape}; got {base.shape}")
        dropped = jnp.ones(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None],
                                                  idx].set(False)
        weights = jnp.where(dropped, base, 0.0).astype(jnp.float32)
    return PrunePlan(kept_idx=idx, fuse_weights=weights, n_in=n + protected, protected=protected)


# --------------------------------------------------------------------------------------------
# Applying plans
# --------------------------------------------------------------------------------------------

def _check_x(plan: PrunePlan, x, name="x"):
    x = tk.as_array(name, x)
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(f"{name} must have shape [batch, tokens, ...]; got {getattr(x, 'shape', x)}")
    tk.check_tokens(name, x, rank=x.ndim, n=plan.n_in, batch=plan.batch)
    return x


def _fused(plan: PrunePlan, x: jax.Array) -> jax.Array:
    """The weighted sum of dropped tokens [B, 1, ...] (one matmul over the token axis)."""
    rest = x[:, plan.protected:]
    fused = jnp.einsum("bn,bn...->b...", plan.fuse_weights, rest.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return fused[:, None].astype(x.dtype)


def prune(plan: PrunePlan, x: jax.Array) -> jax.Array:
    """[B, N, ...] -> [B, protected + k (+1), ...]: a gather, plus the fused token."""
    x = _check_x(plan, x)
    kept = tk.gather_tokens(x, plan.keep_positions)
    if not plan.fuse:
        return kept
    return jnp.concatenate([kept, _fused(plan, x)], axis=1)


def prune_size(plan: PrunePlan, size: jax.Array | None) -> jax.Array | None:
    """Sizes [B, N, 1] after pruning; the fused token's size is the sum of the dropped sizes,
    so sizes keep summing to N when fusing."""
    if size is None:
        return None
    size = _check_x(plan, size, "size")
    kept = tk.gather_tokens(size, plan.keep_positions)
    if not plan.fuse:
        return kept
    dropped = jnp.ones(plan.fuse_weights.shape, bool).at[
        jnp.arange(plan.batch)[:, None], plan.kept_idx].set(False)
    fused = jnp.sum(jnp.where(dropped[..., None], size[:, plan.protected:], 0.0), axis=1)
    return jnp.concatenate([kept, fused[:, None]], axis=1)


def unprune(plan: PrunePlan, y: jax.Array, fill="zeros") -> jax.Array:
    """Puts kept tokens back at their input positions: [B, M, C] -> [B, N, C].

    Dropped tokens get `fill`: "zeros", "fused" (the fused token's value; requires fusion), a
    scalar, or a [B, C] array.
    """
    y = tk.as_array("y", y)
    if getattr(y, "ndim", 0) < 2 or y.shape[:2] != (plan.batch, plan.n_out):
        raise ValueError(f"y must have shape [{plan.batch}, {plan.n_out}, ...] (the plan's "
                         f"output); got {getattr(y, 'shape', y)}")
    if isinstance(fill, str):
        if fill == "fused":
            if not plan.fuse:
                raise ValueError("fill='fused' needs a plan built with fuse=True")
            return tk.invert_by_assignment(y, plan.assignment)
        if fill != "zeros":
            raise ValueError(f"fill={fill!r} is not one of 'zeros', 'fused', a number or an array")
        fill = 0.0
    assignment = plan.assignment
    if plan.fuse:
        assignment = jnp.where(assignment == plan.n_out - 1, -1, assignment)
    return tk.invert_by_assignment(y, assignment, fill)
