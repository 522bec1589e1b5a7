"""PiToMe [`pitome`]: spectrum-preserving token merging by energy score (Tran et al., NeurIPS
2024, "Accelerating Transformers with Spectrum-Preserving Token Merging"; hchautran/PiToMe,
`algo/pitome/merge.py` and its timm/DeiT patches).

After each block's attention the N patch tokens (prefix tokens held out) get an *energy*

    E_i = mean_j elu(cos(k_i, k_j) - margin, alpha)        (j over all N tokens, i included)

on the head-mean keys k. A token with many neighbours above the margin has high energy (it is
redundant); an isolated one has low energy and is protected. Variants (`variant`):

* "pitome": the 2r highest-energy tokens, in descending energy, are dealt alternately into A and
  B; every A token merges into its most similar B token. The other N - 2r tokens stay as they
  are. Output: [prefix, protected (descending energy), B tokens (energy order)].
* "pitome_bsm" (the reference's `use_bsm_pitome`): all N tokens in energy order are dealt
  alternately into A and B, then ToMe's matching merges the r A tokens with the best edges.
  Output: [prefix, kept A tokens (descending best similarity), B tokens].
* "bsm" (the reference's `use_bsm`): ToMe on even / odd positions, r counted over ALL tokens.
  Output: [kept A tokens, B tokens]; kept A in input order (prefix first) when there is a
  prefix, else in descending best similarity.
* "deit" (default): "pitome_bsm" in the first ceil(depth / 2) blocks, "pitome" after them (the
  reference's DeiT patch); "mae": the reverse (its MAE patch); or one variant per block.

Budget at each block: r = floor(N - N * ratio) in float64 (N: the tokens entering the block
without the prefix; "bsm": with it), or a given r. Margin at block l: 0.75 - 0.75 * l / depth
(the patches' schedule) unless given. Merging is the size-weighted mean; sizes add.

Shapes: metric/x [B, T, C] -> [B, T - r, C]; sizes [B, T, 1] -> [B, T - r, 1]; the plan is a
`jax_tokens.merge.MergePlan` with split="index" (A = a_pos, B = b_pos). Every budget is static.
Ties (equal energies or edges) go to the lower index: a stable descending sort (see `energy_order`).

Differences from the reference (the primitives with `protected=1` and `pitome_vision` reproduce
it): every prefix token (class, distillation, registers) is held out and kept in front, where
the reference knows only the class token; a block whose r is 0 is skipped (the reference still
reorders its tokens by energy); `prop_attn` is off by default because the reference's ViT block
never hands sizes to its attention; the energy's mean is summed in fixed point (`_row_mean`),
within ~2e-7 of the float32 mean, so that symmetric or duplicated tokens tie exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jax_tokens import merge
from jax_tokens import schedule as sched
from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["VARIANTS", "ratio_to_r", "default_margins", "energy_score", "energy_order",
           "pitome_matching", "pitome_bsm_matching", "bsm_matching", "pitome_vision",
           "prune_merged", "max_r", "PiToMe", "PiToMeSpec"]

VARIANTS = ("pitome", "pitome_bsm", "bsm")
MIXED = ("deit", "mae")
_HI = jax.lax.Precision.HIGHEST


# -- budgets and margins (plain Python) --------------------------------------------------

def ratio_to_r(n: int, ratio: float) -> int:
    """Tokens a keep ratio removes from n: floor(n - n * ratio) in float64; 0 when ratio >= 1."""
    return 0 if ratio >= 1.0 else max(0, math.floor(n - n * ratio))


def default_margins(depth: int) -> tuple[float, ...]:
    """The reference patches' margin per block: 0.75 - 0.75 * l / depth."""
    return tuple(.75 - .75 * (l / depth) for l in range(depth))


def max_r(variant: str, t: int, protected: int) -> int:
    """The most tokens `variant` can remove from t tokens of which `protected` lead."""
    n = t - protected
    if variant == "pitome":
        return n // 2
    if variant == "pitome_bsm":
        return (n + 1) // 2 if n >= 2 else 0
    n_a = len(range(protected + protected % 2, t, 2))     # bsm: non-prefix even positions
    return n_a if t - protected - n_a > 0 else 0


# -- scores and matchings ----------------------------------------------------------------

def _normalise(m: jax.Array) -> jax.Array:
    m = jax.lax.stop_gradient(m.astype(jnp.float32))
    return m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)


def _row_mean(v: jax.Array, bound: float) -> jax.Array:
    """Mean over the last axis, exactly invariant to the order of a row: entries (|v| <= bound)
    are rounded to a grid of bound * 2^-22 and added as int32 (high and low 11 bits apart, so
    rows up to 2^20 long cannot overflow). Tokens whose rows are permutations of each other
    (symmetric or duplicated tokens) then tie exactly, under jit and eagerly alike; a float sum
    would split them by rounding. Error <= bound * 2^-23 (the golden files' energy gaps are
    >= 4.5e-5)."""
    scale = 2.0 ** 22 / bound
    q = jnp.round(jnp.clip(v, -bound, bound) * scale).astype(jnp.int32)
    hi, lo = jnp.right_shift(q, 11), jnp.bitwise_and(q, 2047)
    total = hi.sum(-1).astype(jnp.float32) * 2048.0 + lo.sum(-1).astype(jnp.float32)
    return total / (scale * v.shape[-1])


def _energy(metric, margin, alpha, protected):
    metric = tk.as_array("metric", metric)
    tk.check_tokens("metric", metric)
    alpha = tk.static_float("alpha", alpha, low=0.0, high=None, low_open=False)
    m = _normalise(metric[:, protected:])
    sim = jnp.einsum("bic,bjc->bij", m, m, precision=_HI)                  # [B, N, N]
    margin = jnp.asarray(margin, jnp.float32)
    # elu(cos - margin) lies in [-alpha, 1 - margin]; margins in [-1, 1] keep it in the bound.
    return _row_mean(jax.nn.elu(sim - margin, alpha), 2.0 * max(1.0, alpha)), sim


def energy_score(metric: jax.Array, margin, alpha: float = 1.0, *,
                 protected: int = 0) -> jax.Array:
    """[B, T, C] metric -> [B, T - protected] fp32 energy of the non-prefix tokens (margin:
    a scalar in [-1, 1], may be traced; alpha: a static float >= 0)."""
    return _energy(metric, margin, alpha, protected)[0]


def energy_order(energy: jax.Array) -> jax.Array:
    """[B, N] -> [B, N] int32 indices by descending energy, ties to the lower index.

    The reference calls torch.argsort(descending=True) without `stable`; on CPU that is
    x86-simd-sort or std::sort, whose tie order is unspecified, so exact ties (duplicate tokens)
    are broken here as torch's stable sort breaks them."""
    return jnp.argsort(energy, axis=-1, descending=True, stable=True).astype(jnp.int32)


def _prefix(bsz: int, p: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (bsz, p))


def _sub(sim, a_idx, b_idx):
    """sim[b, a_idx[b, i], b_idx[b, j]] -> [B, Na, Nb]."""
    rows = jnp.take_along_axis(sim, a_idx[:, :, None], axis=1)
    return jnp.take_along_axis(rows, b_idx[:, None, :], axis=2)


def _check_r(variant, r, t, protected):
    cap = max_r(variant, t, protected)
    return tk.static_int(f"r ({variant}, {t} tokens, {protected} protected)", r, low=0, high=cap)


def pitome_matching(metric: jax.Array, r: int, margin, *, alpha: float = 1.0,
                    protected: int = 0) -> merge.MergePlan:
    """PiToMe: the 2r highest-energy tokens alternate into A and B; every A token merges into
    its most similar B token (A = energy_order[:2r:2], B = energy_order[1:2r:2]).

    metric [B, T, C]; r a static int in [0, (T - protected) // 2]. Plan output:
    [prefix, energy_order[2r:] (protected), B]; A holds [prefix, protected, a tokens]."""
    bsz, t = metric.shape[:2]
    r = _check_r("pitome", r, t, protected)
    energy, sim = _energy(metric, margin, alpha, protected)
    order = energy_order(energy)
    a_idx, b_idx, kept = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
    dst_idx = jnp.argmax(_sub(sim, a_idx, b_idx), axis=-1).astype(jnp.int32) if r else a_idx
    nu = t - 2 * r
    ar = jnp.arange(nu + r, dtype=jnp.int32)
    return merge.MergePlan(
        unm_idx=jnp.broadcast_to(ar[:nu], (bsz, nu)),
        src_idx=jnp.broadcast_to(ar[nu:], (bsz, r)), dst_idx=dst_idx,
        a_pos=jnp.concatenate([_prefix(bsz, protected), protected + kept, protected + a_idx], 1),
        b_pos=protected + b_idx, n_in=t, split="index")


def pitome_bsm_matching(metric: jax.Array, r: int, margin, *, alpha: float = 1.0,
                        protected: int = 0) -> merge.MergePlan:
    """PiToMe's ToMe-on-energy: A = energy_order[::2], B = energy_order[1::2]; the r A tokens
    whose best B similarity is highest merge into it (ties to the lower A position).

    r: static int in [0, ceil((T - protected) / 2)]. Plan output: [prefix, kept A tokens in
    descending best similarity (not sorted, as the reference), B]."""
    bsz, t = metric.shape[:2]
    r = _check_r("pitome_bsm", r, t, protected)
    energy, sim = _energy(metric, margin, alpha, protected)
    order = energy_order(energy)
    a_idx, b_idx = order[:, ::2], order[:, 1::2]
    n_a = a_idx.shape[1]
    if b_idx.shape[1] == 0:
        edge = jnp.broadcast_to(jnp.arange(n_a, dtype=jnp.int32), (bsz, n_a))
        node_idx = jnp.zeros_like(edge)
    else:
        scores = _sub(sim, a_idx, b_idx)
        node_idx = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        edge = jax.lax.top_k(scores.max(axis=-1), n_a)[1].astype(jnp.int32)
    pre = _prefix(bsz, protected)
    return merge.MergePlan(
        unm_idx=jnp.concatenate([pre, protected + edge[:, r:]], 1),
        src_idx=protected + edge[:, :r],
        dst_idx=jnp.take_along_axis(node_idx, edge[:, :r], axis=1),
        a_pos=jnp.concatenate([pre, protected + a_idx], 1), b_pos=protected + b_idx,
        n_in=t, split="index")


def bsm_matching(metric: jax.Array, r: int, *, protected: int = 0) -> merge.MergePlan:
    """The reference's `bsm`: ToMe on A = even, B = odd positions, the leading `protected`
    tokens held in A and never merged (protected = 1 is ToMe with a class token).

    r: static int up to the non-prefix A count. Unmerged A tokens come out in input order when
    protected > 0, in descending best similarity otherwise (as the reference)."""
    metric = tk.as_array("metric", metric)
    tk.check_tokens("metric", metric)
    bsz, t = metric.shape[:2]
    r = _check_r("bsm", r, t, protected)
    a_np = np.array(list(range(protected)) + [i for i in range(protected, t) if i % 2 == 0],
                    np.int32)
    b_np = np.array([i for i in range(protected, t) if i % 2 == 1], np.int32)
    n_a = len(a_np)
    a_pos = jnp.broadcast_to(jnp.asarray(a_np), (bsz, n_a))
    b_pos = jnp.broadcast_to(jnp.asarray(b_np), (bsz, len(b_np)))
    if len(b_np) == 0:                                  # nothing to merge into (r = 0)
        empty = jnp.zeros((bsz, 0), jnp.int32)
        unm = jnp.broadcast_to(jnp.arange(n_a, dtype=jnp.int32), (bsz, n_a))
        return merge.MergePlan(unm_idx=unm, src_idx=empty, dst_idx=empty,
                               a_pos=a_pos, b_pos=b_pos, n_in=t, split="index")
    m = _normalise(metric)
    scores = jnp.einsum("bic,bjc->bij", m[:, a_np], m[:, b_np], precision=_HI)
    scores = jnp.where(jnp.arange(n_a)[None, :, None] < protected, -jnp.inf, scores)
    edge = jax.lax.top_k(scores.max(-1), n_a)[1].astype(jnp.int32)
    src_idx, unm_idx = edge[:, :r], edge[:, r:]
    if protected:                                       # kept A tokens in input order
        unm_idx = jnp.sort(unm_idx, axis=-1)
    node_idx = jnp.argmax(scores, -1).astype(jnp.int32)
    return merge.MergePlan(unm_idx=unm_idx, src_idx=src_idx,
                           dst_idx=jnp.take_along_axis(node_idx, src_idx, axis=1),
                           a_pos=a_pos, b_pos=b_pos, n_in=t, split="index")


def pitome_vision(metric: jax.Array, ratio: float = 1.0, margin=0.5, class_token: bool = False,
                  alpha: float = 1.0, use_bsm: bool = False,
                  use_bsm_pitome: bool = False) -> merge.MergePlan:
    """The reference's entry point: r from `ratio` (over the non-class tokens; "bsm": over all
    of them), then the chosen matching. ratio >= 1 changes nothing."""
    bsz, t = metric.shape[:2]
    p = int(bool(class_token))
    if float(ratio) >= 1.0:
        return merge.identity_plan(bsz, t)
    r = ratio_to_r(t if use_bsm else t - p, float(ratio))
    if use_bsm:
        return bsm_matching(metric, r, protected=p)
    fn = pitome_bsm_matching if use_bsm_pitome else pitome_matching
    return fn(metric, r, margin, alpha=alpha, protected=p)


def prune_merged(plan: merge.MergePlan, x: jax.Array) -> jax.Array:
    """The reference's `prune`: [B, T, C] -> [B, T - r, C], merged-away tokens dropped and
    the B tokens left unchanged."""
    a, b = plan.split_tokens(x)
    return jnp.concatenate([tk.gather_tokens(a, plan.unm_idx), b], axis=1)


# -- the reducer -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PiToMeSpec(base.LayerSpec):
    """A block's spec plus what PiToMe needs there: the block index, margin and variant."""

    layer: int = 0
    margin: float = 0.0
    variant: str = "pitome"


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


def _tuple_of(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _entries(name: str, value) -> list:
    """(label, value) for a field given as one value or one per block."""
    if isinstance(value, tuple):
        return [(f"reduction.{name}[{i}]", v) for i, v in enumerate(value)]
    return [(f"reduction.{name}", value)]


@register
@dataclasses.dataclass(frozen=True)
class PiToMe(base.Reducer):
    """Token merging by energy score (see the module docstring).

    Fields:
      ratio: tokens kept per block, a float in (0, 1] or one per block (1: no merging).
      r: instead of ratio, tokens removed per block: an int >= 0 or one per block.
      margin: None (0.75 - 0.75 l / depth), a float in [0, 1], or one per block.
      variant: "deit" (default), "mae", "pitome", "pitome_bsm", "bsm", or one per block.
      alpha: the ELU's alpha (>= 0).
      prop_attn: add log(size) to the attention logits (the reference's ViT block never passes
        sizes to its attention, so False reproduces it).
    """

    method: ClassVar[str] = "pitome"
    ratio: Any = 1.0
    r: Any = None
    margin: Any = None
    variant: Any = "deit"
    alpha: float = 1.0
    prop_attn: bool = False

    def __post_init__(self):
        for name in ("ratio", "r", "margin", "variant"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for label, v in _entries("ratio", self.ratio):
            tk.static_float(label, v, low=0.0, high=1.0)
        if self.r is not None:
            for label, v in _entries("r", self.r):
                tk.static_int(label, v, low=0)
            if self.ratio != 1.0:
                raise ValueError(f"reduction.r={self.r!r} and reduction.ratio={self.ratio!r} "
                                 "are both set: give the budget as one of them")
        for label, v in _entries("margin", () if self.margin is None else self.margin):
            tk.static_float(label, v, low=0.0, high=1.0, low_open=False)
        ok = VARIANTS if isinstance(self.variant, tuple) else VARIANTS + MIXED
        if any(v not in ok for v in _tuple_of(self.variant)):
            raise ValueError(f"reduction.variant={self.variant!r} is not allowed: give one of "
                             f"{VARIANTS + MIXED} or one of {VARIANTS} per block")
        tk.static_float("reduction.alpha", self.alpha, low=0.0, high=None, low_open=False)
        if not isinstance(self.prop_attn, bool):
            raise TypeError(f"reduction.prop_attn={self.prop_attn!r} must be a bool")

    # -- per-block settings -------------------------------------------------------------------
    def _per_block(self, name: str, value, depth: int) -> tuple:
        if not isinstance(value, tuple):
            return (value,) * depth
        if len(value) != depth:
            raise ValueError(f"reduction.{name} has {len(value)} entries but the model has "
                             f"{depth} blocks: give one per block, or a single value")
        return value

    def _variants(self, depth: int) -> tuple[str, ...]:
        v = self.variant
        if v in MIXED:
            k = math.ceil(depth * 0.5)
            first, rest = ("pitome_bsm", "pitome") if v == "deit" else ("pitome", "pitome_bsm")
            return (first,) * k + (rest,) * (depth - k)
        return self._per_block("variant", v, depth)

    @staticmethod
    def _protected(layout: base.TokenLayout) -> int:
        return max(layout.num_prefix_tokens, int(layout.class_token) + int(layout.distill_token))

    def schedule(self, layout: base.TokenLayout) -> tuple[PiToMeSpec, ...]:
        depth, p = layout.depth, self._protected(layout)
        variants = self._variants(depth)
        margins = default_margins(depth) if self.margin is None else \
            self._per_block("margin", self.margin, depth)
        budget = "r" if self.r is not None else "ratio"
        values = self._per_block(budget, getattr(self, budget), depth)
        specs, n = [], layout.num_tokens
        for l, (v, m, val) in enumerate(zip(variants, margins, values)):
            count = n if v == "bsm" else n - p
            r = val if budget == "r" else ratio_to_r(count, val)
            cap = max_r(v, n, p)
            if r > cap:
                raise ValueError(
                    f"reduction.{budget}={getattr(self, budget)!r} asks block {l} ({v}) to merge "
                    f"r={r} tokens, but {n} tokens enter it ({p} protected) and at most {cap} "
                    f"can merge there; {'raise the ratio' if budget == 'ratio' else 'lower r'}")
            specs.append(PiToMeSpec(n, n - r, r, active=r > 0, layer=l, margin=float(m),
                                    variant=v))
            n -= r
        return tuple(specs)

    def stats(self, layout, spec):
        return ("mean_key",)

    @property
    def proportional_attention(self) -> bool:
        return self.prop_attn

    def flops(self, layout, spec):
        variant = getattr(spec, "variant", "pitome")
        if variant == "bsm":
            return sched.tome_matching_flops(spec.n_in, layout.head_dim)
        n = spec.n_in - self._protected(layout)
        return 2 * n * n * layout.head_dim + 2 * n * n   # Gram matrix + the ELU mean

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        fraction = max(0.0, float(fraction))
        if self.r is not None:
            r = tuple(int(round(v * fraction)) for v in _tuple_of(self.r))
            return self.replace(r=r if isinstance(self.r, tuple) else r[0])
        ratio = tuple(1.0 - (1.0 - k) * fraction for k in _tuple_of(self.ratio))
        return self.replace(ratio=ratio if isinstance(self.ratio, tuple) else ratio[0])

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        if not isinstance(spec, PiToMeSpec):
            raise TypeError("PiToMe.reduce needs the spec from PiToMe.schedule(layout) (it "
                            f"carries the block's margin and variant); got {spec!r}")
        p, metric = self._protected(layout), stats["mean_key"]
        if spec.variant == "bsm":
            plan = bsm_matching(metric, spec.budget, protected=p)
        else:
            fn = pitome_matching if spec.variant == "pitome" else pitome_bsm_matching
            plan = fn(metric, spec.budget, spec.margin, alpha=self.alpha, protected=p)
        x, size = merge.merge_wavg(plan, x, size)
        return x, size, plan
