"""LookupViT as a model: a stack of `jax_tokens.lookup.LookupViTBlock`s (Koner et al.,
"LookupViT: Compressing visual information to a limited number of tokens", ECCV 2024).

    cfg = LookupViTConfig(img_size=224, patch_size=16, lookup_grid=(7, 7))
    model = LookupViT(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(images)            # images [B, H, W, C] (NHWC), like VisionTransformer

The N patch tokens ("high-resolution" tokens) and the M = mh * mw lookup tokens travel side by
side through every block: the M get full self-attention and the wide MLP, the N only a
cross-attention read-back and a narrow MLP (see `LookupViTBlock`). The compression is built into
the architecture, so the model takes no ``reduction=`` (it raises when given one); every shape is
static and the model compiles once per config.

The layout, and what is ours rather than the paper's:

  * patch embedding: a strided convolution, as `jax_tokens.models.vit` (the lucidrains port uses
    a 7x7 convolution over space-to-depth patches instead);
  * a learned position embedding on the N patch tokens (``pos_embed="learn"``; "none" drops it);
    the port uses a fixed sine-cosine table;
  * the M lookup tokens start as the position-embedded patch grid average-pooled to mh x mw
    (`init_lookup_tokens`; the port resizes bilinearly). There is no class token;
  * ``depth`` LookupViT blocks. The hr tokens' MLP is narrower than the lookup tokens' by a
    factor: ``hr_mlp_ratio`` defaults to ``mlp_ratio / HR_MLP_FACTOR`` with HR_MLP_FACTOR = 4
    (hidden width = dim at the default mlp_ratio 4, a quarter of the lookup tokens' MLP). The
    paper makes this factor a hyper-parameter; 4 is our default, not a value we could check
    against the paper's text. Set ``hr_mlp_ratio`` to override it;
  * the last block stops after refining the lookup tokens (``LookupViTBlock(infuse=False)``):
    the classifier reads only the lookup tokens, so the last read-back into the hr tokens would
    be dead compute with parameters that never get a gradient. ``aux["hr_tokens"]`` are
    therefore the hr tokens as the last block read them;
  * a final LayerNorm on the lookup tokens and a linear classifier on their mean. The paper
    classifies from the compressed (lookup) tokens; the lucidrains port adds the mean of the
    normed hr tokens to the mean of the lookup tokens before its classifier. We use the lookup
    tokens only, so the hr tokens stay a by-product for dense tasks;
  * no dropout, drop-path or layer-scale.

Sharding: every parameter carries logical axis names (NNX metadata ``out_sharding`` with
``eager_sharding=False``): the patch kernel (None, None, "patch", "embed"), the position
embedding (None, None, "embed"), the blocks' ("embed", "qkv"), ("heads", "embed"),
("embed", "mlp"), ("mlp", "embed"), LayerNorms ("norm"), the head ("embed", "classes"). Under a
mesh both token streams are constrained to ("batch", "tokens", "embed").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_tokens import reducers
from jax_tokens import sharding as shd
from jax_tokens.layers import PatchGrid, check_images, patch_embedding
from jax_tokens.sharding import logical_axes as _axes
from jax_tokens.attention.api import IMPLS as _ATTN_IMPLS
from jax_tokens.lookup import LookupViTBlock, init_lookup_tokens, lookup_block_flops

__all__ = ["LookupViTConfig", "LookupViT", "HR_MLP_FACTOR"]

HR_MLP_FACTOR = 4.0  # default hr_mlp_ratio = mlp_ratio / HR_MLP_FACTOR
DEFAULT_LOOKUP_GRID = (7, 7)
_ACT = ("batch", "tokens", "embed")  # logical axes of both token streams
_DTYPES = ("float32", "bfloat16")
_POS = ("learn", "none")


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is not allowed: {allowed}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise _bad(name, value, "it must be an int >= 1")
    return int(value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        raise _bad(name, value, "it must be a finite float > 0")
    return float(value)


@dataclasses.dataclass(frozen=True)
class LookupViTConfig(PatchGrid):
    """LookupViT hyper-parameters (timm / `ViTConfig` names where they exist).

    The lookup tokens are set by ``lookup_grid`` (mh, mw) or by ``num_lookup`` (a perfect square
    M, giving a sqrt(M) x sqrt(M) grid); after construction both are filled in and agree. Neither
    given: ``lookup_grid=(7, 7)``. ``hr_mlp_ratio=None`` means ``mlp_ratio / HR_MLP_FACTOR``
    (see `effective_hr_mlp_ratio`). Bad values raise ValueError naming the field.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0               # lookup tokens' MLP: hidden = embed_dim * mlp_ratio
    hr_mlp_ratio: float | None = None    # hr tokens' MLP; None: mlp_ratio / HR_MLP_FACTOR
    lookup_grid: tuple[int, int] | None = None   # (mh, mw); None: from num_lookup or (7, 7)
    num_lookup: int | None = None        # M = mh * mw; a perfect square when given alone
    qkv_bias: bool = True
    pos_embed: str = "learn"             # "learn" | "none"
    ln_eps: float = 1e-6
    attn_impl: str = "auto"              # the lookup tokens' self-attention (jax_tokens.attention)
    dtype: str = "float32"               # compute dtype ("bfloat16" for mixed precision)

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                     "num_heads"):
            _positive_int(name, getattr(self, name))
        if self.img_size % self.patch_size:
            raise _bad("img_size", self.img_size,
                       f"it must be a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise _bad("num_heads", self.num_heads,
                       f"it must divide embed_dim={self.embed_dim}")
        if int(self.embed_dim * _positive_float("mlp_ratio", self.mlp_ratio)) < 1:
            raise _bad("mlp_ratio", self.mlp_ratio,
                       f"int(embed_dim * mlp_ratio) must be >= 1 (embed_dim={self.embed_dim})")
        if self.hr_mlp_ratio is not None:
            _positive_float("hr_mlp_ratio", self.hr_mlp_ratio)
        if int(self.embed_dim * self.effective_hr_mlp_ratio) < 1:
            raise _bad("hr_mlp_ratio", self.hr_mlp_ratio,
                       f"int(embed_dim * hr_mlp_ratio) must be >= 1 (embed_dim="
                       f"{self.embed_dim}, effective ratio {self.effective_hr_mlp_ratio})")
        self._resolve_lookup()
        if not isinstance(self.qkv_bias, bool):
            raise _bad("qkv_bias", self.qkv_bias, "it must be a bool")
        if self.pos_embed not in _POS:
            raise _bad("pos_embed", self.pos_embed, f"it must be one of {_POS}")
        _positive_float("ln_eps", self.ln_eps)
        if self.attn_impl not in _ATTN_IMPLS:
            raise _bad("attn_impl", self.attn_impl, f"it must be one of {_ATTN_IMPLS}")
        if self.dtype not in _DTYPES:
            raise _bad("dtype", self.dtype, f"it must be one of {_DTYPES}")

    def _resolve_lookup(self) -> None:
        grid, m = self.lookup_grid, self.num_lookup
        if m is not None:
            _positive_int("num_lookup", m)
        if grid is None:
            if m is None:
                grid = DEFAULT_LOOKUP_GRID
            else:
                s = math.isqrt(m)
                if s * s != m:
                    raise _bad("num_lookup", m,
                               f"alone it must be a perfect square (nearest: {s * s} or "
                               f"{(s + 1) ** 2}); give lookup_grid=(mh, mw) for other shapes")
                grid = (s, s)
        if isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__") or len(grid) != 2:
            raise _bad("lookup_grid", grid, "it must be a pair (mh, mw) of ints >= 1")
        grid = (_positive_int("lookup_grid[0]", grid[0]),
                _positive_int("lookup_grid[1]", grid[1]))
        g = self.grid
        if grid[0] > g or grid[1] > g:
            raise _bad("lookup_grid", grid, f"each side must be <= the patch grid side {g} "
                       f"(img_size={self.img_size} // patch_size={self.patch_size})")
        if m is not None and m != grid[0] * grid[1]:
            raise _bad("num_lookup", m, f"it must equal lookup_grid {grid[0]} x {grid[1]} = "
                       f"{grid[0] * grid[1]} when both are given")
        object.__setattr__(self, "lookup_grid", grid)
        object.__setattr__(self, "num_lookup", grid[0] * grid[1])

    # -- derived sizes (grid, num_patches, head_dim, mlp_hidden: PatchGrid) -------------------
    @property
    def num_tokens(self) -> int:
        """N, the high-resolution (patch) tokens; LookupViT has no prefix tokens."""
        return self.num_patches

    @property
    def effective_hr_mlp_ratio(self) -> float:
        """``hr_mlp_ratio``, or ``mlp_ratio / HR_MLP_FACTOR`` when it is None."""
        if self.hr_mlp_ratio is None:
            return float(self.mlp_ratio) / HR_MLP_FACTOR
        return float(self.hr_mlp_ratio)

    @property
    def hr_mlp_hidden(self) -> int:
        return int(self.embed_dim * self.effective_hr_mlp_ratio)

    def replace(self, **kw) -> "LookupViTConfig":
        """A copy with fields replaced. Giving one of ``lookup_grid`` / ``num_lookup`` resets
        the other, so ``cfg.replace(num_lookup=16)`` gives a 4 x 4 grid."""
        if "num_lookup" in kw and "lookup_grid" not in kw:
            kw["lookup_grid"] = None
        elif "lookup_grid" in kw and "num_lookup" not in kw:
            kw["num_lookup"] = None
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        """A JSON-ready dict; `LookupViTConfig(**d)` inverts it."""
        d = dataclasses.asdict(self)
        d["lookup_grid"] = list(self.lookup_grid)
        return d

    # -- budgets and cost ---------------------------------------------------------------------
    @property
    def reduction(self) -> reducers.Reducer:
        """The reducer slot a trainer asks about: LookupViT has none (its compression is its
        architecture), so this is the `none` reducer."""
        return reducers.from_config(None)

    def token_counts(self, reduction: Any = None) -> list[int]:
        """For each block, the M lookup tokens that get full attention; then the final count
        (the tokens the classifier reads). `reduction` must be None or `none`."""
        _check_no_reduction(reduction, self)
        return [self.num_lookup] * (self.depth + 1)

    def flops(self, reduction: Any = None) -> int:
        """Estimated forward FLOPs per image (2 x multiply-adds of the matmuls): the patch
        embedding, the initial pooling, the blocks (`lookup_block_flops`; the last one without
        its read-back) and the head. Norms, softmaxes and GELUs are not counted."""
        _check_no_reduction(reduction, self)
        n, m, d = self.num_tokens, self.num_lookup, self.embed_dim
        total = 2 * n * (self.in_chans * self.patch_size ** 2) * d
        mh, mw = self.lookup_grid
        if self.grid % mh == 0 and self.grid % mw == 0:
            total += n * d  # a reshape-mean: one add per element
        else:
            total += 2 * m * n * d  # the [M, N] pooling matrix
        hr = self.effective_hr_mlp_ratio
        for layer in range(self.depth):
            total += lookup_block_flops(n, m, d, self.mlp_ratio, hr,
                                        infuse=layer < self.depth - 1)
        return total + 2 * d * self.num_classes


def _check_no_reduction(reduction: Any, cfg: LookupViTConfig) -> None:
    if reduction is None or reduction == cfg.reduction:
        return
    raise ValueError(
        f"reduction={reduction!r} is not allowed for LookupViT: its compression into "
        f"num_lookup={cfg.num_lookup} lookup tokens is built into every block (set "
        "LookupViTConfig.lookup_grid / num_lookup instead); pass reduction=None")


class LookupViT(nnx.Module):
    """LookupViT: patch embedding, lookup tokens pooled from the patch grid, ``depth``
    `LookupViTBlock`s, LayerNorm, classifier on the mean lookup token (module docstring)."""

    def __init__(self, cfg: LookupViTConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, LookupViTConfig):
            raise TypeError(f"cfg must be a LookupViTConfig; got {type(cfg).__name__}")
        self.cfg = cfg
        dim, dtype = cfg.embed_dim, jnp.dtype(cfg.dtype)
        self.patch_embed = patch_embedding(cfg.in_chans, dim, cfg.patch_size, dtype=dtype,
                                           rngs=rngs)
        tn = nnx.initializers.truncated_normal(0.02)
        if cfg.pos_embed == "learn":
            self.pos_embed = nnx.Param(tn(rngs.params(), (1, cfg.num_tokens, dim)),
                                       **_axes(None, None, "embed"))
        else:
            self.pos_embed = None
        self.blocks = nnx.List([
            LookupViTBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.effective_hr_mlp_ratio,
                           cfg.qkv_bias, attn_impl=cfg.attn_impl,
                           infuse=layer < cfg.depth - 1, ln_eps=cfg.ln_eps, dtype=dtype,
                           rngs=rngs)
            for layer in range(cfg.depth)])
        self.norm = nnx.LayerNorm(dim, epsilon=cfg.ln_eps, dtype=dtype, rngs=rngs,
                                  scale_metadata=_axes("norm"), bias_metadata=_axes("norm"))
        self.head = nnx.Linear(dim, cfg.num_classes, kernel_init=tn,
                               bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs,
                               kernel_metadata=_axes("embed", "classes"),
                               bias_metadata=_axes("classes"))

    def embed(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] images -> [B, N, D] patch tokens (position embedding added)."""
        cfg = self.cfg
        images = check_images(images, cfg.img_size, cfg.in_chans)
        x = self.patch_embed(images.astype(jnp.dtype(cfg.dtype)))
        x = x.reshape(x.shape[0], -1, cfg.embed_dim)
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(x.dtype)
        return x

    def __call__(self, images: jax.Array, *, key: jax.Array | None = None,
                 reduction: Any = None):
        """Returns (logits float32 [B, classes], aux), like `VisionTransformer`.

        aux holds "features" (pre-logits [B, D]: the mean of the normed lookup tokens),
        "tokens" (`cfg.token_counts()`, static ints), "last_hidden_state" [B, M, D] (the normed
        lookup tokens) and "hr_tokens" [B, N, D] (the final high-resolution tokens, un-normed).
        `key` is accepted for the common calling convention and unused (nothing is random).
        `reduction` must be None (or the `none` reducer).
        """
        del key  # no random operations
        _check_no_reduction(reduction, self.cfg)
        cfg = self.cfg
        x = shd.constrain(self.embed(images), _ACT)
        z = shd.constrain(init_lookup_tokens(x, (cfg.grid, cfg.grid), cfg.lookup_grid), _ACT)
        for blk in self.blocks:
            z, x = blk(z, x)
            z, x = shd.constrain(z, _ACT), shd.constrain(x, _ACT)
        z = self.norm(z)
        feats = z.astype(jnp.float32).mean(axis=1).astype(z.dtype)
        logits = self.head(feats).astype(jnp.float32)
        aux = {"features": feats, "tokens": cfg.token_counts(), "last_hidden_state": z,
               "hr_tokens": x}
        return logits, aux
