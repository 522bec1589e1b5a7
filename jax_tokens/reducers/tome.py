"""ToMe [`tome`]: bipartite soft matching after every block's attention (Bolya et al., ICLR 2023;
facebookresearch/ToMe).

Each block splits its tokens alternately into sets A and B, scores every A token against every
B token by the cosine similarity of the head-mean attention keys, and merges the r A tokens with
the best edges into their B partners (size-weighted averages; sizes add). With proportional
attention the next block adds log(size) to the attention logits of every key. The class and
distillation tokens are never merged. The primitives live in `jax_tokens.merge`.

Shapes: x [B, N, C] -> [B, N - r, C]; sizes [B, N, 1] -> [B, N - r, 1]; plan: `MergePlan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from jax_tokens import merge
from jax_tokens import schedule as sched
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register


@register
@dataclasses.dataclass(frozen=True)
class ToMe(base.Reducer):
    """Token merging by bipartite soft matching.

    Fields:
      r: tokens merged per block: an int, an (r, inflection) pair (a linear ramp with the same
        total, inflection in [-1, 1]) or a per-block list (ToMe's `parse_r`).
      prop_attn: proportional attention (log(size) added to the logits).
      clamp_r: ToMe clamps an r larger than a block can merge ((tokens - protected) // 2) to
        that maximum; with clamp_r=False (the default) such an r is an error naming the block.
    """

    method: ClassVar[str] = "tome"
    r: Any = 0
    prop_attn: bool = True
    clamp_r: bool = False

    def __post_init__(self):
        r = self.r
        if isinstance(r, list):
            r = tuple(r)
            object.__setattr__(self, "r", r)
        pair = isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float)
        try:   # the forms parse_r accepts; the depth is checked against the model in schedule
            sched.parse_r(len(r) if isinstance(r, tuple) and not pair else 1, r)
        except (TypeError, ValueError) as e:
            raise type(e)(f"reduction.r={self.r!r} is not allowed ({e}): give an int >= 0, an "
                          "(r, inflection) pair or one int >= 0 per block") from None
        for name in ("prop_attn", "clamp_r"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"reduction.{name}={getattr(self, name)!r} must be a bool")

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        rs = sched.parse_r(layout.depth, self.r)
        protected = int(layout.class_token) + int(layout.distill_token)
        specs, n = [], layout.num_tokens
        for r in rs:
            r_eff = sched.tome_effective_r(n, r, protected)
            specs.append(base.LayerSpec(n, n - r_eff, r_eff, active=r_eff > 0))
            n -= r_eff
        if not self.clamp_r:
            for l, (spec, r) in enumerate(zip(specs, rs)):
                can = (spec.n_in - protected) // 2
                if r > can:
                    counts = [s.n_in for s in specs] + [specs[-1].n_out]
                    raise ValueError(
                        f"reduction.r asks block {l} to merge r={r} tokens, but only {spec.n_in} "
                        f"tokens enter it (at most {can} can merge: half of the "
                        f"{spec.n_in - protected} unprotected tokens); token counts per block "
                        f"when clamped: {counts}. Lower r, or set reduction.clamp_r=True to "
                        "clamp it as ToMe does")
        return tuple(specs)

    def stats(self, layout, spec):
        return ("mean_key",)

    @property
    def proportional_attention(self) -> bool:
        return self.prop_attn

    def flops(self, layout, spec):
        return sched.tome_matching_flops(spec.n_in, layout.head_dim)

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        rs = sched.parse_r(layout.depth, self.r)
        return self.replace(r=tuple(int(round(r * fraction)) for r in rs))

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        plan = merge.bipartite_soft_matching(stats["mean_key"], spec.budget,
                                             class_token=layout.class_token,
                                             distill_token=layout.distill_token)
        x, size = merge.merge_wavg(plan, x, size)
        return x, size, plan
