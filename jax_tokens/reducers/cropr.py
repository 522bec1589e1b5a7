"""Token Cropr [`cropr`]: learned queries of an auxiliary head score the tokens; each module
prunes a fixed count, and the pruned tokens rejoin before the last block (Bergner et al.,
2024; benbergner/cropr, `cls/cropr.py`, `cls/vision_transformer.py`).

A Cropr module follows a block (placement "after"). Its cross-attention scorer reads
k = k_proj(attn_norm(x)) (projection and norm optional) with M learned queries q (optionally
projected):

    scores[b, n] = sum over heads h and queries m of q[m, h] . k[b, n, h]   (unscaled logits)

The prefix tokens (class token, registers) are always kept in front (the reference sets the
class token's score to +inf); the other tokens are ranked by descending score: the first
n_in - rate are kept in that order, the rest are pruned (also in descending order). With
`llf` (the paper's last-layer fusion) the pruned tokens of every module are concatenated
after the kept tokens, in pruning order, before the last block; without it they are gone.

In training (`training()`), the same module also aggregates the tokens with its queries
(softmax(scale * logits) @ v, an output projection when heads > 1, a pre-norm MLP) and a
classification head (LayerNorm eps 1e-5 + Linear) predicts the label from it. The scorer
sees the tokens with gradients stopped (the reference's `x.detach()`), so the backbone is
trained by the main loss only and each module by its head's cross-entropy (`loss`, weight
`aux_weight` each, 1 in the reference). With M > 1 queries the head predicts per query; the
reference hands the [B, M, classes] tensor to the criterion, which reads its dimension 1 as
the classes, so we average the cross-entropy over the queries instead (a stated choice).

Schedule (the reference's): one module after each block but the last (with llf: but the
last two); the first removes rate + 1 tokens, the others rate. `layers` may name other
blocks. Shapes: x [B, n, C] -> [B, n - rate_l, C]; plan: `CroprPlan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jax_tokens import prune
from jax_tokens import sharding as shd
from jax_tokens import tokens as tk
from jax_tokens.layers import Mlp
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["CroprModule", "CroprPlan", "Cropr"]


def _linear(din, dout, rngs, *, bias=True, dtype=None):
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, rngs=rngs,
                      kernel_init=nnx.initializers.truncated_normal(0.02),
                      bias_init=nnx.initializers.zeros)


def _norm(dim, eps, rngs, dtype=None):
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs)


class CroprModule(nnx.Module):
    """One Cropr module: the cross-attention scorer / aggregator and the auxiliary head.

    scores(x [B, N, C]) -> [B, N]; predict(x) -> (scores, logits [B, classes] or
    [B, M, classes] when M > 1). Parameter names follow the reference (`torch_names`).
    """

    def __init__(self, dim: int, num_classes: int, *, num_queries: int = 1, num_heads: int = 1,
                 pre_attn_norm: bool = False, q_proj: bool = False, k_proj: bool = False,
                 v_proj: bool = False, mlp: bool = True, mlp_ratio: float = 4.0, dtype=None,
                 rngs: nnx.Rngs):
        self.num_heads, self.num_queries = num_heads, num_queries
        init = nnx.initializers.truncated_normal(dim ** -0.5)
        self.queries = nnx.Param(init(rngs.params(), (1, num_queries, dim), jnp.float32))
        self.q = _linear(dim, dim, rngs, bias=False, dtype=dtype) if q_proj else None
        self.k = _linear(dim, dim, rngs, bias=False, dtype=dtype) if k_proj else None
        self.v = _linear(dim, dim, rngs, bias=False, dtype=dtype) if v_proj else None
        self.attn_norm = _norm(dim, 1e-6, rngs, dtype) if pre_attn_norm else None
        self.proj = _linear(dim, dim, rngs, dtype=dtype) if num_heads > 1 else None
        self.mlp_norm = _norm(dim, 1e-6, rngs, dtype) if mlp else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio), kernel_init=nnx.initializers.truncated_normal(
            0.02), dtype=dtype, rngs=rngs) if mlp else None
        self.head_norm = _norm(dim, 1e-5, rngs, dtype)
        self.head = _linear(dim, num_classes, rngs, dtype=dtype)

    def _qk(self, x):
        if self.attn_norm is not None:
            x = self.attn_norm(x)
        q = self.queries[...].astype(x.dtype)[0]                     # [M, C]
        if self.q is not None:
            q = self.q(q)
        k = x if self.k is None else self.k(x)
        b, n, c = k.shape
        d = c // self.num_heads
        logits = jnp.einsum("mhd,bnhd->bhmn", q.reshape(-1, self.num_heads, d),
                            k.reshape(b, n, self.num_heads, d),
                            preferred_element_type=jnp.float32)      # unscaled
        return x, logits

    def scores(self, x: jax.Array) -> jax.Array:
        """[B, N, C] -> [B, N]: the unscaled query-key logits summed over heads and queries."""
        return self._qk(x)[1].sum(axis=(1, 2))

    def predict(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The training forward: (scores [B, N], auxiliary logits)."""
        x, logits = self._qk(x)
        b, n, c = x.shape
        d = c // self.num_heads
        v = x if self.v is None else self.v(x)
        probs = jax.nn.softmax(logits * d ** -0.5, axis=-1)
        agg = jnp.einsum("bhmn,bnhd->bmhd", probs.astype(v.dtype),
                         v.reshape(b, n, self.num_heads, d)).reshape(b, -1, c)
        if self.proj is not None:
            agg = self.proj(agg)
        if self.mlp is not None:
            agg = agg + self.mlp(self.mlp_norm(agg))
        out = self.head(self.head_norm(agg)).astype(jnp.float32)     # [B, M, classes]
        return logits.sum(axis=(1, 2)), (out[:, 0] if self.num_queries == 1 else out)

    def torch_names(self) -> dict[str, tuple[nnx.Variable, str]]:
        """Reference name (under `cropr.<i>.`) -> (variable, "linear" | "id")."""
        out = {"cross_attn.queries": (self.queries, "id")}
        for name, lin in (("cross_attn.q", self.q), ("cross_attn.k", self.k),
                          ("cross_attn.v", self.v), ("cross_attn.proj", self.proj),
                          ("cross_attn.mlp.fc1", self.mlp and self.mlp.fc1),
                          ("cross_attn.mlp.fc2", self.mlp and self.mlp.fc2),
                          ("head.head", self.head)):
            if lin is not None:
                out[f"{name}.weight"] = (lin.kernel, "linear")
                if lin.bias is not None:
                    out[f"{name}.bias"] = (lin.bias, "id")
        for name, norm in (("cross_attn.attn_norm", self.attn_norm),
                           ("cross_attn.mlp_norm", self.mlp_norm), ("head.norm", self.head_norm)):
            if norm is not None:
                out[f"{name}.weight"] = (norm.scale, "id")
                out[f"{name}.bias"] = (norm.bias, "id")
        return out


@struct.dataclass
class CroprPlan:
    """A Cropr module's selection: `kept` (a `PrunePlan`, descending score order after the
    prefix), `pruned_idx` [B, rate] (indices into the prunable tokens, descending score), and
    in training the auxiliary head's `logits`."""

    kept: prune.PrunePlan
    pruned_idx: jax.Array
    logits: jax.Array | None = None

    @property
    def n_in(self) -> int:
        return self.kept.n_in

    @property
    def n_out(self) -> int:
        return self.kept.n_out

    @property
    def kept_idx(self) -> jax.Array:
        return self.kept.kept_idx

    @property
    def keep_positions(self) -> jax.Array:
        return self.kept.keep_positions

    @property
    def assignment(self) -> jax.Array:
        return self.kept.assignment

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        return self.kept.matrix(size)

    def apply(self, x: jax.Array) -> jax.Array:
        return prune.prune(self.kept, x)

    def invert(self, y: jax.Array) -> jax.Array:
        return self.kept.invert(y)

    def set_aside(self, x: jax.Array) -> jax.Array:
        """The pruned tokens of x [B, n_in, ...] in descending score order [B, rate, ...]."""
        return tk.gather_tokens(x, self.pruned_idx + self.kept.protected)


@register
@dataclasses.dataclass(frozen=True)
class Cropr(base.Reducer):
    """Fields: rate (tokens each module prunes; the first prunes one more), llf (pruned tokens
    rejoin before the last block), layers (blocks followed by a module; () = the reference's:
    all but the last, with llf all but the last two),
    num_queries, num_heads, pre_attn_norm, q_proj, k_proj, v_proj, mlp, mlp_ratio (the
    module, the reference's defaults), aux_weight (each head's loss weight)."""

    method: ClassVar[str] = "cropr"
    learned: ClassVar[bool] = True
    picture: ClassVar[str] = "kept"
    rate: int = 8
    llf: bool = True
    layers: tuple = ()
    num_queries: int = 1
    num_heads: int = 1
    pre_attn_norm: bool = False
    q_proj: bool = False
    k_proj: bool = False
    v_proj: bool = False
    mlp: bool = True
    mlp_ratio: float = 4.0
    aux_weight: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        tk.static_int("reduction.rate", self.rate, low=1)
        tk.static_int("reduction.num_queries", self.num_queries, low=1)
        tk.static_int("reduction.num_heads", self.num_heads, low=1)
        for l in self.layers:
            tk.static_int("reduction.layers entry", l, low=0)
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"reduction.layers={self.layers} must be strictly increasing")
        for name in ("llf", "pre_attn_norm", "q_proj", "k_proj", "v_proj", "mlp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"reduction.{name}={getattr(self, name)!r} must be a bool")
        tk.static_float("reduction.mlp_ratio", self.mlp_ratio, low=0.0, high=None)
        tk.static_float("reduction.aux_weight", self.aux_weight, low=0.0, high=None,
                        low_open=False)

    def _layers(self, layout: base.TokenLayout) -> tuple[int, ...]:
        # The reference's: a module after every block but the last (llf: but the last two).
        layers = self.layers or tuple(range(layout.depth - (2 if self.llf else 1)))
        if not layers:
            raise ValueError(f"reduction.layers=() places Cropr modules after blocks "
                             f"0..depth-{2 if self.llf else 1}, none in a {layout.depth}-block "
                             "model; name the blocks or use a deeper model")
        base.check_layers(layers, layout)
        if self.llf and layers[-1] >= layout.depth - 1:
            raise ValueError(f"reduction.layers contains {layers[-1]}: with llf=True the pruned "
                             f"tokens rejoin before the last block, so modules follow blocks "
                             f"0..{layout.depth - 2}")
        return layers

    def rejoin_block(self, layout):
        return layout.depth - 1 if self.llf else None

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        if layout.embed_dim % self.num_heads:
            raise ValueError(f"reduction.num_heads={self.num_heads} must divide the embedding "
                             f"width {layout.embed_dim}")
        layers = self._layers(layout)
        p, n, total = layout.num_prefix_tokens, layout.num_tokens, layout.num_tokens
        specs = []
        for l in range(layout.depth):
            if self.llf and l == layout.depth - 1:
                n = total       # the pruned tokens are back
            if l in layers:
                rate = self.rate + (1 if l == layers[0] else 0)
                if n - rate < p + 1:
                    raise ValueError(f"reduction.rate={self.rate} at layer {l} prunes {rate} of "
                                     f"the {n - p} patch tokens entering it; allowed: fewer "
                                     "than that (at least one token must stay)")
                specs.append(base.LayerSpec(n, n - rate, rate, active=True))
                n -= rate
            else:
                specs.append(base.LayerSpec(n, n))
        return tuple(specs)

    def placement(self, spec):
        return "after"

    def flops(self, layout, spec):
        c, n, m = layout.embed_dim, spec.n_in, self.num_queries
        f = 2 * n * c * m + (2 * n * c * c if self.k_proj else 0)   # the scorer's logits
        return f + (2 * m * c * c if self.q_proj else 0)

    def make_module(self, layout, spec, *, dtype=None, rngs=None):
        if layout.num_classes < 1:
            raise ValueError("the cropr reducer needs the model's number of classes for its "
                             "auxiliary heads (TokenLayout.num_classes)")
        return CroprModule(layout.embed_dim, layout.num_classes, num_queries=self.num_queries,
                           num_heads=self.num_heads, pre_attn_norm=self.pre_attn_norm,
                           q_proj=self.q_proj, k_proj=self.k_proj, v_proj=self.v_proj,
                           mlp=self.mlp, mlp_ratio=self.mlp_ratio, dtype=dtype, rngs=rngs)

    def torch_prefix(self, layout: base.TokenLayout, layer: int) -> str:
        """The reference's state-dict prefix of the module after block `layer`."""
        return f"cropr.{self._layers(layout).index(layer)}"

    def _select(self, layout, spec, x, size, scores, logits=None):
        p = layout.num_prefix_tokens
        keep = spec.n_out - p

        def select(scores, x, size):
            _, order = jax.lax.top_k(jax.lax.stop_gradient(scores[:, p:]), spec.n_in - p)
            order = order.astype(jnp.int32)
            kept = prune.PrunePlan(kept_idx=order[:, :keep], n_in=spec.n_in, protected=p)
            return prune.prune(kept, x), prune.prune_size(kept, size), kept, order[:, keep:]

        # The module's scores are per token; the selection runs on each device's own examples
        # under a mesh (XLA would all-gather the batch for the top-k otherwise).
        x, size, kept, pruned_idx = shd.per_example(select, scores, x, size)
        return x, size, CroprPlan(kept=kept, pruned_idx=pruned_idx, logits=logits)

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        if module is None:
            raise ValueError("the cropr reducer needs its module: build the model with this "
                             "reduction (its parameters live in the block)")
        return self._select(layout, spec, x, size, module.scores(x))

    def training(self) -> "Cropr":
        return CroprTraining(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class CroprTraining(Cropr):
    """Cropr in the train step: each module's head predicts the label from its aggregated
    queries (on the tokens with gradients stopped); `loss` adds their cross-entropies. Not
    registered: `Cropr.training()` makes it."""

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        if module is None:
            raise ValueError("the cropr reducer needs its module: build the model with this "
                             "reduction (its parameters live in the block)")
        scores, logits = module.predict(jax.lax.stop_gradient(x))
        return self._select(layout, spec, x, size, scores, logits)

    def loss(self, layout, logits, aux, *, labels, teacher=None):
        del logits, teacher
        terms: dict[str, Any] = {}
        for i, plan in enumerate(aux["plans"]):
            lg = plan.logits
            lab = labels if lg.ndim == 2 else jnp.broadcast_to(labels[:, None], lg.shape[:2])
            terms[f"aux_loss_{i}"] = optax.softmax_cross_entropy_with_integer_labels(
                lg, lab).mean()
        return self.aux_weight * sum(terms.values()), terms
