"""A Flax NNX ViT / DeiT with a token-reducer slot in every block.

    cfg = ViTConfig.vit_small(img_size=224, reduction=dict(method="tome", r=8))
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(images)            # images [B, H, W, C] (NHWC)
    aux["tokens"]                          # tokens entering each block (static ints)

Blocks are pre-norm (attention, reducer, MLP). The reducer (any registered in
`jax_tokens.reducers`, picked by `ViTConfig.reduction`) runs between attention and MLP, as ToMe
and EViT place it, and gets the statistics it asks for from the attention call itself
(`jax_tokens.attention.attention(..., stats=...)`), so attention is never recomputed. A reducer
may ask (`Reducer.placement`) to run after the MLP instead, or before the attention on the
block's input: then the block computes its input's attention probabilities, the reducer
reduces the input, and the attention of the reduced tokens uses the probabilities the reducer
derives from them (MCTF's one-step-ahead attention, `Reducer.reduce_attention`). The whole
per-layer schedule (tokens in and out of every block) comes from the reducer in Python before
tracing: every shape is static and the model compiles once per config. A learned reducer's
module (TokenLearner) is owned by the block it runs in (`blocks.<l>.reducer`).

With `ViTConfig.token_multiple = m` (default 1) every block's token arrays are rounded up to a
multiple of m, the padding masked out of attention and kept from the reducers
(`jax_tokens.models.token_padding`): aligned shapes for tensor cores and TPU tiles, the same
results. The config lives in `jax_tokens.models.vit_config`.

Parameter names follow timm's `VisionTransformer` (patch_embed.proj, blocks.i.attn.qkv, ...)
so `jax_tokens.models.convert` maps state dicts one to one.

Sharding (`jax_tokens.sharding`): every parameter carries logical axis names in its NNX
metadata (`out_sharding`, e.g. the qkv kernel ("embed", "qkv"), fc1 ("embed", "mlp"), with
`eager_sharding=False` so that no mesh is needed to build the model). Under an active mesh
the residual stream is constrained to ("batch", "tokens", "embed"), Pallas attention runs in
`jax.shard_map`, and token selection runs per device on its own examples
(`sharding.per_example`, where the reducer allows it). Without a mesh all of this is inert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokens import reducers
from jax_tokens import sharding as shd
from jax_tokens import tokens as tk
from jax_tokens.layers import Mlp, check_images, linear_axes, norm_axes, patch_embedding
from jax_tokens.models import token_padding
from jax_tokens.models.vit_config import ViTConfig
from jax_tokens.attention import xla as attention_xla
from jax_tokens.attention.sharded import attention as mesh_attention
from jax_tokens.reducers import Reducer

__all__ = ["ViTConfig", "VisionTransformer", "Block", "Attention", "LayerScale", "sincos_2d"]

_ACT = ("batch", "tokens", "embed")  # logical axes of the residual stream


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

_axes = shd.logical_axes
_TRUNC_NORMAL = nnx.initializers.truncated_normal(0.02)


def _dense(rngs, din, dout, use_bias=True, dtype=None, axes=None):
    """nnx.Linear; `axes` = logical names of the kernel's (input, output) dimensions."""
    meta = {} if axes is None else linear_axes(*axes)
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, rngs=rngs,
                      kernel_init=nnx.initializers.truncated_normal(0.02),
                      bias_init=nnx.initializers.zeros, **meta)


def _norm(rngs, dim, eps, dtype=None):
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, use_fast_variance=False, rngs=rngs,
                         **norm_axes())


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32), **_axes("norm"))

    def __call__(self, x):
        return x * self.gamma[...].astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention that also returns the statistics a reducer asked for."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, impl: str, dtype, *, rngs):
        self.num_heads = num_heads
        self.impl = impl
        self.qkv = _dense(rngs, dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          axes=("embed", "qkv"))
        self.proj = _dense(rngs, dim, dim, dtype=dtype, axes=("heads", "embed"))

    def _project(self, x, part: slice):
        """The q, k or v columns of the qkv projection (part: a slice of them) without
        computing the others."""
        lin = self.qkv
        kernel = lin.kernel[...][:, part]
        bias = lin.bias[...][part] if lin.bias is not None else None
        x, kernel, bias = lin.promote_dtype((x, kernel, bias), dtype=lin.dtype)
        y = lin.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=lin.precision)
        return y if bias is None else y + bias

    def probabilities(self, x, *, key_size=None, key_policy=None, eps: float = 1e-6):
        """[B, N, C] -> the attention probabilities [B, H, N, N] (fp32, differentiable, plain
        XLA): for reducers placed before the attention (log(key_size) added to the logits), or
        under a keep policy [B, N] (DynamicViT's softmax_with_policy: each key's exp(logit -
        max) times its policy, a query always seeing itself, then (a + eps/N) / (sum + eps);
        gradients reach the policy)."""
        b, n, c = x.shape
        d = c // self.num_heads
        qk = self._project(x, slice(0, 2 * c)).reshape(b, n, 2, self.num_heads, d)
        logits = jnp.einsum("bqhd,bkhd->bhqk", qk[:, :, 0], qk[:, :, 1],
                            preferred_element_type=jnp.float32) * d ** -0.5
        if key_size is not None:
            logits = logits + jnp.log(key_size.astype(jnp.float32))[:, None, None, :]
        if key_policy is None:
            return jax.nn.softmax(logits, axis=-1)
        policy = key_policy.astype(jnp.float32)[:, None, None, :]
        eye = jnp.eye(n, dtype=jnp.float32)
        policy = policy + (1.0 - policy) * eye
        a = jnp.exp(logits - logits.max(axis=-1, keepdims=True)) * policy
        return (a + eps / n) / (a.sum(axis=-1, keepdims=True) + eps)

    def __call__(self, x, *, key_size=None, stats=(), probs=None, valid=None):
        """x [B, N, C] -> (out [B, N, C], statistics). valid: with padded arrays
        (`token_padding`), the real tokens (the first `valid`; key_size is then 0 for the
        padding): the statistics are those of the real tokens."""
        b, n, c = x.shape
        if probs is not None:   # given probabilities [B, H, N, N] (MCTF's one-step-ahead)
            v = self._project(x, slice(2 * c, 3 * c)).reshape(b, n, self.num_heads, -1)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                             preferred_element_type=jnp.float32).astype(v.dtype)
            return self.proj(out.reshape(b, n, c)), {}
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # A plain `attention` call, wrapped in jax.shard_map for Pallas under a mesh.
        out, st = mesh_attention(q, k, v, key_size=key_size, stats=stats, impl=self.impl)
        if valid is not None:
            st = token_padding.valid_stats(st, valid, q, k, key_size, q.shape[-1] ** -0.5)
        return self.proj(out.reshape(b, n, c)), st


class Block(nnx.Module):
    """Pre-norm block split in two halves so the reducer can sit between them."""

    def __init__(self, cfg: ViTConfig, dtype, *, reducer: nnx.Module | None = None, rngs):
        self.norm1 = _norm(rngs, cfg.embed_dim, cfg.ln_eps, dtype)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_impl, dtype,
                              rngs=rngs)
        self.norm2 = _norm(rngs, cfg.embed_dim, cfg.ln_eps, dtype)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_hidden, kernel_init=_TRUNC_NORMAL, dtype=dtype,
                       rngs=rngs)
        if cfg.layer_scale_init is not None:
            self.ls1 = LayerScale(cfg.embed_dim, cfg.layer_scale_init)
            self.ls2 = LayerScale(cfg.embed_dim, cfg.layer_scale_init)
        else:
            self.ls1 = self.ls2 = None
        self.reducer = reducer   # a learned reducer's module (e.g. TokenLearner), or None

    def attend(self, x, *, key_size=None, stats=(), probs=None, valid=None):
        h, st = self.attn(self.norm1(x), key_size=key_size, stats=stats, probs=probs,
                          valid=valid)
        if self.ls1 is not None:
            h = self.ls1(h)
        return x + h, st

    def input_stats(self, x, stats, *, key_size=None):
        """The statistics of a reducer placed "before" the attention: the differentiable
        probabilities of the block's input tokens ("probs"), and what derives from them."""
        other = [name for name in stats if name not in attention_xla.PROBABILITY_STATS]
        if other:
            raise ValueError(f"statistic {other[0]!r} is not available to a reducer placed "
                             "before the attention (only probs, key_mass, cls_probs)")
        if not stats:
            return {}
        probs = self.attn.probabilities(self.norm1(x), key_size=key_size)
        out = attention_xla.probability_stats(probs, stats)
        if "probs" in stats:      # differentiable here: the reducer's weights come from it
            out["probs"] = probs
        return out

    def feed_forward(self, x):
        h = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            h = self.ls2(h)
        return x + h


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding [grid*grid, dim] (MAE / big_vision layout)."""
    if dim % 4:
        raise ValueError(f"embed_dim={dim} must be divisible by 4 for pos_embed='sincos'")
    y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                       indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    oy, ox = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
    return np.concatenate([np.sin(ox), np.cos(ox), np.sin(oy), np.cos(oy)], 1).astype(np.float32)


class VisionTransformer(nnx.Module):
    """ViT / DeiT with reducer slots; see the module docstring."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dim, dtype = cfg.embed_dim, jnp.dtype(cfg.dtype)
        self.patch_embed = patch_embedding(cfg.in_chans, dim, cfg.patch_size, dtype=dtype,
                                           rngs=rngs)
        tn = nnx.initializers.truncated_normal(0.02)
        key = rngs.params()
        tok_axes = _axes(None, None, "embed")
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(key, (1, 1, dim)), **tok_axes) \
            if cfg.class_token else None
        self.dist_token = nnx.Param(tn(jax.random.fold_in(key, 1), (1, 1, dim)), **tok_axes) \
            if cfg.distill_token else None
        self.reg_token = nnx.Param(tn(jax.random.fold_in(key, 2), (1, cfg.num_registers, dim)),
                                   **tok_axes) if cfg.num_registers else None
        embed_len = cfg.num_patches + (0 if cfg.no_embed_class
                                       else int(cfg.class_token) + int(cfg.distill_token))
        if cfg.pos_embed == "learn":
            self.pos_embed = nnx.Param(tn(jax.random.fold_in(key, 3), (1, embed_len, dim)),
                                       **tok_axes)
        elif cfg.pos_embed == "sincos":
            table = sincos_2d(cfg.grid, dim)
            if embed_len > cfg.num_patches:
                table = np.concatenate([np.zeros((embed_len - cfg.num_patches, dim),
                                                 np.float32), table])
            self.pos_embed = nnx.Variable(jnp.asarray(table)[None], **tok_axes)  # not trained
        else:
            self.pos_embed = None
        red, layout = cfg.reduction, cfg.layout()
        self.blocks = nnx.List([
            Block(cfg, dtype, rngs=rngs,
                  reducer=red.make_module(layout, spec, dtype=dtype, rngs=rngs)
                  if red.learned and spec.active else None)
            for spec in cfg.schedule()])
        self.norm = _norm(rngs, dim, cfg.ln_eps, dtype)
        self.head = _dense(rngs, dim, cfg.num_classes, dtype=dtype, axes=("embed", "classes"))
        self.head_dist = _dense(rngs, dim, cfg.num_classes, dtype=dtype,
                                axes=("embed", "classes")) if cfg.distill_token else None

    # -- embedding ----------------------------------------------------------------------------
    def embed(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] images -> [B, N, D] tokens: [cls?, dist?, registers..., patches]."""
        cfg = self.cfg
        images = check_images(images, cfg.img_size, cfg.in_chans)
        x = self.patch_embed(images.astype(jnp.dtype(cfg.dtype)))
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.embed_dim)
        pos = None if self.pos_embed is None else self.pos_embed[...].astype(x.dtype)
        cls_like = [t[...] for t in (self.cls_token, self.dist_token) if t is not None]
        cls_like = [jnp.broadcast_to(t, (b,) + t.shape[1:]).astype(x.dtype) for t in cls_like]
        regs = [] if self.reg_token is None else [
            jnp.broadcast_to(self.reg_token[...], (b,) + self.reg_token.shape[1:]).astype(x.dtype)]
        if cfg.no_embed_class:
            if pos is not None:
                x = x + pos
            return jnp.concatenate(cls_like + regs + [x], axis=1)
        x = jnp.concatenate(cls_like + [x], axis=1)
        if pos is not None:
            x = x + pos
        if regs:
            n_cls = len(cls_like)
            x = jnp.concatenate([x[:, :n_cls]] + regs + [x[:, n_cls:]], axis=1)
        return x

    # -- forward ------------------------------------------------------------------------------
    def __call__(self, images: jax.Array, *, key: jax.Array | None = None,
                 reduction: Reducer | dict | None = None):
        """Returns (logits [B, classes], aux).

        aux holds "features" (pre-logits [B, D]), "tokens" (tokens entering each block, then
        the final count; static ints), "size" [B, M, 1], "plans" (the plan of every block
        whose reducer ran, in order: e.g. `aux["plans"][0].kept_idx` for pruning),
        "last_hidden_state" [B, M, D] (all tokens after the final norm, prefix first), and,
        with cfg.trace_source, "source_index" [B, N0] (the token each input patch ended in,
        -1 if dropped; `tokens.source_matrix` makes it dense).
        `reduction` overrides the config's reducer (e.g. a keep-rate warm-up); it is static
        (a Reducer or its dict).
        """
        cfg = self.cfg
        red = cfg.reduction if reduction is None else reducers.from_config(reduction)
        layout = cfg.layout()
        specs = red.schedule(layout)
        x = shd.constrain(self.embed(images), _ACT)
        b = x.shape[0]
        size = tk.init_size(x)
        # With token_multiple > 1, x and size hold `valid` real tokens and then padding rows
        # up to a multiple (`token_padding`): attention masks them, reducers never see them.
        multiple = cfg.row_multiple(red)
        valid = x.shape[1]

        def padded(x, size):
            if multiple == 1:
                return x, size
            x, size = token_padding.pad(x, size, multiple)
            return shd.constrain(x, _ACT), size

        x, size = padded(x, size)
        source_index = tk.init_source_index(b, valid) if cfg.trace_source else None
        if red.needs_key and key is None:
            raise ValueError(f"reducer {red.label()!r} draws random numbers: call the model with "
                             "key=jax.random.key(...)")
        plans = []
        rejoin = red.rejoin_block(layout)
        if rejoin is not None and source_index is not None:
            raise ValueError(f"trace_source=True does not support reducer {red.label()!r}: its "
                             "set-aside tokens rejoin later")
        set_aside = []   # (tokens, sizes) each active call set aside, for `rejoin`

        def attend(blk, x, size, sized: bool, valid: int, stats=(), probs=None):
            if probs is None and red.policy_attention:   # a keep policy (DynamicViT training)
                probs = blk.attn.probabilities(blk.norm1(x), key_policy=size[..., 0])
            proportional = red.proportional_attention and sized
            if x.shape[1] > valid:     # padding rows: masked by a key size of 0
                return blk.attend(x, key_size=token_padding.key_size(size, valid, proportional),
                                  stats=stats, probs=probs, valid=valid)
            key_size = size[..., 0] if proportional else None
            return blk.attend(x, key_size=key_size, stats=stats, probs=probs)

        for l, (blk, spec) in enumerate(zip(self.blocks, specs)):
            if l == rejoin and set_aside:
                x = jnp.concatenate([x[:, :valid]] + [t for t, _ in set_aside], axis=1)
                size = jnp.concatenate([size[:, :valid]] + [s for _, s in set_aside], axis=1)
                valid = x.shape[1]
                x, size = padded(x, size)
            stats = red.stats(layout, spec) if spec.active else ()
            place = red.placement(spec) if spec.active else "mid"
            if place == "before":   # the reducer runs on the block's input (one-step-ahead)
                x, size = x[:, :valid], size[:, :valid]
                key_size = size[..., 0] if (red.proportional_attention and l > 0) else None
                st = blk.input_stats(x, stats, key_size=key_size)
            else:
                # Sizes enter attention from the second block on (all ones before: log 1 = 0).
                x, st = attend(blk, x, size, l > 0, valid, stats)
            if place == "after":
                x = shd.constrain(blk.feed_forward(x), _ACT)
            if spec.active:
                if red.learned and blk.reducer is None:
                    raise ValueError(f"reducer {red.label()!r} has parameters at block {l}, but "
                                     "this model was built without them: build it with this "
                                     "reduction in its config")
                layer_key = None if key is None else jax.random.fold_in(key, l)

                def run(x_, s_, st_, spec=spec, blk=blk, layer_key=layer_key):
                    return red.reduce(layout, spec, x_, s_, st_, key=layer_key,
                                      module=blk.reducer)

                # Selection on each device's own examples under a mesh (no batch all-gather).
                x_in, size_in = x[:, :valid], size[:, :valid]     # the real tokens only
                x, size, plan = shd.per_example(run, x_in, size_in, st) \
                    if red.per_example(spec) else run(x_in, size_in, st)
                valid = x.shape[1]
                x, size = padded(x, size)
                if source_index is not None:
                    source_index = tk.update_source_index(source_index, plan.assignment)
                if rejoin is not None:
                    set_aside.append((plan.set_aside(x_in), plan.set_aside(size_in)))
                plans.append(plan)
                if place == "before":   # attention of the reduced tokens: given or afresh
                    probs = red.reduce_attention(layout, spec, plan, size_in, st)
                    if probs is not None:
                        probs = token_padding.pad_probs(probs, x.shape[1])
                    x, _ = attend(blk, x, size, True, valid, probs=probs)
            if place != "after":
                x = shd.constrain(blk.feed_forward(x), _ACT)
        x, size = x[:, :valid], size[:, :valid]     # the padding rows go
        if not cfg.fc_norm:
            x = self.norm(x)
        if cfg.global_pool == "token":
            feats = x[:, 0]
        else:   # size-weighted mean over the patch tokens ("avg") or every token ("avg_all")
            p = cfg.num_prefix_tokens if cfg.global_pool == "avg" else 0
            w = size[:, p:].astype(x.dtype)
            feats = (x[:, p:] * w).sum(axis=1) / w.sum(axis=1)
        if cfg.fc_norm:
            feats = self.norm(feats)
        logits = self.head(feats)
        aux = {"features": feats, "tokens": [s.n_in for s in specs] + [specs[-1].n_out],
               "size": size, "plans": plans, "last_hidden_state": x}
        if source_index is not None:
            aux["source_index"] = source_index
        if self.head_dist is not None:
            logits_dist = self.head_dist(x[:, 1])
            aux["logits_cls"], aux["logits_dist"] = logits, logits_dist
            logits = (logits + logits_dist) / 2
        return logits.astype(jnp.float32), aux
