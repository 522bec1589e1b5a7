"""EViT [`evit`]: keep the tokens the class token attends to most, fuse the rest into one
(Liang et al., ICLR 2022; youweiliang/evit).

At each listed block, after attention, the patch tokens are ranked by the class token's
attention averaged over heads; the top ceil(keep_rate * (N - p)) stay (in descending order of
that attention) and, with `fuse` (EViT's default), the dropped ones are summed into one token
weighted by their attention (not renormalised, as the reference). Prefix tokens stay in front.
During training EViT anneals the keep rate from 1 with a cosine (`config.budget_warmup`).

Shapes: x [B, N, C] -> [B, p + k + 1, C]; plan: `jax_tokens.prune.PrunePlan`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax_tokens.reducers.registry import register
from jax_tokens.reducers.topk import KeepTopK


@register
@dataclasses.dataclass(frozen=True)
class EViT(KeepTopK):
    """Fields: keep_rate (a float in (0, 1] or one per listed block), layers, fuse."""

    method: ClassVar[str] = "evit"
    score: ClassVar[str] = "cls_attn"
    order: ClassVar[str] = "score"
    fuse: bool = True
