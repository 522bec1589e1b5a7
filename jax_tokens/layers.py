"""Layers the models and the learned reducers share: the transformer MLP and the NNX metadata
that names parameters' logical axes (`jax_tokens.sharding` maps them to mesh axes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_tokens.sharding import logical_axes

__all__ = ["Mlp", "linear_axes", "norm_axes", "logical_axes", "patch_embedding", "PatchGrid"]


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
