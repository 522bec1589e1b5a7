"""DynamicViT [`dynamicvit`]: a small learned predictor decides which tokens to keep (Rao et
al., NeurIPS 2021; raoyongming/DynamicViT, `models/dyvit.py` and `losses.py`).

Before each listed block, the prediction module scores the patch tokens:

    h = GELU(Linear(LayerNorm(x)))                      LayerNorm eps 1e-5, exact GELU
    z = [h_local, mean_policy(h_global)]                halves of h; the global half is the
                                                        policy-masked mean over tokens
    log_probs = log_softmax(MLP(z))                     C -> C/2 -> C/4 -> 2, index 0 = keep

Inference keeps k_p = int(N0 * keep_ratio[p]) patch tokens (N0: the patch tokens entering the
model; the reference hard-codes 14 * 14, which is the patch count at 224 / 16), the prefix
tokens first, then the kept tokens in descending keep score (the reference's argsort order).
The ratios are relative to N0 and must not grow with depth.

Training (`training()`) keeps all N tokens (static shapes): a Gumbel-softmax hard sample of
the predictor's log-probs (straight-through gradients) times the previous decision is the
keep policy, carried as the token sizes, and every block's attention applies it
multiplicatively (`Reducer.policy_attention`: DynamicViT's softmax_with_policy, the
diagonal kept, eps 1e-6). Its loss (`loss`) adds the paper's terms to the classification
loss, with the reference's DeiT weights: ratio_weight * mean_p (mean over examples of
(kept share - keep_ratio[p])^2) + distill_weight * (KL(teacher || student) on the logits +
MSE of the final patch tokens on the tokens kept at the end). The teacher is the unreduced
model (`needs_teacher`); the trainer runs it on the same images with the current
parameters and gradients stopped (the reference uses a frozen copy of the pretrained
weights the student starts from; see the README).

Shapes: x [B, p + n, C] -> [B, p + k_p, C] (inference) or [B, p + n, C] (training);
plan: `jax_tokens.prune.PrunePlan` (inference) or `PolicyPlan` (training).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jax_tokens import prune
from jax_tokens import sharding as shd
from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["Predictor", "PolicyPlan", "DynamicViT", "predictor_flops"]


def _linear(din, dout, rngs, dtype=None):
    return nnx.Linear(din, dout, dtype=dtype, rngs=rngs,
                      kernel_init=nnx.initializers.truncated_normal(0.02),
                      bias_init=nnx.initializers.zeros)


class Predictor(nnx.Module):
    """DynamicViT's prediction module (the reference's `PredictorLG`).

    __call__(x [B, n, C], policy [B, n, 1]) -> keep / drop log-probs [B, n, 2].
    Parameter names follow the reference (`in_conv.0` LayerNorm, `in_conv.1`, `out_conv.0`,
    `out_conv.2`, `out_conv.4` Linear) through `torch_names`.
    """

    def __init__(self, dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, epsilon=1e-5, dtype=dtype, use_fast_variance=False,
                                  rngs=rngs)
        self.inp = _linear(dim, dim, rngs, dtype)
        self.out1 = _linear(dim, dim // 2, rngs, dtype)
        self.out2 = _linear(dim // 2, dim // 4, rngs, dtype)
        self.out3 = _linear(dim // 4, 2, rngs, dtype)

    def __call__(self, x: jax.Array, policy: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.inp(self.norm(x)), approximate=False)
        c = h.shape[-1]
        policy = policy.astype(h.dtype)
        # The policy-weighted mean of the global half. The reference divides by the policy's
        # sum as is, which is 0/0 = NaN for an image whose every patch token an earlier stage
        # dropped (seen training on Fashion-MNIST: one seed's loss turned NaN at step 958);
        # a floor of 1e-6 leaves every other case bit-identical (sums of a 0/1 policy are 0
        # or >= 1) and gives such an image a zero global feature and finite gradients.
        glob = (h[..., c // 2:] * policy).sum(axis=1, keepdims=True) / jnp.maximum(
            policy.sum(axis=1, keepdims=True), 1e-6)
        h = jnp.concatenate([h[..., :c // 2], jnp.broadcast_to(glob, h[..., c // 2:].shape)],
                            axis=-1)
        h = jax.nn.gelu(self.out1(h), approximate=False)
        h = jax.nn.gelu(self.out2(h), approximate=False)
        return jax.nn.log_softmax(self.out3(h).astype(jnp.float32), axis=-1)

    def torch_names(self) -> dict[str, tuple[nnx.Variable, str]]:
        """Reference name (under `score_predictor.<p>.`) -> (variable, "linear" | "id")."""
        out = {"in_conv.0.weight": (self.norm.scale, "id"),
               "in_conv.0.bias": (self.norm.bias, "id")}
        for name, lin in (("in_conv.1", self.inp), ("out_conv.0", self.out1),
                          ("out_conv.2", self.out2), ("out_conv.4", self.out3)):
            out[f"{name}.weight"] = (lin.kernel, "linear")
            out[f"{name}.bias"] = (lin.bias, "id")
        return out


def predictor_flops(n: int, dim: int) -> int:
    """FLOPs of the predictor on n tokens (2 x multiply-adds of its four matmuls)."""
    return 2 * n * (dim * dim + dim * (dim // 2) + (dim // 2) * (dim // 4) + (dim // 4) * 2)


@struct.dataclass
class PolicyPlan:
    """DynamicViT in training: nothing moves; `decision` [B, n] (1 keep, 0 drop, with
    straight-through gradients) is the keep policy of the patch tokens after this block's
    sampling (already multiplied by the previous one)."""

    decision: jax.Array
    protected: int = struct.field(pytree_node=False, default=1)

    @property
    def n_in(self) -> int:
        return self.protected + self.decision.shape[1]

    @property
    def n_out(self) -> int:
        return self.n_in

    @property
    def assignment(self) -> jax.Array:
        """[B, N]: kept tokens stay in their slot, dropped ones -1."""
        b, n = self.decision.shape
        slots = jnp.broadcast_to(jnp.arange(self.n_in, dtype=jnp.int32), (b, self.n_in))
        kept = jnp.concatenate([jnp.ones((b, self.protected), bool), self.decision > 0.5], 1)
        return jnp.where(kept, slots, -1)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        del size
        d = jnp.concatenate([jnp.ones((self.decision.shape[0], self.protected)),
                             self.decision.astype(jnp.float32)], axis=1)
        return d[:, :, None] * jnp.eye(self.n_in, dtype=jnp.float32)

    def apply(self, x: jax.Array) -> jax.Array:
        return x

    def invert(self, y: jax.Array) -> jax.Array:
        return y


def _gumbel_keep(key: jax.Array, log_probs: jax.Array) -> jax.Array:
    """torch.nn.functional.gumbel_softmax(log_probs, hard=True)[..., 0]: the one-hot of the
    argmax of log_probs + Gumbel noise in the forward pass, the softmax's gradient."""
    g = jax.random.gumbel(key, log_probs.shape, jnp.float32)
    soft = jax.nn.softmax(log_probs + g, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), 2, dtype=soft.dtype)
    return (hard + soft - jax.lax.stop_gradient(soft))[..., 0]


@register
@dataclasses.dataclass(frozen=True)
class DynamicViT(base.Reducer):
    """Fields: layers (blocks before which a predictor prunes; the paper's (3, 6, 9) for
    12 blocks), keep_ratio (one per layer, relative to the model's patch tokens, not growing
    with depth; the paper's 0.7, 0.49, 0.343), ratio_weight and distill_weight (the training
    loss's weights; the reference's DeiT values 2.0 and 0.5)."""

    method: ClassVar[str] = "dynamicvit"
    learned: ClassVar[bool] = True
    picture: ClassVar[str] = "kept"
    layers: tuple = (3, 6, 9)
    keep_ratio: tuple = (0.7, 0.49, 0.343)
    ratio_weight: float = 2.0
    distill_weight: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        ratios = self.keep_ratio
        if not isinstance(ratios, (tuple, list)):
            ratios = (ratios,) * len(self.layers)
        object.__setattr__(self, "keep_ratio", tuple(ratios))
        if not self.layers:
            raise ValueError("reduction.layers=() must name at least one block for dynamicvit")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"reduction.layers={self.layers} must be strictly increasing block "
                             "indices")
        for l in self.layers:
            tk.static_int("reduction.layers entry", l, low=0)
        if len(self.keep_ratio) != len(self.layers):
            raise ValueError(f"reduction.keep_ratio has {len(self.keep_ratio)} entries but "
                             f"reduction.layers has {len(self.layers)}: give one per layer")
        prev = 1.0
        for l, r in zip(self.layers, self.keep_ratio):
            tk.static_float(f"reduction.keep_ratio (layer {l})", r, low=0.0, high=1.0)
            if r > prev:
                raise ValueError(f"reduction.keep_ratio={r} at layer {l} is above the ratio "
                                 f"{prev} of the layer before: DynamicViT's ratios are shares "
                                 "of the input patches and must not grow with depth")
            prev = r
        for name in ("ratio_weight", "distill_weight"):
            tk.static_float(f"reduction.{name}", getattr(self, name), low=0.0, high=None,
                            low_open=False)

    def _keep(self, layout: base.TokenLayout) -> dict[int, int]:
        n0 = layout.num_tokens - layout.num_prefix_tokens
        return {l: int(n0 * r) for l, r in zip(self.layers, self.keep_ratio)}

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        base.check_layers(self.layers, layout)
        keep, p, n = self._keep(layout), layout.num_prefix_tokens, layout.num_tokens
        specs = []
        for l in range(layout.depth):
            if l in keep:
                if keep[l] < 1:
                    raise ValueError(
                        f"reduction.keep_ratio={self.keep_ratio[self.layers.index(l)]} at layer "
                        f"{l} keeps int({layout.num_tokens - p} * ratio) = 0 patch tokens; "
                        "allowed: a ratio that keeps at least one")
                specs.append(base.LayerSpec(n, p + keep[l], keep[l], active=True))
                n = p + keep[l]
            else:
                specs.append(base.LayerSpec(n, n))
        return tuple(specs)

    def placement(self, spec):
        return "before"   # the reference prunes before the block runs

    def flops(self, layout, spec):
        return predictor_flops(spec.n_in - layout.num_prefix_tokens, layout.embed_dim)

    def anneal(self, layout, fraction):
        """Keep ratios part-way to their targets (1 - (1 - r) * fraction): the keep-ratio loss's
        targets in training, the kept counts in evaluation."""
        if fraction >= 1.0:
            return self
        return self.replace(keep_ratio=tuple(1.0 - (1.0 - r) * fraction
                                             for r in self.keep_ratio))

    def make_module(self, layout, spec, *, dtype=None, rngs=None):
        return Predictor(layout.embed_dim, dtype=dtype, rngs=rngs)

    def torch_prefix(self, layout: base.TokenLayout, layer: int) -> str:
        """The reference's state-dict prefix of the predictor at `layer`."""
        return f"score_predictor.{self.layers.index(layer)}"

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        if module is None:
            raise ValueError("the dynamicvit reducer needs its predictor: build the model with "
                             "this reduction (its parameters live in the block)")
        p = layout.num_prefix_tokens
        ones = jnp.ones(x.shape[:1] + (x.shape[1] - p, 1), x.dtype)   # eval: every token live
        scores = module(x[:, p:], ones)[..., 0]

        def select(scores, x, size):
            plan = prune.topk(scores, spec.budget, protected=p, order="score")
            return prune.prune(plan, x), prune.prune_size(plan, size), plan

        # The predictor is per token; the top-k runs on each device's own examples under a
        # mesh (XLA would all-gather the batch for it otherwise).
        return shd.per_example(select, scores, x, size)

    def training(self) -> "DynamicViT":
        return DynamicViTTraining(**{f.name: getattr(self, f.name)
                                     for f in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class DynamicViTTraining(DynamicViT):
    """DynamicViT in the train step: static N, Gumbel-softmax keep policies in the sizes,
    policy-masked attention in every block, the paper's losses (see the module docstring).
    Not registered: `DynamicViT.training()` makes it."""

    needs_key: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = True

    @property
    def policy_attention(self) -> bool:
        return True

    def schedule(self, layout):
        eval_specs = super().schedule(layout)
        n = layout.num_tokens
        return tuple(base.LayerSpec(n, n, s.budget, s.active) for s in eval_specs)

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        if module is None:
            raise ValueError("the dynamicvit reducer needs its predictor: build the model with "
                             "this reduction (its parameters live in the block)")
        if key is None:
            raise ValueError("DynamicViT's training path samples Gumbel noise: call the model "
                             "with key=jax.random.key(...)")
        p = layout.num_prefix_tokens
        prev = size[:, p:]                                      # [B, n, 1] the policy so far
        log_probs = module(x[:, p:], prev)
        decision = _gumbel_keep(key, log_probs) * prev[..., 0].astype(jnp.float32)
        size = jnp.concatenate([size[:, :p], decision[..., None].astype(size.dtype)], axis=1)
        return x, size, PolicyPlan(decision=decision, protected=p)

    def loss(self, layout, logits, aux, *, labels, teacher=None):
        del labels
        plans = aux["plans"]
        ratio = sum(jnp.mean((pl.decision.mean(axis=1) - r) ** 2)
                    for pl, r in zip(plans, self.keep_ratio)) / len(self.layers)
        terms: dict[str, Any] = {"ratio_loss": ratio}
        total = self.ratio_weight * ratio
        if teacher is not None:
            t_logits, t_aux = teacher
            logits = logits.astype(jnp.float32)
            log_s = jax.nn.log_softmax(logits, axis=-1)
            log_t = jax.nn.log_softmax(t_logits.astype(jnp.float32), axis=-1)
            kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s)) / logits.shape[0]
            p = layout.num_prefix_tokens
            mask = (plans[-1].decision > 0.5).astype(jnp.float32)[..., None]   # [B, n, 1]
            diff = (aux["last_hidden_state"][:, p:].astype(jnp.float32)
                    - t_aux["last_hidden_state"][:, p:].astype(jnp.float32)) ** 2
            count = mask.sum() * diff.shape[-1]
            mse = jnp.where(mask.sum() < 0.1, 0.0, (diff * mask).sum() / jnp.maximum(count, 1.0))
            terms.update(cls_distill=kl, token_distill=mse)
            total = total + self.distill_weight * (kl + mse)
        return total, terms
