"""LookupViT's block (Koner et al., ECCV 2024): bidirectional cross-attention between M lookup
tokens and N high-resolution tokens, full processing for the M only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_tokens import tokens as tok
from jax_tokens.attention import attention
from jax_tokens.lookup._common import F32, LN_EPS, _check_channels, _hidden, _static_float
from jax_tokens.lookup.plan import LookupPlan
from jax_tokens.layers import Mlp, linear_axes, norm_axes


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
    return jnp.einsum("bmhd,bnhd->bhmn", q, k, preferred_element_type=F32) * scale


def bidirectional_probs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both softmaxes of the same logits [B, H, M, N].

    Returns:
      gather [B, H, M, N]: softmax over N (each lookup token reads the hr tokens);
      scatter [B, H, N, M]: softmax over M, transposed (each hr token reads the lookup tokens).
    """
    logits = logits.astype(F32)
    gather = jax.nn.softmax(logits, axis=-1)
    scatter = jnp.swapaxes(jax.nn.softmax(logits, axis=-2), -1, -2)
    return gather, scatter


class LookupViTBlock(nnx.Module):
    """One LookupViT block (Koner et al., "LookupViT: Compressing visual information to a limited
    number of tokens", ECCV 2024).

    With M lookup (compressed) tokens ``z`` [B, M, C] and N high-resolution tokens ``x``
    [B, N, C], pre-norm, residuals, LayerNorm eps 1e-6 (``ln_eps``)::

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
      infuse: run step 3 (default). ``infuse=False`` builds a block that stops after step 2:
        the hr tokens come out unchanged and step 3's layers are not created. A model's last
        block uses it when nothing reads the final hr tokens (their update would be dead
        compute, and its parameters would never get a gradient).
      ln_eps: epsilon of every LayerNorm (1e-6 by default, as timm's ViT).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 hr_mlp_ratio: float = 1.0, qkv_bias: bool = True, *, attn_impl: str = "auto",
                 infuse: bool = True, ln_eps: float = LN_EPS, dtype=None, param_dtype=F32,
                 rngs: nnx.Rngs):
        self.dim = tok.static_int("dim", dim, low=1)
        self.num_heads = tok.static_int("num_heads", num_heads, low=1, high=self.dim)
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} is not allowed: it must divide dim={dim}")
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"qkv_bias must be a bool; got {qkv_bias!r}")
        if not isinstance(infuse, bool):
            raise TypeError(f"infuse must be a bool; got {infuse!r}")
        self.infuse = infuse
        self.head_dim = dim // num_heads
        self.mlp_hidden = _hidden("mlp_ratio", dim, mlp_ratio)
        self.hr_mlp_hidden = _hidden("hr_mlp_ratio", dim, hr_mlp_ratio)
        self.attn_impl = attn_impl

        ln = dict(epsilon=_static_float("ln_eps", ln_eps), dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs, **norm_axes())
        lin = dict(kernel_init=nnx.initializers.xavier_uniform(),
                   bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
        # 1. gather (lookup <- hr)
        self.norm_cross_q = nnx.LayerNorm(dim, **ln)
        self.norm_cross_kv = nnx.LayerNorm(dim, **ln)
        self.cross_q = nnx.Linear(dim, dim, use_bias=qkv_bias, **lin, **linear_axes("embed", "qkv"))
        self.cross_kv = nnx.Linear(dim, 2 * dim, use_bias=qkv_bias, **lin,
                                   **linear_axes("embed", "qkv"))
        self.cross_proj = nnx.Linear(dim, dim, **lin, **linear_axes("heads", "embed"))
        # 2. refine (lookup tokens only)
        self.norm1 = nnx.LayerNorm(dim, **ln)
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **lin, **linear_axes("embed", "qkv"))
        self.proj = nnx.Linear(dim, dim, **lin, **linear_axes("heads", "embed"))
        self.norm2 = nnx.LayerNorm(dim, **ln)
        self.mlp = Mlp(dim, self.mlp_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # 3. infuse (hr <- lookup), reusing the logits of step 1
        if not infuse:
            self.norm_back_v = self.back_v = self.back_proj = self.norm_hr = None
            self.hr_mlp = None
            return
        self.norm_back_v = nnx.LayerNorm(dim, **ln)
        self.back_v = nnx.Linear(dim, dim, use_bias=qkv_bias, **lin, **linear_axes("embed", "qkv"))
        self.back_proj = nnx.Linear(dim, dim, **lin, **linear_axes("heads", "embed"))
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
        ``scatter_plan`` (LookupPlan M -> N). A block built with ``infuse=False`` computes no
        scatter: its dict has ``logits``, ``gather`` and ``plan`` only.
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
        if self.infuse:
            gather, scatter = bidirectional_probs(logits)
        else:
            gather, scatter = jax.nn.softmax(logits, axis=-1), None
        read = jnp.einsum("bhmn,bnhd->bmhd", gather.astype(v.dtype), self._heads(v),
                          preferred_element_type=F32).astype(z.dtype)
        z = z + self.cross_proj(self._merge(read))

        # 2. refinement: a ViT block on the M lookup tokens.
        qkv = self.qkv(self.norm1(z))
        sq, sk, sv = (self._heads(t) for t in jnp.split(qkv, 3, axis=-1))
        out, _ = attention(sq, sk, sv, impl=self.attn_impl)
        z = z + self.proj(self._merge(out))
        z = z + self.mlp(self.norm2(z))

        # 3. global context infusion through the same logits, soft-maxed over M.
        if not self.infuse:
            if not return_attention:
                return z, x
            return z, x, dict(logits=logits, gather=gather,
                              plan=LookupPlan(weights=gather.mean(axis=1)))
        v2 = self._heads(self.back_v(self.norm_back_v(z)))
        back = jnp.einsum("bhnm,bmhd->bnhd", scatter.astype(v2.dtype), v2,
                          preferred_element_type=F32).astype(x.dtype)
        x = x + self.back_proj(self._merge(back))
        x = x + self.hr_mlp(self.norm_hr(x))

        if not return_attention:
            return z, x
        aux = dict(logits=logits, gather=gather, scatter=scatter,
                   plan=LookupPlan(weights=gather.mean(axis=1)),
                   scatter_plan=LookupPlan(weights=scatter.mean(axis=1)))
        return z, x, aux


def lookup_block_flops(n: int, m: int, dim: int, mlp_ratio: float = 4.0,
                       hr_mlp_ratio: float = 1.0, *, infuse: bool = True, batch: int = 1) -> int:
    """FLOPs of one `LookupViTBlock` call: 2 x the multiply-adds of its matmuls.

    Per example (times ``batch``); LayerNorms, softmaxes, GELUs and residual adds (a few percent
    at ViT sizes) are not counted. The number of heads does not change the count. ``infuse``
    as in `LookupViTBlock` (False: no step 3).
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
    back = m * d2 + n * m * dim + n * d2 + 2 * n * dim * hr_hid  # v', read-back, proj, mlp
    return 2 * batch * (gather + refine + (back if infuse else 0))
