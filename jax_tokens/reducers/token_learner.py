"""TokenLearner [`token_learner`]: after one block's attention, M learned tokens replace the
patch tokens (Ryoo et al., NeurIPS 2021; v1.1 as in scenic's `TokenLearnerModuleV11`).

An MLP on the layer-normed tokens emits M score maps; a softmax over the N patch tokens turns
each into weights, and output token m is the weighted sum of the patch tokens. The prefix
tokens (class, registers) pass through in front. Each learned token's size is the share of
every patch's size it takes (a patch's weights over the M tokens, renormalised), so sizes keep
summing to the input count. The module (`jax_tokens.lookup.TokenLearner`) is owned by the
block it runs in (`blocks.<l>.reducer`).

Shapes: x [B, p + N, C] -> [B, p + M, C]; plan: `jax_tokens.lookup.LookupPlan` with prefix p.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jax_tokens import lookup
from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register


@register
@dataclasses.dataclass(frozen=True)
class TokenLearner(base.Reducer):
    """Fields: layers (exactly one block index), num_tokens (M), hidden_dim (the score MLP's
    width; scenic's bottleneck_dim, 64)."""

    method: ClassVar[str] = "token_learner"
    learned: ClassVar[bool] = True
    layers: tuple = ()
    num_tokens: int = 8
    hidden_dim: int = 64

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != 1:
            raise ValueError(f"reduction.layers={self.layers} must name exactly one block for "
                             "the token_learner reducer")
        tk.static_int("reduction.layers entry", self.layers[0], low=0)
        tk.static_int("reduction.num_tokens", self.num_tokens, low=1)
        tk.static_int("reduction.hidden_dim", self.hidden_dim, low=1)

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        base.check_layers(self.layers, layout)
        p, n, m = layout.num_prefix_tokens, layout.num_tokens, self.num_tokens
        if m >= n - p:
            raise ValueError(f"reduction.num_tokens={m} at block {self.layers[0]} must be fewer "
                             f"than the {n - p} patch tokens entering it")
        specs = []
        for l in range(layout.depth):
            if l == self.layers[0]:
                specs.append(base.LayerSpec(n, p + m, m, active=True))
                n = p + m
            else:
                specs.append(base.LayerSpec(n, n))
        return tuple(specs)

    def flops(self, layout, spec):
        return lookup.token_learner_flops(spec.n_in - layout.num_prefix_tokens,
                                          layout.embed_dim, spec.budget, self.hidden_dim)

    def make_module(self, layout, spec, *, dtype=None, rngs=None):
        return lookup.TokenLearner(layout.embed_dim, spec.budget, self.hidden_dim, dtype=dtype,
                                   rngs=rngs)

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        if module is None:
            raise ValueError("the token_learner reducer needs its TokenLearner module: build "
                             "the model with this reduction (its parameters live in the block)")
        p = layout.num_prefix_tokens
        y, plan = module(x[:, p:])
        w = plan.weights.astype(jnp.float32)                          # [B, M, N]
        share = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)  # each patch's shares
        new_size = jnp.einsum("bmn,bn->bm", share, size[:, p:, 0])[..., None]
        x = jnp.concatenate([x[:, :p], y.astype(x.dtype)], axis=1)
        size = jnp.concatenate([size[:, :p], new_size], axis=1)
        return x, size, lookup.LookupPlan(weights=plan.weights, prefix=p)
