"""A Flax NNX decoder of the Llama family (Llama, SmolLM, Mistral-style GQA, Qwen2 with q/k/v
biases).

    cfg = LlamaConfig.smollm2_135m()
    model = create(cfg, seed=0)                       # or Llama(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(tokens)                       # tokens [B, T] int32, causal, no cache
    logits, aux = model(tokens, positions=pos, mask=mask, cache=cache)   # with a KV cache
    aux["cache"]                                      # the cache after writing these tokens

Blocks are pre-norm: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP -> residual; a
final RMSNorm, then the LM head (the embedding matrix transposed when the embeddings are tied).
Attention is grouped-query: `num_kv_heads` key/value heads, each serving `num_heads //
num_kv_heads` consecutive query heads; keys and values are repeated to the query heads right
before the library's `attention()` call (they are cached unrepeated). RoPE uses the
"rotate-half" layout (the first and second halves of each head form the pairs), with the
config's base and scaling (linear, Llama 3, or explicit per-frequency factors).

The L blocks are one `Block` whose parameters are stacked on a leading layer axis, and the
forward pass is a `lax.scan` over it: a 30-layer model compiles in about the time of one
layer (measured on this project's 2-core CPU: ~3 s instead of ~13 s for a forward pass,
~10 s instead of ~40 s for a decode step), at the price of a per-layer slice of the weights in
every step (on that CPU, decode steps take about 1.8x longer than with unrolled layers).
Parameter names: `layers.attn.q_proj` is [L, D, H, hd]; `create(cfg, seed=...)` builds a
random model under one jit.

Without a cache the call is plain causal attention over the T tokens (`mask` / `positions`
handle padded batches). With a cache (`jax_tokens.models.llama.cache`), the new tokens' keys
and values are written into the cache first and the queries attend over every cache slot,
masked by the cache's validity and positions (`cache.attention_bias`): one code path for
prefill, chunked prefill and one-token decoding, with static shapes throughout.

Sharding: parameters carry logical axis names (`out_sharding` metadata, as the ViT's do):
embedding ("vocab", "embed"), q kernel ("embed", "heads", None), k / v kernels ("embed",
"kv_heads", None), output projection ("heads", None, "embed"), MLP ("embed", "mlp") / ("mlp",
"embed"), norms ("norm"), the layer parameters with a leading None (layer axis); the
residual stream is constrained to ("batch", "tokens", "embed").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokens import sharding as shd
from jax_tokens.attention.sharded import attention as mesh_attention
from jax_tokens.models.llama import cache as kvc
from jax_tokens.models.llama.rope import apply_rope, repeat_kv, rope_inv_freq, rope_tables

__all__ = ["LlamaConfig", "RopeScaling", "Llama", "create", "shard", "next_token_loss",
           "RMSNorm", "rope_inv_freq", "apply_rope", "repeat_kv"]

_ACT = ("batch", "tokens", "embed")
_axes = shd.logical_axes


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "linear" (positions divided by `factor`), "llama3" (Llama
    3.1's frequency-dependent scaling: low frequencies divided by `factor`, high ones kept,
    smooth in between), or "factors" (each inverse frequency divided by `freq_factors[i]`, the
    form GGUF files store as `rope_freqs.weight`)."""

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in ("linear", "llama3", "factors"):
            raise ValueError(f"rope scaling kind={self.kind!r} is not one of linear, llama3, "
                             "factors")
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ValueError(f"rope scaling factor={self.factor!r} must be a finite float > 0")
        if self.kind == "factors" and not self.freq_factors:
            raise ValueError("rope scaling kind='factors' needs freq_factors")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-family hyper-parameters (Hugging Face's names where they exist)."""

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    qkv_bias: bool = False            # Qwen2: biases on the q, k and v projections
    attn_impl: str = "auto"
    dtype: str = "float32"            # compute dtype ("bfloat16" for mixed precision)
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta={self.rope_theta!r} must be a finite float > 0")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of float32, "
                                 "bfloat16, float16")
        sc = self.rope_scaling
        if sc is not None and sc.kind == "factors" and len(sc.freq_factors) != self.head_dim // 2:
            raise ValueError(f"rope freq_factors has {len(sc.freq_factors)} entries; head_dim "
                             f"{self.head_dim} needs {self.head_dim // 2}")

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            sc = dict(d["rope_scaling"])
            if sc.get("freq_factors") is not None:
                sc["freq_factors"] = tuple(sc["freq_factors"])
            d["rope_scaling"] = RopeScaling(**sc)
        return cls(**d)

    def num_params(self) -> int:
        """Parameter count (the tied LM head counted once)."""
        d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                           self.num_kv_heads, self.head_dim)
        layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
        if self.qkv_bias:
            layer += h * hd + 2 * kv * hd
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    @classmethod
    def smollm2_135m(cls, **kw) -> "LlamaConfig":
        """SmolLM2-135M(-Instruct): 30 layers, width 576, 9 / 3 heads, RoPE base 1e5."""
        return cls(**{**dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                             num_kv_heads=3, head_dim=64, intermediate_size=1536,
                             rms_norm_eps=float(np.float32(1e-5)), rope_theta=100000.0,
                             max_position_embeddings=8192, tie_word_embeddings=True), **kw})

    @classmethod
    def tiny(cls, **kw) -> "LlamaConfig":
        """A small random-init config for tests."""
        return cls(**{**dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, intermediate_size=128,
                             rope_theta=10000.0, max_position_embeddings=512), **kw})


def _param(rngs, init, shape, dtype, names, layers):
    """A parameter; with `layers`, stacked along a leading layer axis (logical name None)."""
    if layers:
        shape, names = (layers,) + tuple(shape), (None,) + tuple(names)
    return nnx.Param(init(rngs.params(), shape, dtype), **_axes(*names))


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, layers: int = 0):
        shape = ((layers,) if layers else ()) + (dim,)
        names = ((None,) if layers else ()) + ("norm",)
        self.scale = nnx.Param(jnp.ones(shape, param_dtype), **_axes(*names))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.scale[...].astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, through `jax_tokens.attention.attention`.

    Parameters (per layer): q_proj [D, H, hd], k_proj / v_proj [D, KVH, hd], o_proj
    [H, hd, D], plus q/k/v biases [H|KVH, hd] with cfg.qkv_bias.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, layers: int = 0):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.q_proj = _param(rngs, init, (d, h, hd), pd, ("embed", "heads", None), layers)
        self.k_proj = _param(rngs, init, (d, kv, hd), pd, ("embed", "kv_heads", None), layers)
        self.v_proj = _param(rngs, init, (d, kv, hd), pd, ("embed", "kv_heads", None), layers)
        self.o_proj = _param(rngs, init, (h, hd, d), pd, ("heads", None, "embed"), layers)
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, zeros, (h, hd), pd, ("heads", None), layers)
            self.k_bias = _param(rngs, zeros, (kv, hd), pd, ("kv_heads", None), layers)
            self.v_bias = _param(rngs, zeros, (kv, hd), pd, ("kv_heads", None), layers)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.impl = cfg.attn_impl

    def project(self, x: jax.Array, cos, sin):
        """x [B, T, D] -> q [B, T, H, hd], k, v [B, T, KVH, hd] (RoPE applied to q and k) and
        the queries before RoPE."""
        dt = x.dtype

        def proj(w, b):
            y = jnp.einsum("btd,dhk->bthk", x, w[...].astype(dt))
            return y if b is None else y + b[...].astype(dt)

        q_raw = proj(self.q_proj, self.q_bias)
        q = apply_rope(q_raw, cos, sin)
        k = apply_rope(proj(self.k_proj, self.k_bias), cos, sin)
        v = proj(self.v_proj, self.v_bias)
        return q, k, v, q_raw

    def __call__(self, x, cos, sin, *, bias=None, cache: kvc.KVCache | None = None,
                 layer=None, positions=None, mask=None, stats: Sequence[str] = (),
                 query_index=0, want_qkv: bool | str = False, inv_freq=None):
        """With a cache: the new keys / values go into layer `layer` of the stacked cache
        (only the T new slots are written) and the queries attend over that layer's slots.
        Keys and values keep their KV heads (grouped-query attention, never repeated)."""
        q, k, v, q_raw = self.project(x, cos, sin)
        if cache is not None:
            cache = cache.write_layer(layer, k, v, positions, mask)
            lc = cache.layer(layer)
            keys, values = lc.k.astype(q.dtype), lc.v.astype(q.dtype)
            if lc.sink_shift:     # StreamingLLM's positions inside the cache
                keys = kvc.reindex_sink_keys(keys, lc.pos, lc.valid, lc.sink_shift, inv_freq)
            bias = lc.attention_bias(positions, k.shape[1], mask)      # [B, KVH, T, C]
            causal = False
        else:
            keys, values = k, v
            causal = bias is None
        out, st = mesh_attention(q, keys, values, bias=bias, causal=causal, stats=stats,
                                 query_index=query_index, impl=self.impl)
        y = jnp.einsum("bthk,hkd->btd", out, self.o_proj[...].astype(out.dtype))
        if want_qkv:
            st = {**st, "queries": q_raw if want_qkv == "raw" else q}
        return y, cache, st


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, layers: int = 0):
        d, f = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.gate_proj = _param(rngs, init, (d, f), pd, ("embed", "mlp"), layers)
        self.up_proj = _param(rngs, init, (d, f), pd, ("embed", "mlp"), layers)
        self.down_proj = _param(rngs, init, (f, d), pd, ("mlp", "embed"), layers)

    def __call__(self, x):
        dt = x.dtype
        g = x @ self.gate_proj[...].astype(dt)
        u = x @ self.up_proj[...].astype(dt)
        return (jax.nn.silu(g) * u) @ self.down_proj[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm decoder block. Built with `layers=L`, every parameter has a leading layer axis
    (the model's one `Block` holds all L layers; `Llama.__call__` scans over that axis)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, layers: int = 0):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd,
                                  layers=layers)
        self.attn = Attention(cfg, rngs=rngs, layers=layers)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd,
                                      layers=layers)
        self.mlp = SwiGLU(cfg, rngs=rngs, layers=layers)

    def __call__(self, x, cos, sin, **kw):
        h, cache, st = self.attn(self.input_norm(x), cos, sin, **kw)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return shd.constrain(x, _ACT), cache, st


class Llama(nnx.Module):
    """The decoder; see the module docstring.

    `layers` is one `Block` whose parameters are stacked over the L layers ([L, ...]):
    the forward pass is a `lax.scan` over them, so a model compiles in about the time of one
    layer whatever its depth, and the KV cache is stacked the same way ([L, B, C, KVH, hd]).
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.embed = _param(rngs, init, (cfg.vocab_size, cfg.hidden_size), pd,
                            ("vocab", "embed"), 0)
        self.layers = Block(cfg, rngs=rngs, layers=cfg.num_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pd)
        self.lm_head = None if cfg.tie_word_embeddings else _param(
            rngs, init, (cfg.hidden_size, cfg.vocab_size), pd, ("embed", "vocab"), 0)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states [..., D] (after the final norm) -> float32 logits [..., V]."""
        if self.lm_head is None:   # tied: contract with the embedding rows, no transpose
            return jnp.einsum("...d,vd->...v", h, self.embed[...].astype(h.dtype),
                              preferred_element_type=jnp.float32)
        return jnp.matmul(h, self.lm_head[...].astype(h.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 mask: jax.Array | None = None, cache: kvc.KVCache | None = None,
                 stats: Sequence[str] = (), query_index: Any = 0, want_qkv: bool | str = False,
                 logits: str = "all"):
        """Forward pass over T new tokens.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] int positions (default 0..T-1, or, with a cache, continuing from
            the first layer's write index). Left-padded batches: `cache.padding_positions`.
          mask: [B, T] bool, False for padding tokens (default: all valid). Padding tokens
            attend only to themselves; nobody attends to them.
          cache: a `KVCache` to write the new keys / values into and attend over (None:
            causal attention over these T tokens only).
          stats: attention statistics to return for every layer (names from
            `jax_tokens.attention.STATS`). With a cache they are over the cache slots ([B, H,
            C] for "key_mass"), which is what a press needs.
          query_index: the query rows "cls_probs" returns (an int or a sequence of ints).
          want_qkv: also return every layer's queries [B, T, H, hd] (RoPE applied; "raw":
            before RoPE) under
            "queries" in the statistics.
          logits: "all" ([B, T, V]), "last" ([B, V], the last position) or "none".

        Returns:
          (logits float32 or None, aux): aux["cache"] (the updated cache, or None),
          aux["stats"] (name -> array with a leading layer axis [L, ...]) and aux["hidden"]
          ([B, T, D] after the final norm).
        """
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, tokens]; got {tokens.shape}")
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits={logits!r} is not one of 'all', 'last', 'none'")
        if isinstance(stats, str):
            raise TypeError(f"stats must be a tuple of names; got the string {stats!r}")
        b, t = tokens.shape
        if cache is not None:
            if cache.num_layers != cfg.num_layers:
                raise ValueError(f"the cache has {cache.num_layers} layers; the model has "
                                 f"{cfg.num_layers}")
            if t > cache.capacity:
                raise ValueError(f"{t} new tokens do not fit a KV cache of capacity "
                                 f"{cache.capacity}")
        causal_only = positions is None
        if positions is None:
            start = 0 if cache is None else cache.index[0]
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        x, cache, layer_stats = self.run_layers(
            self.embed_tokens(tokens), positions, mask=mask, cache=cache, stats=stats,
            query_index=query_index, want_qkv=want_qkv, causal_only=causal_only)
        h = self.norm(x)
        out = None
        if logits == "all":
            out = self.logits(h)
        elif logits == "last":
            out = self.logits(h[:, -1])
        return out, {"cache": cache, "stats": layer_stats, "hidden": h}

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B, T] ids -> [B, T, D] in the compute dtype."""
        # FSDP-style: the table is gathered whole (over its width) before the lookup, so the
        # looked-up rows come out split over the batch like the tokens (a lookup into a
        # width-split table would need an all-to-all and a full rematerialisation).
        table = shd.constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))
        return shd.constrain(x, _ACT)

    def run_layers(self, x: jax.Array, positions: jax.Array, *, mask=None,
                   cache: kvc.KVCache | None = None, start: int = 0, stop: int | None = None,
                   stats: Sequence[str] = (), query_index: Any = 0,
                   want_qkv: bool | str = False, causal_only: bool = False):
        """Layers [start, stop) (static) on x [B, T, D] at `positions` [B, T]: a scan over
        that slice of the stacked layers. Returns (x, cache, stats with a leading [stop -
        start] axis). Without a cache, `causal_only` skips the padding / position mask."""
        cfg = self.cfg
        stop = cfg.num_layers if stop is None else stop
        b, t = positions.shape
        cos, sin = rope_tables(positions, rope_inv_freq(cfg))
        bias = None  # plain causal attention unless padding or explicit positions
        if cache is None and (mask is not None or not causal_only):
            bias = kvc.self_attention_bias(
                positions, jnp.ones((b, t), bool) if mask is None else mask)
        kw = dict(positions=positions, mask=mask, stats=tuple(stats), query_index=query_index,
                  want_qkv=want_qkv)
        if cache is not None and cache.sink_shift:
            kw["inv_freq"] = rope_inv_freq(cfg)
        graphdef, params = nnx.split(self.layers)
        if (start, stop) != (0, cfg.num_layers):
            params = jax.tree.map(lambda a: a[start:stop], params)

        if cache is None:
            def body(h, layer_params):
                h, _, st = nnx.merge(graphdef, layer_params)(h, cos, sin, bias=bias, **kw)
                return h, st

            x, layer_stats = jax.lax.scan(body, x, params)
        else:
            def body(carry, xs):
                h, kv = carry
                layer_params, l = xs
                h, kv, st = nnx.merge(graphdef, layer_params)(h, cos, sin, cache=kv, layer=l,
                                                              **kw)
                return (h, kv), st

            (x, cache), layer_stats = jax.lax.scan(
                body, (x, cache), (params, jnp.arange(start, stop)))
        return x, cache, layer_stats


def create(cfg: LlamaConfig, *, seed: int = 0) -> Llama:
    """A randomly initialised `Llama`, built under one `jax.jit` (eager initialisation
    dispatches and compiles every initializer separately: seconds on a CPU)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(seed))))
    params = jax.jit(lambda: nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, params)


def next_token_loss(model: Llama, tokens: jax.Array, mask: jax.Array | None = None,
                    positions: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of every next token (language-model training loss, float32).

    tokens [B, T] int; mask [B, T] bool (False: padding; a pair counts when both of its
    tokens are real; default all real); positions as in `Llama.__call__` (default: counted
    over the real tokens, so left- and right-padded rows give the same loss).
    """
    if mask is not None and positions is None:
        positions = kvc.padding_positions(mask)
    logits, _ = model(tokens, positions=positions, mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    if mask is None:
        return nll.mean()
    pair = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
    return (nll * pair).sum() / jnp.maximum(pair.sum(), 1.0)


def shard(model: Llama, mesh: jax.sharding.Mesh, rules=None) -> Llama:
    """Places the model's parameters on `mesh` by their logical axis names and `rules`
    (`jax_tokens.sharding.axis_rules(preset)`; None: replicated), in place; returns it.
    Run prefill / decode / training steps under `sharding.use_mesh(mesh, rules)`."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, shd.state_shardings(mesh, state, rules)))
    return model
