"""Per-layer budgets and cost estimates, all in plain Python ints (known at trace time).

* `parse_r` expands ToMe's budget forms (an int, an `(r, inflection)` pair, a per-layer list).
* `tome_token_counts` / `keep_count` give the token count each layer sees.
* `vit_flops` counts the FLOPs (2 x multiply-adds, as XLA's cost analysis does) of a ViT whose
  token counts per layer are given (each reducer adds its own work, `Reducer.flops`).
"""

from __future__ import annotations

import math
from typing import Sequence

from jax_tokens import tokens as tk


def parse_r(num_layers: int, r) -> list[int]:
    """Per-layer merge counts, as ToMe's `parse_r`.

    * int r: the same r in every layer;
    * (r, inflection): a linear ramp with the same total; inflection in [-1, 1] (-1: all at the
      end, 0: constant, 1: all at the start);
    * list: used as is, padded with zeros to `num_layers`.
    """
    num_layers = tk.static_int("num_layers", num_layers, low=1)
    if isinstance(r, (list, tuple)) and not (isinstance(r, tuple) and len(r) == 2
                                             and isinstance(r[1], float)):
        rs = [tk.static_int(f"r[{i}]", v, low=0) for i, v in enumerate(r)]
        if len(rs) > num_layers:
            raise ValueError(f"r has {len(rs)} entries but the model has {num_layers} layers")
        return rs + [0] * (num_layers - len(rs))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
        inflect = tk.static_float("inflection", inflect, low=-1.0, high=1.0, low_open=False)
    r = tk.static_int("r", r, low=0)
    min_val = int(r * (1.0 - inflect))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(min_val + step * i) for i in range(num_layers)]


def tome_effective_r(n_tokens: int, r: int, protected: int) -> int:
    """The r that bipartite matching really removes from n_tokens (clamped as ToMe)."""
    return max(0, min(r, (n_tokens - protected) // 2))


def keep_count(keep_rate: float, n: int) -> int:
    """How many of n prunable tokens a keep rate keeps: ceil(keep_rate * n), as EViT."""
    keep_rate = tk.static_float("keep_rate", keep_rate, low=0.0, high=1.0)
    return max(1, math.ceil(keep_rate * n))


def tome_matching_flops(n: int, dim_metric: int) -> int:
    """Similarity scores of one bipartite matching: (n/2) x (n/2) dot products."""
    return 2 * (n - n // 2) * (n // 2) * dim_metric


def vit_flops(*, tokens_in: Sequence[int], tokens_mid: Sequence[int], dim: int, mlp_hidden: int,
              num_patches: int, patch_dim: int, num_classes: int) -> int:
    """FLOPs of a ViT forward for one image.

    Args:
      tokens_in[l]: tokens entering block l (seen by attention);
      tokens_mid[l]: tokens after block l's reducer (seen by its MLP).
    The reducers' own work is counted by each reducer (`Reducer.flops`).
    """
    total = 2 * num_patches * patch_dim * dim + 2 * dim * num_classes
    for n, m in zip(tokens_in, tokens_mid):
        total += 2 * n * dim * 3 * dim + 2 * n * n * dim * 2 + 2 * n * dim * dim
        total += 2 * m * dim * mlp_hidden * 2
    return total
