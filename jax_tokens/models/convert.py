"""Weights in and out of `VisionTransformer`: timm, Hugging Face and (via onnx_import) ONNX.

    model = from_timm(state_dict, cfg)      # numpy arrays keyed by timm names
    state_dict = to_timm(model)             # exact inverse
    save_safetensors(model, "vit.safetensors"); model = load_safetensors("vit.safetensors", cfg)

    cfg = hf_config(json.load(open("config.json")), img_size=224)
    model = from_hf(read_safetensors("model.safetensors"), cfg)   # ViTModel / Dinov2Model names
    hf_state = to_hf(model, flavor="dinov2")                       # exact inverse

timm stores Linear weights as [out, in] and the patch convolution as [out, in, kh, kw]; NNX
stores [in, out] and [kh, kw, in, out]. Parameters that timm does not have (a TokenLearner)
travel under their NNX path prefixed with "jax_tokens.".

Hugging Face `ViTModel` / `Dinov2Model` (and `Dinov2WithRegistersModel`) names are first renamed
to timm's (`hf_to_timm`): the separate query/key/value projections are concatenated into timm's
`qkv` (rows in q, k, v order), `layer_scale{1,2}.lambda1` becomes `ls{1,2}.gamma`, and the
mask token and the ViT pooler (unused by a feature extractor) are ignored.

A checkpoint whose position table was trained for another grid (DINOv2: 37 x 37 at 518 px) is
resampled at conversion time, in numpy, the way the source library resamples it at run time
(`resample_pos_embed`): "hf" (transformers' `interpolate_pos_encoding`: bicubic to the target
size, a = -0.75, half-pixel centres, no antialiasing; also what an ONNX export of it computes),
"dinov2" (the original DINOv2 code and older transformers: bicubic with scale factor
(new + 0.1) / old) and "timm" (`resample_abs_pos_embed`: bicubic with antialiasing, PIL's
a = -0.5 kernel). Measured once against torch 2.13 `F.interpolate` on the real DINOv2-S/14
table (37 x 37 -> 16, 24, 40, 64; values up to 0.16) the results agree to float32 rounding: max
abs difference 1.2e-7 ("hf"), 2.4e-7 ("dinov2": torch rounds 1 / scale_factor to float32),
1.4e-7 ("timm"); onnxruntime's Resize for 37 -> 16: 1.5e-8. tests/test_convert.py keeps torch's
numbers for a small grid (no torch needed) and cross-checks onnxruntime.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokens.models.resample import (RESAMPLE_METHODS, bicubic_aa_matrix,  # noqa: F401
                                       bicubic_matrix, resample_pos_embed)
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


def _reducer_variables(model: VisionTransformer, layer: int, module) -> dict:
    """A learned reducer's parameters at `layer`: under its reference code's names when the
    reducer and its module declare them (`torch_prefix`, `torch_names`: DynamicViT's
    `score_predictor.<p>`, Cropr's `cropr.<i>`), else `jax_tokens.blocks.<l>.reducer.<path>`."""
    red = model.cfg.reduction
    if hasattr(red, "torch_prefix") and hasattr(module, "torch_names"):
        prefix = red.torch_prefix(model.cfg.layout(), layer)
        return {f"{prefix}.{name}": (var, _LINEAR if kind == "linear" else _ID)
                for name, (var, kind) in module.torch_names().items()}
    return {f"jax_tokens.blocks.{layer}.reducer." + ".".join(str(k) for k in path): (var, _ID)
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


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
        if blk.reducer is not None:   # a learned reducer's parameters (not in timm)
            out.update(_reducer_variables(model, i, blk.reducer))
    out.update(_norm("fc_norm" if model.cfg.fc_norm else "norm", model.norm))
    out.update(_linear("head", model.head))
    if model.head_dist is not None:
        out.update(_linear("head_dist", model.head_dist))
    return out


def load_timm_into(model: VisionTransformer, state_dict: Mapping[str, np.ndarray],
                   *, strict: bool = True,
                   pos_embed_resample: str | None = None) -> VisionTransformer:
    """Copies a timm state dict into `model` in place (and returns it).

    Raises ValueError listing every missing key, unexpected key and shape mismatch (with
    strict=False, missing and unexpected keys are tolerated; shape mismatches never are).
    `pos_embed_resample` ("hf", "dinov2", "timm"; see `resample_pos_embed`) resamples a
    `pos_embed` trained for another grid to the model's grid instead of rejecting it.
    """
    targets = timm_variables(model)
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    if pos_embed_resample is not None and "pos_embed" in sd and "pos_embed" in targets:
        sd["pos_embed"] = _fit_pos_embed(sd["pos_embed"], model.cfg, pos_embed_resample)
    missing = sorted(set(targets) - set(sd))
    unexpected = sorted(set(sd) - set(targets))
    bad_shapes = []
    bad_dtypes = [f"{name}: {sd[name].dtype} (a float dtype is needed)" for name in targets
                  if name in sd and not np.issubdtype(sd[name].dtype, np.floating)]
    for name, (var, (to_ours, _)) in targets.items():
        if name in sd:
            want = tuple(var.get_value().shape)
            got = to_ours(sd[name]).shape
            if got != want:
                bad_shapes.append(f"{name}: checkpoint {tuple(sd[name].shape)} -> {got}, "
                                  f"model expects {want}")
    problems = []
    if bad_shapes:
        problems.append("shape mismatches:\n  " + "\n  ".join(bad_shapes))
    if bad_dtypes:
        problems.append("non-float tensors:\n  " + "\n  ".join(bad_dtypes))
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
            var.set_value(jnp.asarray(to_ours(sd[name]), dtype=var.get_value().dtype))
    return model


def _build(cfg: ViTConfig, seed: int, names) -> VisionTransformer:
    """The model to load into: built abstractly (no random init, which costs seconds per
    model on a CPU) when the checkpoint covers every variable, else initialised for real."""
    abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(seed)))
    targets = timm_variables(abstract)
    if set(targets) <= set(names) and \
            len(jax.tree.leaves(nnx.state(abstract))) == len(targets):
        return abstract
    return VisionTransformer(cfg, rngs=nnx.Rngs(seed))


def from_timm(state_dict: Mapping[str, np.ndarray], cfg: ViTConfig, *, strict: bool = True,
              seed: int = 0, pos_embed_resample: str | None = None) -> VisionTransformer:
    """Builds a `VisionTransformer` from a timm state dict.

    `pos_embed_resample="timm"` resamples a position table trained at another resolution as
    timm's `resample_abs_pos_embed` does (default: a different grid is a shape error).
    """
    model = _build(cfg, seed, state_dict.keys()) if strict else \
        VisionTransformer(cfg, rngs=nnx.Rngs(seed))
    return load_timm_into(model, state_dict, strict=strict, pos_embed_resample=pos_embed_resample)


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
    try:
        return load_file(str(path))
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError and friends)
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                         f"{e}); it may be truncated or not a safetensors file: write it again "
                         "(e.g. rerun train.py's export) or fetch it again") from e


def load_safetensors(path: str | os.PathLike, cfg: ViTConfig, *,
                     strict: bool = True) -> VisionTransformer:
    """Builds a model from a timm-named .safetensors file."""
    return from_timm(read_safetensors(path), cfg, strict=strict)


# --------------------------------------------------------------------------------------------
# Position-embedding resampling (numpy, with torch's / ONNX's bicubic semantics)
# --------------------------------------------------------------------------------------------

def _fit_pos_embed(pos: np.ndarray, cfg: ViTConfig, method: str) -> np.ndarray:
    """Resamples a checkpoint's pos_embed to cfg's grid (prefix rows as the model lays them)."""
    prefix = 0 if cfg.no_embed_class else int(cfg.class_token) + int(cfg.distill_token)
    if pos.ndim == 3 and pos.shape[1] == prefix + cfg.num_patches:
        return pos
    return resample_pos_embed(pos, cfg.grid, num_prefix_tokens=prefix, method=method)


# --------------------------------------------------------------------------------------------
# Hugging Face ViTModel / Dinov2Model names
# --------------------------------------------------------------------------------------------

# Per-layer names: HF suffix after "encoder.layer.{i}." -> timm suffix after "blocks.{i}.".
_HF_LAYER = {
    "norm1": "norm1", "layernorm_before": "norm1",            # Dinov2 / ViT
    "norm2": "norm2", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "intermediate.dense": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "output.dense": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Present in HF checkpoints, not needed by a feature extractor / classifier.
_HF_IGNORED = ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias")
_HF_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def _hf_prefix(keys) -> str:
    for k in keys:
        if k.endswith("embeddings.cls_token"):
            return k[: -len("embeddings.cls_token")]
    raise ValueError("not a Hugging Face ViT / DINOv2 state dict: no '*embeddings.cls_token' "
                     f"key among {sorted(keys)[:8]}{' ...' if len(keys) > 8 else ''}")


def hf_to_timm(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """Renames a Hugging Face ViT / DINOv2 state dict to timm's names.

    Accepts `ViTModel`, `ViTForImageClassification` ("vit." prefix, "classifier" -> "head"),
    `Dinov2Model`, `Dinov2WithRegistersModel` and any common prefix ("dinov2.", "backbone.").
    Returns (timm_state_dict, report); report["ignored"] lists the keys dropped on purpose
    (mask token, pooler), report["prefix"] the prefix found, report["flavor"] "vit" or "dinov2".
    Raises ValueError listing unknown keys and incomplete query/key/value triples.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    prefix = _hf_prefix(sd)
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    ignored, unknown = [], []
    flavor = "vit"
    for key, value in sd.items():
        if key in ("classifier.weight", "classifier.bias"):
            out["head." + key.split(".")[-1]] = value
            continue
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        name = key[len(prefix):]
        if name in _HF_IGNORED:
            ignored.append(key)
            continue
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value
            continue
        m = _HF_LAYER_RE.match(name)
        if m is None:
            unknown.append(key)
            continue
        i, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
        if mod in ("attention.attention.query", "attention.attention.key",
                   "attention.attention.value") and leaf in ("weight", "bias"):
            qkv.setdefault((i, leaf), {})[mod.rsplit(".", 1)[1]] = value
        elif mod in ("layer_scale1", "layer_scale2") and leaf == "lambda1":
            out[f"blocks.{i}.ls{mod[-1]}.gamma"] = value
            flavor = "dinov2"
        elif mod in _HF_LAYER and leaf in ("weight", "bias"):
            out[f"blocks.{i}.{_HF_LAYER[mod]}.{leaf}"] = value
            if mod.startswith("mlp.") or mod in ("norm1", "norm2"):
                flavor = "dinov2"
        else:
            unknown.append(key)
    incomplete = []
    for (i, leaf), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            incomplete.append(f"{prefix}encoder.layer.{i}.attention.attention."
                              f"{{{','.join(missing)}}}.{leaf}")
            continue
        out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0)
    if unknown or incomplete:
        msg = []
        if unknown:
            hint = (" (a SwiGLU MLP, 'mlp.weights_in/out', has no counterpart in this model)"
                    if any("weights_in" in k or "weights_out" in k for k in unknown) else "")
            msg.append("unknown keys" + hint + ":\n  " + "\n  ".join(sorted(unknown)))
        if incomplete:
            msg.append("incomplete query/key/value:\n  " + "\n  ".join(incomplete))
        raise ValueError("cannot map the Hugging Face state dict:\n" + "\n".join(msg))
    return out, {"prefix": prefix, "ignored": sorted(ignored), "flavor": flavor}


def timm_to_hf(state_dict: Mapping[str, np.ndarray], *, flavor: str = "dinov2",
               prefix: str = "") -> dict[str, np.ndarray]:
    """timm names -> Hugging Face `Dinov2Model` (flavor="dinov2") or `ViTModel` ("vit") names.

    qkv is split into query / key / value. With flavor="vit" a classifier head is written as
    "classifier.*" (ViTForImageClassification); with "dinov2" the head is left out (HF's
    Dinov2ForImageClassification classifier reads [CLS, mean patch], 2 x D: no counterpart).
    """
    if flavor not in ("dinov2", "vit"):
        raise ValueError(f"flavor={flavor!r} is not one of 'dinov2', 'vit'")
    layer_names = ({"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
                    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"} if flavor == "dinov2" else
                   {"norm1": "layernorm_before", "norm2": "layernorm_after",
                    "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                    "mlp.fc2": "output.dense"})
    top = {v: k for k, v in _HF_TOP.items()}
    out: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state_dict.items():
        value = np.asarray(value)
        if key in top:
            out[prefix + top[key]] = value
            continue
        if key in ("head.weight", "head.bias"):
            if value.size and flavor == "vit":
                out["classifier." + key.split(".")[-1]] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if m is None:
            unknown.append(key)
            continue
        i, mod, leaf = m.groups()
        base = f"{prefix}encoder.layer.{i}."
        if mod == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
                out[f"{base}attention.attention.{part}.{leaf}"] = chunk
        elif mod in ("ls1", "ls2") and leaf == "gamma":
            if flavor != "dinov2":
                raise ValueError("LayerScale has no Hugging Face ViTModel name: use "
                                 "flavor='dinov2'")
            out[f"{base}layer_scale{mod[-1]}.lambda1"] = value
        elif mod in layer_names:
            out[f"{base}{layer_names[mod]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError("no Hugging Face name for:\n  " + "\n  ".join(sorted(unknown)))
    return out


def _zero_head(timm_sd: dict, cfg: ViTConfig, strict: bool) -> None:
    if "head.weight" in timm_sd:
        return
    if cfg.num_classes == 0:
        timm_sd["head.weight"] = np.zeros((0, cfg.embed_dim), np.float32)
        timm_sd["head.bias"] = np.zeros((0,), np.float32)
    elif strict:
        raise ValueError(f"the checkpoint has no classifier (a backbone such as Dinov2Model) but "
                         f"cfg.num_classes={cfg.num_classes}: build the config with "
                         "num_classes=0, or pass strict=False to keep a random head")


def from_hf(state_dict: Mapping[str, np.ndarray], cfg: ViTConfig, *, strict: bool = True,
            seed: int = 0, pos_embed_resample: str | None = "hf") -> VisionTransformer:
    """Builds a `VisionTransformer` from a Hugging Face ViT / DINOv2 state dict.

    Backbones without a classifier need cfg.num_classes=0 (`hf_config` sets it). A position
    table for another grid is resampled with `pos_embed_resample` (default: as transformers'
    `interpolate_pos_encoding` does at run time; "dinov2" for checkpoints meant to be used with
    the original DINOv2 code; None to reject a mismatch).
    """
    timm_sd, _ = hf_to_timm(state_dict)
    _zero_head(timm_sd, cfg, strict)
    return from_timm(timm_sd, cfg, strict=strict, seed=seed,
                     pos_embed_resample=pos_embed_resample)


def to_hf(model: VisionTransformer, *, flavor: str = "dinov2",
          prefix: str = "") -> dict[str, np.ndarray]:
    """The model's parameters under Hugging Face names (exact inverse of `from_hf`)."""
    return timm_to_hf(to_timm(model), flavor=flavor, prefix=prefix)


def hf_config(config: Mapping[str, Any], **overrides) -> ViTConfig:
    """A `ViTConfig` from a Hugging Face ViT / DINOv2 `config.json` dict.

    `overrides` (img_size=..., reduction=..., num_classes=...) replace the derived fields;
    img_size defaults to the checkpoint's `image_size` (DINOv2: 518; pass img_size=224 to run at
    224 with a resampled position table). Raises ValueError for features this ViT lacks.
    """
    kind = config.get("model_type", "vit")
    if kind not in ("vit", "dinov2", "dinov2_with_registers"):
        raise ValueError(f"model_type={kind!r} is not one of 'vit', 'dinov2', "
                         "'dinov2_with_registers'")
    if config.get("use_swiglu_ffn", False):
        raise ValueError("use_swiglu_ffn=True (DINOv2 giant) is not supported: the blocks have "
                         "a GELU MLP")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act={act!r} is not supported: the MLP uses exact GELU")
    dim = int(config["hidden_size"])
    if "mlp_ratio" in config:
        mlp_ratio = float(config["mlp_ratio"])
    else:
        mlp_ratio = int(config.get("intermediate_size", 4 * dim)) / dim
    labels = config.get("id2label") or {}
    kw = dict(
        img_size=int(config.get("image_size", 224)), patch_size=int(config.get("patch_size", 16)),
        in_chans=int(config.get("num_channels", 3)), embed_dim=dim,
        depth=int(config["num_hidden_layers"]), num_heads=int(config["num_attention_heads"]),
        mlp_ratio=mlp_ratio, qkv_bias=bool(config.get("qkv_bias", True)),
        num_registers=int(config.get("num_register_tokens", 0)),
        ln_eps=float(config.get("layer_norm_eps", 1e-12 if kind == "vit" else 1e-6)),
        layer_scale_init=(float(config.get("layerscale_value", 1.0))
                          if kind.startswith("dinov2") else None),
        num_classes=len(labels) if (kind == "vit" and config.get("architectures") and
                                    "ViTForImageClassification" in config["architectures"])
        else 0,
    )
    kw.update(overrides)
    return ViTConfig(**kw)
