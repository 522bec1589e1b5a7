"""From `config.model` to a model config, with every budget checked before any data is read,
and the budget warm-up as a list of phases.

    cfg = model_config(config)              # ViTConfig (or LookupViTConfig), budgets checked
    phases = budget_phases(config, cfg, total_steps)   # [Phase(start_step, reducer), ...]

Budget warm-up (`config.budget_warmup`): the reducer's budget anneals from "no reduction" to the
target over a fraction of training (EViT anneals its keep rate with a cosine), in `levels`
discrete steps; each distinct budget is one more compiled train step. How a budget anneals is
the reducer's own (`Reducer.anneal`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from jax_tokens import reducers
from jax_tokens.models import LookupViTConfig, ViTConfig
from jax_tokens.train.schema import ConfigError, default_config

__all__ = ["reducer_from_config", "vit_config", "lookupvit_config", "model_config",
           "check_budgets", "Phase",
           "budget_phases", "phase_at"]


def reducer_from_config(group) -> reducers.Reducer:
    """`config.model.reduction` -> the Reducer it describes (ConfigError naming the field)."""
    try:
        return reducers.from_config(reducers.upgrade_legacy(dict(group.items())))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config.model.reduction: {e}") from e


def vit_config(config, *, in_chans: int | None = None,
               num_classes: int | None = None) -> ViTConfig:
    """`config.model` -> ViTConfig; every budget checked against its layer's token count.

    in_chans / num_classes fill the model's when those are None (from the dataset); if the
    config has neither, placeholders (3 channels, 1000 classes) are used, which is enough to
    check budgets (they only depend on the image and patch sizes).
    """
    m = config.model
    for key in ("num_lookup", "hr_mlp_ratio"):
        if m[key] is not None:
            raise ConfigError(f"config.model.{key}={m[key]!r} applies to model 'lookupvit' "
                              f"only (config.model.name={m.name!r})")
    kw = dict(
        img_size=m.img_size, patch_size=m.patch_size,
        in_chans=m.in_chans if m.in_chans is not None else (in_chans or 3),
        num_classes=m.num_classes if m.num_classes is not None else (num_classes or 1000),
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        mlp_ratio=float(m.mlp_ratio), qkv_bias=m.qkv_bias, class_token=m.class_token,
        num_registers=m.num_registers, pos_embed=m.pos_embed, no_embed_class=m.no_embed_class,
        layer_scale_init=m.layer_scale_init, global_pool=m.global_pool, ln_eps=m.ln_eps,
        attn_impl=m.attn_impl, dtype=m.dtype, token_multiple=m.token_multiple)
    red = reducer_from_config(m.reduction)
    try:
        return ViTConfig(**kw, reduction=red)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config.model: {e}") from e


def lookupvit_config(config, *, in_chans: int | None = None,
                     num_classes: int | None = None) -> LookupViTConfig:
    """`config.model` (name "lookupvit") -> LookupViTConfig. The ViT-only keys must keep their
    defaults (LookupViT has no class token, registers or reducer slot)."""
    m, ref = config.model, default_config().model
    vit_only = ("class_token", "num_registers", "no_embed_class", "layer_scale_init",
                "global_pool", "token_multiple")
    for key in vit_only:
        if m[key] != ref[key]:
            raise ConfigError(f"config.model.{key}={m[key]!r} does not apply to model "
                              f"'lookupvit' (leave it at {ref[key]!r})")
    if m.reduction.get("method", "none") != "none":
        raise ConfigError(f"config.model.reduction.method={m.reduction.method!r}: model "
                          "'lookupvit' compresses by its architecture (set "
                          "config.model.num_lookup); use method 'none'")
    try:
        return LookupViTConfig(
            img_size=m.img_size, patch_size=m.patch_size,
            in_chans=m.in_chans if m.in_chans is not None else (in_chans or 3),
            num_classes=m.num_classes if m.num_classes is not None else (num_classes or 1000),
            embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
            mlp_ratio=float(m.mlp_ratio), hr_mlp_ratio=m.hr_mlp_ratio,
            num_lookup=m.num_lookup, qkv_bias=m.qkv_bias, pos_embed=m.pos_embed,
            ln_eps=m.ln_eps, attn_impl=m.attn_impl, dtype=m.dtype)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config.model: {e}") from e


_MODEL_CONFIGS = {"vit": vit_config, "lookupvit": lookupvit_config}


def model_config(config, *, in_chans: int | None = None, num_classes: int | None = None):
    """The model config `config.model` describes (`config.model.name`: "vit" or
    "lookupvit")."""
    name = config.model.name
    if name not in _MODEL_CONFIGS:
        raise ConfigError(f"config.model.name={name!r} is not one of {tuple(_MODEL_CONFIGS)}")
    return _MODEL_CONFIGS[name](config, in_chans=in_chans, num_classes=num_classes)


def check_budgets(cfg, reduction: Any = None) -> None:
    """ConfigError naming the first block whose budget cannot work with the tokens entering it
    (the reducer's schedule checks it; ToMe's r beyond what a block can merge is an error
    unless the reducer's clamp_r is set)."""
    try:
        cfg.token_counts(reduction)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config.model.reduction: {e}") from e


@dataclasses.dataclass(frozen=True)
class Phase:
    """From train step `start` on, train with `reduction` (a Reducer)."""
    start: int
    reduction: Any


def budget_phases(config, cfg, total_steps: int) -> list[Phase]:
    """The budget warm-up as a list of phases (one compiled train step each).

    The budget goes from no reduction to the target: constant until `start_fraction` of
    training, then `levels` equal pieces over `fraction` of training whose budget is the cosine
    (or linear) anneal evaluated at the start of the piece (`Reducer.anneal`), then the target.
    Phases with the same per-layer token counts are merged.
    """
    red, w = cfg.reduction, config.budget_warmup
    if w.shape not in ("cosine", "linear"):
        raise ConfigError(f"config.budget_warmup.shape={w.shape!r} is not one of cosine, linear")
    if not 0.0 <= w.fraction <= 1.0 or not 0.0 <= w.start_fraction <= 1.0:
        raise ConfigError(f"config.budget_warmup.fraction={w.fraction} and start_fraction="
                          f"{w.start_fraction} must be in [0, 1]")
    if w.fraction == 0.0:
        return [Phase(0, red)]
    if not isinstance(w.levels, int) or w.levels < 1:
        raise ConfigError(f"config.budget_warmup.levels={w.levels!r} must be an int >= 1")

    def at(t: float):
        f = 0.5 * (1.0 - math.cos(math.pi * t)) if w.shape == "cosine" else t
        try:
            return red.anneal(cfg.layout(), f)
        except NotImplementedError as e:
            raise ConfigError(f"config.budget_warmup.fraction={w.fraction}: {e}; set it to 0 "
                              "for this reducer") from None

    start = int(round(w.start_fraction * total_steps))
    length = max(1, int(round(w.fraction * total_steps)))
    points = [(0, 0.0)] + [(start + (i * length) // w.levels, i / w.levels)
                           for i in range(1, w.levels)] + [(start + length, 1.0)]
    phases: list[Phase] = []
    for step, t in points:
        r = red if t == 1.0 else at(t)
        check_budgets(cfg, r)
        if phases and cfg.token_counts(phases[-1].reduction) == cfg.token_counts(r):
            continue
        if phases and phases[-1].start == step:
            phases[-1] = Phase(step, r)
        else:
            phases.append(Phase(step, r))
    return phases


def phase_at(phases: Sequence[Phase], step: int) -> int:
    """Index of the phase that step `step` trains in."""
    i = 0
    for j, p in enumerate(phases):
        if p.start <= step:
            i = j
    return i
