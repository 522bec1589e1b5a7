"""The config schema: every key a config may set, loading config files, command-line overrides.

    config = load_config("configs/fashion_mnist_tome.py", {"model.reduction.r": 8})

Configs are Python files with `get_config(arg=None)` returning an `ml_collections.ConfigDict`
(`file.py:arg` passes `arg`). They start from `default_config()` and import nothing heavier than
this module (it imports only ml_collections; the reducer registry is looked up lazily).

`config.model.reduction` is the one group whose keys depend on a value: it holds `method` and
that reducer's fields (`jax_tokens.reducers.fields(method)`), e.g.
`reduction(method="tome", r=13, prop_attn=True)`. An unknown key anywhere is a `ConfigError`
naming the key and the valid ones. Overriding `model.reduction.method` (in code or with
`--config.model.reduction.method=...`) switches the group to that reducer, keeping the fields
the two share.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
from ml_collections import config_dict

__all__ = [
    "ConfigError", "default_config", "reduction", "load_config", "check_config",
    "split_override_flags", "config_to_dict", "config_diff",
    "upgrade_config_dict", "RUNTIME_KEYS",
]


class ConfigError(ValueError):
    """A config key, value or budget that cannot work; the message says which and why."""


def _cd(d: dict, type_safe: bool = True) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(d, type_safe=type_safe)


def reduction(method: str = "none", **fields) -> ml_collections.ConfigDict:
    """The `config.model.reduction` group for one reducer: `reduction(method="tome", r=13)`.
    Not type safe: a budget may be an int, a float or a per-layer tuple."""
    return _cd(dict(method=method, **fields), type_safe=False)


def default_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with its default (ImageNet-sized ViT-S, no reduction)."""
    ph = config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = _cd(dict(
        name="vit",                  # "vit" | "lookupvit" (jax_tokens.models.MODELS)
        img_size=224, patch_size=16,
        in_chans=ph(int),            # None: from the dataset
        num_classes=ph(int),         # None: from the dataset
        embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True, class_token=True,
        num_registers=0, pos_embed="learn", no_embed_class=False,
        layer_scale_init=ph(float), global_pool="token", ln_eps=1e-6, attn_impl="auto",
        dtype="float32",             # compute dtype: "bfloat16" for mixed precision
        token_multiple=1,            # vit: token arrays rounded up to a multiple, the padding
                                     # masked (same results; tensor-core / sublane tiles)
        num_lookup=ph(int),          # lookupvit: M lookup tokens (a perfect square); None: 49
        hr_mlp_ratio=ph(float),      # lookupvit: the N tokens' MLP; None: mlp_ratio / 4
    ))
    c.model.reduction = reduction("none")   # method + that reducer's fields
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
        # JAX's persistent compilation cache: "workdir" (WORKDIR/compilation_cache), a
        # directory (shared by runs), or "" (off); see jax_tokens/compile_cache.py
        compilation_cache="workdir",
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
    "data.auto_prepare", "train.log_every", "train.progress", "train.compilation_cache",
    "eval.batch_size", "model.token_multiple",
    "eval.every_steps", "eval.max_examples", "eval.at_end", "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.async_save", "checkpoint.export", "mesh.", "sharding.", "distributed",
})
"""Keys that may change when a run resumes: they do not change what is computed (a trailing
"." covers a whole group; a checkpoint restores onto any mesh; model.token_multiple pads the
token arrays and gives the same results to float precision)."""

_FREE_FORM = ("sharding.rules", "press")   # groups whose keys are not in a schema
"""Groups whose keys are not fixed by the schema."""
_REDUCTION = "model.reduction"
"""The group whose keys are the fields of its reducer."""


def _reduction_keys(method: Any) -> tuple[str, ...]:
    from jax_tokens import reducers  # pylint: disable=import-outside-toplevel
    try:
        return reducers.fields(method)
    except ValueError as e:
        raise ConfigError(f"config.model.reduction.method: {e}") from None


def _ignored(key: str, ignore) -> bool:
    return key in ignore or any(p.endswith(".") and key.startswith(p) for p in ignore)


# ----------------------------------------------------------------------------------------------
# Loading and overriding
# ----------------------------------------------------------------------------------------------

def error_line(message: str, max_items: int = 8) -> str:
    """`message` as the one `error:` line a CLI prints: a multi-line message (a list of config
    differences, missing keys, ...) is joined with '; ', at most `max_items` of its lines kept."""
    lines = [" ".join(line.split()) for line in str(message).splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > max_items + 1:
        lines = lines[:max_items] + [f"... ({len(lines) - max_items - 1} more)", lines[-1]]
    out = lines[0] if lines else ""
    for prev, line in zip(lines, lines[1:]):
        out += (" " if prev.endswith(":") else "; ") + line
    return "error: " + out


def _located(error: BaseException, path: str) -> str:
    """'ErrorType: message (line N)' with the line of `path` the error came from, if any."""
    if isinstance(error, SyntaxError):          # its message names the file and line already
        return f"{type(error).__name__}: {error}"
    line = None
    tb = error.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{type(error).__name__}: {error}" + (f" (line {line})" if line else "")


def load_config(path_and_arg: str, overrides: Mapping[str, Any] | None = None, *,
                check: Callable[[Any], None] | None = None,
                switches: Mapping[str, Callable[[Any, Any], None]] | None = None
                ) -> ml_collections.ConfigDict:
    """Loads `path.py` or `path.py:arg` (calls `get_config(arg)`), applies dotted overrides
    ({"model.reduction.r": 8}) and checks the result against the schema.

    A `model.reduction.method` override is applied first and switches the reduction group to
    that reducer (keeping the fields both reducers have), so the other overrides can set its
    fields. `check` replaces `check_config` and `switches` ({dotted key: fn(config, value)},
    applied before the other overrides) the reduction switch, for configs of another schema
    (the LM evaluation's)."""
    path, arg = path_and_arg, None
    if ":" in os.path.basename(path_and_arg):
        path, arg = path_and_arg.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    name = "_jax_tokens_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file {path!r} is not a Python file (a .py with get_config())")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # pylint: disable=broad-except  (any error in the user's file)
        raise ConfigError(f"config file {path!r} failed to load: {_located(e, path)}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config() function")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:  # pylint: disable=broad-except
        raise ConfigError(f"get_config({'' if arg is None else repr(arg)}) in {path!r} "
                          f"failed: {_located(e, path)}") from e
    overrides = dict(overrides or {})
    if switches is None:
        switches = {_REDUCTION + ".method": switch_reduction}
    for key, switch in switches.items():
        if key in overrides:
            switch(config, overrides.pop(key))
    for key, value in overrides.items():
        _check_key(config, key)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.{key}={value!r} has the wrong type: {e}") from None
    (check_config if check is None else check)(config)
    return config


def switch_reduction(config, method: str) -> None:
    """Makes `config.model.reduction` a group for reducer `method`, keeping the shared fields."""
    keys = _reduction_keys(method)
    old = config.model.reduction
    kept = {k: old[k] for k in old.keys() if k in keys and k != "method"}
    config.model.reduction = reduction(method, **kept)


def _check_key(config, dotted: str) -> None:
    """ConfigError naming the valid keys if `dotted` does not exist in `config`."""
    node, seen = config, []
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"unknown config key {'config.' + dotted!r}: {'.'.join(seen)!r} is a "
                              "value, not a group")
        where = ".".join(seen)
        if where in _FREE_FORM:
            return
        valid = _reduction_keys(node.get("method")) if where == _REDUCTION else sorted(node.keys())
        if part not in valid:
            raise ConfigError(_unknown(dotted, where, part, valid, node))
        if part not in node:     # a reducer field the group does not hold yet
            return
        node = node[part]
        seen.append(part)


def _unknown(dotted: str, where: str, part: str, valid: Iterable[str], node) -> str:
    place = "config" if not where else "config." + where
    msg = (f"unknown config key {'config.' + dotted!r}: {place} has no {part!r}; valid keys "
           f"there: {', '.join(valid)}")
    if where == _REDUCTION:
        from jax_tokens import reducers  # pylint: disable=import-outside-toplevel
        msg += (f" (the fields of reducer {node.get('method')!r}; registered reducers: "
                f"{', '.join(reducers.names())}; switch with config.model.reduction.method)")
    return msg


def check_config(config, reference=None, value_checks=None) -> None:
    """ConfigError if `config` has a key the schema does not know (listing the valid ones), or
    lacks a group; then the value checks ((key, test, what is allowed) triples). `reference`
    (default: the training schema, `default_config()`) is a config holding every valid key."""
    schema = default_config() if reference is None else reference

    def walk(node, ref, prefix):
        if prefix[:-1] == _REDUCTION:
            valid = _reduction_keys(node.get("method", "none"))
            for key in node.keys():
                if key not in valid:
                    raise ConfigError(_unknown(prefix + key, _REDUCTION, key, valid, node))
            return
        for key in node.keys():
            dotted = prefix + key
            if key not in ref:
                raise ConfigError(_unknown(dotted, prefix[:-1], key, sorted(ref.keys()), node))
            if isinstance(ref[key], ml_collections.ConfigDict):
                if not isinstance(node[key], (ml_collections.ConfigDict, dict)):
                    raise ConfigError(f"config.{dotted} must be a group with keys "
                                      f"{', '.join(sorted(ref[key].keys()))}")
                if dotted not in _FREE_FORM:
                    walk(node[key], ref[key], dotted + ".")

    walk(config, schema, "")
    for key in schema.keys():
        if key not in config:
            raise ConfigError(f"config has no {key!r}; start configs from "
                              "jax_tokens.train.schema.default_config()" if reference is None
                              else f"config has no {key!r}")
    _check_values(config, _VALUE_CHECKS if reference is None else value_checks or ())


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_VALUE_CHECKS = (  # (key, test, what is allowed); a None value passes where the schema has None
    ("seed", _is_int, "an int"),
    ("train.batch_size", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("train.grad_accum_steps", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("train.total_steps", lambda v: v is None or (_is_int(v) and v >= 1), "None or an int >= 1"),
    ("train.epochs", lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
    ("train.lr", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
    ("train.log_every", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("eval.batch_size", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("eval.every_steps", lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: only at the end)"),
    ("eval.max_examples", lambda v: v is None or (_is_int(v) and v >= 1),
     "None or an int >= 1"),
    ("checkpoint.every_steps", lambda v: _is_int(v) and v >= 0,
     "an int >= 0 (0: only at the end)"),
    ("checkpoint.keep", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    ("budget_warmup.levels", lambda v: _is_int(v) and v >= 1, "an int >= 1"),
)


def _check_values(config, checks) -> None:
    """ConfigError naming the key, the value and what is allowed, for the numbers every run
    needs (the model's fields are checked by the model config, budgets by the reducer)."""
    for key, ok, allowed in checks:
        node = config
        for part in key.split("."):
            node = node[part]
        if not ok(node):
            raise ConfigError(f"config.{key}={node!r} is not allowed: it must be {allowed}")


def _parse_value(text: str) -> Any:
    """A command-line value: a Python literal (3, 1e-3, (1, 2), None, 'x'), true/false, or
    else the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_override_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Takes the `--config.a.b=value` (and `--config.a.b value`, `--noconfig.a.b`) flags out
    of a command line: (the other arguments, {"a.b": value}). Values are Python literals where
    they parse as one (`--config.model.reduction.layers=(1,)`), else strings."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config.") or a.startswith("--noconfig."):
            negated = a.startswith("--no")
            key, eq, value = a.split(".", 1)[1].partition("=")
            if negated:
                overrides[key] = False
            elif eq:
                overrides[key] = _parse_value(value)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides[key] = _parse_value(argv[i + 1])
                i += 1
            else:
                overrides[key] = True
        else:
            rest.append(a)
        i += 1
    return rest, overrides


# ----------------------------------------------------------------------------------------------
# Comparing configs (resume checks)
# ----------------------------------------------------------------------------------------------

def upgrade_config_dict(d: Mapping) -> dict:
    """A plain copy of a config dict with its model.reduction in today's canonical form: a
    config written before the reducer registry (one group with every method's fields) is
    upgraded, and every field of the reducer is spelled out (defaults included), so configs
    that differ only in whether they spell out a default compare equal."""
    out = json.loads(json.dumps(d))
    model = out.get("model")
    if isinstance(model, dict):    # written before the key existed: no padding
        model.setdefault("token_multiple", 1)
    if isinstance(model, dict) and isinstance(model.get("reduction"), dict):
        from jax_tokens import reducers  # pylint: disable=import-outside-toplevel
        red = reducers.upgrade_legacy(model["reduction"])
        try:
            red = reducers.from_config(red).to_dict()
        except (ValueError, TypeError):
            pass     # left as written: the model config check names what is wrong with it
        model["reduction"] = json.loads(json.dumps(red))
    return out


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
    """Human-readable differences `key: old -> new` between two configs, outside `ignore`
    (a config written before the reducer registry is upgraded first)."""
    a = _flatten(upgrade_config_dict(config_to_dict(old)))
    b = _flatten(upgrade_config_dict(config_to_dict(new)))
    ignore = set(ignore)
    out = []
    for key in sorted(set(a) | set(b)):
        if _ignored(key, ignore):
            continue
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out
