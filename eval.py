"""Evaluate a trained ViT: accuracy, throughput, GFLOPs and tokens per block, over budgets.

    python eval.py --workdir /tmp/fm                      # latest checkpoint of a train.py run
    python eval.py --checkpoint /tmp/fm/export            # an export (params + config.json)
    python eval.py --checkpoint /tmp/fm/checkpoints/702   # one training checkpoint
    python eval.py --workdir /tmp/fm_tome --sweep r=0,4,8,10,12
    python eval.py --workdir /tmp/fm_evit --sweep keep_rate=1.0,0.7,0.5,0.3 --visualize 4
    python eval.py --workdir /tmp/fm --sweep tome:r=0,4,8      # another reducer's budgets

Prints top-1 / top-5 accuracy over the eval split, images/s of the compiled forward pass on one
eval batch (all budgets timed side by side in interleaved rounds; the median round is reported),
GFLOPs per image from XLA's cost analysis of the compiled forward pass (and the analytic
estimate), and the tokens entering each block. `--sweep` evaluates several budgets of the same
parameters in one run and prints a markdown table: `FIELD=v1,v2,...` varies a field of the
model's reducer, `METHOD:FIELD=v1,...` switches to another registered reducer first (its other
fields at their defaults). `--visualize N` writes a PNG per image showing which patches each
output token gathers (merged groups, or kept/dropped patches, as the reducer draws itself).
`--config` (with `--config.x=y`) overrides the run's config, e.g. the data dir or the eval
reduction; the architecture must match the checkpoint's. Compiled programs are kept in the
workdir's compilation_cache/ (JAX's persistent cache, shared with train.py;
`--compilation_cache` names another directory or '' turns it off).
"""

import dataclasses
import json
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from jax_tokens import reducers
from jax_tokens import train as trainer
from jax_tokens.train import schema

_OVERRIDES: dict = {}      # --config.a.b=value flags, taken out of argv before absl parses it
_CONFIG = flags.DEFINE_string("config", None, "Config file (default: the config stored with "
                              "the checkpoint); override keys with --config.a.b=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py workdir: its latest checkpoint.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "An export dir, a training checkpoint step dir, or a .safetensors file "
    "(timm names; needs --config).")
_SWEEP = flags.DEFINE_string(
    "sweep", None, "Budgets to compare: FIELD=v1,v2,... of the model's reducer (r=0,4,8 for "
    "ToMe, keep_rate=1.0,0.7,0.5 for pruning), or METHOD:FIELD=v1,... for another reducer.")
_VISUALIZE = flags.DEFINE_integer("visualize", 0, "Write a PNG for each of the first N eval "
                                  "images.")
_VISUALIZE_DIR = flags.DEFINE_string("visualize_dir", None, "Where the PNGs go (default: "
                                     "<workdir or checkpoint>/visualize).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Eval batch size (default: "
                                   "config.eval.batch_size).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Evaluate accuracy on the first N "
                                     "examples only.")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved timing rounds (median reported).")
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "workdir", "JAX's persistent compilation cache: 'workdir' (the "
    "--workdir's compilation_cache/, which train.py fills; none with --checkpoint), a "
    "directory, or '' (off).")


def _fail(msg: str) -> int:
    print(schema.error_line(msg), file=sys.stderr, flush=True)
    return 1


def _parse_sweep(spec: str, cfg):
    """'r=0,4,8' / 'keep_rate=1,0.7' / 'tome:r=0,4' -> [(label, Reducer)], each checked."""
    import ast  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from jax_tokens import models  # pylint: disable=import-outside-toplevel
    if "=" not in spec:
        raise trainer.ConfigError(f"--sweep={spec!r} must look like r=0,4,8, "
                                  "keep_rate=1.0,0.7,0.5 or tome:r=0,4,8")
    key, values = (p.strip() for p in spec.split("=", 1))
    base = cfg.reduction
    if ":" in key:
        method, key = (p.strip() for p in key.split(":", 1))
        try:
            base = reducers.get(method)() if method != base.method else base
        except (ValueError, TypeError) as e:
            raise trainer.ConfigError(f"--sweep {method}:{key}: {e}") from e
    valid = reducers.fields(base.method)[1:]
    if key not in valid:
        raise trainer.ConfigError(
            f"--sweep key {key!r} is not a field of reducer {base.method!r} (its fields: "
            f"{', '.join(valid) or 'none'}); use METHOD:FIELD=... for another reducer "
            f"({', '.join(reducers.names())})")
    out = []
    for v in [v.strip() for v in values.split(",") if v.strip()]:
        try:
            value = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            value = v
        try:
            red = base.replace(**{key: value})
        except (ValueError, TypeError) as e:
            raise trainer.ConfigError(f"--sweep {key}={v}: {e}") from e
        trainer.check_budgets(cfg, red)
        out.append((f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}", red))
    if not out:
        raise trainer.ConfigError(f"--sweep={spec!r} lists no values")
    # A reducer with parameters can only vary budgets that keep its parameters as trained.
    if any(red.learned for _, red in out):
        def shapes(c):
            model = nnx.eval_shape(lambda: models.create(c, rngs=nnx.Rngs(0)))
            return jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(model, nnx.Param))
        want = shapes(cfg)
        for label, red in out:
            if shapes(cfg.replace(reduction=red)) != want:
                raise trainer.ConfigError(f"--sweep {label} changes the parameters of reducer "
                                          f"{red.method!r}; sweep only budgets that keep them")
    return out


def _load(mesh, rules):
    """(config, cfg, graphdef, params, rest, out_dir) from --workdir / --checkpoint."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    from jax_tokens import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from jax_tokens.models import convert  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    user_config = _user_config()
    if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
        raise trainer.ConfigError("pass exactly one of --workdir and --checkpoint")
    path = _WORKDIR.value or _CHECKPOINT.value
    if not os.path.exists(path):
        raise ckpt_lib.CheckpointError(f"{path} does not exist")

    def merged(saved: dict | None):
        if user_config is not None:
            config = user_config
            if saved is not None:
                diff = [d for d in trainer.config_diff(saved, config, ())
                        if d.startswith("model.") and not d.startswith("model.reduction.")
                        and not d.startswith("model.token_multiple:")]
                if diff:
                    raise ckpt_lib.CheckpointMismatchError(
                        f"--config describes a different model than the checkpoint in {path}:"
                        "\n  " + "\n  ".join(diff))
            return config
        if saved is None:
            raise trainer.ConfigError(f"{path} holds no training config: pass --config")
        config = ml_collections.ConfigDict(schema.upgrade_config_dict(saved))
        trainer.check_config(config)
        return config

    if path.endswith(".safetensors"):
        if user_config is None:
            raise trainer.ConfigError("a .safetensors checkpoint needs --config (the model)")
        config = user_config
        try:                                   # a bad file is reported before data is read
            tensors = convert.read_safetensors(path)
        except (OSError, ValueError) as e:
            raise ckpt_lib.CheckpointError(str(e)) from e
        data_dir = trainer.ensure_dataset(config)
        cfg = trainer.dataset_model_config(config, data_dir)
        try:
            model = convert.from_timm(tensors, cfg)
        except ValueError as e:
            raise ckpt_lib.CheckpointError(f"cannot load {path} into the config's model: {e}"
                                           ) from e
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return config, cfg, graphdef, params, rest, os.path.dirname(os.path.abspath(path))

    if os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isdir(os.path.join(path, "params")):                       # an export
        saved = None
        train_cfg = os.path.join(path, "train_config.json")
        if os.path.isfile(train_cfg):
            with open(train_cfg) as f:
                saved = json.load(f)
        config = merged(saved)
        cfg, graphdef, params, rest = trainer.load_export(path, mesh, rules)
        trainer.ensure_dataset(config)
        return config, _with_reduction(config, cfg), graphdef, params, rest, path

    if _WORKDIR.value:
        directory = os.path.join(path, "checkpoints")
        if not os.path.isdir(directory):
            raise ckpt_lib.CheckpointError(f"no committed checkpoint in {directory}")
        checkpointer = ckpt_lib.Checkpointer(directory, read_only=True)
        step = checkpointer.latest_step()
        if step is None:
            raise ckpt_lib.CheckpointError(f"no committed checkpoint in {directory}")
        out_dir = path
    else:                                                                       # a step dir
        directory, name = os.path.split(os.path.abspath(path.rstrip("/")))
        if not name.isdigit():
            raise ckpt_lib.CheckpointError(
                f"{path} is neither an export (config.json + params/), a training checkpoint "
                "step directory (checkpoints/<step>) nor a .safetensors file")
        checkpointer = ckpt_lib.Checkpointer(directory, read_only=True)
        step = int(name)
        if step not in checkpointer.all_steps():
            raise ckpt_lib.CheckpointError(f"{path} is not a committed checkpoint (steps in "
                                           f"{directory}: {checkpointer.all_steps()})")
        out_dir = os.path.dirname(directory)
    saved = checkpointer.read_config(step)
    config = merged(saved)
    saved = ml_collections.ConfigDict(schema.upgrade_config_dict(saved))
    data_dir = trainer.ensure_dataset(config)
    train_cfg = trainer.dataset_model_config(saved, data_dir)
    tx, _ = trainer.make_optimizer(saved, 1, 1)       # only its state's structure is used
    import jax  # pylint: disable=import-outside-toplevel
    graphdef, abstract_state, rest, _ = trainer.init_model(train_cfg, 0, mesh, rules, tx=tx,
                                                           abstract=True)
    if jax.tree.leaves(rest):       # constants such as a sin-cos table are not checkpointed
        _, _, rest, _ = trainer.init_model(train_cfg, 0, mesh, rules)
    state = checkpointer.restore(step, abstract_state)
    print(f"checkpoint: step {step} in {directory}", flush=True)
    cfg = trainer.dataset_model_config(config, data_dir)
    return config, cfg, graphdef, state.params, rest, out_dir


def _has_reducer_slots(cfg) -> bool:
    return any(f.name == "reduction" for f in dataclasses.fields(cfg))


def _with_reduction(config, cfg):
    """The export's model config with the eval config's reduction (same architecture)."""
    if not _has_reducer_slots(cfg):
        return cfg
    return cfg.replace(reduction=trainer.reducer_from_config(config.model.reduction))


def _with_token_multiple(config, cfg, graphdef, params, rest, mesh, rules):
    """The eval config's model.token_multiple (padded token arrays: same parameters, same
    results) applied to the loaded model, whatever the checkpoint was trained with."""
    if not _has_reducer_slots(cfg):
        return cfg, graphdef
    from flax import nnx  # pylint: disable=import-outside-toplevel
    want = config.model.token_multiple
    built = nnx.merge(graphdef, params, rest).cfg      # the config the graph was built from
    if built.token_multiple != want:
        graphdef, _, _, _ = trainer.init_model(built.replace(token_multiple=want), 0, mesh,
                                               rules, abstract=True)
    return cfg.replace(token_multiple=want), graphdef


def _user_config():
    """--config with its --config.a.b=value overrides (None without --config)."""
    if _CONFIG.value is None:
        if _OVERRIDES:
            raise trainer.ConfigError(f"--config.{next(iter(_OVERRIDES))} overrides a config: "
                                      "pass --config FILE too")
        return None
    return schema.load_config(_CONFIG.value, _OVERRIDES)


def _display_images(batch, spec, n: int, scale: int):
    """uint8 RGB [n, H*scale, W*scale, 3] from normalised eval images."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    x = np.asarray(batch["image"][:n], np.float32)
    if spec.mean is not None:
        x = x * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
    x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x.repeat(scale, axis=1).repeat(scale, axis=2)


def _visualize(entries, params, rest, batch, spec, cfg, n: int, out_dir: str, mesh, rules):
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    try:
        from jax_tokens import visualize as vis  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise NotImplementedError("--visualize needs jax_tokens.visualize, which is not "
                                  "available") from e
    n = min(n, batch["image"].shape[0])
    scale = max(1, 224 // cfg.img_size)
    photos = _display_images(batch, spec, n, scale)
    # The same parameters in a model that tracks which patches each token covers.
    traced = cfg.replace(trace_source=True)
    graphdef, _, _, _ = trainer.init_model(traced, 0, mesh, rules, abstract=True)
    sources = {}
    for label, red in entries:
        forward = jax.jit(trainer.make_forward(graphdef, red))
        _, aux = forward(params, rest, batch["image"][:n])
        sources[label] = np.asarray(jax.device_get(aux["source_index"]))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(n):
        tiles, labels = [photos[i]], ["input"]
        for label, red in entries:
            src = sources[label][i]
            if red.picture == "kept":
                img = vis.draw_kept_patches(photos[i], src, cfg.grid,
                                            num_prefix_tokens=cfg.num_prefix_tokens)
            else:
                img = vis.draw_merge_groups(photos[i], src, cfg.grid,
                                            num_prefix_tokens=cfg.num_prefix_tokens)
            tiles.append(img)
            labels.append(label)
        path = os.path.join(out_dir, f"image_{i:03d}.png")
        vis.side_by_side(tiles, labels=labels, path=path)
        paths.append(path)
    return paths


def main(argv):
    if len(argv) > 1:
        return _fail(f"unexpected arguments {argv[1:]}; see python eval.py --help")
    if not flags.FLAGS["verbosity"].present:     # Orbax warns about read-only managers
        absl_logging.set_verbosity(absl_logging.ERROR)
    from jax_tokens import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
    from jax_tokens import data as data_lib  # pylint: disable=import-outside-toplevel
    from jax_tokens import compile_cache  # pylint: disable=import-outside-toplevel
    try:
        try:
            workdir = _WORKDIR.value if _WORKDIR.value and os.path.isdir(_WORKDIR.value) \
                else None        # a missing workdir is _run's error to report
            cache_dir = compile_cache.prepare(_COMPILATION_CACHE.value, workdir)
        except (ValueError, OSError) as e:
            raise trainer.ConfigError(f"--compilation_cache={_COMPILATION_CACHE.value}: {e}") \
                from None
        with compile_cache.persistent(cache_dir) as stats:
            status = _run()
        if cache_dir is not None:
            print(stats.summary(), flush=True)
        return status
    except (trainer.ConfigError, ckpt_lib.CheckpointError, data_lib.DatasetNotPreparedError,
            NotImplementedError) as e:
        return _fail(str(e))


def _run() -> int:
    import jax  # pylint: disable=import-outside-toplevel
    from jax_tokens import sharding as shd  # pylint: disable=import-outside-toplevel

    mesh, rules = trainer.make_mesh_and_rules(_user_config())
    with shd.use_mesh(mesh, rules):
        config, cfg, graphdef, params, rest, out_dir = _load(mesh, rules)
        cfg, graphdef = _with_token_multiple(config, cfg, graphdef, params, rest, mesh, rules)
        if _VISUALIZE.value and not _has_reducer_slots(cfg):
            raise trainer.ConfigError("--visualize draws what a reducer did; this model "
                                      f"({type(cfg).__name__}) has no reducer slots")
        entries = (_parse_sweep(_SWEEP.value, cfg) if _SWEEP.value
                   else [(cfg.reduction.label(), cfg.reduction)])
        data_dir = trainer.ensure_dataset(config)
        batch_size = _BATCH_SIZE.value or config.eval.batch_size
        loader = trainer.make_eval_loader(config, data_dir, batch_size)
        max_examples = _MAX_EXAMPLES.value if _MAX_EXAMPLES.value is not None \
            else config.eval.max_examples
        first = next(iter(loader))
        batch = shd.put_batch(first, mesh, rules)
        p_sh = shd.state_shardings(mesh, params, rules)
        r_sh = shd.state_shardings(mesh, rest, rules)

        # One compiled eval step (forward pass + top-k) per budget: it gives the accuracy, the
        # GFLOPs (XLA's cost analysis of this very executable) and the timing.
        rows, compiled = [], {}
        for label, red in entries:
            step = trainer.jit_eval_step(trainer.make_eval_step(graphdef, red), mesh, p_sh, r_sh,
                                         rules)
            compiled[label] = step.lower(params, rest, batch).compile()
            acc = trainer.evaluate(compiled[label], params, rest, loader, mesh, rules,
                                   max_examples=max_examples)
            gflops = trainer.compiled_gflops(compiled[label])
            rows.append({"budget": label, "method": red.method,
                         "tokens": cfg.token_counts(red), "top1": acc["top1"],
                         "top5": acc["top5"], "loss": acc["loss"], "examples": acc["examples"],
                         "gflops_xla": None if gflops is None else gflops / batch_size,
                         "gflops_estimate": cfg.flops(red) / 1e9})
            print(f"{label}: top-1 {acc['top1']:.4f} top-5 {acc['top5']:.4f} "
                  f"({acc['examples']} examples)", flush=True)
        speed = trainer.measure_throughput(compiled, (params, rest, batch),
                                           batch_size=batch_size, rounds=_ROUNDS.value)
        base = speed[entries[0][0]]
        for row in rows:
            row["images_per_s"] = speed[row["budget"]]
            row["speedup"] = speed[row["budget"]] / base

        print()
        print(f"model: {cfg.embed_dim}-dim x {cfg.depth} blocks, {cfg.num_tokens} tokens; "
              f"{jax.default_backend()} x {len(mesh.devices.flat)}; eval batch {batch_size}; "
              f"images/s: the compiled eval step (forward + top-k) on one batch, median of "
              f"{_ROUNDS.value} interleaved rounds")
        print()
        print("| budget | tokens per block | top-1 | top-5 | images/s | speed-up | "
              "GFLOPs (XLA) | GFLOPs (estimate) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            gx = "n/a" if row["gflops_xla"] is None else f"{row['gflops_xla']:.4f}"
            print(f"| {row['budget']} | {' '.join(map(str, row['tokens']))} | "
                  f"{100 * row['top1']:.2f} | {100 * row['top5']:.2f} | "
                  f"{row['images_per_s']:.0f} | {row['speedup']:.2f}x | {gx} | "
                  f"{row['gflops_estimate']:.4f} |")
        sys.stdout.flush()

        if _VISUALIZE.value:
            out = _VISUALIZE_DIR.value or os.path.join(out_dir, "visualize")
            spec = loader.spec
            paths = _visualize(entries, params, rest, first, spec, cfg, _VISUALIZE.value, out,
                               mesh, rules)
            print(f"\nwrote {len(paths)} PNGs to {out}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"rows": rows, "batch_size": batch_size,
                       "backend": jax.default_backend(), "time": time.time()}, f, indent=2)
    return 0


if __name__ == "__main__":
    _argv, _OVERRIDES = schema.split_override_flags(sys.argv)
    app.run(main, argv=_argv)
