"""Rotary position embeddings (RoPE) of the Llama family: frequencies with the config's
scaling (linear, per-frequency factors, Llama 3), cos / sin tables, the rotate-half rotation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rope_inv_freq", "rope_tables", "apply_rope", "repeat_kv"]


def rope_inv_freq(cfg) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32) of a `LlamaConfig`, with its scaling
    applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = cfg.rope_scaling
    if sc is not None:
        if sc.kind == "linear":
            inv = inv / sc.factor
        elif sc.kind == "factors":
            inv = inv / np.asarray(sc.freq_factors, np.float64)
        elif sc.kind == "llama3":
            low_wavelen = sc.original_max_positions / sc.low_freq_factor
            high_wavelen = sc.original_max_positions / sc.high_freq_factor
            wavelen = 2 * np.pi / inv
            smooth = (sc.original_max_positions / wavelen - sc.low_freq_factor) / (
                sc.high_freq_factor - sc.low_freq_factor)
            mid = (1 - smooth) * inv / sc.factor + smooth * inv
            inv = np.where(wavelen > low_wavelen, inv / sc.factor,
                           np.where(wavelen < high_wavelen, inv, mid))
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, head_dim] (float32) for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, H, D]: pairs are (i, i + D/2)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def repeat_kv(x: jax.Array, groups: int, axis: int = 2) -> jax.Array:
    """KV heads to query heads: KV head j serves query heads j*groups ... j*groups+groups-1."""
    return x if groups == 1 else jnp.repeat(x, groups, axis=axis)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
