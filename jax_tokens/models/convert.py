"""Weights in and out of `VisionTransformer` with timm's names and layouts.

    model = from_timm(state_dict, cfg)      # numpy arrays keyed by timm names
    state_dict = to_timm(model)             # exact inverse
    save_safetensors(model, "vit.safetensors"); model = load_safetensors("vit.safetensors", cfg)

timm stores Linear weights as [out, in] and the patch convolution as [out, in, kh, kw]; NNX
stores [in, out] and [kh, kw, in, out]. Parameters that timm does not have (a TokenLearner)
travel under their NNX path prefixed with "jax_tokens.".
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokens.models.vit import VisionTransformer, ViTConfig

_Transform = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]
_ID: _Transform = (lambda a: a, lambda a: a)
_LINEAR: _Transform = (lambda a: a.T, lambda a: a.T)
_CONV: _Transform = (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))


def _linear(prefix: str, module) -> dict:
    out = {f"{prefix}.weight": (module.kernel, _LINEAR)}
    if getattr(module, "bias", None) is not None:
        out[f"{prefix}.bias"] = (module.bias, _ID)
    return out


def _norm(prefix: str, module) -> dict:
    return {f"{prefix}.weight": (module.scale, _ID), f"{prefix}.bias": (module.bias, _ID)}


def timm_variables(model: VisionTransformer) -> dict[str, tuple[nnx.Variable, _Transform]]:
    """timm name -> (the model's variable, (timm->ours, ours->timm) layout transforms)."""
    out: dict = {"patch_embed.proj.weight": (model.patch_embed.kernel, _CONV),
                 "patch_embed.proj.bias": (model.patch_embed.bias, _ID)}
    for name in ("cls_token", "dist_token", "reg_token"):
        if getattr(model, name) is not None:
            out[name] = (getattr(model, name), _ID)
    if isinstance(model.pos_embed, nnx.Param):
        out["pos_embed"] = (model.pos_embed, _ID)
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}"
        out.update(_norm(f"{p}.norm1", blk.norm1))
        out.update(_linear(f"{p}.attn.qkv", blk.attn.qkv))
        out.update(_linear(f"{p}.attn.proj", blk.attn.proj))
        out.update(_norm(f"{p}.norm2", blk.norm2))
        out.update(_linear(f"{p}.mlp.fc1", blk.mlp.fc1))
        out.update(_linear(f"{p}.mlp.fc2", blk.mlp.fc2))
        if blk.ls1 is not None:
            out[f"{p}.ls1.gamma"] = (blk.ls1.gamma, _ID)
            out[f"{p}.ls2.gamma"] = (blk.ls2.gamma, _ID)
    out.update(_norm("norm", model.norm))
    out.update(_linear("head", model.head))
    if model.head_dist is not None:
        out.update(_linear("head_dist", model.head_dist))
    if model.lookup is not None:
        for path, var in nnx.to_flat_state(nnx.state(model.lookup, nnx.Param)):
            out["jax_tokens.lookup." + ".".join(str(k) for k in path)] = (var, _ID)
    return out


def load_timm_into(model: VisionTransformer, state_dict: Mapping[str, np.ndarray],
                   *, strict: bool = True) -> VisionTransformer:
    """Copies a timm state dict into `model` in place (and returns it).

    Raises ValueError listing every missing key, unexpected key and shape mismatch (with
    strict=False, missing and unexpected keys are tolerated; shape mismatches never are).
    """
    targets = timm_variables(model)
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    missing = sorted(set(targets) - set(sd))
    unexpected = sorted(set(sd) - set(targets))
    bad_shapes = []
    for name, (var, (to_ours, _)) in targets.items():
        if name in sd:
            want = tuple(var[...].shape)
            got = to_ours(sd[name]).shape
            if got != want:
                bad_shapes.append(f"{name}: checkpoint {tuple(sd[name].shape)} -> {got}, "
                                  f"model expects {want}")
    problems = []
    if bad_shapes:
        problems.append("shape mismatches:\n  " + "\n  ".join(bad_shapes))
    if strict and missing:
        problems.append("missing keys:\n  " + "\n  ".join(missing))
    if strict and unexpected:
        problems.append("unexpected keys:\n  " + "\n  ".join(unexpected))
    if problems:
        raise ValueError("state dict does not fit the model config "
                         f"(embed_dim={model.cfg.embed_dim}, depth={model.cfg.depth}, "
                         f"img_size={model.cfg.img_size}, patch_size={model.cfg.patch_size}):\n"
                         + "\n".join(problems))
    for name, (var, (to_ours, _)) in targets.items():
        if name in sd:
            var.value = jnp.asarray(to_ours(sd[name]), dtype=var[...].dtype)
    return model


def from_timm(state_dict: Mapping[str, np.ndarray], cfg: ViTConfig, *, strict: bool = True,
              seed: int = 0) -> VisionTransformer:
    """Builds a `VisionTransformer` from a timm state dict."""
    model = VisionTransformer(cfg, rngs=nnx.Rngs(seed))
    return load_timm_into(model, state_dict, strict=strict)


def to_timm(model: VisionTransformer) -> dict[str, np.ndarray]:
    """The model's parameters as a timm state dict (float32 numpy arrays)."""
    return {name: np.asarray(to_timm_fn(np.asarray(var[...])))
            for name, (var, (_, to_timm_fn)) in timm_variables(model).items()}


def save_safetensors(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Writes the timm-named state dict as a .safetensors file."""
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: np.ascontiguousarray(v) for k, v in to_timm(model).items()}, str(path))


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    if not os.path.exists(path):
        raise FileNotFoundError(f"no safetensors file at {path}")
    return load_file(str(path))


def load_safetensors(path: str | os.PathLike, cfg: ViTConfig, *,
                     strict: bool = True) -> VisionTransformer:
    """Builds a model from a timm-named .safetensors file."""
    return from_timm(read_safetensors(path), cfg, strict=strict)
