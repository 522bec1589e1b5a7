"""FasterVLM [`fastervlm`]: keep the patch tokens the class token attends to most, in their
input order (Zhang et al., 2024, "[CLS] Attention is All You Need for Training-Free Visual Token
Pruning: Make VLM Inference Faster"; Theia-4869/FasterVLM).

At one block the patch tokens (prefix tokens excluded, kept in front) are ranked by the class
token's attention of that block averaged over heads (`cls_probs`, the row of query 0: the class
token; in a model without one, whatever token 0 is, as `topk(score="cls_attn")`), and the `keep`
highest stay, in input (position) order; nothing is fused. Ties go to the lower index
(`lax.top_k`). The selection carries no gradient; the kept tokens do.

Also here: `OneBlockSelector`, what the four visual-token selectors (`fastervlm`, `visionzip`,
`divprune`, `prumerge`) share. A VLM takes the tokens of one encoder layer (LLaVA: the
penultimate), so a selector runs at exactly one block:

  * `layers=(l,)`: the block; negative indices count from the end (`(-2,)`: the penultimate
    block, `(-1,)`: the last). More than one block or none is an error.
  * `keep`: patch tokens kept (a static int in 1..patch tokens entering the block); prefix
    tokens (class, distillation, registers) always stay in front, so the block puts out
    prefix + keep tokens (PruMerge: + 1 extra token). The DINOv2 study keeps 64 / 128 / 192
    of 256 patches with every method.
  * `place`: "after" (the default: on the block's output, after the MLP, with that block's
    attention statistics; what a VLM reads from a layer's hidden states) or "mid" (after the
    attention, before the MLP).

Shapes: x [B, N, C] -> [B, p + keep, C]; sizes gathered; plan: `jax_tokens.prune.PrunePlan`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_tokens import prune
from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["OneBlockSelector", "FasterVLM", "PLACES", "l2_normalize"]

PLACES = ("after", "mid")


def l2_normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
    """x / max(||x||, eps) along the last axis in fp32 (eps 0: no epsilon, a zero row gives
    NaN), with the same bits eager and under jit: the squared norms are a matrix-vector product
    (a dot is not re-fused like a reduction) and the norm passes an optimization barrier, so
    XLA cannot turn the division into a multiplication by rsqrt. Cosines of parallel tokens
    then stay exact ties in both modes (the selectors break ties by index)."""
    x = x.astype(jnp.float32)
    ones = jnp.ones((x.shape[-1],), jnp.float32)
    sq = jnp.einsum("...c,c->...", x * x, ones, precision=jax.lax.Precision.HIGHEST)
    norm = jnp.sqrt(sq)[..., None]
    if eps:
        norm = jnp.maximum(norm, jnp.float32(eps))
    return x / jax.lax.optimization_barrier(norm)


@dataclasses.dataclass(frozen=True)
class OneBlockSelector(base.Reducer):
    """A visual-token selector at one block (see the module docstring).

    Fields: keep (patch tokens kept, default 64), layers (one block index; negative counts
    from the end), place ("after" or "mid"). Subclasses set `extra_tokens` (outputs beyond
    prefix + keep) and may check a block in `_check_block`."""

    picture: ClassVar[str] = "kept"
    extra_tokens: ClassVar[int] = 0
    keep: int = 64
    layers: tuple = ()
    place: str = "after"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        tk.static_int("reduction.keep", self.keep, low=1)
        if len(self.layers) != 1:
            raise ValueError(f"reduction.layers={list(self.layers)}: {self.method} selects "
                             "tokens at exactly one block; give layers=(l,) (negative l counts "
                             "from the end: (-2,) is the penultimate block)")
        l = self.layers[0]
        if isinstance(l, bool) or not isinstance(l, int):
            raise TypeError(f"reduction.layers entry {l!r} must be an int (a block index)")
        if self.place not in PLACES:
            raise ValueError(f"reduction.place={self.place!r} is not one of {PLACES}")

    def block(self, layout: base.TokenLayout) -> int:
        """The block index in 0..depth-1 (ValueError naming a layer outside the model)."""
        l = self.layers[0]
        if not -layout.depth <= l < layout.depth:
            raise ValueError(f"reduction.layers contains {l}, but the model has {layout.depth} "
                             f"blocks (allowed: {-layout.depth}..{layout.depth - 1})")
        return l % layout.depth

    def _check_block(self, layer: int, patches: int) -> None:
        """Method-specific checks of the active block (patches: patch tokens entering it)."""

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        at = self.block(layout)
        n, p = layout.num_tokens, layout.num_prefix_tokens
        if not 1 <= self.keep <= n - p:
            raise ValueError(f"reduction.keep={self.keep} at block {at}: {n - p} patch tokens "
                             f"(besides {p} prefix tokens) enter it (allowed: 1..{n - p})")
        self._check_block(at, n - p)
        specs = [base.LayerSpec(n, n) for _ in range(layout.depth)]
        specs[at] = base.LayerSpec(n, p + self.keep + self.extra_tokens, self.keep, active=True)
        for l in range(at + 1, layout.depth):
            specs[l] = base.LayerSpec(specs[at].n_out, specs[at].n_out)
        return tuple(specs)

    def placement(self, spec: base.LayerSpec) -> str:
        return self.place


@register
@dataclasses.dataclass(frozen=True)
class FasterVLM(OneBlockSelector):
    """FasterVLM: the `keep` patch tokens with the most class-token attention (head mean), in
    input order. Fields: keep, layers, place (see `OneBlockSelector`)."""

    method: ClassVar[str] = "fastervlm"

    def stats(self, layout, spec):
        return ("cls_probs",)

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        base.check_stats(self, layout, spec, stats)
        p = layout.num_prefix_tokens
        scores = prune.cls_attention(stats["cls_probs"], p)
        plan = prune.topk(scores, spec.budget, protected=p, order="position")
        return prune.prune(plan, x), prune.prune_size(plan, size), plan
