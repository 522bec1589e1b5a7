"""PPT [`ppt`]: per image, prune or pool (ToMe-merge), chosen by the variance of the token
importance scores (Wu et al., 2023, "PPT: Token Pruning and Pooling for Efficient Vision
Transformers"; xjwu1024/PPT, `ppt_deit.py`).

At each listed block, after attention, every token gets a significance score: the class
token's attention to it (summed over heads; the reference multiplies by the norm of its value
vector, see below), normalised to sum to 1 over the unprotected tokens. The unbiased variance
of those scores decides, per image, how r tokens are removed:

  variance >= threshold (a few tokens dominate: "inattentive redundancy"): prune the r
      lowest-scoring tokens; the kept ones come out in descending score order, sizes kept;
  variance <  threshold (attention is spread out: "duplicative redundancy"): ToMe's bipartite
      soft matching on the head-mean keys (`jax_tokens.merge`), size-weighted, sizes summed.

Both branches remove the same r, so both are computed and `jnp.where` picks one per image:
shapes stay static and a batch mixing the two compiles once. The class and distillation tokens
are never pruned or merged.

Differences from the reference: the score omits the value-norm factor ||v_j|| (the blocks
expose attention statistics, not values; `significance(..., value_norm=)` takes it when a
caller has it), which changes the variance's scale and so the threshold's meaning; a
distillation token is protected (the reference ranks it with the patches when pruning); r is
clamped once, to what ToMe can merge, so both branches always agree (the reference clamps the
pruning branch to (N - 1) // 2, a mixed batch then fails with a distillation token).

Shapes: x [B, N, C] -> [B, N - r, C]; sizes [B, N, 1] -> [B, N - r, 1]; plan: `PPTPlan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jax_tokens import merge, prune
from jax_tokens import schedule as sched
from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["PPTPlan", "significance", "score_variance", "ppt_match", "ppt_merge", "PPT"]

SCORES = ("cls_attn", "key_mass")


# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------

def significance(attn_row: jax.Array, protected: int = 1,
                 value_norm: jax.Array | None = None) -> jax.Array:
    """PPT's (ATS's) significance scores: [B, H, N] attention (the CLS row, or any per-key
    statistic) summed over heads, times `value_norm` [B, N] when given, over the tokens after
    the `protected` prefix, normalised to sum 1. Returns [B, N - protected] fp32."""
    a = tk.as_array("attn_row", attn_row)
    if getattr(a, "ndim", None) != 3:
        raise ValueError(f"attn_row must have rank 3 [batch, heads, tokens]; got shape "
                         f"{getattr(a, 'shape', a)}")
    protected = tk.static_int("protected", protected, low=0, high=a.shape[-1] - 1)
    s = jax.lax.stop_gradient(a.astype(jnp.float32)).sum(axis=1)
    if value_norm is not None:
        s = s * jax.lax.stop_gradient(tk.as_array("value_norm", value_norm)).astype(jnp.float32)
    s = s[:, protected:]
    return s / jnp.maximum(s.sum(axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def score_variance(scores: jax.Array) -> jax.Array:
    """[B, n] -> [B]: the unbiased variance (torch.var's default, divisor n - 1)."""
    scores = tk.as_array("scores", scores).astype(jnp.float32)
    n = scores.shape[-1]
    centred = scores - scores.mean(axis=-1, keepdims=True)
    return (centred * centred).sum(axis=-1) / max(n - 1, 1)


@struct.dataclass
class PPTPlan:
    """Both branches' plans and the per-image choice.

    Attributes:
      merge_plan: ToMe's `MergePlan` (the pooling branch).
      prune_plan: the `PrunePlan` (the pruning branch; kept tokens in descending score).
      pruned: [B] bool, True where the image was pruned (score variance >= threshold).
      variance: [B] fp32 the score variance that decided.
    Every method picks, per image, the chosen branch's answer. `matrix(size)` is size-weighted
    on merged rows (pass the sizes, as for ToMe); pruned rows are one-hot.
    """

    merge_plan: merge.MergePlan
    prune_plan: prune.PrunePlan
    pruned: jax.Array
    variance: jax.Array

    @property
    def n_in(self) -> int:
        return self.merge_plan.n_in

    @property
    def n_out(self) -> int:
        return self.merge_plan.n_out

    def _pick(self, if_pruned: jax.Array, if_merged: jax.Array) -> jax.Array:
        sel = self.pruned.reshape(self.pruned.shape + (1,) * (if_pruned.ndim - 1))
        return jnp.where(sel, if_pruned, if_merged)

    @property
    def assignment(self) -> jax.Array:
        """[B, N] output slot of each input token (-1: pruned)."""
        return self._pick(self.prune_plan.assignment, self.merge_plan.assignment)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N] map of `ppt_merge` (with `size`) or of `apply` (without)."""
        return self._pick(self.prune_plan.matrix(), self.merge_plan.matrix(size))

    def apply(self, x: jax.Array, size: jax.Array | None = None) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: pruned images gather, pooled ones average (weighted by
        `size` when given), i.e. `matrix(size) @ x`."""
        return self._pick(prune.prune(self.prune_plan, x), self.merge_plan.apply(x, size))

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: tokens back in place (group values; pruned ones 0)."""
        return self._pick(self.prune_plan.invert(y), self.merge_plan.invert(y))


def ppt_match(scores: jax.Array, metric: jax.Array, r: int, *, threshold: float,
              class_token: bool = True, distill_token: bool = False) -> PPTPlan:
    """One PPT block's selection.

    Args:
      scores: [B, N - p] significance of the unprotected tokens (p = class + distillation).
      metric: [B, N, C] ToMe's merge metric (the head-mean keys).
      r: tokens to remove, static; clamped to (N - p) // 2 as ToMe (both branches use it).
      threshold: images whose score variance is >= threshold are pruned, the others pooled.
    """
    metric = tk.as_array("metric", metric)
    tk.check_tokens("metric", metric)
    n = metric.shape[1]
    p = int(bool(class_token)) + int(bool(distill_token))
    r = sched.tome_effective_r(n, tk.static_int("r", r, low=0), p)
    scores = tk.as_array("scores", scores)
    if scores.shape != (metric.shape[0], n - p):
        raise ValueError(f"scores must have shape {(metric.shape[0], n - p)} (one per "
                         f"unprotected token); got {scores.shape}")
    variance = score_variance(scores)
    m_plan = merge.bipartite_soft_matching(metric, r, class_token=class_token,
                                           distill_token=distill_token)
    p_plan = prune.topk(scores, n - p - r, protected=p, order="score")
    return PPTPlan(merge_plan=m_plan, prune_plan=p_plan, pruned=variance >= threshold,
                   variance=variance)


def ppt_merge(plan: PPTPlan, x: jax.Array,
              size: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Applies a plan: (x [B, N - r, C], sizes [B, N - r, 1]): pooled images average by size
    and add sizes (`merge.merge_wavg`); pruned images keep their tokens' sizes."""
    x = tk.as_array("x", x)
    size = tk.init_size(x) if size is None else tk.as_array("size", size).astype(jnp.float32)
    xm, sm = merge.merge_wavg(plan.merge_plan, x, size)
    xp, sp = prune.prune(plan.prune_plan, x), prune.prune_size(plan.prune_plan, size)
    return plan._pick(xp, xm), plan._pick(sp, sm)


# --------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------

@register
@dataclasses.dataclass(frozen=True)
class PPT(base.Reducer):
    """Adaptive pruning / pooling at the listed blocks (see the module docstring).

    Fields:
      r: tokens removed at each listed block: an int, or one int per entry of `layers`.
      layers: block indices (the reference's `pp_loc_list`; its DeiT-S setting is (3, 6, 9)
        with r=50).
      threshold: score variance at and above which an image is pruned (the reference's
        evaluation setting for DeiT-S is 7e-5; 0 prunes every image, inf pools every image).
      prop_attn: proportional attention (log(size) in the logits), the reference's default.
      score: "cls_attn" (the reference; needs a class token) or "key_mass" (attention each
        token receives, for models without a class token).
      clamp_r: clamp an r larger than a block can remove ((tokens - protected) // 2) instead
        of raising.
    """

    method: ClassVar[str] = "ppt"
    r: Any = 0
    layers: tuple = ()
    threshold: float = 7e-5
    prop_attn: bool = True
    score: str = "cls_attn"
    clamp_r: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for l in self.layers:
            tk.static_int("reduction.layers entry", l, low=0)
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"reduction.layers={list(self.layers)} lists a block twice")
        if isinstance(self.r, (list, tuple)):
            object.__setattr__(self, "r", tuple(self.r))
            if len(self.r) != len(self.layers):
                raise ValueError(f"reduction.r has {len(self.r)} entries but reduction.layers "
                                 f"has {len(self.layers)}: give one r per listed block, or one "
                                 "int")
            for l, r in zip(self.layers, self.r):
                tk.static_int(f"reduction.r (block {l})", r, low=0)
        else:
            tk.static_int("reduction.r", self.r, low=0)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise ValueError(f"reduction.threshold={t!r} is not allowed: it must be a float "
                             ">= 0 (inf pools every image)")
        object.__setattr__(self, "threshold", float(t))
        for name in ("prop_attn", "clamp_r"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"reduction.{name}={getattr(self, name)!r} must be a bool")
        if self.score not in SCORES:
            raise ValueError(f"reduction.score={self.score!r} is not one of {SCORES}")

    def _rs(self) -> dict[int, int]:
        rs = self.r if isinstance(self.r, tuple) else (self.r,) * len(self.layers)
        return dict(zip(self.layers, rs))

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        base.check_layers(self.layers, layout)
        if self.score == "cls_attn" and not layout.class_token:
            raise ValueError("reduction.score='cls_attn' needs a class token, and this model "
                             "has none: use score='key_mass'")
        rs, n, specs = self._rs(), layout.num_tokens, []
        protected = int(layout.class_token) + int(layout.distill_token)
        for l in range(layout.depth):
            r = rs.get(l, 0)
            can = (n - protected) // 2
            if r > can and not self.clamp_r:
                raise ValueError(
                    f"reduction.r asks block {l} to remove r={r} tokens, but only {n} tokens "
                    f"enter it (at most {can} can go: half of the {n - protected} unprotected "
                    "tokens, so that pooling and pruning remove the same number). Lower r, or "
                    "set reduction.clamp_r=True")
            r = min(r, can)
            specs.append(base.LayerSpec(n, n - r, r, active=r > 0))
            n -= r
        return tuple(specs)

    def stats(self, layout, spec):
        return ("cls_probs" if self.score == "cls_attn" else "key_mass", "mean_key")

    @property
    def proportional_attention(self) -> bool:
        return self.prop_attn

    def flops(self, layout, spec):
        # Both branches are computed for every image: ToMe's matching (the pruning top-k and
        # the variance are comparisons and O(N) work).
        return sched.tome_matching_flops(spec.n_in, layout.head_dim)

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        rs = self.r if isinstance(self.r, tuple) else (self.r,) * len(self.layers)
        return self.replace(r=tuple(int(round(r * fraction)) for r in rs))

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        protected = int(layout.class_token) + int(layout.distill_token)
        row = stats["cls_probs"] if self.score == "cls_attn" else stats["key_mass"]
        scores = significance(row, protected)
        plan = ppt_match(scores, stats["mean_key"], spec.budget, threshold=self.threshold,
                         class_token=layout.class_token, distill_token=layout.distill_token)
        x, size = ppt_merge(plan, x, size)
        return x, size, plan
