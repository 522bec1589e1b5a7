"""Compression into M learned tokens: TokenLearner and LookupViT's bidirectional cross-attention.

A lookup reduction forms each of its M output tokens as a softmax-weighted average of the N input
tokens, so its plan is the softmax matrix itself: ``y = W x`` with ``W: [B, M, N]`` and every row
summing to 1 (DESIGN.md, principle 3).

* `compress(x, logits)`: the pure function. Logits ``[B, N, M]`` (one score map over the N tokens
  per output token) -> softmax over N -> ``(y [B, M, C], LookupPlan)``.
* `TokenLearner`: TokenLearner v1.1 (scenic's ``TokenLearnerModuleV11``): LayerNorm -> MLP that
  emits M score maps -> softmax over N -> weighted sum of the input features.
* `LookupViTBlock`: one LookupViT block (Koner et al., ECCV 2024). M compressed ("lookup")
  tokens gather from the N high-resolution tokens by cross-attention, run full self-attention and
  an MLP, and the N tokens read back through the *same* logits, soft-maxed over the other axis.
* `init_lookup_tokens`: the M starting tokens, adaptive average pooling of the patch grid.
* `lookup_block_flops` / `token_learner_flops`: FLOPs (2 x multiply-adds of the matmuls).

Naming: the brief for this library calls the M compressed tokens "lookup tokens" and the N patch
tokens "high-resolution (hr) tokens". The paper uses "compressed tokens" for the M and "lookup
tokens" for the N (the tokens that are *looked up*). The code follows the library's naming.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokens import tokens as tok
from jax_tokens.attention import attention

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

_F32 = jnp.float32
_LN_EPS = 1e-6


def _axes(*names):
    """NNX metadata: logical axis names (see jax_tokens.sharding), applied when sharding."""
    return {"out_sharding": names, "eager_sharding": False}


def _ln_axes():
    return dict(scale_metadata=_axes("norm"), bias_metadata=_axes("norm"))


def _lin_axes(din, dout):
    """Linear kernel / bias metadata for (input, output) logical names."""
    return dict(kernel_metadata=_axes(din, dout), bias_metadata=_axes(dout))


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

@flax.struct.dataclass
class LookupPlan:
    """How M output tokens are formed from N input tokens by softmax weights.

    Attributes:
      weights: [B, M, N] float32; row m holds the weights output token m gives each input token
        (a softmax over N, so every row sums to 1).

    The plan is a pytree (works under jit / vmap / grad / scan) and can be applied to any other
    per-token array (positions, sizes, a second stream).
    """

    weights: jax.Array

    @property
    def n_in(self) -> int:
        """N, the number of input tokens (static)."""
        return self.weights.shape[-1]

    @property
    def n_out(self) -> int:
        """M, the number of output tokens (static)."""
        return self.weights.shape[-2]

    @property
    def assignment(self) -> jax.Array:
        """[B, N] int32: for each input token, the output token that weights it the most.

        Ties go to the lowest output index (``argmax``). Every input token gets a slot (never
        -1), so `jax_tokens.tokens.invert_by_assignment` inverts the plan without a fill value.
        """
        return jnp.argmax(self.weights, axis=-2).astype(jnp.int32)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """The dense [B, M, N] linear map (== `weights`, as float32).

        With ``size`` [B, N, 1] (or [B, N]) the rows are re-weighted by the token sizes and
        renormalised, which equals adding ``log(size)`` to the logits before the softmax
        (proportional attention): a token that stands for more patches counts for more.
        """
        w = self.weights.astype(_F32)
        if size is None:
            return w
        s = jnp.asarray(size, _F32)
        if s.ndim == w.ndim:  # [B, N, 1]
            s = s[..., 0]
        if s.shape != w.shape[:-2] + w.shape[-1:]:
            raise ValueError(f"size must have shape [batch, tokens(, 1)] = "
                             f"{w.shape[:-2] + w.shape[-1:]}; got {jnp.shape(size)}")
        w = w * s[..., None, :]
        return w / jnp.maximum(w.sum(axis=-1, keepdims=True), jnp.finfo(_F32).tiny)

    def apply(self, x: jax.Array, size: jax.Array | None = None) -> jax.Array:
        """[B, N, C] -> [B, M, C]: ``y[m] = sum_n W[m, n] x[n]`` (accumulated in float32).

        ``size`` as in `matrix`. The plan applies to any per-token array (positions, a second
        stream, ...), not only to the tokens it was computed from.
        """
        tok.check_tokens("x", x, n=self.n_in, batch=self.weights.shape[0])
        w = self.matrix(size)
        y = jnp.einsum("bmn,bnc->bmc", w.astype(x.dtype), x, preferred_element_type=_F32)
        return y.astype(x.dtype)

    def unapply(self, y: jax.Array) -> jax.Array:
        """[B, M, C] -> [B, N, C]: puts output tokens back at the input positions.

        A softmax plan has no exact inverse. Each input token n receives the output token that
        gives it the largest weight, ``y[argmax_m W[m, n]]`` (see `assignment`), so the result is
        piecewise constant over the input grid: the choice that dense outputs and pictures need
        (a segmentation of the N tokens into M regions). It is a gather, so gradients flow to `y`
        but not to the weights. For a soft read-back use `transpose_plan`.
        """
        tok.check_tokens("y", y, n=self.n_out, batch=self.weights.shape[0])
        return tok.invert_by_assignment(y, self.assignment)

    def transpose_plan(self) -> "LookupPlan":
        """The soft read-back [B, N, M]: ``W^T`` with every row renormalised to sum to 1.

        ``transpose_plan().apply(y)`` gives each input token the average of the output tokens,
        weighted by how much each one took from it (a single-head version of LookupViT's
        hr-side read-back, up to the softmax: here the weights are renormalised, not
        re-soft-maxed).
        """
        wt = jnp.swapaxes(self.weights.astype(_F32), -1, -2)
        wt = wt / jnp.maximum(wt.sum(axis=-1, keepdims=True), jnp.finfo(_F32).tiny)
        return LookupPlan(weights=wt)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

def _static_float(name: str, value: Any, *, positive: bool = True) -> float:
    if tok.is_traced(value) or isinstance(value, jax.Array):
        raise TypeError(f"{name} must be a static Python float known at trace time; got a "
                        f"traced/array value {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name}={value} is not allowed: it must be a finite float > 0")
    return value


def _hidden(name: str, dim: int, ratio: Any) -> int:
    ratio = _static_float(name, ratio)
    hidden = int(dim * ratio)
    if hidden < 1:
        raise ValueError(f"{name}={ratio} is not allowed for dim={dim}: int(dim * {name}) = "
                         f"{hidden} must be >= 1")
    return hidden


def _check_channels(name: str, x: jax.Array, dim: int) -> None:
    if x.shape[-1] != dim:
        raise ValueError(f"{name} has {x.shape[-1]} channels (shape {tuple(x.shape)}); the "
                         f"module was built with dim={dim}")


def _pair(name: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (height, width) of ints; got {value!r}")
    return (tok.static_int(f"{name}[0]", value[0], low=1),
            tok.static_int(f"{name}[1]", value[1], low=1))


# --------------------------------------------------------------------------------------------
# The pure function
# --------------------------------------------------------------------------------------------

def compress(x: jax.Array, logits: jax.Array) -> tuple[jax.Array, LookupPlan]:
    """Compresses N tokens into M by M softmax score maps over the tokens.

    Args:
      x: [B, N, C] tokens.
      logits: [B, N, M] one score map over the N tokens per output token (M, the budget, is the
        static last dimension). The softmax is taken over N in float32.

    Returns:
      (y [B, M, C] in x's dtype, LookupPlan with weights [B, M, N]).
    """
    tok.check_tokens("x", x)
    tok.check_tokens("logits", logits, n=x.shape[1], batch=x.shape[0])
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have M >= 1 score maps in its last dimension; got shape "
                         f"{tuple(logits.shape)}")
    weights = jax.nn.softmax(logits.astype(_F32), axis=1)  # over N
    plan = LookupPlan(weights=jnp.swapaxes(weights, 1, 2))  # [B, M, N]
    return plan.apply(x), plan


# --------------------------------------------------------------------------------------------
# TokenLearner v1.1
# --------------------------------------------------------------------------------------------

class Mlp(nnx.Module):
    """Dense -> GELU -> Dense (the transformer MLP).

    `out_axis` is the logical axis name of the output ("embed", or None for score maps).
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, *,
                 approximate_gelu: bool = False, kernel_init=nnx.initializers.xavier_uniform(),
                 bias_init=nnx.initializers.zeros_init(), dtype=None, param_dtype=_F32,
                 out_axis: str | None = "embed", rngs: nnx.Rngs):
        out_dim = dim if out_dim is None else out_dim
        kw = dict(kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden_dim, **kw, **_lin_axes("embed", "mlp"))
        self.fc2 = nnx.Linear(hidden_dim, out_dim, **kw, **_lin_axes("mlp", out_axis))
        self.approximate_gelu = approximate_gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu))


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
                 feature_hidden_dim: int | None = None, dtype=None, param_dtype=_F32,
                 rngs: nnx.Rngs):
        self.dim = tok.static_int("dim", dim, low=1)
        self.num_tokens = tok.static_int("num_tokens", num_tokens, low=1)
        hidden_dim = tok.static_int("hidden_dim", hidden_dim, low=1)
        self.norm = nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs, **_ln_axes())
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


# --------------------------------------------------------------------------------------------
# LookupViT
# --------------------------------------------------------------------------------------------

def bidirectional_logits(q: jax.Array, k: jax.Array, scale: float | None = None) -> jax.Array:
    """The one similarity matrix of a bidirectional cross-attention.

    Args:
      q: [B, M, H, D] queries from the M lookup tokens.
      k: [B, N, H, D] keys from the N high-resolution tokens.
      scale: default D ** -0.5.

    Returns:
      [B, H, M, N] float32 logits.
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must have rank 4 [batch, tokens, heads, head_dim]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads "
                         "and head_dim")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return jnp.einsum("bmhd,bnhd->bhmn", q, k, preferred_element_type=_F32) * scale


def bidirectional_probs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both softmaxes of the same logits [B, H, M, N].

    Returns:
      gather [B, H, M, N]: softmax over N (each lookup token reads the hr tokens);
      scatter [B, H, N, M]: softmax over M, transposed (each hr token reads the lookup tokens).
    """
    logits = logits.astype(_F32)
    gather = jax.nn.softmax(logits, axis=-1)
    scatter = jnp.swapaxes(jax.nn.softmax(logits, axis=-2), -1, -2)
    return gather, scatter


class LookupViTBlock(nnx.Module):
    """One LookupViT block (Koner et al., "LookupViT: Compressing visual information to a limited
    number of tokens", ECCV 2024).

    With M lookup (compressed) tokens ``z`` [B, M, C] and N high-resolution tokens ``x``
    [B, N, C], pre-norm, residuals, LayerNorm eps 1e-6::

      # 1. information gathering: multi-head cross-attention, queries from z, keys/values from x
      A = (LN_q(z) Wq) (LN_kv(x) Wk)^T / sqrt(d)            # [B, H, M, N], computed once
      z = z + Proj_g(softmax_N(A) (LN_kv(x) Wv))
      # 2. refinement of the M tokens: a full ViT block on M tokens only
      z = z + MHSA(LN_1(z))
      z = z + MLP_{mlp_ratio}(LN_2(z))
      # 3. global context infusion: x reads back through the SAME A, soft-maxed over M
      x = x + Proj_s(softmax_M(A)^T (LN_v(z) Wv'))
      x = x + MLP_{hr_mlp_ratio}(LN_hr(x))

    What the sources specify (the paper's abstract, and the public port
    lucidrains/vit-pytorch ``look_vit.py`` for the block's layout; the full paper text was not at
    hand when this was written): the three steps above and their order; the M tokens get the
    full-cost attention and MLP while the N tokens pass only through cheaper layers; the
    exchange between the two sets is a multi-head *bidirectional* cross-attention whose
    similarity matrix is computed once in step 1 and reused, transposed, in step 3 (no second
    Q K^T: that keeps the N-token side linear in N); the N tokens' MLP is narrower than the
    ViT's by a factor (here ``hr_mlp_ratio`` = hidden / dim, e.g. ``mlp_ratio / r``); pre-norm
    residual sub-layers as in ViT.

    What we chose (not pinned down by the sources we could check):
      * step 3 normalises the shared logits with a softmax over the M lookup tokens (so each hr
        token's weights sum to 1), rather than reusing step 1's probabilities transposed, as the
        lucidrains port does (those do not sum to 1 per hr token);
      * step 3 reads the *refined* lookup tokens (after step 2) through its own LayerNorm and
        value projection Wv' and has its own output projection; it reuses the logits only;
      * separate LayerNorms for each input of each sub-layer (LN_q, LN_kv, LN_1, LN_2, LN_v,
        LN_hr); qkv_bias applies to Wq, Wk, Wv, Wv' and the self-attention qkv; output
        projections and MLPs always have biases;
      * the cross-attention uses the same number of heads as the self-attention (num_heads),
        head_dim = dim // num_heads;
      * MLPs use exact (erf) GELU, as timm's ViT; Xavier-uniform kernels, zero biases;
      * no dropout / drop-path / layer-scale.

    The self-attention of the M tokens goes through `jax_tokens.attention.attention` (a Pallas
    kernel on TPU/GPU). The cross-attention materialises [B, H, M, N] logits (M is small: that is
    the point of the method) and both softmaxes in float32.

    Args:
      dim: channels C of both token sets.
      num_heads: heads of the self- and cross-attention; must divide dim.
      mlp_ratio: hidden width / dim of the lookup tokens' MLP.
      hr_mlp_ratio: hidden width / dim of the high-resolution tokens' MLP.
      qkv_bias: biases on the query/key/value projections.
      attn_impl: passed to `attention` as ``impl`` for the lookup self-attention.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 hr_mlp_ratio: float = 1.0, qkv_bias: bool = True, *, attn_impl: str = "auto",
                 dtype=None, param_dtype=_F32, rngs: nnx.Rngs):
        self.dim = tok.static_int("dim", dim, low=1)
        self.num_heads = tok.static_int("num_heads", num_heads, low=1, high=self.dim)
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} is not allowed: it must divide dim={dim}")
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"qkv_bias must be a bool; got {qkv_bias!r}")
        self.head_dim = dim // num_heads
        self.mlp_hidden = _hidden("mlp_ratio", dim, mlp_ratio)
        self.hr_mlp_hidden = _hidden("hr_mlp_ratio", dim, hr_mlp_ratio)
        self.attn_impl = attn_impl

        ln = dict(epsilon=_LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  **_ln_axes())
        lin = dict(kernel_init=nnx.initializers.xavier_uniform(),
                   bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
        # 1. gather (lookup <- hr)
        self.norm_cross_q = nnx.LayerNorm(dim, **ln)
        self.norm_cross_kv = nnx.LayerNorm(dim, **ln)
        self.cross_q = nnx.Linear(dim, dim, use_bias=qkv_bias, **lin, **_lin_axes("embed", "qkv"))
        self.cross_kv = nnx.Linear(dim, 2 * dim, use_bias=qkv_bias, **lin,
                                   **_lin_axes("embed", "qkv"))
        self.cross_proj = nnx.Linear(dim, dim, **lin, **_lin_axes("heads", "embed"))
        # 2. refine (lookup tokens only)
        self.norm1 = nnx.LayerNorm(dim, **ln)
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **lin, **_lin_axes("embed", "qkv"))
        self.proj = nnx.Linear(dim, dim, **lin, **_lin_axes("heads", "embed"))
        self.norm2 = nnx.LayerNorm(dim, **ln)
        self.mlp = Mlp(dim, self.mlp_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # 3. infuse (hr <- lookup), reusing the logits of step 1
        self.norm_back_v = nnx.LayerNorm(dim, **ln)
        self.back_v = nnx.Linear(dim, dim, use_bias=qkv_bias, **lin, **_lin_axes("embed", "qkv"))
        self.back_proj = nnx.Linear(dim, dim, **lin, **_lin_axes("heads", "embed"))
        self.norm_hr = nnx.LayerNorm(dim, **ln)
        self.hr_mlp = Mlp(dim, self.hr_mlp_hidden, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[:2] + (self.num_heads, self.head_dim))

    def _merge(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[:2] + (self.dim,))

    def __call__(self, lookup_tokens: jax.Array, hr_tokens: jax.Array, *,
                 return_attention: bool = False):
        """(lookup_tokens [B, M, C], hr_tokens [B, N, C]) -> the same, updated.

        With ``return_attention=True`` a third output dict holds ``logits`` [B, H, M, N],
        ``gather`` [B, H, M, N] (softmax over N), ``scatter`` [B, H, N, M] (softmax over M of the
        same logits), and their head means as plans: ``plan`` (LookupPlan N -> M) and
        ``scatter_plan`` (LookupPlan M -> N).
        """
        tok.check_tokens("lookup_tokens", lookup_tokens)
        tok.check_tokens("hr_tokens", hr_tokens, batch=lookup_tokens.shape[0])
        _check_channels("lookup_tokens", lookup_tokens, self.dim)
        _check_channels("hr_tokens", hr_tokens, self.dim)
        z, x = lookup_tokens, hr_tokens

        # 1. information gathering.
        q = self._heads(self.cross_q(self.norm_cross_q(z)))
        k, v = jnp.split(self.cross_kv(self.norm_cross_kv(x)), 2, axis=-1)
        logits = bidirectional_logits(q, self._heads(k))
        gather, scatter = bidirectional_probs(logits)
        read = jnp.einsum("bhmn,bnhd->bmhd", gather.astype(v.dtype), self._heads(v),
                          preferred_element_type=_F32).astype(z.dtype)
        z = z + self.cross_proj(self._merge(read))

        # 2. refinement: a ViT block on the M lookup tokens.
        qkv = self.qkv(self.norm1(z))
        sq, sk, sv = (self._heads(t) for t in jnp.split(qkv, 3, axis=-1))
        out, _ = attention(sq, sk, sv, impl=self.attn_impl)
        z = z + self.proj(self._merge(out))
        z = z + self.mlp(self.norm2(z))

        # 3. global context infusion through the same logits, soft-maxed over M.
        v2 = self._heads(self.back_v(self.norm_back_v(z)))
        back = jnp.einsum("bhnm,bmhd->bnhd", scatter.astype(v2.dtype), v2,
                          preferred_element_type=_F32).astype(x.dtype)
        x = x + self.back_proj(self._merge(back))
        x = x + self.hr_mlp(self.norm_hr(x))

        if not return_attention:
            return z, x
        aux = dict(logits=logits, gather=gather, scatter=scatter,
                   plan=LookupPlan(weights=gather.mean(axis=1)),
                   scatter_plan=LookupPlan(weights=scatter.mean(axis=1)))
        return z, x, aux


def lookup_block_flops(n: int, m: int, dim: int, mlp_ratio: float = 4.0,
                       hr_mlp_ratio: float = 1.0, *, batch: int = 1) -> int:
    """FLOPs of one `LookupViTBlock` call: 2 x the multiply-adds of its matmuls.

    Per example (times ``batch``); LayerNorms, softmaxes, GELUs and residual adds (a few percent
    at ViT sizes) are not counted. The number of heads does not change the count.
    """
    n = tok.static_int("n", n, low=1)
    m = tok.static_int("m", m, low=1)
    dim = tok.static_int("dim", dim, low=1)
    batch = tok.static_int("batch", batch, low=1)
    hid = _hidden("mlp_ratio", dim, mlp_ratio)
    hr_hid = _hidden("hr_mlp_ratio", dim, hr_mlp_ratio)
    d2 = dim * dim
    gather = m * d2 + 2 * n * d2 + 2 * m * n * dim + m * d2  # q, kv, logits + read, proj
    refine = 3 * m * d2 + 2 * m * m * dim + m * d2 + 2 * m * dim * hid  # qkv, attn, proj, mlp
    infuse = m * d2 + n * m * dim + n * d2 + 2 * n * dim * hr_hid  # v', read-back, proj, mlp
    return 2 * batch * (gather + refine + infuse)


# --------------------------------------------------------------------------------------------
# Initial lookup tokens
# --------------------------------------------------------------------------------------------

def _pool_bins(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging matrix of 1-D adaptive average pooling (PyTorch's bins)."""
    mat = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)  # ceil((i + 1) * n_in / n_out)
        mat[i, lo:hi] = 1.0 / (hi - lo)
    return mat


def adaptive_pool_matrix(grid_hw: tuple[int, int], m_hw: tuple[int, int]) -> np.ndarray:
    """The static [M, N] matrix of 2-D adaptive average pooling of a row-major grid.

    Output cell (i, j) averages rows [floor(i H / mh), ceil((i + 1) H / mh)) and the analogous
    columns (PyTorch ``adaptive_avg_pool2d`` bins; bins overlap when the sizes do not divide).
    """
    gh, gw = _pair("grid_hw", grid_hw)
    mh, mw = _pair("m_hw", m_hw)
    if mh > gh or mw > gw:
        raise ValueError(f"m_hw={(mh, mw)} is not allowed for grid_hw={(gh, gw)}: the lookup "
                         "grid must be no larger than the patch grid in each dimension")
    return np.kron(_pool_bins(gh, mh), _pool_bins(gw, mw))


def init_lookup_tokens(hr_tokens: jax.Array, grid_hw: tuple[int, int], m_hw: tuple[int, int],
                       *, return_plan: bool = False):
    """The M = mh * mw initial lookup tokens: the patch grid average-pooled to mh x mw.

    LookupViT starts its compressed tokens from the high-resolution patch grid resized down to
    the small grid. We use adaptive average pooling (non-divisible sizes use PyTorch's
    overlapping bins); the lucidrains port resizes bilinearly instead. The tokens must be the
    patch grid only, row-major (drop a class token first).

    Args:
      hr_tokens: [B, N, C] with N == grid_hw[0] * grid_hw[1].
      grid_hw: (H, W) of the patch grid.
      m_hw: (mh, mw) of the lookup grid, 1 <= mh <= H, 1 <= mw <= W.
      return_plan: also return the LookupPlan [B, M, N] of the pooling.

    Returns:
      [B, M, C] in hr_tokens' dtype (and the plan when asked).
    """
    tok.check_tokens("hr_tokens", hr_tokens)
    pool = adaptive_pool_matrix(grid_hw, m_hw)
    (gh, gw), (mh, mw) = _pair("grid_hw", grid_hw), _pair("m_hw", m_hw)
    b, n, c = hr_tokens.shape
    if n != gh * gw:
        raise ValueError(f"hr_tokens has {n} tokens (shape {tuple(hr_tokens.shape)}) but "
                         f"grid_hw={(gh, gw)} needs {gh * gw}; pass only the patch tokens")
    if gh % mh == 0 and gw % mw == 0:  # exact reshape-mean
        grid = hr_tokens.astype(_F32).reshape(b, mh, gh // mh, mw, gw // mw, c)
        y = grid.mean(axis=(2, 4)).reshape(b, mh * mw, c).astype(hr_tokens.dtype)
    else:
        y = jnp.einsum("mn,bnc->bmc", jnp.asarray(pool), hr_tokens.astype(_F32),
                       precision=jax.lax.Precision.HIGHEST).astype(hr_tokens.dtype)
    if not return_plan:
        return y
    return y, LookupPlan(weights=jnp.broadcast_to(jnp.asarray(pool), (b,) + pool.shape))


def lookup_grid(m: int) -> tuple[int, int]:
    """(s, s) for a perfect-square budget M = s * s; raises otherwise."""
    m = tok.static_int("m", m, low=1)
    s = math.isqrt(m)
    if s * s != m:
        raise ValueError(f"m={m} is not allowed: a square lookup grid needs a perfect square "
                         f"(nearest: {s * s} or {(s + 1) ** 2}); pass m_hw explicitly otherwise")
    return s, s
