"""DiffRate [`diffrate`]: sort by CLS attention, prune the tail, merge the next tail into the
most similar kept token (Chen et al., ICCV 2023, "DiffRate: Differentiable Compression Rate
for Efficient Vision Transformers"; OpenGVLab/DiffRate, `DiffRate/merge.py` and
`DiffRate/patch/deit.py`).

After a block's attention the tokens are sorted by the class token's attention (mean over
heads; the class token stays first), so that "important" tokens come first. Then two static
counts per block act on that order:

  prune: keep the first P tokens (the rest are dropped);
  merge: the first K <= P tokens are kept; each of the P - K others is averaged into the kept
         token it is most cosine-similar to (metric: the tokens x themselves; the class token
         is never a destination). The average is a plain mean, `(x_dst + sum x_src) / (1 +
         count)`, **not** size-weighted, as the reference.

DiffRate learns P and K per block by a differentiable search; here they are given, as lists
of total token counts (prefix tokens included, like the reference's `prune_kept_num` /
`merge_kept_num`, so the paper's searched schedules in `compression_rate.json` can be typed
in). The search itself (the differentiable masks) is not part of this reducer.

Sizes. The reference's inference update scales every merged token's size by its cosine to its
destination before summing ("similarity-weighted proportional attention"), without a floor, so
a size can fall below 1 or even below 0 (then log(size) in the next block's attention is NaN).
`size_update` picks the rule:
  "similarity" (default): size_dst + sum size_src * max(cos, 0): the reference whenever no
      merged token has a negative cosine (the usual case); sizes never fall below 1;
  "reference": size_dst + sum size_src * cos, exactly the reference (may be <= 0);
  "train": the reference's training rule, each term max(size * cos, 1);
  "sum": plain sums (ToMe's; sizes keep counting patches).

Shapes: x [B, N, C] -> [B, K, C]; sizes [B, N, 1] -> [B, K, 1]; plan: `DiffRatePlan`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["DiffRatePlan", "sort_by_score", "similarity_match", "merge_sorted", "merge_size",
           "diffrate_match", "diffrate_merge", "DiffRate", "SIZE_RULES"]

SIZE_RULES = ("similarity", "reference", "train", "sum")
SCORES = ("cls_attn", "key_mass")
_HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------

def sort_by_score(scores: jax.Array, protected: int = 1) -> jax.Array:
    """[B, N - protected] scores -> [B, N] int32 input positions: the `protected` prefix tokens
    first (in place), then the others in descending score. Ties: lower index first (a stable
    sort; the reference's unstable torch.sort leaves their order unspecified)."""
    scores = tk.as_array("scores", scores)
    if getattr(scores, "ndim", None) != 2:
        raise ValueError(f"scores must have rank 2 [batch, tokens - protected]; got shape "
                         f"{getattr(scores, 'shape', scores)}")
    protected = tk.static_int("protected", protected, low=0)
    b, n = scores.shape
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores.astype(jnp.float32)), n)
    front = jnp.broadcast_to(jnp.arange(protected, dtype=jnp.int32), (b, protected))
    return jnp.concatenate([front, idx.astype(jnp.int32) + protected], axis=1)


def similarity_match(metric: jax.Array, kept: int, *, exclude: int = 0
                     ) -> tuple[jax.Array, jax.Array]:
    """The reference's `get_merge_func` matching on tokens already in order.

    metric: [B, n, C]; the first `kept` tokens are destinations, each of the n - kept others
    goes to its most cosine-similar destination, never to one of the first `exclude` (the
    class token: `class_token=True` is exclude=1). Returns (dst_idx [B, n - kept] int32 in
    [exclude, kept), node_max [B, n - kept] fp32: that cosine, possibly negative). Ties: the
    lowest destination index (torch's max). No gradient flows through the matching.
    """
    metric = tk.as_array("metric", metric)
    tk.check_tokens("metric", metric)
    n = metric.shape[1]
    kept = tk.static_int("kept", kept, low=1, high=n)
    exclude = tk.static_int("exclude", exclude, low=0)
    if kept < n and exclude >= kept:
        raise ValueError(f"kept={kept} leaves no destination for the merged tokens: the first "
                         f"exclude={exclude} may not receive merges (kept must be > exclude)")
    m = jax.lax.stop_gradient(metric.astype(jnp.float32))
    m = m / jnp.maximum(jnp.linalg.norm(m, axis=-1, keepdims=True), 1e-12)
    sim = jnp.einsum("bic,bjc->bij", m[:, kept:], m[:, :kept], precision=_HI)
    if exclude:
        sim = jnp.where(jnp.arange(kept) < exclude, -jnp.inf, sim)
    return sim.argmax(-1).astype(jnp.int32), sim.max(-1)


def merge_sorted(x: jax.Array, dst_idx: jax.Array, kept: int, mode: str = "mean",
                 training: bool = False) -> jax.Array:
    """The reference's `merge`: x [B, n, ...] (destinations first) -> [B, kept, ...].

    mode "mean": (x_dst + sum of its sources) / (1 + count); "sum": x_dst + sum; "amax": the
    elementwise max (source tracking). training=True returns [B, n, ...]: the merged
    destinations followed by the sources unchanged (the reference's training layout).
    """
    x = tk.as_array("x", x)
    kept = tk.static_int("kept", kept, low=1, high=x.shape[1])
    if mode not in ("mean", "sum", "amax"):
        raise ValueError(f"mode={mode!r} is not one of 'mean', 'sum', 'amax'")
    if dst_idx.shape != (x.shape[0], x.shape[1] - kept):
        raise ValueError(f"dst_idx must have shape {(x.shape[0], x.shape[1] - kept)} (one "
                         f"destination per merged token); got {dst_idx.shape}")
    dst, src = x[:, :kept], x[:, kept:]
    if src.shape[1] == 0:
        out = dst
    elif mode == "amax":
        out = dst.at[jnp.arange(x.shape[0])[:, None], dst_idx].max(src)
    else:
        onehot = jax.nn.one_hot(dst_idx, kept, dtype=jnp.float32)          # [B, r, K]
        flat = src.reshape(src.shape[:2] + (-1,)).astype(jnp.float32)
        out = dst.reshape(dst.shape[:2] + (-1,)).astype(jnp.float32) + jnp.einsum(
            "brk,brc->bkc", onehot, flat, precision=_HI)
        if mode == "mean":
            out = out / (1.0 + onehot.sum(1))[..., None]
        out = out.reshape(dst.shape).astype(x.dtype)
    return jnp.concatenate([out, src], axis=1) if training else out


def merge_size(size: jax.Array, dst_idx: jax.Array, node_max: jax.Array, kept: int,
               rule: str = "similarity", training: bool = False) -> jax.Array:
    """Sizes [B, n, 1] (destinations first) -> [B, kept, 1] by `rule` (module docstring).
    rule="reference" is the reference's inference update; rule="train" with training=True its
    training update ([B, n, 1])."""
    if rule not in SIZE_RULES:
        raise ValueError(f"rule={rule!r} is not one of {SIZE_RULES}")
    size = tk.as_array("size", size).astype(jnp.float32)
    dst, src = size[:, :kept], size[:, kept:]
    cos = node_max.astype(jnp.float32)[..., None]
    if rule == "similarity":
        src = src * jnp.maximum(cos, 0.0)
    elif rule in ("reference", "train"):
        src = src * cos
    both = jnp.concatenate([dst, src], axis=1)
    if rule == "train":
        both = jnp.maximum(both, 1.0)
    return merge_sorted(both, dst_idx, kept, "sum", training)


@struct.dataclass
class DiffRatePlan:
    """N tokens -> sort -> keep n_mid (prune) -> merge into n_out (K).

    Attributes:
      order: [B, N] int32 input positions in sorted order (prefix tokens first).
      dst_idx: [B, n_mid - K] int32 destination (in [0, K)) of sorted tokens K..n_mid-1.
      node_max: [B, n_mid - K] fp32 cosine of each merged token to its destination.
      n_mid: tokens after pruning (static); n_out: tokens after merging, K (static).
    The plan's reduction is a plain (unweighted) mean per group, as the reference merges x;
    `matrix(size)` therefore ignores `size`.
    """

    order: jax.Array
    dst_idx: jax.Array
    node_max: jax.Array
    n_mid: int = struct.field(pytree_node=False, default=0)
    n_out: int = struct.field(pytree_node=False, default=0)

    @property
    def n_in(self) -> int:
        return self.order.shape[1]

    @property
    def batch(self) -> int:
        return self.order.shape[0]

    @property
    def assignment(self) -> jax.Array:
        """[B, N] output slot of every input token (-1: pruned)."""
        b = self.batch
        slots = jnp.concatenate([
            jnp.broadcast_to(jnp.arange(self.n_out, dtype=jnp.int32), (b, self.n_out)),
            self.dst_idx.astype(jnp.int32),
            jnp.full((b, self.n_in - self.n_mid), -1, jnp.int32)], axis=1)
        return jnp.zeros((b, self.n_in), jnp.int32).at[
            jnp.arange(b)[:, None], self.order].set(slots)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, K, N]: each row averages its group (plain mean; `size` is ignored)."""
        del size
        w = tk.assignment_matrix(self.assignment, self.n_out)
        return w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)

    def apply(self, x: jax.Array) -> jax.Array:
        """[B, N, ...] -> [B, K, ...]: sort, prune, plain-mean merge (== `matrix() @ x`)."""
        x = tk.as_array("x", x)
        tk.check_tokens("x", x, rank=x.ndim, n=self.n_in, batch=self.batch)
        return merge_sorted(tk.gather_tokens(x, self.order[:, :self.n_mid]), self.dst_idx,
                            self.n_out, "mean")

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, K, ...] -> [B, N, ...]: every token gets its group's value, pruned ones 0."""
        return tk.invert_by_assignment(y, self.assignment)


def diffrate_match(scores: jax.Array, metric: jax.Array, prune_kept: int, merge_kept: int, *,
                   protected: int = 1) -> DiffRatePlan:
    """The whole selection of one block.

    Args:
      scores: [B, N - protected] importance (the head-mean CLS attention) of the tokens after
        the protected prefix.
      metric: [B, N, C] the tokens (the reference uses x after attention), in input order.
      prune_kept: P, tokens left after pruning (prefix included), static in (protected, N].
      merge_kept: K, tokens left after merging, static in (protected, P].
      protected: leading tokens that are never sorted, pruned, merged, or merged into.
    """
    metric = tk.as_array("metric", metric)
    tk.check_tokens("metric", metric)
    n = metric.shape[1]
    protected = tk.static_int("protected", protected, low=0, high=n - 1)
    p_k = tk.static_int("prune_kept", prune_kept, low=protected + 1, high=n)
    m_k = tk.static_int("merge_kept", merge_kept, low=protected + 1, high=p_k)
    if scores.shape != (metric.shape[0], n - protected):
        raise ValueError(f"scores must have shape {(metric.shape[0], n - protected)} (one per "
                         f"unprotected token); got {scores.shape}")
    order = sort_by_score(scores, protected)
    dst_idx, node_max = similarity_match(tk.gather_tokens(metric, order[:, :p_k]), m_k,
                                         exclude=protected)
    return DiffRatePlan(order=order, dst_idx=dst_idx, node_max=node_max, n_mid=p_k,
                        n_out=m_k)


def diffrate_merge(plan: DiffRatePlan, x: jax.Array, size: jax.Array | None = None,
                   rule: str = "similarity") -> tuple[jax.Array, jax.Array]:
    """Applies a plan: (x [B, K, C] plain means, sizes [B, K, 1] by `rule`)."""
    x = tk.as_array("x", x)
    if size is None:
        size = tk.init_size(x)
    keep = plan.order[:, :plan.n_mid]
    s = merge_size(tk.gather_tokens(tk.as_array("size", size), keep), plan.dst_idx,
                   plan.node_max, plan.n_out, rule)
    return plan.apply(x), s


# --------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------

@register
@dataclasses.dataclass(frozen=True)
class DiffRate(base.Reducer):
    """DiffRate with given per-block kept counts (see the module docstring).

    Fields:
      prune_kept / merge_kept: one total token count per block (prefix tokens included), or
        () for no pruning / no merging. Counts may not grow: each is at most the tokens that
        reach that step.
      clamp: read a count above the tokens present as "keep all" (the reference's behaviour,
        which some of its searched schedules rely on) instead of raising.
      size_update: "similarity" (default), "reference", "train" or "sum" (module docstring).
      prop_attn: proportional attention (log(size) in the logits), as the reference.
      score: "cls_attn" (the reference; needs a class token) or "key_mass" (attention each
        token receives, head mean: for models without a class token).
    """

    method: ClassVar[str] = "diffrate"
    prune_kept: tuple = ()
    merge_kept: tuple = ()
    clamp: bool = False
    size_update: str = "similarity"
    prop_attn: bool = True
    score: str = "cls_attn"

    def __post_init__(self):
        for name in ("prune_kept", "merge_kept"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"reduction.{name}={v!r} must be a list of ints (one total "
                                "token count per block) or () for none")
            object.__setattr__(self, name, tuple(v))
            for i, c in enumerate(v):
                tk.static_int(f"reduction.{name}[{i}] (block {i})", c, low=1)
        for name in ("clamp", "prop_attn"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"reduction.{name}={getattr(self, name)!r} must be a bool")
        if self.size_update not in SIZE_RULES:
            raise ValueError(f"reduction.size_update={self.size_update!r} is not one of "
                             f"{SIZE_RULES}")
        if self.score not in SCORES:
            raise ValueError(f"reduction.score={self.score!r} is not one of {SCORES}")

    def _counts(self, layout: base.TokenLayout) -> list[tuple[int, int, int]]:
        """(tokens in, after pruning, after merging) per block, checked."""
        for name in ("prune_kept", "merge_kept"):
            v = getattr(self, name)
            if v and len(v) != layout.depth:
                raise ValueError(f"reduction.{name} has {len(v)} entries but the model has "
                                 f"{layout.depth} blocks: give one count per block (tokens "
                                 "kept, prefix tokens included), or () for none")
        if self.score == "cls_attn" and not layout.class_token:
            raise ValueError("reduction.score='cls_attn' needs a class token, and this model "
                             "has none: use score='key_mass'")
        p, n, out = layout.num_prefix_tokens, layout.num_tokens, []
        for l in range(layout.depth):
            n_in = n
            for name, step in (("prune_kept", "pruning"), ("merge_kept", "merging")):
                v = getattr(self, name)
                c = v[l] if v else n
                if c <= p:
                    raise ValueError(f"reduction.{name}[{l}]={c} at block {l} is not allowed: "
                                     f"it must keep the {p} prefix token(s) and at least one "
                                     f"more (>= {p + 1})")
                if c > n and not self.clamp:
                    raise ValueError(
                        f"reduction.{name}[{l}]={c} at block {l} exceeds the {n} tokens that "
                        f"reach its {step} step: counts cannot grow. Lower it to <= {n}, or "
                        "set reduction.clamp=True to read it as 'keep all', as the DiffRate "
                        "reference does")
                n = min(n, c)
                if name == "prune_kept":
                    mid = n
            out.append((n_in, mid, n))
        return out

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        return tuple(base.LayerSpec(n_in, k, mid, active=k < n_in)
                     for n_in, mid, k in self._counts(layout))

    def stats(self, layout, spec):
        return ("cls_probs",) if self.score == "cls_attn" else ("key_mass",)

    @property
    def proportional_attention(self) -> bool:
        return self.prop_attn

    def flops(self, layout, spec):
        # Cosine similarities of the merged tokens to the kept ones (metric: x, width C).
        return 2 * (spec.budget - spec.n_out) * spec.n_out * layout.embed_dim

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        n0, counts = layout.num_tokens, self._counts(layout)
        ease = lambda c: n0 - int(round((n0 - c) * fraction))   # noqa: E731
        return self.replace(
            prune_kept=tuple(ease(m) for _, m, _ in counts) if self.prune_kept else (),
            merge_kept=tuple(ease(k) for _, _, k in counts) if self.merge_kept else ())

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        p = layout.num_prefix_tokens
        stat = stats["cls_probs"] if self.score == "cls_attn" else stats["key_mass"]
        scores = stat.astype(jnp.float32).mean(axis=1)[:, p:]
        plan = diffrate_match(scores, x, spec.budget, spec.n_out, protected=p)
        x, size = diffrate_merge(plan, x, size, self.size_update)
        return x, size, plan
