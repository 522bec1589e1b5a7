"""Layers the models and the learned reducers share: the transformer MLP, the patch embedding,
the NNX metadata that names parameters' logical axes (`jax_tokens.sharding` maps them to mesh
axes), and the image check every model runs on its input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokens.sharding import logical_axes

__all__ = ["Mlp", "linear_axes", "norm_axes", "logical_axes", "patch_embedding", "PatchGrid",
           "check_images"]


def linear_axes(din: str | None, dout: str | None) -> dict:
    """nnx.Linear kernel / bias metadata for the (input, output) logical axis names."""
    return dict(kernel_metadata=logical_axes(din, dout), bias_metadata=logical_axes(dout))


def norm_axes() -> dict:
    """nnx.LayerNorm scale / bias metadata (per-channel vectors: "norm")."""
    return dict(scale_metadata=logical_axes("norm"), bias_metadata=logical_axes("norm"))


class Mlp(nnx.Module):
    """Dense -> GELU -> Dense (the transformer MLP), parameters `fc1` and `fc2` (timm's names).

    `out_axis` is the logical axis name of the output ("embed", or None for score maps);
    `approximate_gelu` picks the tanh GELU (flax's default) over the exact erf one (timm's).
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None, *,
                 approximate_gelu: bool = False, kernel_init=nnx.initializers.xavier_uniform(),
                 bias_init=nnx.initializers.zeros_init(), dtype=None, param_dtype=jnp.float32,
                 out_axis: str | None = "embed", rngs: nnx.Rngs):
        out_dim = dim if out_dim is None else out_dim
        kw = dict(kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden_dim, **kw, **linear_axes("embed", "mlp"))
        self.fc2 = nnx.Linear(hidden_dim, out_dim, **kw, **linear_axes("mlp", out_axis))
        self.approximate_gelu = approximate_gelu

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu))


def patch_embedding(in_chans: int, dim: int, patch_size: int, *, dtype=None,
                    rngs: nnx.Rngs) -> nnx.Conv:
    """The patch embedding: a patch_size x patch_size convolution with that stride (timm's
    `patch_embed.proj`), kernel axes (None, None, "patch", "embed")."""
    return nnx.Conv(in_chans, dim, (patch_size, patch_size), strides=(patch_size, patch_size),
                    padding="VALID", dtype=dtype, rngs=rngs,
                    kernel_metadata=logical_axes(None, None, "patch", "embed"),
                    bias_metadata=logical_axes("embed"))


class PatchGrid:
    """Sizes a patch model's config derives from img_size, patch_size, embed_dim, num_heads
    and mlp_ratio (mixed into ViTConfig and LookupViTConfig)."""

    @property
    def grid(self) -> int:
        """Side of the square patch grid."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


# Normalised images (mean 0, std 1 per channel) lie within a few units of 0; raw 0-255 pixels
# passed as floats reach far beyond this.
_MAX_NORMALISED = 100.0


def check_images(images, img_size: int, in_chans: int):
    """`images` as an array after checking what a model can take: shape [B, S, S, C] (NHWC),
    a float dtype, and, when the values are concrete (an eager call), finite values of a
    normalised image. Raises ValueError / TypeError naming what is wrong."""
    if not hasattr(images, "ndim"):
        images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != (img_size, img_size, in_chans):
        raise ValueError(f"images must have shape [batch, {img_size}, {img_size}, {in_chans}] "
                         f"(NHWC); got {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images have dtype {images.dtype}; the model takes float images "
                        "normalised as in training, e.g. jax_tokens.images.normalize(images, "
                        "mean, std) for uint8 pixels")
    if not isinstance(images, jax.core.Tracer):   # concrete (also when closed over under jit)
        host = np.asarray(images, np.float32)
        peak = float(np.max(np.abs(host))) if host.size else 0.0
        if not np.isfinite(peak):
            raise ValueError("images contain NaN or Inf values")
        if peak > _MAX_NORMALISED:
            raise ValueError(f"images reach |x| = {peak:g}: they look like raw pixel values, "
                             "not normalised ones; normalise them as in training, e.g. "
                             "jax_tokens.images.normalize(images, mean, std)")
    return images
