"""TokenLearner v1.1 (Ryoo et al. 2021): M learned score maps pool N tokens into M."""

from __future__ import annotations

import jax
from flax import nnx

from jax_tokens import tokens as tok
from jax_tokens.layers import Mlp, norm_axes
from jax_tokens.lookup._common import F32, LN_EPS, _check_channels
from jax_tokens.lookup.plan import LookupPlan, compress


class TokenLearner(nnx.Module):
    """TokenLearner v1.1 (Ryoo et al. 2021; scenic ``TokenLearnerModuleV11``).

    ``scores = MLP(LayerNorm(x))`` gives M score maps [B, N, M]; a softmax over the N tokens turns
    each into weights, and output token m is the weighted sum of the input features. As in scenic:
    LayerNorm (eps 1e-6) only feeds the scores (the features are the raw input); the MLP is
    Dense(hidden_dim) -> GELU (tanh approximation, flax's default) -> Dense(M), kernels Xavier
    uniform, biases normal(1e-6); v1.1 uses softmax where v1 used a sigmoid with sum pooling.
    scenic's default hidden width (``bottleneck_dim``) is 64. Dropout (scenic's ``dropout_rate``,
    0 by default there) is not implemented.

    Our addition: ``feature_hidden_dim`` (default None = scenic) transforms the features by an
    MLP dim -> feature_hidden_dim -> dim before pooling (the original paper's optional feature
    transform); the plan then maps those transformed features, not `x`.

    Args:
      dim: channels C of the input tokens.
      num_tokens: M, the static output budget.
      hidden_dim: width of the score MLP.
    """

    def __init__(self, dim: int, num_tokens: int, hidden_dim: int = 64, *,
                 feature_hidden_dim: int | None = None, dtype=None, param_dtype=F32,
                 rngs: nnx.Rngs):
        self.dim = tok.static_int("dim", dim, low=1)
        self.num_tokens = tok.static_int("num_tokens", num_tokens, low=1)
        hidden_dim = tok.static_int("hidden_dim", hidden_dim, low=1)
        self.norm = nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs, **norm_axes())
        self.score_mlp = Mlp(dim, hidden_dim, num_tokens, approximate_gelu=True,
                             bias_init=nnx.initializers.normal(1e-6), dtype=dtype,
                             param_dtype=param_dtype, out_axis=None, rngs=rngs)
        if feature_hidden_dim is None:
            self.feature_mlp = None
        else:
            feature_hidden_dim = tok.static_int("feature_hidden_dim", feature_hidden_dim, low=1)
            self.feature_mlp = Mlp(dim, feature_hidden_dim, approximate_gelu=True,
                                   bias_init=nnx.initializers.normal(1e-6), dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

    def scores(self, x: jax.Array) -> jax.Array:
        """[B, N, C] -> [B, N, M] logits (before the softmax over N)."""
        return self.score_mlp(self.norm(x))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, LookupPlan]:
        """[B, N, C] -> (y [B, M, C], LookupPlan [B, M, N])."""
        tok.check_tokens("x", x)
        _check_channels("x", x, self.dim)
        feats = x if self.feature_mlp is None else self.feature_mlp(x)
        return compress(feats, self.scores(x))


def token_learner_flops(n: int, dim: int, num_tokens: int, hidden_dim: int = 64, *,
                        feature_hidden_dim: int | None = None, batch: int = 1) -> int:
    """FLOPs (2 x multiply-adds of the matmuls) of one `TokenLearner` call."""
    n = tok.static_int("n", n, low=1)
    dim = tok.static_int("dim", dim, low=1)
    m = tok.static_int("num_tokens", num_tokens, low=1)
    h = tok.static_int("hidden_dim", hidden_dim, low=1)
    batch = tok.static_int("batch", batch, low=1)
    macs = n * dim * h + n * h * m + m * n * dim
    if feature_hidden_dim is not None:
        macs += 2 * n * dim * tok.static_int("feature_hidden_dim", feature_hidden_dim, low=1)
    return 2 * batch * macs
