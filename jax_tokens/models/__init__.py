"""Models: a Flax NNX ViT/DeiT with reducer slots, LookupViT, and weight conversion.

    model = models.create(cfg, rngs=nnx.Rngs(0))     # the model a config describes
    d = models.config_to_dict(cfg); cfg == models.config_from_dict(d)
"""

from __future__ import annotations

from typing import Any, Mapping

from jax_tokens import reducers
from jax_tokens.models.lookupvit import LookupViT, LookupViTConfig
from jax_tokens.models.vit import VisionTransformer, ViTConfig
from jax_tokens.reducers import LayerSpec

__all__ = ["VisionTransformer", "ViTConfig", "LookupViT", "LookupViTConfig", "LayerSpec",
           "create", "config_to_dict", "config_from_dict", "MODELS"]

MODELS: dict[str, tuple[type, type]] = {"vit": (ViTConfig, VisionTransformer),
                                        "lookupvit": (LookupViTConfig, LookupViT)}
"""Model name -> (config class, module class)."""


def _name_of(cfg) -> str:
    for name, (cfg_cls, _) in MODELS.items():
        if type(cfg) is cfg_cls:
            return name
    raise TypeError(f"{type(cfg).__name__} is not a model config of {sorted(MODELS)}")


def create(cfg, *, rngs):
    """The NNX model `cfg` describes."""
    return MODELS[_name_of(cfg)][1](cfg, rngs=rngs)


def config_to_dict(cfg) -> dict[str, Any]:
    """A JSON-ready dict of a model config, with its model name under "model"."""
    return {"model": _name_of(cfg), **cfg.to_dict()}


def config_from_dict(d: Mapping[str, Any]):
    """The model config of `config_to_dict` (a dict without "model" is a ViT; a ViT config
    written before the reducer registry is upgraded)."""
    d = dict(d)
    name = d.pop("model", "vit")
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not one of {sorted(MODELS)}")
    cfg_cls = MODELS[name][0]
    if "reduction" in d:
        d["reduction"] = reducers.from_config(reducers.upgrade_legacy(d["reduction"] or
                                                                      {"method": "none"}))
    known = {f for f in cfg_cls.__dataclass_fields__}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"the {name} config has unknown fields {unknown}")
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
