"""MCTF [`mctf`]: multi-criteria token fusion with one-step-ahead attention (Lee, Choi and Kim,
CVPR 2024; mlvlab/MCTF, `utils/mctf.py`, `models/modules/blocks.py`).

Tokens split alternately into A (even positions) and B (odd). Every A-B edge is scored by three
criteria, each with a temperature (0 switches it off):

    W_sim  = ((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)          similar tokens fuse
    W_info = (i_a * i_b) ** (1 / tau_info),  i = 1 / attn.mean(heads, queries), / max i
    W_size = (s_a * s_b) ** (1 / tau_size),  s = 1 / size, / max s
    score  = W_sim * W_info * W_size                               (uninformative, small fuse)

Step 1 merges the r1 A tokens with the best edges into their best B token. Bidirectional (the
default) with r1 = r // 2, then step 2 scores the B tokens (carrying their step-1 merges)
against the kept A tokens with the same score matrix and merges the r2 = r - r1 best into them.
Output: [kept A tokens (with step-2 merges), kept B tokens (descending step-2 score)];
one-directional: [kept A tokens, all B tokens]. Kept A tokens are in input order when a token
is protected, else in descending score order. Pooling: 0 size-weighted mean; 1 weights
attn.mean(heads, queries) * size (the authors' setting); 2 elementwise max; 3 plain mean. Sizes
add. `merge_attention` is the one-step-ahead attention: the key columns of each group are
summed, its query rows pooled like x.

In the ViT (`placement` "before", as the reference's Block_DEIT with one_step_ahead=1): at an
active block the attention probabilities of the block's input x are computed (prop. attention),
x itself is the metric and is merged, and the block's attention on the merged tokens uses the
merged probabilities (no second softmax; gradients reach q and k through them). With
one_step_ahead=2 the attention is computed afresh on the merged tokens; with 0, MCTF runs after
the MLP on the block's output with the block's attention ("after").

Protection: the reference's `num_protected` protects the first A tokens, i.e. positions 0, 2, 4,
... (field `num_protected`); by default the reducer protects the class token (position 0) and a
distillation token (position 1: nothing merges into it, it stays at output position 1).

Shapes: metric/x [B, N, C] -> [B, N - r, C]; size [B, N, 1]; probs [B, H, N, N] ->
[B, H, N - r, N - r]; plan: `MCTFPlan`. Budgets are static ints. Ties go to the lower index
(first maximum, stable descending sort), as torch's CPU max / sort.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_tokens import schedule as sched
from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["MCTFPlan", "bipartite_soft_matching", "merge", "merge_wavg", "merge_attention",
           "merge_source", "unmerge", "reference_r", "MCTF"]

POOLINGS = (0, 1, 2, 3)
_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


@struct.dataclass
class MCTFPlan:
    """A two-step bipartite merge of N tokens (step 2 only when bidirectional).

    Attributes:
      unm_idx [B, Na - r1], src_idx / dst_idx [B, r1]: step 1, positions in A (even tokens) of
        the kept and merged A tokens, and the B position each merged one goes to.
      unm_idx2 [B, Nb - r2], src_idx2 / dst_idx2 [B, r2]: step 2, positions in B of the kept
        and merged B tokens, and the slot in the kept-A list (unm_idx order) each goes to.
        One-directional: unm_idx2 = 0..Nb-1, r2 = 0.
      weights: [B, N] pooling-1 weights (attn.mean(heads, queries)), else None.
      n_in, pooling, distill_token (token 1 kept at output position 1): static.
    """

    unm_idx: jax.Array
    src_idx: jax.Array
    dst_idx: jax.Array
    unm_idx2: jax.Array
    src_idx2: jax.Array
    dst_idx2: jax.Array
    weights: jax.Array | None = None
    n_in: int = struct.field(pytree_node=False, default=0)
    pooling: int = struct.field(pytree_node=False, default=0)
    distill_token: bool = struct.field(pytree_node=False, default=False)

    @property
    def batch(self) -> int:
        return self.unm_idx.shape[0]

    @property
    def n_out(self) -> int:
        return self.unm_idx.shape[1] + self.unm_idx2.shape[1]

    def _slots(self) -> tuple[np.ndarray, np.ndarray]:
        """Static output slots of the kept A tokens and of the kept B tokens."""
        nu, nb = self.unm_idx.shape[1], self.unm_idx2.shape[1]
        a, b = np.arange(nu), nu + np.arange(nb)
        if self.distill_token and nu and nb:
            a, b = np.where(a == 0, 0, a + 1), np.where(b == nu, 1, b)
        return a.astype(np.int32), b.astype(np.int32)

    def _arrange(self, unm: jax.Array, unm2: jax.Array) -> jax.Array:
        if self.distill_token and unm.shape[1] and unm2.shape[1]:
            return jnp.concatenate([unm[:, :1], unm2[:, :1], unm[:, 1:], unm2[:, 1:]], axis=1)
        return jnp.concatenate([unm, unm2], axis=1)

    @property
    def assignment(self) -> jax.Array:
        """[B, N] int32 output slot of each input token."""
        a_slot, b_slot = (jnp.asarray(s) for s in self._slots())
        rows = jnp.arange(self.batch)[:, None]
        nb, na = self.n_in // 2, self.n_in - self.n_in // 2
        to_b = jnp.zeros((self.batch, nb), jnp.int32).at[rows, self.unm_idx2].set(b_slot[None])
        to_b = to_b.at[rows, self.src_idx2].set(a_slot[self.dst_idx2])
        to_a = jnp.zeros((self.batch, na), jnp.int32).at[rows, self.unm_idx].set(a_slot[None])
        to_a = to_a.at[rows, self.src_idx].set(jnp.take_along_axis(to_b, self.dst_idx, axis=1))
        out = jnp.zeros((self.batch, self.n_in), jnp.int32).at[:, ::2].set(to_a)
        return out.at[:, 1::2].set(to_b)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N] map of the linear poolings: each row averages its group with weights
        size (pooling 0), weights * size (1; weights alone without size), or 1 (3; and 2, whose
        max is not linear: this is its group mean)."""
        w = tk.assignment_matrix(self.assignment, self.n_out) * _weights(self, size)[:, None, :, 0]
        return w / jnp.maximum(w.sum(-1, keepdims=True), jnp.finfo(_F32).tiny)

    def apply(self, x: jax.Array, size: jax.Array | None = None) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: `matrix(size) @ x` for any per-token array (a token
        alone in its group comes back exactly)."""
        return _pool(self, x, _weights(self, size), exact=True)

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: every input token gets its group's value."""
        return unmerge(self, y)


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------

def _best(scores: jax.Array, r: int):
    """Rows' best edges, rows ranked by them (stable descending), split into (kept, merged)."""
    node_max, node_idx = scores.max(-1), scores.argmax(-1).astype(jnp.int32)
    order = jnp.argsort(-node_max, axis=-1, stable=True).astype(jnp.int32)
    return order[:, r:], order[:, :r], jnp.take_along_axis(node_idx, order[:, :r], axis=1)


def bipartite_soft_matching(metric: jax.Array, r: int, *, attn_mean: jax.Array | None = None,
                            size: jax.Array | None = None, num_protected: int = 0,
                            distill_token: bool = False, tau_sim: float = 1.0,
                            tau_info: float = 20.0, tau_size: float = 40.0,
                            bidirection: bool = True, pooling: int = 0) -> MCTFPlan:
    """MCTF's multi-criteria matching (see the module docstring).

    Args:
      metric: [B, N, C] similarity features (MCTF uses the tokens x); cosine similarity.
      r: tokens to remove (static), clamped to (N - protected) // 2.
      attn_mean: [B, N] attention each token receives averaged over heads and queries
        (`probs.mean((1, 2))`, or `key_mass.mean(1) / N`); needed for tau_info > 0 (otherwise
        W_info = 1) and pooling 1.
      size: [B, N, 1] token sizes for W_size (None: W_size = 1).
      num_protected: the first num_protected A tokens (positions 0, 2, 4, ...) never merge
        (the reference's semantics); kept A tokens then come out in input order.
      distill_token: token 1 (a B token) never merges, nothing merges into it, and it stays at
        output position 1.
      tau_sim, tau_info, tau_size: temperatures (>= 0; 0 drops the criterion).
      bidirection: two steps of r // 2 and r - r // 2 (else one step of r).
      pooling: 0-3, kept in the plan for `merge_wavg` / `merge_attention`.
    """
    metric = tk.as_array("metric", metric)
    tk.check_tokens("metric", metric)
    attn_mean = None if attn_mean is None else tk.as_array("attn_mean", attn_mean)
    size = None if size is None else tk.as_array("size", size)
    bsz, t = metric.shape[:2]
    na, nb = t - t // 2, t // 2
    r = tk.static_int("r", r, low=0)
    num_protected = tk.static_int("num_protected", num_protected, low=0, high=na)
    taus = [tk.static_float(n, v, low=0.0, high=None, low_open=False)
            for n, v in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size))]
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
    if pooling == 1 and attn_mean is None:
        raise ValueError("pooling=1 weights tokens by the attention they receive: give attn_mean")
    r = max(0, min(r, (t - num_protected - int(bool(distill_token))) // 2))
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)

    m = jax.lax.stop_gradient(metric.astype(_F32))
    m = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
    scores = jnp.ones((bsz, na, nb), _F32)
    if taus[0] > 0:   # (cos + 1) / 2 clipped at 0: rounding below -1 would give NaN powers
        cos = jnp.einsum("bic,bjc->bij", m[:, ::2], m[:, 1::2], precision=_HI)
        scores = jnp.maximum((cos + 1) / 2, 0.0) ** (1 / taus[0])
    for tau, v in ((taus[1], attn_mean), (taus[2], None if size is None else size[..., 0])):
        if tau > 0 and v is not None:
            inv = 1 / jnp.maximum(jax.lax.stop_gradient(v).astype(_F32), jnp.finfo(_F32).tiny)
            inv = inv / inv.max(axis=1, keepdims=True)
            scores = scores * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau)
    if num_protected:
        scores = scores.at[:, :num_protected].set(-jnp.inf)
    if distill_token:
        scores = scores.at[:, :, 0].set(-jnp.inf)

    unm_idx, src_idx, dst_idx = _best(scores, r1)
    if num_protected or distill_token:
        unm_idx = jnp.sort(unm_idx, axis=1)
    if bidirection:
        kept = jnp.take_along_axis(scores, unm_idx[:, :, None], axis=1)      # [B, Nu, Nb]
        unm_idx2, src_idx2, dst_idx2 = _best(jnp.swapaxes(kept, 1, 2), r2)
        if distill_token:   # token 1 (B position 0) first among the kept B tokens
            front = jnp.argsort(unm_idx2 != 0, axis=1, stable=True)
            unm_idx2 = jnp.take_along_axis(unm_idx2, front, axis=1)
    else:
        unm_idx2 = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (bsz, nb))
        src_idx2 = dst_idx2 = jnp.zeros((bsz, 0), jnp.int32)
    weights = None if pooling != 1 else jax.lax.stop_gradient(attn_mean.astype(_F32))
    return MCTFPlan(unm_idx, src_idx, dst_idx, unm_idx2, src_idx2, dst_idx2, weights,
                    n_in=t, pooling=pooling, distill_token=bool(distill_token))


# --------------------------------------------------------------------------------------------
# Operations on plans
# --------------------------------------------------------------------------------------------

def _scatter(dst: jax.Array, idx: jax.Array, src: jax.Array, mode: str) -> jax.Array:
    if mode == "amax":
        return dst.at[jnp.arange(dst.shape[0])[:, None], idx].max(src)
    onehot = jax.nn.one_hot(idx, dst.shape[1], dtype=_F32)                   # [B, r, n]
    added = jnp.einsum("brn,br...->bn...", onehot, src.astype(_F32), precision=_HI)
    return (dst.astype(_F32) + added).astype(dst.dtype)


def merge(plan: MCTFPlan, x: jax.Array, mode: str = "sum") -> jax.Array:
    """[B, N, ...] -> [B, M, ...]: each group's sum ("sum") or elementwise max ("amax"), the
    destination token included (the reference's scatter_reduce), in the two steps of the plan.
    The sums are one-hot matmuls."""
    if mode not in ("sum", "amax"):
        raise ValueError(f"mode={mode!r} is not one of 'sum', 'amax'")
    x = tk.as_array("x", x)
    if x.ndim < 2 or x.shape[:2] != (plan.batch, plan.n_in):
        raise ValueError(f"x must have shape [{plan.batch}, {plan.n_in}, ...] (the plan's "
                         f"input); got {x.shape}")
    a, b = x[:, ::2], x[:, 1::2]
    unm = tk.gather_tokens(a, plan.unm_idx)
    if plan.src_idx.shape[1]:
        b = _scatter(b, plan.dst_idx, tk.gather_tokens(a, plan.src_idx), mode)
    unm2 = tk.gather_tokens(b, plan.unm_idx2)
    if plan.src_idx2.shape[1]:
        unm = _scatter(unm, plan.dst_idx2, tk.gather_tokens(b, plan.src_idx2), mode)
    return plan._arrange(unm, unm2)


def _weights(plan: MCTFPlan, size: jax.Array | None) -> jax.Array:
    """[B, N, 1] fp32 pooling weights of each token (constant factors dropped)."""
    ones = jnp.ones((plan.batch, plan.n_in, 1), _F32)
    size = ones if size is None else jax.lax.stop_gradient(tk.as_array("size", size)).astype(_F32)
    if plan.pooling == 0:
        return size
    if plan.pooling == 1:
        return plan.weights[..., None] * (size / size.max(axis=1, keepdims=True))
    return ones


def _pool(plan: MCTFPlan, x: jax.Array, w: jax.Array, *, exact: bool = False,
          extra: jax.Array | None = None):
    """Weighted group means of x [B, N, ...] with weights w [B, N, 1]: sum(w x) / sum(w) in
    one merge (`extra` [B, N, k] is summed alongside and returned too). exact: normalise w
    per group first (two more passes), so that a token alone in its group comes out exactly."""
    bsz, n = x.shape[:2]
    if exact:
        total = unmerge(plan, merge(plan, w, "sum"))
        w = (w / jnp.where(total > 0, total, 1.0)).reshape(w.shape[:2] + (1,) * (x.ndim - 2))
        return merge(plan, x.astype(_F32) * w, "sum").astype(x.dtype)
    flat = x.reshape(bsz, n, -1).astype(_F32)
    parts = [flat * w, w] + ([] if extra is None else [extra])
    both = merge(plan, jnp.concatenate(parts, axis=-1), "sum")
    f, total = flat.shape[-1], both[..., flat.shape[-1]:flat.shape[-1] + 1]
    out = (both[..., :f] / jnp.where(total > 0, total, 1.0)).reshape(
        (bsz, plan.n_out) + x.shape[2:]).astype(x.dtype)
    return out if extra is None else (out, both[..., f + 1:])


def merge_wavg(plan: MCTFPlan, x: jax.Array,
               size: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """MCTF's `merge_wavg`: x [B, N, C] pooled as the plan's pooling says; sizes [B, N, 1]
    (ones when None) summed. Returns (x [B, M, C], size [B, M, 1] fp32)."""
    x = tk.as_array("x", x)
    size = tk.init_size(x) if size is None else tk.as_array("size", size).astype(_F32)
    size = jax.lax.stop_gradient(size)
    if plan.pooling == 2:
        return merge(plan, x, "amax"), merge(plan, size, "sum")
    return _pool(plan, x, _weights(plan, size), extra=size)     # sizes summed in the same pass


def merge_attention(plan: MCTFPlan, probs: jax.Array, size: jax.Array | None = None) -> jax.Array:
    """One-step-ahead attention: probs [B, H, N, N] (rows: queries) -> [B, H, M, M]. Each
    group's key columns are summed, then its query rows pooled as x is (size-weighted mean,
    attention-weighted, max or mean, by the plan's pooling), with the input sizes [B, N, 1]."""
    probs = tk.as_array("probs", probs).astype(_F32)
    cols = merge(plan, jnp.moveaxis(probs, 3, 1), "sum")             # [B, Mk, H, Nq]
    rows = jnp.moveaxis(cols, 3, 1)                                  # [B, Nq, Mk, H]
    if plan.pooling == 2:
        out = merge(plan, rows, "amax")
    else:
        out = _pool(plan, rows, _weights(plan, size))                # [B, Mq, Mk, H]
    return jnp.moveaxis(out, 3, 1)                                   # [B, H, Mq, Mk]


def merge_source(plan: MCTFPlan, source: jax.Array | None = None) -> jax.Array:
    """[B, N, N0] -> [B, M, N0]: which input patches each token covers (identity when None)."""
    if source is None:
        source = jnp.broadcast_to(jnp.eye(plan.n_in, dtype=_F32), (plan.batch,) + (plan.n_in,) * 2)
    return merge(plan, source, "amax")


def unmerge(plan: MCTFPlan, y: jax.Array) -> jax.Array:
    """[B, M, ...] -> [B, N, ...]: every token gets its group's value (both steps undone; the
    reference's `unmerge` ignores step 2, and agrees with this one-directionally)."""
    return tk.invert_by_assignment(tk.as_array("y", y), plan.assignment)


def reference_r(num_tokens: int, r: float, num_protected: int) -> int:
    """The r MCTF's per-layer wrapper really merges: at least 10 tokens stay, a fraction r < 1
    counts the unprotected tokens, and at most half of them merge (0 stays 0)."""
    if r <= 0:
        return 0
    if num_tokens - r < 10:
        r = num_tokens - 10
    r = min(int((num_tokens - num_protected) * r) if r < 1 else int(r),
            (num_tokens - num_protected) // 2)
    return max(0, r)


# --------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------

@register
@dataclasses.dataclass(frozen=True)
class MCTF(base.Reducer):
    """Multi-criteria token fusion.

    Fields:
      r: tokens merged per block: an int, an (r, inflection) pair or one int per block (ToMe's
        `parse_r`), or a float in [0, 1): that fraction of the unprotected tokens at each block.
      layers: the blocks where MCTF runs (None: every block; the authors evaluate 1..depth-1).
      clamp_r: clamp as MCTF's per-layer wrapper (at least 10 tokens stay, at most half of the
        unprotected tokens merge); False: an r a block cannot merge is an error naming it.
      tau_sim, tau_info, tau_size: temperatures (authors: 1, 20, 40; 0 drops a criterion).
      bidirection: two-step bipartite merging. pooling: 0-3 (authors: 1).
      one_step_ahead: 1 (authors): merge the block's input and reuse its merged attention;
        2: merge the input, recompute the attention; 0: merge after the MLP.
      prop_attn: proportional attention (log size added to the logits).
      num_protected: None protects the class / distillation tokens; an int n protects the first
        n A tokens (positions 0, 2, ..., the reference's semantics).
    """

    method: ClassVar[str] = "mctf"
    r: Any = 0
    layers: Any = None
    clamp_r: bool = False
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirection: bool = True
    one_step_ahead: int = 1
    pooling: int = 1
    prop_attn: bool = True
    num_protected: int | None = None

    def __post_init__(self):
        r = tuple(self.r) if isinstance(self.r, list) else self.r
        object.__setattr__(self, "r", r)
        if isinstance(r, float):
            if not 0.0 <= r < 1.0:
                raise ValueError(f"reduction.r={r!r} is not allowed: a float r is a fraction "
                                 "in [0, 1); give an int to merge a number of tokens")
        else:
            pair = isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float)
            try:
                sched.parse_r(len(r) if isinstance(r, tuple) and not pair else 1, r)
            except (TypeError, ValueError) as e:
                raise type(e)(f"reduction.r={self.r!r} is not allowed ({e}): give an int >= 0, "
                              "a fraction in [0, 1), an (r, inflection) pair or one int >= 0 "
                              "per block") from None
        if self.layers is not None:
            layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else None
            if layers is None or not all(isinstance(l, int) and not isinstance(l, bool)
                                         for l in layers):
                raise TypeError(f"reduction.layers={self.layers!r} must be None or block indices")
            object.__setattr__(self, "layers", layers)
        for name in ("tau_sim", "tau_info", "tau_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < np.inf:
                raise ValueError(f"reduction.{name}={v!r} is not allowed: a temperature >= 0")
            object.__setattr__(self, name, float(v))
        for name, allowed in (("pooling", POOLINGS), ("one_step_ahead", (0, 1, 2))):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or int(v) not in allowed:
                raise ValueError(f"reduction.{name}={v!r} is not one of {allowed}")
            object.__setattr__(self, name, int(v))
        for name in ("clamp_r", "bidirection", "prop_attn"):
            if getattr(self, name) not in (True, False):
                raise TypeError(f"reduction.{name}={getattr(self, name)!r} must be a bool")
            object.__setattr__(self, name, bool(getattr(self, name)))
        p = self.num_protected
        if p is not None and (isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 0):
            raise ValueError(f"reduction.num_protected={p!r} must be None or an int >= 0")
        object.__setattr__(self, "num_protected", None if p is None else int(p))

    # -- budgets ----------------------------------------------------------------------------
    def _protected(self, layout) -> tuple[int, bool]:
        """(protected A tokens, distillation token) of the matching."""
        if self.num_protected is None:
            return int(layout.class_token), bool(layout.distill_token)
        return int(self.num_protected), False

    def _per_block(self, depth: int) -> list:
        rs = [self.r] * depth if isinstance(self.r, float) else sched.parse_r(depth, self.r)
        if self.layers is not None:
            rs = [v if l in self.layers else 0 for l, v in enumerate(rs)]
        return rs

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        if self.layers is not None:
            base.check_layers(self.layers, layout)
        n_prot, distill = self._protected(layout)
        p = n_prot + int(distill)
        specs, n = [], layout.num_tokens
        for l, r in enumerate(self._per_block(layout.depth)):
            if self.clamp_r:
                r_eff = reference_r(n, r, p)
            else:
                r_eff = int((n - p) * r) if isinstance(r, float) else r
                can = max(0, (n - p) // 2)
                if r_eff > can:
                    raise ValueError(
                        f"reduction.r asks block {l} to merge r={r_eff} tokens (r={r!r}), but "
                        f"only {n} tokens enter it (at most {can} can merge: half of the "
                        f"{n - p} unprotected tokens). Lower r, or set reduction.clamp_r=True "
                        "to clamp it as MCTF does")
            specs.append(base.LayerSpec(n, n - r_eff, r_eff, active=r_eff > 0))
            n -= r_eff
        return tuple(specs)

    # -- what the block computes for it ----------------------------------------------------
    def placement(self, spec):
        return "before" if self.one_step_ahead else "after"

    def _needs_mean(self) -> bool:
        return self.tau_info > 0 or self.pooling == 1

    def stats(self, layout, spec):
        if self.one_step_ahead == 1:
            return ("probs",)
        return ("key_mass",) if self._needs_mean() else ()

    @property
    def proportional_attention(self) -> bool:
        return self.prop_attn

    def flops(self, layout, spec):
        n, c = spec.n_in, layout.embed_dim
        total = 2 * (n - n // 2) * (n // 2) * c if self.tau_sim > 0 else 0   # cosine scores
        if self.one_step_ahead:   # q, k and the logits of the input tokens ("before")
            total += 2 * n * c * 2 * c + 2 * n * n * c
        if self.one_step_ahead == 1:
            # The merged tokens' attention computes no q, k or logits (ViTConfig.flops counts
            # a full attention there); the merged probabilities are one-hot matmuls.
            m, r1 = spec.n_out, spec.budget // 2 if self.bidirection else spec.budget
            total -= 2 * m * c * 2 * c + 2 * m * m * c
            total += 2 * layout.num_heads * (n + m) * (r1 * (n // 2) + (spec.budget - r1) * m)
        return total

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        if isinstance(self.r, float):
            return self.replace(r=self.r * max(fraction, 0.0))
        rs = sched.parse_r(layout.depth, self.r)
        return self.replace(r=tuple(int(round(v * max(fraction, 0.0))) for v in rs))

    # -- the reduction ---------------------------------------------------------------------
    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        attn_mean = None
        if self._needs_mean():
            attn_mean = (stats["probs"].mean(axis=(1, 2)) if "probs" in stats
                         else stats["key_mass"].mean(axis=1) / spec.n_in)
        n_prot, distill = self._protected(layout)
        plan = bipartite_soft_matching(
            x, spec.budget, attn_mean=attn_mean, size=size, num_protected=n_prot,
            distill_token=distill, tau_sim=self.tau_sim, tau_info=self.tau_info,
            tau_size=self.tau_size, bidirection=self.bidirection, pooling=self.pooling)
        x, size = merge_wavg(plan, x, size)
        return x, size, plan

    def reduce_attention(self, layout, spec, plan, size, stats):
        if self.one_step_ahead != 1:
            return None
        return merge_attention(plan, stats["probs"], size)
