"""VisionZip [`visionzip`]: dominant tokens by class-token attention plus contextual tokens
merged by key similarity (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not
Necessary in Vision Language Models"; dvlab-research/VisionZip,
`CLIPVisionTower_VisionZip.forward`).

At one block (`OneBlockSelector`: `layers=(l,)`, `keep`, `place`; VisionZip reads CLIP's
penultimate layer: its output tokens with its attention and keys, i.e. `place="after"`):

  * Dominant: the D patch tokens with the largest class-token attention summed over heads
    (`cls_probs`, query 0; `lax.top_k`, lower index first on ties). They come out in input
    order after the prefix tokens (the reference's `masked_select`).
  * Contextual: the M = P - D other patch tokens, in input order, are compared by their keys
    averaged over heads (`mean_key`, the reference's `metric`), L2-normalised with no
    epsilon. Targets are positions `arange(0, M, step)[:K]` with `step = max(1, M // K)` (cut
    to K when `arange` gives more); every other token joins the target of largest cosine
    (first on ties), and contextual token k = x[target_k] + mean(x of its members) (the
    target added, not averaged in; a target without members is itself). They come out in
    target order after the dominant tokens.

Budget: D + K = `keep` patch tokens out (prefix tokens in front). `contextual` sets K; None
(the default) uses the 54:10 split of VisionZip's README example, K = round(keep * 10 / 64):
keep 64 / 128 / 192 -> D + K = 54 + 10 / 108 + 20 / 162 + 30. The reference's dominant count
includes the class token (`visionzip(model, dominant=54, contextual=10)` gives CLS + 53 + 10);
here the class token is a prefix token on top of `keep`. `contextual=0` keeps dominant tokens
only.

Sizes: a dominant token keeps its size; a contextual token gets its target's size plus its
members' (the merge is not size-weighted, as the reference). The selection carries no gradient
(statistics are stopped); the tokens do.

Shapes: x [B, N, C] -> [B, p + D + K, C]; plan: `VisionZipPlan`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.fastervlm import OneBlockSelector, l2_normalize
from jax_tokens.reducers.registry import register

__all__ = ["VisionZipPlan", "visionzip", "default_contextual", "targets", "VisionZip"]

DOMINANT_SHARE, CONTEXTUAL_SHARE = 54, 10      # VisionZip's own split of 64 tokens


def default_contextual(keep: int) -> int:
    """VisionZip's 54:10 split: K = round(keep * 10 / 64) contextual tokens of `keep`."""
    return int(round(keep * CONTEXTUAL_SHARE / (DOMINANT_SHARE + CONTEXTUAL_SHARE)))


def targets(remaining: int, contextual: int) -> np.ndarray:
    """The target positions among the M remaining tokens: arange(0, M, max(1, M // K))[:K]."""
    step = max(1, remaining // contextual)
    return np.arange(0, remaining, step)[:contextual]


@struct.dataclass
class VisionZipPlan(tk.WeightedGroupPlan):
    """N input tokens -> p prefix + D dominant + K contextual tokens (`tokens.WeightedGroupPlan`).

    Attributes:
      groups: [B, N] int32 output slot of each input token (-1: dropped, only without
        contextual tokens).
      weights: [B, N] float32 its weight in that slot: 1 for prefix, dominant and target
        tokens, 1 / (members of its target) for the merged ones, 0 for dropped ones.
      dominant: [B, D] int32 patch-token indices (prefix excluded) of the dominant tokens in
        descending attention (the reference's `all_indices[:, 1:] - 1` when p = 1).
    """

    dominant: jax.Array | None = None


def visionzip(scores: jax.Array, metric: jax.Array, dominant: int, contextual: int, *,
              protected: int = 0) -> VisionZipPlan:
    """VisionZip's selection as a plan over all N tokens (`plan.apply(x)` is the output).

    scores: [B, N - protected] class-token attention of the patch tokens (summed over heads,
      as the reference; any monotone transform gives the same dominant set up to ties).
    metric: [B, N - protected, Ck] the patch tokens' keys averaged over heads.
    dominant, contextual: D and K, static ints with D + K <= N - protected.
    protected: leading tokens kept in front (class, registers).
    """
    scores, metric = tk.as_array("scores", scores), tk.as_array("metric", metric)
    if scores.ndim != 2 or metric.ndim != 3 or metric.shape[:2] != scores.shape:
        raise ValueError(f"scores must be [B, P] and metric [B, P, Ck]; got {scores.shape} and "
                         f"{metric.shape}")
    b, n = scores.shape
    p = tk.static_int("protected", protected, low=0)
    d = tk.static_int("dominant", dominant, low=0, high=n)
    k = tk.static_int("contextual", contextual, low=0, high=n - d)
    m = n - d
    scores = jax.lax.stop_gradient(scores.astype(jnp.float32))
    dom = jax.lax.top_k(scores, d)[1].astype(jnp.int32)                     # [B, D]
    rows = jnp.arange(b)[:, None]
    is_dom = jnp.zeros((b, n), bool).at[rows, dom].set(True)
    # Dominant slots in input order: p + (rank of the token among the dominant ones).
    dom_slot = p + jnp.cumsum(is_dom, axis=1, dtype=jnp.int32) - 1
    # The remaining tokens in input order (a stable sort puts the non-dominant ones first).
    rest = jnp.argsort(is_dom.astype(jnp.int32), axis=1, stable=True)[:, :m].astype(jnp.int32)
    groups = jnp.where(is_dom, dom_slot, -1)         # K = 0: the other tokens are dropped
    weights = is_dom.astype(jnp.float32)
    if k:
        tgt = targets(m, k)
        others = np.setdiff1d(np.arange(m), tgt)                          # static, ascending
        met = l2_normalize(tk.gather_tokens(jax.lax.stop_gradient(metric), rest))
        sim = jnp.einsum("bmc,bkc->bmk", met[:, others], met[:, tgt],
                         precision=jax.lax.Precision.HIGHEST)                # [B, M - K, K]
        choice = jnp.argmax(sim, axis=-1).astype(jnp.int32)
        count = jnp.zeros((b, k), jnp.float32).at[rows, choice].add(1.0)
        slot_of_rest = jnp.zeros((b, m), jnp.int32).at[:, tgt].set(np.arange(k, dtype=np.int32))
        slot_of_rest = slot_of_rest.at[:, others].set(choice)
        w_rest = jnp.ones((b, m), jnp.float32).at[:, others].set(
            1.0 / jnp.maximum(jnp.take_along_axis(count, choice, axis=1), 1.0))
        groups = groups.at[rows, rest].set(p + d + slot_of_rest)
        weights = weights.at[rows, rest].set(w_rest)
    front = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    groups = jnp.concatenate([front, groups], axis=1)
    weights = jnp.concatenate([jnp.ones((b, p), jnp.float32), weights], axis=1)
    return VisionZipPlan(groups=groups, weights=weights, dominant=dom, n_out=p + d + k)


@register
@dataclasses.dataclass(frozen=True)
class VisionZip(OneBlockSelector):
    """VisionZip: dominant + contextual tokens, `keep` patch tokens in all. Fields: keep,
    layers, place (see `jax_tokens.reducers.fastervlm.OneBlockSelector`), contextual (K of the
    `keep`; None: VisionZip's 54:10 split, round(keep * 10 / 64))."""

    method: ClassVar[str] = "visionzip"
    picture: ClassVar[str] = "groups"
    contextual: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.contextual is not None:
            tk.static_int("reduction.contextual", self.contextual, low=0, high=self.keep)

    @property
    def num_contextual(self) -> int:
        return default_contextual(self.keep) if self.contextual is None else self.contextual

    def stats(self, layout, spec):
        return ("cls_probs", "mean_key")

    def flops(self, layout, spec):
        # The similarities of the M - K merged tokens to the K targets, then their sums.
        k = self.num_contextual
        if not k:
            return 0
        m = spec.n_in - layout.num_prefix_tokens - (self.keep - k)
        return 2 * (m - k) * k * layout.head_dim + 2 * (m - k) * layout.embed_dim

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        base.check_stats(self, layout, spec, stats)
        p, k = layout.num_prefix_tokens, self.num_contextual
        scores = stats["cls_probs"].astype(jnp.float32).sum(axis=1)[:, p:]
        plan = visionzip(scores, stats["mean_key"][:, p:], spec.budget - k, k, protected=p)
        return plan.apply(x), plan.group_size(size), plan
