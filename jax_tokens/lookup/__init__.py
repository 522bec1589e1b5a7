"""Compression into M learned tokens: TokenLearner and LookupViT's bidirectional cross-attention.

A lookup reduction forms each of its M output tokens as a softmax-weighted average of the N input
tokens, so its plan is the softmax matrix itself: ``y = W x`` with ``W: [B, M, N]`` and every row
summing to 1 (DESIGN.md, principle 3). Leading prefix tokens (class token, registers) can pass
through the plan unchanged (``LookupPlan(weights, prefix=p)``).

* `plan`: `LookupPlan` (the plan protocol: n_in, n_out, assignment, matrix, apply, invert) and
  `compress(x, logits)`, the pure function: logits ``[B, N, M]`` -> softmax over N ->
  ``(y [B, M, C], LookupPlan)``.
* `token_learner`: `TokenLearner`, TokenLearner v1.1 (scenic's ``TokenLearnerModuleV11``):
  LayerNorm -> MLP that emits M score maps -> softmax over N -> weighted sum of the input
  features; `token_learner_flops`.
* `block`: `LookupViTBlock`, one LookupViT block (Koner et al., ECCV 2024). M compressed
  ("lookup") tokens gather from the N high-resolution tokens by cross-attention, run full
  self-attention and an MLP, and the N tokens read back through the *same* logits, soft-maxed
  over the other axis; `bidirectional_logits`, `bidirectional_probs`, `lookup_block_flops`.
* `pooling`: `init_lookup_tokens`, the M starting tokens (adaptive average pooling of the patch
  grid); `adaptive_pool_matrix`, `lookup_grid`.

FLOPs functions count 2 x the multiply-adds of the matmuls.

Naming: the brief for this library calls the M compressed tokens "lookup tokens" and the N patch
tokens "high-resolution (hr) tokens". The paper uses "compressed tokens" for the M and "lookup
tokens" for the N (the tokens that are *looked up*). The code follows the library's naming.
"""

from jax_tokens.lookup.block import (LookupViTBlock, bidirectional_logits, bidirectional_probs,
                                     lookup_block_flops)
from jax_tokens.lookup.plan import LookupPlan, compress
from jax_tokens.lookup.pooling import adaptive_pool_matrix, init_lookup_tokens, lookup_grid
from jax_tokens.layers import Mlp
from jax_tokens.lookup.token_learner import TokenLearner, token_learner_flops

__all__ = [
    "LookupPlan",
    "compress",
    "TokenLearner",
    "LookupViTBlock",
    "bidirectional_logits",
    "bidirectional_probs",
    "adaptive_pool_matrix",
    "init_lookup_tokens",
    "lookup_grid",
    "lookup_block_flops",
    "token_learner_flops",
]
