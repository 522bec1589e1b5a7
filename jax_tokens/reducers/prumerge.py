"""LLaVA-PruMerge [`prumerge`]: keep the class-token attention outliers, each merged with its
nearest neighbours by key similarity, plus one token for the rest (Shang et al., 2024,
"LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models";
42Shawn/LLaVA-PruMerge, `CLIPVisionTower.token_prune_merge_advanced`).

At one block (`OneBlockSelector`: `layers=(l,)`, `keep`, `place`), with a = the class token's
attention over the full width as one head, softmax(q_full k_full^T * C**-0.5) (the statistic
"full_cls_probs": the reference's attention on CLIP's raw q_proj / k_proj outputs) restricted to
the patch tokens (not renormalised), and the full-width keys ("full_key"):

  * Kept: the L patch tokens of largest a (`lax.top_k`: lower index first on ties), in
    descending order of a. Fixed mode: L = `keep`. Adaptive mode (`adaptive=True`): L is the
    number of IQR outliers, L = int(P * r) with r = #(a > Q3 + 1.5 IQR) / count (Python floats;
    quartiles as `np.percentile`'s linear interpolation in float32), over the whole batch
    flattened (`scope="batch"`: the reference's one ratio for the batch) or per image
    (`scope="image"`: the reference run one image at a time, as LLaVA does).
  * Each kept token i: out_i = x_i + sum_{j in NN(i)} a_j x_j over its `neighbors` (32 in the
    reference) nearest other patch tokens by cosine of the keys (F.normalize, eps 1e-12; the
    candidates ordered other kept tokens, descending, then the rest ascending, which decides
    ties). The weights are the raw attention, not renormalised; a neighbour may be another
    kept token, so one input token can feed several outputs.
  * One extra token: sum_{j not kept} a_j x_j.

Output: prefix tokens, the kept tokens in descending attention, the extra token (the reference
puts out no class token; here prefix tokens stay in front as with every reducer).

Budget: `keep` is L in fixed mode (the block puts out p + keep + 1 tokens: for an output count
equal to the other selectors' p + k, use keep = k - 1); the reference's `reduction_ratio` r is
keep = int(P * r). In adaptive mode `keep` is a static cap: the block always puts out
p + keep + 1 tokens, of which slot s < min(L, keep) is valid. Invalid slots are zero tokens of
size 0 (no input token is assigned to them); the tokens an exceeded cap leaves out go to the
extra token. A size of 0 masks a key under proportional attention (log 0 = -inf): set
`prop_attn=True` to mask invalid slots in the blocks after this one (every token's size then
enters the logits, as ToMe's); size-weighted average pooling ignores them too, and a consumer
of the tokens (a VLM) masks them with `size > 0`.

Sizes: a kept token keeps its own size and the extra token sums the sizes of the tokens not
kept (each input token counted once, in the slot of its assignment), so sizes still sum to N;
the neighbours' contributions are not counted again. The selection, the neighbours and the
weights carry no gradient; the tokens do.

Placement note: the reference takes q and k from layer 23's projections applied to layer 22's
output, i.e. from the attention of the block *after* the selected tokens. Here "after" uses the
attention of the block whose output is selected (its input's q and k); at `place="mid"` the
tokens are that attention's output.

Shapes: x [B, N, C] -> [B, p + keep + 1, C]; sizes [B, N, 1] -> [B, p + keep + 1, 1]; plan:
`PruMergePlan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.fastervlm import OneBlockSelector, l2_normalize
from jax_tokens.reducers.registry import register

__all__ = ["PruMergePlan", "percentile", "outlier_count", "adaptive_keep", "prumerge",
           "PruMerge", "SCOPES"]

SCOPES = ("batch", "image")
NORMALIZE_EPS = 1e-12      # F.normalize's


def percentile(sorted_values: jax.Array, q: float) -> jax.Array:
    """`np.percentile(v, 100 q)` (linear interpolation) of float32 values sorted ascending along
    the last axis, computed as NumPy does for float32: the lower neighbour plus gamma times the
    difference, or for gamma >= 0.5 the upper one minus (1 - gamma) times it, in float32."""
    n = sorted_values.shape[-1]
    v = n * q - q                                   # NumPy's virtual index (alpha = beta = 1)
    lo = min(max(int(math.floor(v)), 0), n - 1)
    hi = min(lo + 1, n - 1)
    g = v - lo
    a, b = sorted_values[..., lo], sorted_values[..., hi]
    diff = b - a
    if g >= 0.5:
        return b - diff * np.float32(1.0 - g)
    return a + diff * np.float32(g)


def outlier_count(values: jax.Array) -> jax.Array:
    """The number of entries of `values` [..., n] (float32, over the last axis) above
    Q3 + 1.5 (Q3 - Q1) (the reference's `outlier_dectection`, before its division): [...]."""
    s = jnp.sort(values.astype(jnp.float32), axis=-1)
    q1, q3 = percentile(s, 0.25), percentile(s, 0.75)
    upper = q3 + np.float32(1.5) * (q3 - q1)
    return jnp.sum(values > upper[..., None], axis=-1, dtype=jnp.int32)


def adaptive_keep(cls_attn: jax.Array, scope: str = "batch") -> jax.Array:
    """L per example [B] int32 (not capped): int(P * ratio) with ratio = outliers / values, in
    Python float64 (a table over the possible counts), over the whole batch ("batch": the same
    L for every example) or per image ("image")."""
    cls_attn = jax.lax.stop_gradient(tk.as_array("cls_attn", cls_attn)).astype(jnp.float32)
    if cls_attn.ndim != 2:
        raise ValueError(f"cls_attn must have shape [B, P]; got {cls_attn.shape}")
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    b, n = cls_attn.shape
    total = b * n if scope == "batch" else n
    table = jnp.asarray([int(n * (c / total)) for c in range(total + 1)], jnp.int32)
    if scope == "batch":
        return jnp.broadcast_to(table[outlier_count(cls_attn.reshape(-1))], (b,))
    return table[outlier_count(cls_attn)]


@struct.dataclass
class PruMergePlan:
    """N input tokens -> p prefix + K kept (merged with their neighbours) + 1 extra token.

    Attributes:
      kept: [B, K] int32 patch-token indices (prefix excluded) in descending attention.
      valid: [B, K] bool, slot k holds a kept token (adaptive mode: k < L; else all).
      neighbors: [B, K, nn] int32 patch-token indices merged into each kept token.
      weights: [B, P] float32 the class-token attention of the patch tokens (the merge weights).
      n_in, protected: static token counts.
    `assignment`: prefix tokens their own slot, valid kept tokens theirs, every other token the
    extra (last) slot; `matrix` also holds the neighbour weights (an input token can feed
    several outputs), so `invert` (a gather by assignment) is not its inverse for merged slots.
    """

    kept: jax.Array
    valid: jax.Array
    neighbors: jax.Array
    weights: jax.Array
    n_in: int = struct.field(pytree_node=False, default=0)
    protected: int = struct.field(pytree_node=False, default=0)

    @property
    def n_out(self) -> int:
        return self.protected + self.kept.shape[1] + 1

    @property
    def num_kept(self) -> jax.Array:
        """[B] int32 the valid kept tokens (L, capped)."""
        return jnp.sum(self.valid, axis=1, dtype=jnp.int32)

    @property
    def assignment(self) -> jax.Array:
        b, k, p = self.kept.shape[0], self.kept.shape[1], self.protected
        rows = jnp.arange(b)[:, None]
        slots = jnp.where(self.valid, p + jnp.arange(k, dtype=jnp.int32), self.n_out - 1)
        rest = jnp.full((b, self.n_in - p), self.n_out - 1, jnp.int32)
        # Invalid slots write the extra slot onto their (not kept) token: the same value.
        rest = rest.at[rows, self.kept].set(slots)
        front = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        return jnp.concatenate([front, rest], axis=1)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N]: prefix rows one-hot; kept row k: 1 at the token, a_j at each
        neighbour j (zero rows for invalid slots); the last row a_j at every token not kept."""
        del size
        b, k, p = self.kept.shape[0], self.kept.shape[1], self.protected
        rows, slots = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
        valid = self.valid.astype(jnp.float32)
        w = jnp.zeros((b, k, self.n_in - p), jnp.float32)
        w = w.at[rows, slots, self.neighbors].add(
            jnp.take_along_axis(self.weights[:, None, :], self.neighbors, axis=2)
            * valid[..., None])
        w = w.at[rows[..., 0], slots[..., 0], self.kept].add(valid)
        kept_mask = jnp.zeros((b, self.n_in - p), jnp.float32).at[
            rows[..., 0], self.kept].max(valid)
        extra = (self.weights * (1.0 - kept_mask))[:, None, :]
        w = jnp.concatenate([w, extra], axis=1)
        w = jnp.pad(w, ((0, 0), (0, 0), (p, 0)))
        front = jax.nn.one_hot(jnp.arange(p), self.n_in, dtype=jnp.float32)
        return jnp.concatenate([jnp.broadcast_to(front, (b, p, self.n_in)), w], axis=1)

    def apply(self, x: jax.Array) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: `matrix() @ x` (fp32 sums, x's dtype out)."""
        x = tk.as_array("x", x)
        tk.check_tokens("x", x, rank=x.ndim, n=self.n_in)
        flat = x.reshape(x.shape[:2] + (-1,)).astype(jnp.float32)
        out = jnp.einsum("bmn,bnc->bmc", self.matrix(), flat,
                         precision=jax.lax.Precision.HIGHEST)
        return out.reshape((x.shape[0], self.n_out) + x.shape[2:]).astype(x.dtype)

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: every token gets the value of its assigned slot."""
        return tk.invert_by_assignment(y, self.assignment)

    def group_size(self, size: jax.Array) -> jax.Array:
        """[B, N, 1] sizes -> [B, M, 1]: per slot the sizes of the tokens assigned to it (0 for
        invalid slots)."""
        return tk.reduce_by_assignment(tk.as_array("size", size).astype(jnp.float32),
                                       self.assignment, self.n_out, "sum")


def prumerge(cls_attn: jax.Array, keys: jax.Array, keep: int, *, adaptive: bool = False,
             neighbors: int = 32, scope: str = "batch", protected: int = 0) -> PruMergePlan:
    """PruMerge's selection and merge as a plan over all N tokens (`plan.apply(x)`).

    cls_attn: [B, P] the class token's attention to the P = N - protected patch tokens.
    keys: [B, P, Ck] their keys (full width).
    keep: L (fixed mode) or the cap on L (adaptive), a static int in 1..P.
    adaptive: L from the IQR outlier rule (`adaptive_keep`, `scope` "batch" or "image").
    neighbors: tokens merged into each kept token, a static int in 0..P-1 (the reference: 32).
    protected: leading tokens kept in front.
    """
    cls_attn = jax.lax.stop_gradient(tk.as_array("cls_attn", cls_attn)).astype(jnp.float32)
    keys = jax.lax.stop_gradient(tk.as_array("keys", keys)).astype(jnp.float32)
    if cls_attn.ndim != 2 or keys.ndim != 3 or keys.shape[:2] != cls_attn.shape:
        raise ValueError(f"cls_attn must be [B, P] and keys [B, P, Ck]; got {cls_attn.shape} "
                         f"and {keys.shape}")
    b, n = cls_attn.shape
    p = tk.static_int("protected", protected, low=0)
    k = tk.static_int("keep", keep, low=1, high=n)
    nn = tk.static_int("neighbors", neighbors, low=0, high=n - 1)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {SCOPES}")
    kept = jax.lax.top_k(cls_attn, k)[1].astype(jnp.int32)                  # [B, K]
    slots = jnp.arange(k, dtype=jnp.int32)
    if adaptive:
        valid = slots[None, :] < adaptive_keep(cls_attn, scope)[:, None]
    else:
        valid = jnp.ones((b, k), bool)
    rows = jnp.arange(b)[:, None]
    # Candidate order: the valid kept tokens by rank, then the others ascending.
    order = jnp.arange(n, dtype=jnp.int32)[None, :] + k
    order = jnp.broadcast_to(order, (b, n)).at[rows, kept].set(
        jnp.where(valid, slots, k + kept))
    perm = jnp.argsort(order, axis=1).astype(jnp.int32)                      # [B, P]
    unit = l2_normalize(keys, NORMALIZE_EPS)
    sim = jnp.einsum("bkc,bnc->bkn", tk.gather_tokens(unit, kept), tk.gather_tokens(unit, perm),
                     precision=jax.lax.Precision.HIGHEST)                    # [B, K, P]
    sim = jnp.where(perm[:, None, :] == kept[:, :, None], -jnp.inf, sim)    # not itself
    pos = jax.lax.top_k(sim, nn)[1]
    nb = jnp.take_along_axis(jnp.broadcast_to(perm[:, None, :], sim.shape), pos, axis=2)
    return PruMergePlan(kept=kept, valid=valid, neighbors=nb.astype(jnp.int32),
                        weights=cls_attn, n_in=n + p, protected=p)


@register
@dataclasses.dataclass(frozen=True)
class PruMerge(OneBlockSelector):
    """LLaVA-PruMerge: kept outliers merged with their neighbours, plus one extra token.

    Fields: keep (L in fixed mode, the static cap in adaptive mode), layers, place (see
    `jax_tokens.reducers.fastervlm.OneBlockSelector`), adaptive (the IQR rule, default False:
    PruMerge's fixed ratio), neighbors (32), scope ("batch" or "image": what the adaptive rule
    counts over), prop_attn (sizes enter later blocks' attention; masks invalid slots)."""

    method: ClassVar[str] = "prumerge"
    picture: ClassVar[str] = "groups"
    extra_tokens: ClassVar[int] = 1
    adaptive: bool = False
    neighbors: int = 32
    scope: str = "batch"
    prop_attn: bool = False

    def __post_init__(self):
        super().__post_init__()
        for name in ("adaptive", "prop_attn"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"reduction.{name}={getattr(self, name)!r} must be a bool")
        tk.static_int("reduction.neighbors", self.neighbors, low=0)
        if self.scope not in SCOPES:
            raise ValueError(f"reduction.scope={self.scope!r} is not one of {SCOPES}")

    def _check_block(self, layer, patches):
        if self.neighbors > patches - 1:
            raise ValueError(f"reduction.neighbors={self.neighbors} at block {layer}: each kept "
                             f"token merges its nearest of the other {patches - 1} patch tokens "
                             f"(allowed: 0..{patches - 1})")

    @property
    def proportional_attention(self) -> bool:
        return self.prop_attn

    def per_example(self, spec):
        # The batch-wide outlier ratio couples the examples: no per-device selection.
        return not (self.adaptive and self.scope == "batch")

    def stats(self, layout, spec):
        return ("full_cls_probs", "full_key")

    def flops(self, layout, spec):
        n, c = spec.n_in - layout.num_prefix_tokens, layout.embed_dim
        # The class token's full-width logits, the key cosines of the kept tokens, the merges.
        return 2 * spec.n_in * c + 2 * spec.budget * n * c + \
            2 * spec.budget * self.neighbors * c + 2 * n * c

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        base.check_stats(self, layout, spec, stats)
        p = layout.num_prefix_tokens
        plan = prumerge(stats["full_cls_probs"][:, p:], stats["full_key"][:, p:], spec.budget,
                        adaptive=self.adaptive, neighbors=self.neighbors, scope=self.scope,
                        protected=p)
        return plan.apply(x), plan.group_size(size), plan
