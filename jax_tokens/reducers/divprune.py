"""DivPrune [`divprune`]: keep a diverse subset of the patch tokens by greedy max-min selection
on their cosine distances (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token
Pruning for Large Multimodal Models"; vbdi/divprune, `LlavaMetaForCausalLM.DivPrune`).

At one block (`OneBlockSelector`: `layers=(l,)`, `keep`, `place`) the patch tokens' features
(the block's tokens themselves; the reference selects among LLaVA's projected visual tokens) give
the distance matrix D = 1 - F F^T with F = x / ||x|| (row norms, no epsilon). The first token is
the one whose nearest other token is farthest: argmax_j of the second-smallest entry of column j
of D (the smallest is the diagonal, about 0). Each further token is argmax_j min_{s selected}
D[s, j] (rows: the selected tokens). Ties go to the lowest index (as torch.argmax). The kept
tokens come out in input order (LLaVA sorts `keep_indexs`); prefix tokens stay in front.

One choice of ours: a token already selected is never picked again. The reference does not mask
them (they drop out because D[s, s] is about 0), so with duplicate tokens it can pick one twice
and keep fewer distinct tokens than asked; with distinct tokens both rules give the same picks
(`divprune(..., repeat=True)` is the reference's rule). The reference's budget is
`int(round(threshold_ratio * N))` (Python rounding, half to even): `keep_from_ratio`.

No gradient flows through the selection (the features are stopped); the kept tokens carry it.

Shapes: x [B, N, C] -> [B, p + keep, C]; plan: `jax_tokens.prune.PrunePlan` (no fusion).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_tokens import prune
from jax_tokens import tokens as tk
from jax_tokens.reducers.fastervlm import OneBlockSelector, l2_normalize
from jax_tokens.reducers.registry import register

__all__ = ["cosine_distance", "divprune", "keep_from_ratio", "DivPrune"]


def keep_from_ratio(ratio: float, n: int) -> int:
    """The reference's budget: int(round(ratio * n)) with Python's round (half to even)."""
    tk.static_float("ratio", ratio, low=0.0, high=1.0)
    return int(round(ratio * tk.static_int("n", n, low=1)))


def cosine_distance(feats: jax.Array) -> jax.Array:
    """[B, N, C] -> [B, N, N] fp32: 1 - cos, F = feats / ||feats|| (no epsilon: a zero token
    gives NaN, as the reference; `l2_normalize`: the same bits eager and under jit). No
    gradient."""
    f = l2_normalize(jax.lax.stop_gradient(tk.as_array("feats", feats)))
    return 1.0 - jnp.einsum("bnc,bmc->bnm", f, f, precision=jax.lax.Precision.HIGHEST)


def divprune(feats: jax.Array | None, k: int, *, distance: jax.Array | None = None,
             repeat: bool = False) -> jax.Array:
    """Greedy max-min diversity selection: [B, k] int32 token indices in greedy order.

    feats: [B, N, C] tokens (the distances are `cosine_distance(feats)`), or None with
      `distance` [B, N, N] given (the reference's `cosine_matrix` argument).
    k: tokens to select, a static int in 1..N.
    repeat: False (ours): a selected token is never picked again; True: the reference's rule,
      which can re-pick one when every remaining score is at most its self-distance.
    """
    if distance is None:
        if feats is None:
            raise ValueError("divprune needs feats [B, N, C] or distance [B, N, N]")
        feats = tk.as_array("feats", feats)
        tk.check_tokens("feats", feats)
        d = cosine_distance(feats)
    else:
        d = jax.lax.stop_gradient(tk.as_array("distance", distance)).astype(jnp.float32)
        if d.ndim != 3 or d.shape[1] != d.shape[2]:
            raise ValueError(f"distance must have shape [B, N, N]; got {d.shape}")
    b, n = d.shape[0], d.shape[1]
    k = tk.static_int("k", k, low=1, high=n)
    if n < 2:
        raise ValueError("divprune needs at least 2 tokens (the first pick is scored by the "
                         "distance to the nearest other token)")
    # Step 0: the second-smallest entry of each column (the nearest other token's distance).
    second = -jax.lax.top_k(-jnp.swapaxes(d, 1, 2), 2)[0][..., 1]           # [B, N]
    first = jnp.argmax(second, axis=-1).astype(jnp.int32)
    rows = jnp.arange(b)

    def step(i, carry):
        sel, mind, taken = carry
        score = mind if repeat else jnp.where(taken, -jnp.inf, mind)
        s = jnp.argmax(score, axis=-1).astype(jnp.int32)
        return (sel.at[:, i].set(s), jnp.minimum(mind, d[rows, s]),
                taken.at[rows, s].set(True))

    sel = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first)
    taken = jnp.zeros((b, n), bool).at[rows, first].set(True)
    return jax.lax.fori_loop(1, k, step, (sel, d[rows, first], taken))[0]


@register
@dataclasses.dataclass(frozen=True)
class DivPrune(OneBlockSelector):
    """DivPrune: `keep` patch tokens chosen for diversity, in input order. Fields: keep,
    layers, place (see `jax_tokens.reducers.fastervlm.OneBlockSelector`)."""

    method: ClassVar[str] = "divprune"

    def _check_block(self, layer, patches):
        if patches < 2:
            raise ValueError(f"reduction=divprune at block {layer} needs at least 2 patch "
                             f"tokens; {patches} enter it")

    def flops(self, layout, spec):
        n = spec.n_in - layout.num_prefix_tokens     # the distance matrix, then k min-updates
        return 2 * n * n * layout.embed_dim + 2 * spec.budget * n

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        p = layout.num_prefix_tokens
        x = tk.as_array("x", x)
        idx = jnp.sort(divprune(x[:, p:], spec.budget), axis=1)
        plan = prune.PrunePlan(kept_idx=idx, n_in=x.shape[1], protected=p)
        return prune.prune(plan, x), prune.prune_size(plan, size), plan
