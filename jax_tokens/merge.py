"""Token merging by bipartite soft matching (ToMe, Bolya et al. 2023) with plans as data.

The reference (facebookresearch/ToMe, `tome/merge.py`) returns closures. Here a matching returns
a `MergePlan`, a pytree of index arrays, and the operations are plain functions of the plan:

    plan = bipartite_soft_matching(metric, r, class_token=True)
    x, size = merge_wavg(plan, x, size)       # size-weighted average of each merged group
    source = merge_source(plan, source)       # which input patches each token covers
    x_full = unmerge(plan, x)                 # back to the input layout (dense prediction)

A matching splits the tokens into two sets A and B, picks r edges A -> B and merges each chosen
A token into its most similar B token. The output is `[unmerged A tokens, all B tokens]` (with
the class and distillation tokens kept in front when present). Shapes depend only on static
ints, so everything works under `jit`, `vmap`, `grad` and `scan`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_tokens import tokens as tk
from jax_tokens.schedule import parse_r

__all__ = [
    "MergePlan", "bipartite_soft_matching", "kth_bipartite_soft_matching",
    "random_bipartite_soft_matching", "merge", "merge_wavg", "merge_source", "unmerge",
    "parse_r", "identity_plan",
]

_MODES = ("mean", "sum", "amax")


@struct.dataclass
class MergePlan:
    """How a bipartite matching turns N tokens into `n_out` tokens.

    Attributes:
      unm_idx: [B, Nu] indices into A of the A tokens that stay unmerged, in output order.
      src_idx: [B, r] indices into A of the A tokens that are merged away.
      dst_idx: [B, r] indices into B of the token each src token merges into.
      a_pos, b_pos: [B, Na], [B, Nb] input positions of the A and B tokens when the split is
        data dependent (split="index"); None for the static splits.
      n_in: input token count N.
      split: "alternate" (A = even, B = odd positions; ToMe), "kth" (every k-th token is in B,
        the tail past a multiple of k is dropped), or "index" (positions given by a_pos/b_pos).
      k: the period of the "kth" split.
      distill_token: interleave the output as [unm0, dst0, unm1.., dst1..] so that the class and
        distillation tokens stay at positions 0 and 1.
    """

    unm_idx: jax.Array
    src_idx: jax.Array
    dst_idx: jax.Array
    a_pos: jax.Array | None = None
    b_pos: jax.Array | None = None
    n_in: int = struct.field(pytree_node=False, default=0)
    split: str = struct.field(pytree_node=False, default="alternate")
    k: int = struct.field(pytree_node=False, default=2)
    distill_token: bool = struct.field(pytree_node=False, default=False)

    # -- static sizes -------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.unm_idx.shape[0]

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    @property
    def n_a(self) -> int:
        return self.unm_idx.shape[1] + self.src_idx.shape[1]

    @property
    def n_b(self) -> int:
        if self.split == "alternate":
            return self.n_in // 2
        if self.split == "kth":
            return self.n_in // self.k
        return self.b_pos.shape[1]

    @property
    def n_out(self) -> int:
        return self.unm_idx.shape[1] + self.n_b

    # -- the split ----------------------------------------------------------------------------
    def split_tokens(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, N, ...] -> (A [B, Na, ...], B [B, Nb, ...])."""
        if self.split == "alternate":
            return x[:, ::2], x[:, 1::2]
        if self.split == "kth":
            t = (self.n_in // self.k) * self.k
            g = x[:, :t].reshape((x.shape[0], -1, self.k) + x.shape[2:])
            a = g[:, :, : self.k - 1].reshape((x.shape[0], -1) + x.shape[2:])
            return a, g[:, :, self.k - 1]
        return tk.gather_tokens(x, self.a_pos), tk.gather_tokens(x, self.b_pos)

    def _output_slots(self) -> tuple[np.ndarray, np.ndarray]:
        """Static output slot of each unmerged-A position and of each B token."""
        nu, nb = self.unm_idx.shape[1], self.n_b
        unm_slot, dst_slot = np.arange(nu), nu + np.arange(nb)
        if self.distill_token and nu > 0 and nb > 0:
            unm_slot = np.where(unm_slot == 0, 0, unm_slot + 1)
            dst_slot = np.where(np.arange(nb) == 0, 1, dst_slot)
        return unm_slot.astype(np.int32), dst_slot.astype(np.int32)

    def _arrange(self, unm: jax.Array, dst: jax.Array) -> jax.Array:
        if self.distill_token and unm.shape[1] > 0 and dst.shape[1] > 0:
            return jnp.concatenate([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], axis=1)
        return jnp.concatenate([unm, dst], axis=1)

    # -- the plan as data ---------------------------------------------------------------------
    @property
    def assignment(self) -> jax.Array:
        """[B, N] int32 output slot of each input token (-1: dropped by the "kth" tail)."""
        unm_slot, dst_slot = self._output_slots()
        bsz = self.batch
        a_slot = jnp.zeros((bsz, self.n_a), jnp.int32)
        rows = jnp.arange(bsz)[:, None]
        a_slot = a_slot.at[rows, self.unm_idx].set(jnp.asarray(unm_slot)[None])
        a_slot = a_slot.at[rows, self.src_idx].set(jnp.asarray(dst_slot)[self.dst_idx])
        b_slot = jnp.broadcast_to(jnp.asarray(dst_slot), (bsz, self.n_b))
        if self.split == "alternate":
            out = jnp.full((bsz, self.n_in), -1, jnp.int32)
            out = out.at[:, 0::2].set(a_slot)
            return out.at[:, 1::2].set(b_slot)
        if self.split == "kth":
            groups = jnp.concatenate(
                [a_slot.reshape(bsz, -1, self.k - 1), b_slot[:, :, None]], axis=2)
            tail = jnp.full((bsz, self.n_in - groups.shape[1] * self.k), -1, jnp.int32)
            return jnp.concatenate([groups.reshape(bsz, -1), tail], axis=1)
        out = jnp.full((bsz, self.n_in), -1, jnp.int32)
        out = out.at[rows, self.a_pos].set(a_slot)
        return out.at[rows, self.b_pos].set(b_slot)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N] map of `merge_wavg` (size-weighted mean of each group)."""
        w = tk.assignment_matrix(self.assignment, self.n_out)
        if size is not None:
            w = w * size[:, None, :, 0]
        return w / jnp.maximum(w.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)

    def apply(self, x: jax.Array, size: jax.Array | None = None) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: each group's mean (size-weighted with `size` [B, N, 1]),
        i.e. `matrix(size) @ x`. Works on any per-token array (positions, a second stream)."""
        if size is None:
            return merge(self, x, "mean")
        return merge_wavg(self, x, size)[0]

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: every input token gets its group's value (`unmerge`)."""
        return unmerge(self, y)


def identity_plan(batch: int, n: int) -> MergePlan:
    """The plan that changes nothing (r = 0): every token is its own B token, in order."""
    empty = jnp.zeros((batch, 0), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    return MergePlan(unm_idx=empty, src_idx=empty, dst_idx=empty, a_pos=empty, b_pos=pos,
                     n_in=n, split="index")


def _normalise(metric: jax.Array) -> jax.Array:
    metric = metric.astype(jnp.float32)
    norm = jnp.linalg.norm(metric, axis=-1, keepdims=True)
    return metric / jnp.maximum(norm, 1e-12)


def _check_metric(metric) -> jax.Array:
    metric = tk.as_array("metric", metric)
    tk.check_tokens("metric", metric)
    return metric


def bipartite_soft_matching(metric: jax.Array, r: int, *, class_token: bool = False,
                            distill_token: bool = False) -> MergePlan:
    """ToMe's matching: alternate split, merge the r most similar A tokens into B.

    Args:
      metric: [B, N, C] similarity features (ToMe uses the head-mean attention keys); cosine
        similarity is used, so the scale does not matter.
      r: how many tokens to remove (static int >= 0). As in the reference, it is clamped to
        (N - protected) // 2, the most a bipartite split can remove.
      class_token: token 0 is never merged; unmerged tokens then keep their input order.
        Without it they come out in descending order of their best similarity (as ToMe).
      distill_token: token 1 is a distillation token: nothing merges into it and it stays at
        output position 1.

    Returns:
      A `MergePlan` with n_out = N - r'.
    """
    metric = _check_metric(metric)
    r = tk.static_int("r", r, low=0)
    bsz, t = metric.shape[:2]
    protected = int(bool(class_token)) + int(bool(distill_token))
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return identity_plan(bsz, t)
    m = jax.lax.stop_gradient(_normalise(metric))
    a, b = m[:, ::2], m[:, 1::2]
    scores = jnp.einsum("bic,bjc->bij", a, b, precision=jax.lax.Precision.HIGHEST)
    if class_token:
        scores = scores.at[:, 0, :].set(-jnp.inf)
    if distill_token:
        scores = scores.at[:, :, 0].set(-jnp.inf)
    node_max = scores.max(axis=-1)                      # [B, Na]
    node_idx = scores.argmax(axis=-1).astype(jnp.int32)  # [B, Na]
    n_a = a.shape[1]
    if class_token:
        # Only the r best edges need ranking; the rest keep their input order.
        # Only the r best edges need ranking; the rest keep their input order, which a second
        # top_k over -index (src pushed last) yields without a scatter or a full sort.
        _, src_idx = jax.lax.top_k(node_max, r)
        pos = jnp.arange(n_a, dtype=jnp.int32)
        is_src = (src_idx[:, :, None] == pos).any(axis=1)
        _, unm_idx = jax.lax.top_k(jnp.where(is_src, -n_a - 1, -pos), n_a - r)
    else:
        _, order = jax.lax.top_k(node_max, n_a)
        src_idx, unm_idx = order[:, :r], order[:, r:]
    src_idx = src_idx.astype(jnp.int32)
    dst_idx = jnp.take_along_axis(node_idx, src_idx, axis=1)
    return MergePlan(unm_idx=unm_idx.astype(jnp.int32), src_idx=src_idx, dst_idx=dst_idx,
                     n_in=t, split="alternate", distill_token=bool(distill_token))


def kth_bipartite_soft_matching(metric: jax.Array, k: int) -> MergePlan:
    """Every k-th token is a destination; each other token merges into its most similar one.

    Tokens past the last multiple of k are dropped (as in the reference). Returns a plan with
    n_out = N // k. k <= 1 changes nothing.
    """
    metric = _check_metric(metric)
    bsz, t = metric.shape[:2]
    k = tk.static_int("k", k, low=0, high=t)
    if k <= 1:
        return identity_plan(bsz, t)
    proto = MergePlan(unm_idx=jnp.zeros((bsz, 0), jnp.int32),
                      src_idx=jnp.zeros((bsz, 0), jnp.int32),
                      dst_idx=jnp.zeros((bsz, 0), jnp.int32), n_in=t, split="kth", k=k)
    a, b = proto.split_tokens(jax.lax.stop_gradient(_normalise(metric)))
    scores = jnp.einsum("bic,bjc->bij", a, b, precision=jax.lax.Precision.HIGHEST)
    dst_idx = scores.argmax(axis=-1).astype(jnp.int32)
    src_idx = jnp.broadcast_to(jnp.arange(a.shape[1], dtype=jnp.int32), dst_idx.shape)
    return proto.replace(src_idx=src_idx, dst_idx=dst_idx)


def random_bipartite_soft_matching(metric: jax.Array, r: int, *, key: jax.Array) -> MergePlan:
    """A random set of r tokens (A) merges into the most similar of the rest (B).

    The output holds the N - r B tokens in the random order of the split (as the reference).
    No token is protected. r must be in [0, N - 1].
    """
    metric = _check_metric(metric)
    bsz, t = metric.shape[:2]
    r = tk.static_int("r", r, low=0, high=t - 1)
    if r <= 0:
        return identity_plan(bsz, t)
    perm = jnp.argsort(jax.random.uniform(key, (bsz, t)), axis=1).astype(jnp.int32)
    a_pos, b_pos = perm[:, :r], perm[:, r:]
    m = jax.lax.stop_gradient(_normalise(metric))
    a, b = tk.gather_tokens(m, a_pos), tk.gather_tokens(m, b_pos)
    scores = jnp.einsum("bic,bjc->bij", a, b, precision=jax.lax.Precision.HIGHEST)
    dst_idx = scores.argmax(axis=-1).astype(jnp.int32)
    src_idx = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (bsz, r))
    return MergePlan(unm_idx=jnp.zeros((bsz, 0), jnp.int32), src_idx=src_idx, dst_idx=dst_idx,
                     a_pos=a_pos, b_pos=b_pos, n_in=t, split="index")


# --------------------------------------------------------------------------------------------
# Operations on plans
# --------------------------------------------------------------------------------------------

def _check_x(plan: MergePlan, x: jax.Array, name: str = "x") -> jax.Array:
    x = tk.as_array(name, x)
    if getattr(x, "ndim", 0) < 2:
        raise ValueError(f"{name} must have shape [batch, tokens, ...]; got {getattr(x, 'shape', x)}")
    tk.check_tokens(name, x, rank=x.ndim, n=plan.n_in, batch=plan.batch)
    return x


def merge(plan: MergePlan, x: jax.Array, mode: str = "mean") -> jax.Array:
    """Applies the plan: [B, N, C] -> [B, N - r, C].

    mode "sum" adds each src token to its destination, "mean" averages the destination with
    everything merged into it (the reference's scatter_reduce with include_self), "amax" takes
    the elementwise maximum. The scatter into B is a one-hot matmul ([B, r, Nb] x [B, r, C]),
    which maps onto the MXU/tensor cores instead of a serial scatter.
    """
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r} is not one of {_MODES}")
    x = _check_x(plan, x)
    a, b = plan.split_tokens(x)
    unm = tk.gather_tokens(a, plan.unm_idx)
    if plan.r == 0:
        return plan._arrange(unm, b)
    src = tk.gather_tokens(a, plan.src_idx)
    if mode == "amax":
        rows = jnp.arange(plan.batch)[:, None]
        dst = b.at[rows, plan.dst_idx].max(src)
        return plan._arrange(unm, dst)
    onehot = jax.nn.one_hot(plan.dst_idx, plan.n_b, dtype=jnp.float32)  # [B, r, Nb]
    added = jnp.einsum("brn,br...->bn...", onehot, src.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    dst = b.astype(jnp.float32) + added
    if mode == "mean":
        count = 1.0 + onehot.sum(axis=1)
        dst = dst / count.reshape(count.shape + (1,) * (x.ndim - 2))
    return plan._arrange(unm, dst.astype(x.dtype))


def merge_wavg(plan: MergePlan, x: jax.Array,
               size: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Size-weighted average merge. Returns (x [B, M, C], size [B, M, 1]).

    `size` [B, N, 1] counts the patches each token stands for (ones when None); the merged
    sizes are their sums, so they always add up to the input's total.
    """
    x = _check_x(plan, x)
    if size is None:
        size = tk.init_size(x)
    size = _check_x(plan, size, "size")
    size = size.astype(jnp.float32)
    # One merge for both: the size rides along as an extra channel.
    c = x.shape[-1]
    both = merge(plan, jnp.concatenate([x.astype(jnp.float32) * size, size], axis=-1), "sum")
    new_size = both[..., c:]
    # A group whose sizes sum to zero (padding tokens) averages to zero instead of NaN.
    safe = jnp.where(new_size > 0, new_size, 1.0)
    return (both[..., :c] / safe).astype(x.dtype), new_size


def merge_source(plan: MergePlan, source: jax.Array | None = None) -> jax.Array:
    """Dense source tracking: [B, N, N0] -> [B, M, N0] (identity start when None).

    Row m marks the input patches inside output token m (ToMe's `merge_source`). For a cheap
    index-map alternative see `jax_tokens.tokens.update_source_index`.
    """
    if source is None:
        source = jnp.broadcast_to(jnp.eye(plan.n_in, dtype=jnp.float32),
                                  (plan.batch, plan.n_in, plan.n_in))
    return merge(plan, source, mode="amax")


def unmerge(plan: MergePlan, x: jax.Array, *, reference_layout: bool = False) -> jax.Array:
    """Inverse layout: [B, M, C] -> [B, N, C]; every input token gets its group's value.

    Unmerged tokens come back exactly; tokens the "kth" split dropped come back as zeros. It is
    a single gather by `plan.assignment`.

    With a distillation token, `merge` interleaves its output ([unm0, dst0, unm1.., dst1..]);
    this function undoes that. The reference's `unmerge` does not: it always reads its input
    as [unmerged..., destinations...]. `reference_layout=True` reads x that way too, which
    reproduces the reference exactly (the two agree whenever distill_token is False).
    """
    x = tk.as_array("x", x)
    if getattr(x, "ndim", 0) < 2 or x.shape[1] != plan.n_out or x.shape[0] != plan.batch:
        raise ValueError(f"x must have shape [{plan.batch}, {plan.n_out}, ...] (the plan's "
                         f"output); got {getattr(x, 'shape', x)}")
    if reference_layout:
        nu = plan.unm_idx.shape[1]
        x = plan._arrange(x[:, :nu], x[:, nu:])
    return tk.invert_by_assignment(x, plan.assignment)
