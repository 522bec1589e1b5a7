"""Top-k pruning [`topk`]: keep the k highest-scoring tokens at chosen blocks.

Scores (`score`): "cls_attn" (the class token's attention, head mean: EViT's), "key_mass"
(attention received per key, head mean), "l2_norm" (token norm) or "random" (a floor; needs a
PRNG key). The kept tokens come out in descending score order or in input order (`order`);
with `fuse` the dropped tokens are fused into one extra token (EViT), weighted by the scores
(CLS attention) or by their softmax (the other scores). Prefix tokens (class, distillation,
registers) are always kept in front. The primitives live in `jax_tokens.prune`; `evit.py` is
this reducer with EViT's choices fixed.

Shapes: x [B, N, C] -> [B, p + k (+1), C], k = ceil(keep_rate * (N - p)); plan: `PrunePlan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from jax_tokens import prune
from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

# score name -> (attention statistics it needs, scores(x, stats, protected, key) [B, N - p])
SCORES = {
    "cls_attn": (("cls_probs",), lambda x, st, p, key: prune.cls_attention(st["cls_probs"], p)),
    "key_mass": (("key_mass",), lambda x, st, p, key: prune.key_mass(st["key_mass"], p)),
    "l2_norm": ((), lambda x, st, p, key: prune.l2_norm(x, p)),
    "random": ((), lambda x, st, p, key: prune.random_scores(key, x.shape[0], x.shape[1] - p)),
}
ORDERS = ("score", "position")


@dataclasses.dataclass(frozen=True)
class KeepTopK(base.Reducer):
    """What top-k pruning and EViT share: keep rates per listed block, fusion, the schedule.

    Subclasses provide `score` and `order` (fields or class constants).
    """

    picture: ClassVar[str] = "kept"
    keep_rate: Any = 1.0
    layers: tuple = ()
    fuse: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for l in self.layers:
            tk.static_int("reduction.layers entry", l, low=0)
        rates = self.keep_rate
        if isinstance(rates, (list, tuple)):
            rates = tuple(rates)
            object.__setattr__(self, "keep_rate", rates)
            if len(rates) != len(self.layers):
                raise ValueError(f"reduction.keep_rate has {len(rates)} entries but "
                                 f"reduction.layers has {len(self.layers)}: give one rate per "
                                 "pruning layer, or a single float")
            for l, rate in zip(self.layers, rates):
                tk.static_float(f"reduction.keep_rate (layer {l})", rate, low=0.0, high=1.0)
        else:
            where = (f" (layer{'s' if len(self.layers) > 1 else ''} "
                     f"{', '.join(map(str, self.layers))})" if self.layers else "")
            tk.static_float(f"reduction.keep_rate{where}", rates, low=0.0, high=1.0)
        if not isinstance(self.fuse, bool):
            raise TypeError(f"reduction.fuse={self.fuse!r} must be a bool")
        if self.score not in SCORES:
            raise ValueError(f"reduction.score={self.score!r} is not one of {tuple(SCORES)}")
        if self.order not in ORDERS:
            raise ValueError(f"reduction.order={self.order!r} is not one of {ORDERS}")

    def _rates(self) -> dict[int, float]:
        rates = self.keep_rate if isinstance(self.keep_rate, tuple) else \
            (self.keep_rate,) * len(self.layers)
        return dict(zip(self.layers, rates))

    @property
    def needs_key(self) -> bool:
        return self.score == "random"

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        base.check_layers(self.layers, layout)
        rates, p, n = self._rates(), layout.num_prefix_tokens, layout.num_tokens
        specs = []
        for l in range(layout.depth):
            if l in rates:
                k = prune.keep_count(rates[l], n - p)
                if k < n - p:
                    n_out = p + k + int(self.fuse)
                    specs.append(base.LayerSpec(n, n_out, k, active=True))
                    n = n_out
                    continue
            specs.append(base.LayerSpec(n, n))
        return tuple(specs)

    def stats(self, layout, spec):
        return SCORES[self.score][0]

    def flops(self, layout, spec):
        # The fused token: a weighted sum over the prunable tokens.
        return 2 * (spec.n_in - layout.num_prefix_tokens) * layout.embed_dim if self.fuse else 0

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        if isinstance(self.keep_rate, tuple):
            return self.replace(keep_rate=tuple(1.0 - (1.0 - k) * fraction
                                                for k in self.keep_rate))
        return self.replace(keep_rate=1.0 - (1.0 - self.keep_rate) * fraction)

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        p = layout.num_prefix_tokens
        if self.needs_key and key is None:
            raise ValueError(f"reduction.score={self.score!r} needs a PRNG key: call the model "
                             "with key=jax.random.key(...)")
        scores = SCORES[self.score][1](x, stats, p, key)
        fuse_w = None
        if self.fuse:   # EViT's weights are the CLS attention; other scores: their softmax
            fuse_w = scores if self.score == "cls_attn" else jax.nn.softmax(scores, axis=-1)
        plan = prune.topk(scores, spec.budget, protected=p, order=self.order, fuse=self.fuse,
                          fuse_weights=fuse_w)
        return prune.prune(plan, x), prune.prune_size(plan, size), plan


@register
@dataclasses.dataclass(frozen=True)
class TopK(KeepTopK):
    """Top-k pruning with a choice of score and output order (see the module docstring).

    Fields: keep_rate (a float in (0, 1] or one per listed block), layers (block indices),
    score ("cls_attn", "key_mass", "l2_norm", "random"), order ("score", "position"), fuse.
    """

    method: ClassVar[str] = "topk"
    score: str = "cls_attn"
    order: str = "score"
