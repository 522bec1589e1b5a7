"""The train / eval step and loop that `train.py` and `eval.py` share.

    config = load_config("configs/fashion_mnist_vit.py")      # an ml_collections ConfigDict
    result = train(config, "/tmp/fm")                          # resumes if /tmp/fm has a checkpoint

Configs are Python files with `get_config(arg=None)` returning a ConfigDict; `default_config()`
is the schema: every key a config may set, with its default (unknown keys are an error that
lists the valid ones). `vit_config(config)` turns `config.model` into a `ViTConfig`, checking
every per-layer budget against the token count of that layer before any data is read.

The steps are pure functions of a `TrainState` (step, parameters, optimizer state, RNG) that are
`jax.jit`-compiled with shardings over the mesh of `jax_tokens.sharding` and donate the state.
The model is split with `nnx.split` into a graph definition (static), its parameters (trained)
and the rest of its variables (constants such as a sin-cos position table).

Budget warm-up (`config.budget_warmup`): the reducer's budget anneals from "no reduction" to the
target over a fraction of training (EViT anneals its keep rate with a cosine), in `levels`
discrete steps; each distinct budget is one more compiled train step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from ml_collections import config_dict

from jax_tokens import data as data_lib
from jax_tokens import sharding as shd
from jax_tokens import schedule as sched
from jax_tokens.metrics import MetricWriter
from jax_tokens.models.vit import ReductionConfig, ViTConfig, VisionTransformer

__all__ = [
    "ConfigError", "default_config", "load_config", "check_config", "check_override_flags",
    "exit_on_bad_overrides",
    "config_to_dict", "config_diff", "RUNTIME_KEYS", "vit_config", "reduction_config",
    "check_budgets", "budget_phases", "Phase", "make_optimizer", "TrainState", "init_model",
    "make_train_step", "make_forward", "make_eval_step", "evaluate", "xla_gflops",
    "compiled_gflops",
    "measure_throughput", "ensure_dataset", "train",
]


class ConfigError(ValueError):
    """A config key, value or budget that cannot work; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# Config schema
# ----------------------------------------------------------------------------------------------

def _cd(d: dict, type_safe: bool = True) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(d, type_safe=type_safe)


def default_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default (ImageNet-sized ViT-S, no reduction)."""
    ph = config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _cd(dict(
        img_size=224, patch_size=16,
        in_chans=ph(int),            # None: from the dataset
        num_classes=ph(int),         # None: from the dataset
        embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True, class_token=True,
        num_registers=0, pos_embed="learn", no_embed_class=False,
        layer_scale_init=ph(float), global_pool="token", ln_eps=1e-6, attn_impl="auto",
        dtype="float32",             # compute dtype: "bfloat16" for mixed precision
    ))
    # r / keep_rate may be an int/float or a per-layer tuple, so this group is not type safe.
    c.model.reduction = _cd(dict(
        method="none", r=0, prop_attn=True, keep_rate=1.0, layers=(), score="cls_attn",
        order="score", fuse=False, num_tokens=8,
        clamp_r=False,   # ToMe: allow r larger than a layer can merge (clamped as ToMe does)
    ), type_safe=False)
    c.budget_warmup = _cd(dict(
        fraction=0.0,        # of training over which the budget anneals to its target (0: off)
        start_fraction=0.0,  # no reduction before this fraction of training
        levels=4,            # discrete budgets during the anneal (each one compile)
        shape="cosine",      # "cosine" (EViT) or "linear"
    ))
    c.data = _cd(dict(
        name="fashion_mnist", data_dir=ph(str), train_split=ph(str), eval_split=ph(str),
        image_size=ph(int), augment=True, num_threads=ph(int), prefetch=ph(int),
        worker_count=0,
        auto_prepare=True,   # prepare Fashion-MNIST (local files) when it is missing
    ))
    c.train = _cd(dict(
        batch_size=128, epochs=1.0, total_steps=ph(int), lr=1e-3, min_lr=0.0,
        warmup_epochs=0.0, warmup_steps=ph(int), weight_decay=0.05, b1=0.9, b2=0.999,
        label_smoothing=0.0, grad_clip=1.0, grad_accum_steps=1, log_every=50, progress=True,
    ))
    c.eval = _cd(dict(
        batch_size=256,
        every_steps=0,       # evaluate during training every N steps (0: only at the end)
        max_examples=ph(int),  # evaluate on the first N examples only (None: all)
        at_end=True,         # evaluate when training ends
    ))
    c.checkpoint = _cd(dict(every_steps=500, keep=3, async_save=True, export=True))
    # Devices: see jax_tokens.sharding. mesh sizes (-1: the remaining devices); the sharding
    # preset "dp" | "fsdp" | "fsdp_tp", and `rules` {logical axis: mesh axes} overriding it.
    c.mesh = _cd(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = _cd(dict(preset="dp"))
    c.sharding.rules = _cd({}, type_safe=False)
    c.distributed = False     # multi-process: jax.distributed.initialize() (see sharding.py)
    return c


RUNTIME_KEYS = frozenset({
    "data.data_dir", "data.num_threads", "data.prefetch", "data.worker_count",
    "data.auto_prepare", "train.log_every", "train.progress", "eval.batch_size",
    "eval.every_steps", "eval.max_examples", "eval.at_end", "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.async_save", "checkpoint.export", "mesh.", "sharding.", "distributed",
})
"""Keys that may change when a run resumes: they do not change what is computed (a trailing
"." covers a whole group; a checkpoint restores onto any mesh)."""

_FREE_FORM = ("sharding.rules",)
"""Groups whose keys are not fixed by the schema."""


def _ignored(key: str, ignore) -> bool:
    return key in ignore or any(p.endswith(".") and key.startswith(p) for p in ignore)


def load_config(path_and_arg: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
    """Loads `path.py` or `path.py:arg` (calls `get_config(arg)`), applies dotted overrides
    ({"model.reduction.r": 8}) and checks the result against the schema."""
    path, arg = path_and_arg, None
    if ":" in os.path.basename(path_and_arg):
        path, arg = path_and_arg.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = "_jax_tokens_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config() function")
    config = module.get_config(arg) if arg is not None else module.get_config()
    for key, value in (overrides or {}).items():
        _check_key(config, key)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    check_config(config)
    return config


def _valid_keys(node) -> list[str]:
    return sorted(node.keys())


def _check_key(config, dotted: str) -> None:
    """ConfigError naming the valid keys if `dotted` does not exist in `config`."""
    node, seen = config, []
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(seen)!r} is a value, "
                              "not a group")
        if ".".join(seen) in _FREE_FORM:
            return
        if part not in node:
            where = "config" if not seen else "config." + ".".join(seen)
            raise ConfigError(f"unknown config key {'config.' + dotted!r}: {where} has no "
                              f"{part!r}; valid keys there: {', '.join(_valid_keys(node))}")
        node = node[part]
        seen.append(part)


def check_config(config) -> None:
    """ConfigError if `config` has a key the schema does not know (listing the valid ones), or
    lacks a group."""
    schema = default_config()

    def walk(node, ref, prefix):
        for key in node.keys():
            dotted = prefix + key
            if key not in ref:
                where = "config" if not prefix else "config." + prefix[:-1]
                raise ConfigError(f"unknown config key {'config.' + dotted!r}: {where} has no "
                                  f"{key!r}; valid keys there: {', '.join(_valid_keys(ref))}")
            if isinstance(ref[key], ml_collections.ConfigDict):
                if not isinstance(node[key], (ml_collections.ConfigDict, dict)):
                    raise ConfigError(f"config.{dotted} must be a group with keys "
                                      f"{', '.join(_valid_keys(ref[key]))}")
                if dotted not in _FREE_FORM:
                    walk(node[key], ref[key], dotted + ".")

    walk(config, schema, "")
    for key in schema.keys():
        if key not in config:
            raise ConfigError(f"config has no {key!r}; start configs from "
                              "jax_tokens.trainer.default_config()")


def check_override_flags(argv: Sequence[str], default_config_path: str) -> None:
    """Checks the `--config.a.b=value` flags of a command line against the config they override,
    before absl parses them (absl would fail with a bare AttributeError). Raises ConfigError."""
    path = default_config_path
    overrides = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--config.") or a.startswith("--noconfig."):
            overrides.append(a.split("=", 1)[0].split("config.", 1)[1])
        i += 1
    if not overrides:
        return
    if path is None:
        raise ConfigError(f"--config.{overrides[0]} overrides a config: pass --config FILE too")
    config = load_config(path)
    for key in overrides:
        _check_key(config, key)


def exit_on_bad_overrides(argv: Sequence[str], default_config_path: str | None) -> None:
    """For train.py / eval.py, before they define their `--config` flag: ml_collections parses
    the default config file and its overrides as soon as the flag is defined, and an unknown key
    would surface as a bare AttributeError. This prints the ConfigError naming the key and the
    valid ones, and exits with status 2."""
    try:
        check_override_flags(argv, default_config_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def config_to_dict(config) -> dict:
    """A JSON-ready plain dict of the config (tuples become lists)."""
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    return json.loads(config.to_json())


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_diff(old, new, ignore: Iterable[str] = RUNTIME_KEYS) -> list[str]:
    """Human-readable differences `key: old -> new` between two configs, outside `ignore`."""
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    ignore = set(ignore)
    out = []
    for key in sorted(set(a) | set(b)):
        if _ignored(key, ignore):
            continue
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Model config and budgets
# ----------------------------------------------------------------------------------------------

def _tupled(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def reduction_config(red) -> ReductionConfig:
    """`config.model.reduction` -> ReductionConfig (clamp_r is checked by check_budgets)."""
    try:
        return ReductionConfig(
            method=red.method, r=_tupled(red.r), prop_attn=bool(red.prop_attn),
            keep_rate=_tupled(red.keep_rate), layers=tuple(red.layers), score=red.score,
            order=red.order, fuse=bool(red.fuse), num_tokens=int(red.num_tokens))
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
    kw = dict(
        img_size=m.img_size, patch_size=m.patch_size,
        in_chans=m.in_chans if m.in_chans is not None else (in_chans or 3),
        num_classes=m.num_classes if m.num_classes is not None else (num_classes or 1000),
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        mlp_ratio=float(m.mlp_ratio), qkv_bias=m.qkv_bias, class_token=m.class_token,
        num_registers=m.num_registers, pos_embed=m.pos_embed, no_embed_class=m.no_embed_class,
        layer_scale_init=m.layer_scale_init, global_pool=m.global_pool, ln_eps=m.ln_eps,
        attn_impl=m.attn_impl, dtype=m.dtype)
    red = reduction_config(m.reduction)
    try:
        cfg = ViTConfig(**kw, reduction=red)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config.model: {e}") from e
    check_budgets(cfg, clamp_r=bool(m.reduction.get("clamp_r", False)))
    return cfg


def check_budgets(cfg: ViTConfig, reduction: ReductionConfig | None = None, *,
                  clamp_r: bool = False) -> None:
    """ConfigError naming the first block whose budget exceeds the tokens entering it.

    ToMe: r at block l may merge at most (tokens - protected) // 2 tokens; ToMe itself clamps
    larger r silently, which clamp_r=True allows. Lookup: num_tokens must be fewer than the
    patch tokens entering its block. Pruning rates and layer indices are checked by ViTConfig.
    """
    red = cfg.reduction if reduction is None else reduction
    try:
        specs = cfg.schedule(red)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config.model.reduction: {e}") from e
    if red.method == "tome" and not clamp_r:
        protected = int(cfg.class_token) + int(cfg.distill_token)
        for layer, (spec, r) in enumerate(zip(specs, sched.parse_r(cfg.depth, red.r))):
            can = (spec.n_in - protected) // 2
            if r > can:
                raise ConfigError(
                    f"config.model.reduction.r asks block {layer} to merge r={r} tokens, but only "
                    f"{spec.n_in} tokens enter it (at most {can} can merge: half of the "
                    f"{spec.n_in - protected} unprotected tokens); token counts per block with "
                    f"this r: {cfg.token_counts(red)}. Lower r, or set "
                    f"config.model.reduction.clamp_r=True to clamp it as ToMe does")
    if red.method == "lookup":
        layer = red.layers[0]
        n = specs[layer].n_in - cfg.num_prefix_tokens
        if red.num_tokens >= n:
            raise ConfigError(
                f"config.model.reduction.num_tokens={red.num_tokens} at block {layer} must be "
                f"fewer than the {n} patch tokens entering it")


@dataclasses.dataclass(frozen=True)
class Phase:
    """From train step `start` on, train with `reduction`."""
    start: int
    reduction: ReductionConfig


def budget_phases(config, cfg: ViTConfig, total_steps: int) -> list[Phase]:
    """The budget warm-up as a list of phases (one compiled train step each).

    The budget goes from no reduction (keep_rate 1, r 0) to the target: constant until
    `start_fraction` of training, then `levels` equal pieces over `fraction` of training whose
    budget is the cosine (or linear) anneal evaluated at the start of the piece, then the
    target. Phases with the same per-layer token counts are merged.
    """
    red, w = cfg.reduction, config.budget_warmup
    if w.shape not in ("cosine", "linear"):
        raise ConfigError(f"config.budget_warmup.shape={w.shape!r} is not one of cosine, linear")
    if not 0.0 <= w.fraction <= 1.0 or not 0.0 <= w.start_fraction <= 1.0:
        raise ConfigError(f"config.budget_warmup.fraction={w.fraction} and start_fraction="
                          f"{w.start_fraction} must be in [0, 1]")
    if w.fraction == 0.0 or red.method not in ("prune", "tome"):
        if w.fraction > 0.0 and red.method not in ("none",):
            raise ConfigError(f"config.budget_warmup is only supported for reduction methods "
                              f"prune and tome, not {red.method!r}")
        return [Phase(0, red)]
    if not isinstance(w.levels, int) or w.levels < 1:
        raise ConfigError(f"config.budget_warmup.levels={w.levels!r} must be an int >= 1")

    def anneal(t: float) -> float:  # 0: no reduction, 1: target
        return 0.5 * (1.0 - math.cos(math.pi * t)) if w.shape == "cosine" else t

    def at(t: float) -> ReductionConfig:
        f = anneal(t)
        if red.method == "prune":
            rates = red.keep_rate
            if isinstance(rates, tuple):
                return dataclasses.replace(red, keep_rate=tuple(1.0 - (1.0 - k) * f for k in rates))
            return dataclasses.replace(red, keep_rate=1.0 - (1.0 - rates) * f)
        rs = sched.parse_r(cfg.depth, red.r)
        return dataclasses.replace(red, r=tuple(int(round(r * f)) for r in rs))

    start = int(round(w.start_fraction * total_steps))
    length = max(1, int(round(w.fraction * total_steps)))
    points = [(0, 0.0)] + [(start + (i * length) // w.levels, i / w.levels)
                           for i in range(1, w.levels)] + [(start + length, 1.0)]
    phases: list[Phase] = []
    for step, t in points:
        r = red if t == 1.0 else at(t)
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


# ----------------------------------------------------------------------------------------------
# Optimizer, state and steps
# ----------------------------------------------------------------------------------------------

_NO_DECAY = ("pos_embed", "cls_token", "dist_token", "reg_token")


def _decay_mask(params):
    """Weight decay on matrices and kernels only (not biases, norms, tokens, positions)."""
    def keep(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return x.ndim >= 2 and not any(n in _NO_DECAY for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config, total_steps: int, steps_per_epoch: int):
    """AdamW with linear warm-up + cosine decay, global-norm clipping. Returns (tx, schedule)."""
    t = config.train
    warmup = t.warmup_steps if t.warmup_steps is not None else \
        int(round(t.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else t.lr, peak_value=t.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=t.min_lr)
    parts = []
    if t.grad_clip and t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule


@struct.dataclass
class TrainState:
    """Everything a train step changes: step, parameters, optimizer state, base RNG key data."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _model_init(cfg: ViTConfig, seed: int, tx=None):
    """init() -> (params or TrainState, rest) for jax.eval_shape / jax.jit, and a box that
    receives the graphdef while it is traced."""
    box = {}

    def init():
        model = VisionTransformer(cfg, rngs=nnx.Rngs(seed))
        box["graphdef"], params, rest = nnx.split(model, nnx.Param, ...)
        if tx is None:
            return params, rest
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed))), rest

    return init, box


def init_model(cfg: ViTConfig, seed: int, mesh, rules=None, *, tx=None,
               abstract: bool = False):
    """(graphdef, params, rest, shardings): the model split for the steps (`nnx.split`: the
    parameters and the rest of its variables), created already placed by the mesh and rules
    (`jax.jit(init, out_shardings=...)`, big_vision style), or as ShapeDtypeStructs with their
    shardings (abstract=True, e.g. a restore target).

    With an optimizer `tx`, `params` is a whole TrainState (step, params, optimizer state,
    RNG) instead. `shardings` is the (params-or-state, rest) pair of sharding pytrees.
    """
    init, box = _model_init(cfg, seed, tx)
    shapes = jax.eval_shape(init)
    shardings = shd.state_shardings(mesh, shapes, rules)
    if abstract:
        params, rest = shd.abstract_with_shardings(shapes, shardings)
    else:
        lowered = jax.jit(init, out_shardings=shardings).lower()
        # Runs once: on CPU, LLVM's optimisations cost more compile time than they save.
        options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" \
            else None
        params, rest = lowered.compile(compiler_options=options)()
    return box["graphdef"], params, rest, shardings


def _loss_and_metrics(logits, labels, num_classes: int, label_smoothing: float):
    onehot = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    loss = optax.softmax_cross_entropy(logits, onehot).mean()
    acc = (jnp.argmax(logits, -1) == labels).mean()
    return loss, acc


def make_train_step(graphdef, tx, schedule, *, num_classes: int, reduction: ReductionConfig,
                    label_smoothing: float = 0.0, grad_accum_steps: int = 1) -> Callable:
    """step(state, rest, batch) -> (state, metrics): one optimizer update.

    With grad_accum_steps = k the batch is split into k micro-batches whose gradients are
    averaged in a `lax.scan` (the optimizer sees one update per call, memory is per micro-batch).
    """
    k = int(grad_accum_steps)

    def loss_fn(params, rest, images, labels, key):
        model = nnx.merge(graphdef, params, rest)
        logits, _ = model(images, key=key, reduction=reduction)
        loss, acc = _loss_and_metrics(logits, labels, num_classes, label_smoothing)
        return loss, acc

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        images, labels = batch["image"], batch["label"]
        if k == 1:
            (loss, acc), grads = grad_fn(state.params, rest, images, labels, key)
        else:
            b = images.shape[0]
            # Row i of micro-batch j is batch row i * k + j: every device keeps its own rows.
            split = lambda x: jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
            micro = (split(images), split(labels), jnp.arange(k))

            def body(carry, xs):
                img, lab, j = xs
                (l, a), g = grad_fn(state.params, rest, img, lab, jax.random.fold_in(key, j))
                g_sum, l_sum, a_sum = carry
                return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, a_sum + a), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss, acc), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
            grads = jax.tree.map(lambda g: g / k, grads)
            loss, acc = loss / k, acc / k
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_forward(graphdef, reduction: ReductionConfig | None = None) -> Callable:
    """forward(params, rest, images) -> (logits, aux) with a static reduction override."""
    def forward(params, rest, images):
        return nnx.merge(graphdef, params, rest)(images, reduction=reduction)
    return forward


def make_eval_step(graphdef, reduction: ReductionConfig | None = None) -> Callable:
    """eval_step(params, rest, batch) -> sums over the valid rows: count, top1, top5, loss."""
    forward = make_forward(graphdef, reduction)

    def step(params, rest, batch):
        logits, _ = forward(params, rest, batch["image"])
        labels, mask = batch["label"], batch["mask"]
        top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"count": mask.sum(), "top1": ((top[:, 0] == labels) & mask).sum(),
                "top5": ((top == labels[:, None]).any(-1) & mask).sum(),
                "loss": jnp.where(mask, loss, 0.0).sum()}

    return step


def jit_eval_step(step: Callable, mesh, params_sharding, rest_sharding, rules=None
                  ) -> Callable:
    return jax.jit(step, in_shardings=(params_sharding, rest_sharding,
                                       shd.batch_sharding(mesh, rules)),
                   out_shardings=shd.replicated(mesh))


def evaluate(eval_step: Callable, params, rest, loader, mesh, rules=None, *,
             max_examples: int | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy and loss over one pass of an EvalLoader (padding masked out)."""
    sums: dict[str, float] = {}
    pending = []
    seen = 0
    t0 = time.perf_counter()
    for batch in loader:
        if max_examples is not None and seen >= max_examples:
            break
        if max_examples is not None:
            keep = np.arange(len(batch["mask"])) < max_examples - seen
            batch = dict(batch, mask=batch["mask"] & keep)
        seen += int(batch["mask"].sum())
        pending.append(eval_step(params, rest, shd.put_batch(batch, mesh, rules)))
    for out in jax.device_get(pending):
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    dt = time.perf_counter() - t0
    n = max(sums.get("count", 0.0), 1.0)
    return {"top1": sums.get("top1", 0.0) / n, "top5": sums.get("top5", 0.0) / n,
            "loss": sums.get("loss", 0.0) / n, "examples": int(sums.get("count", 0)),
            "seconds": dt}


def xla_gflops(fn: Callable, *args) -> float | None:
    """GFLOPs of one call of `jax.jit(fn)(*args)` from XLA's cost analysis (None if absent)."""
    return compiled_gflops(jax.jit(fn).lower(*args).compile())


def compiled_gflops(compiled) -> float | None:
    """GFLOPs of one call of a compiled executable (`jax.jit(f).lower(...).compile()`), from
    XLA's cost analysis (None if the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"]) / 1e9


def measure_throughput(fns: Mapping[str, Callable], args: Sequence, *, batch_size: int,
                       rounds: int = 5, min_seconds: float = 0.3) -> dict[str, float]:
    """Images/s of several compiled functions on the same inputs, measured side by side.

    Each function is warmed up, then timed in `rounds` interleaved rounds (each round times
    enough calls to last about `min_seconds`); the median round is reported, so a load spike on
    a shared machine hits every function alike.
    """
    calls = {}
    for name, f in fns.items():
        jax.block_until_ready(f(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        dt = max(time.perf_counter() - t0, 1e-6)
        calls[name] = max(1, int(math.ceil(min_seconds / dt)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                out = f(*args)
            jax.block_until_ready(out)
            samples[name].append(calls[name] * batch_size / (time.perf_counter() - t0))
    return {name: float(np.median(v)) for name, v in samples.items()}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def ensure_dataset(config, log: Callable[[str], None] = print) -> str:
    """The data dir holding the dataset; prepares Fashion-MNIST (local files) if missing."""
    data_dir = config.data.data_dir or data_lib.DEFAULT_DATA_DIR
    try:
        data_lib.dataset_info(config.data.name, data_dir)
    except data_lib.DatasetNotPreparedError:
        local = config.data.name in ("fashion_mnist", "fashion_mnist_local")
        if not (local and config.data.auto_prepare):
            raise
        log(f"Fashion-MNIST is not prepared in {data_dir}; preparing it now from the local "
            f"files (python -m jax_tokens.data prepare --dataset fashion_mnist --data_dir "
            f"{data_dir}) ...")
        t0 = time.perf_counter()
        data_lib.prepare("fashion_mnist", data_dir)
        log(f"prepared Fashion-MNIST in {time.perf_counter() - t0:.1f} s")
    return data_dir


def _loader_kwargs(config) -> dict:
    d = config.data
    return dict(image_size=d.image_size, num_threads=d.num_threads, prefetch=d.prefetch,
                worker_count=d.worker_count)


def make_eval_loader(config, data_dir: str, batch_size: int | None = None):
    return data_lib.make_eval_loader(config.data.name, data_dir,
                                     batch_size or config.eval.batch_size,
                                     split=config.data.eval_split, **_loader_kwargs(config))


def dataset_model_config(config, data_dir: str) -> ViTConfig:
    """vit_config with in_chans / num_classes from the dataset, checked against it."""
    info = data_lib.dataset_info(config.data.name, data_dir)
    img = config.data.image_size or info.image_shape[0]
    chans = info.image_shape[-1]
    cfg = vit_config(config, in_chans=chans, num_classes=info.num_classes)
    if cfg.img_size != img:
        raise ConfigError(f"config.model.img_size={cfg.img_size} but the {info.name} loader "
                          f"produces {img}x{img} images (set config.data.image_size)")
    if cfg.in_chans != chans:
        raise ConfigError(f"config.model.in_chans={cfg.in_chans} but {info.name} images have "
                          f"{chans} channels")
    if info.num_classes is not None and cfg.num_classes != info.num_classes:
        raise ConfigError(f"config.model.num_classes={cfg.num_classes} but {info.name} has "
                          f"{info.num_classes} classes")
    return cfg


def make_mesh_and_rules(config):
    """The mesh (config.mesh) and logical-axis rules (config.sharding) of a config."""
    try:
        return shd.make_mesh(config), shd.rules_from_config(config)
    except ValueError as e:
        raise ConfigError(f"invalid config.mesh / config.sharding: {e}") from e


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar (step, loss, accuracy, images/s, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool, log: Callable[[str], None]):
        self.log, self.total = log, total
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # pylint: disable=import-outside-toplevel
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            mininterval=0.5, smoothing=0.1)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, step: int, info: dict, eta_s: float | None) -> None:
        text = (f"loss {info['loss']:.4f} acc {info['accuracy']:.3f} "
                f"{info['images_per_s']:.0f} img/s")
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            eta = "" if eta_s is None else f" ETA {_hms(eta_s)}"
            self.log(f"step {step}/{self.total}: {text}{eta}")

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


def train(config, workdir: str, *, log: Callable[[str], None] = print) -> dict:
    """Trains (or resumes) the config in `workdir`; returns the final metrics.

    workdir gets checkpoints/ (Orbax: state, data iterator, config), metrics.jsonl,
    tensorboard/, config.json, export/ (parameters + config, model.safetensors) and
    results.json. A workdir with a checkpoint resumes from it exactly; a checkpoint whose
    config differs (outside RUNTIME_KEYS) or that cannot be read raises CheckpointError.
    """
    from jax_tokens import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel

    t_start = time.perf_counter()
    check_config(config)
    cfg = vit_config(config)                       # budgets checked before any data is read
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         every=config.checkpoint.every_steps,
                                         keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
    latest = checkpointer.latest_step()
    if latest is not None:
        checkpointer.check_config(latest, config)   # mismatch / corrupt: a clear error
    config_json = config_to_dict(config)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)

    data_dir = ensure_dataset(config, log)
    cfg = dataset_model_config(config, data_dir)
    t = config.train
    loader = data_lib.make_train_loader(
        config.data.name, data_dir, t.batch_size, seed=config.seed, split=config.data.train_split,
        augment=config.data.augment, **_loader_kwargs(config))
    steps_per_epoch = loader.steps_per_epoch
    total_steps = t.total_steps if t.total_steps is not None else \
        int(math.ceil(t.epochs * steps_per_epoch))
    if total_steps < 1:
        raise ConfigError(f"training would take {total_steps} steps: set config.train.epochs or "
                          "config.train.total_steps")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"config.train.batch_size={t.batch_size} must be divisible by "
                          f"config.train.grad_accum_steps={t.grad_accum_steps}")
    phases = budget_phases(config, cfg, total_steps)
    for p in phases:
        check_budgets(cfg, p.reduction, clamp_r=bool(config.model.reduction.clamp_r))
    eval_loader = make_eval_loader(config, data_dir)

    mesh, rules = make_mesh_and_rules(config)
    try:
        shd.check_batch_size(mesh, t.batch_size // t.grad_accum_steps, rules,
                             what="config.train.batch_size / grad_accum_steps")
        shd.check_batch_size(mesh, config.eval.batch_size, rules, what="config.eval.batch_size")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    log(f"model: {cfg.embed_dim}-dim x {cfg.depth} blocks, {cfg.num_tokens} tokens, reduction "
        f"{cfg.reduction.method}; tokens per block {cfg.token_counts()}; "
        f"{cfg.flops() / 1e9:.4f} GFLOPs/image (estimate)")
    log(f"data: {loader.name} {loader.split} ({loader.num_examples} examples, "
        f"{steps_per_epoch} steps/epoch); {total_steps} steps of {t.batch_size} images; "
        f"{len(mesh.devices.flat)} device(s) on {jax.default_backend()}, mesh "
        f"{dict(zip(mesh.axis_names, mesh.axis_sizes))}")
    if len(phases) > 1:
        log("budget warm-up: " + ", ".join(
            f"step {p.start}: {cfg.token_counts(p.reduction)}" for p in phases))

    with shd.use_mesh(mesh, rules):
        tx, lr_schedule = make_optimizer(config, total_steps, steps_per_epoch)
        graphdef, state, rest, (state_sharding, rest_sharding) = init_model(
            cfg, config.seed, mesh, rules, tx=tx, abstract=latest is not None)
        if latest is not None:
            if jax.tree.leaves(rest):   # constants (a sin-cos table) are not checkpointed
                _, _, rest, _ = init_model(cfg, config.seed, mesh, rules)
            state = checkpointer.restore(latest, state, data_iterator=loader.iterator)
            log(f"resumed from {checkpointer.directory} at step {latest}")
        start_step = int(jax.device_get(state.step))

        steps: dict[int, Callable] = {}
        # The loop carries the train state as a flat list of arrays: flattening a TrainState of
        # nnx Variables and rebuilding it from the outputs costs ~10 ms of Python per step,
        # which on a small CPU machine competes with the step itself. The TrainState is
        # rebuilt only where it is needed (checkpoints, evaluation, export).
        state_leaves, state_def = jax.tree.flatten(state)
        leaf_shardings = state_def.flatten_up_to(state_sharding)

        def train_step_for(i: int) -> Callable:
            if i not in steps:
                fn = make_train_step(graphdef, tx, lr_schedule, num_classes=cfg.num_classes,
                                     reduction=phases[i].reduction,
                                     label_smoothing=t.label_smoothing,
                                     grad_accum_steps=t.grad_accum_steps)

                def flat_fn(leaves, rest, batch, fn=fn):
                    new_state, metrics = fn(state_def.unflatten(leaves), rest, batch)
                    return state_def.flatten_up_to(new_state), metrics

                steps[i] = jax.jit(flat_fn, in_shardings=(leaf_shardings, rest_sharding,
                                                          shd.batch_sharding(mesh, rules)),
                                   out_shardings=(leaf_shardings, shd.replicated(mesh)),
                                   donate_argnums=(0,))
            return steps[i]

        def current_state() -> TrainState:
            return state_def.unflatten(state_leaves)

        eval_step = jit_eval_step(make_eval_step(graphdef, cfg.reduction), mesh,
                                  state_sharding.params, rest_sharding, rules)

        def run_eval(step: int) -> dict:
            res = evaluate(eval_step, current_state().params, rest, eval_loader, mesh, rules,
                           max_examples=config.eval.max_examples)
            writer.write(step, {"eval/top1": res["top1"], "eval/top5": res["top5"],
                                "eval/loss": res["loss"]})
            return res

        progress = _Progress(total_steps, start_step, t.progress, log)
        pending: list[dict] = []
        interval_t0, interval_images = time.perf_counter(), 0
        train_t0, trained_images, compile_s = None, 0, 0.0
        step = start_step
        finished = False
        try:
            while step < total_steps:
                phase = phase_at(phases, step)
                if phase > 0 and phases[phase].start == step and step != start_step:
                    progress.write(f"step {step}: budget warm-up -> tokens per block "
                                   f"{cfg.token_counts(phases[phase].reduction)}")
                batch = shd.put_batch(next(loader), mesh, rules)
                fn = train_step_for(phase)
                t_call = time.perf_counter()
                state_leaves, metrics = fn(state_leaves, rest, batch)
                step += 1
                pending.append(metrics)
                progress.advance()
                if train_t0 is None:                  # the first step includes compilation
                    jax.block_until_ready(metrics)
                    compile_s = time.perf_counter() - t_call
                    train_t0 = interval_t0 = time.perf_counter()
                    interval_images = 0
                else:
                    interval_images += t.batch_size
                    trained_images += t.batch_size
                if step % t.log_every == 0 or step == total_steps:
                    host = jax.device_get(pending)
                    pending = []
                    now = time.perf_counter()
                    ips = interval_images / max(now - interval_t0, 1e-9)
                    info = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    info["images_per_s"] = ips
                    writer.write(step, {f"train/{k}": v for k, v in info.items()})
                    rate = trained_images / max(now - train_t0, 1e-9)
                    eta = (total_steps - step) * t.batch_size / rate if rate > 0 else None
                    progress.show(step, info, eta)
                    interval_t0, interval_images = now, 0
                if checkpointer.should_save(step) or step == total_steps:
                    checkpointer.save(step, current_state(), data_iterator=loader.iterator,
                                      config=config_json, force=step == total_steps)
                if config.eval.every_steps and step % config.eval.every_steps == 0 \
                        and step != total_steps:
                    res = run_eval(step)
                    progress.write(f"step {step}: eval top-1 {res['top1']:.4f} top-5 "
                                   f"{res['top5']:.4f} loss {res['loss']:.4f}")
            checkpointer.wait()
            finished = True
        finally:
            progress.close()
            loader.close()
            checkpointer.close(quiet=not finished)   # never hide the error that stopped us
        train_s = time.perf_counter() - train_t0 if train_t0 is not None else 0.0
        eval_res = {"top1": None, "top5": None, "loss": None}
        if config.eval.at_end:
            eval_res = run_eval(step)
            log(f"step {step}: eval top-1 {eval_res['top1']:.4f} top-5 "
                f"{eval_res['top5']:.4f} loss {eval_res['loss']:.4f} "
                f"({eval_res['examples']} examples)")
        if config.checkpoint.export:
            export_dir = os.path.join(workdir, "export")
            ckpt_lib.export(export_dir, graphdef, current_state().params, rest, cfg,
                            train_config=config_json)
            log(f"exported parameters + config to {export_dir} (model.safetensors: timm names)")
    writer.close()
    result = {"step": step, "top1": eval_res["top1"], "top5": eval_res["top5"],
              "eval_loss": eval_res["loss"], "train_seconds": round(train_s, 1),
              "compile_seconds": round(compile_s, 1),
              "train_images_per_s": round(trained_images / train_s, 1) if train_s else None,
              "wall_seconds": round(time.perf_counter() - t_start, 1),
              "resumed_from": latest}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
