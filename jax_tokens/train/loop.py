"""The training loop that `train.py` runs (and the data and mesh set-up eval.py shares).

    config = load_config("configs/fashion_mnist_vit.py")      # jax_tokens.train.schema
    result = train(config, "/tmp/fm")                          # resumes if /tmp/fm has a checkpoint
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Callable

import jax
import numpy as np

from jax_tokens import checkpoint as ckpt_lib
from jax_tokens import compile_cache
from jax_tokens import data as data_lib
from jax_tokens import sharding as shd
from jax_tokens.metrics import MetricWriter
from jax_tokens.train import export as export_lib
from jax_tokens.train.budgets import budget_phases, model_config, phase_at
from jax_tokens.train.guard import (Preempted, StopSignals, TrainingDiverged, WorkdirLock,
                                    first_nonfinite)
from jax_tokens.train.measure import evaluate
from jax_tokens.train.schema import ConfigError, check_config, config_to_dict
from jax_tokens.train.state import (TrainState, init_model, jit_eval_step, make_eval_step,
                                    make_optimizer, make_train_step)

__all__ = ["ensure_dataset", "make_eval_loader", "dataset_model_config", "make_mesh_and_rules",
           "train"]


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


def dataset_model_config(config, data_dir: str):
    """model_config with in_chans / num_classes from the dataset, checked against it."""
    info = data_lib.dataset_info(config.data.name, data_dir)
    img = config.data.image_size or info.image_shape[0]
    chans = info.image_shape[-1]
    cfg = model_config(config, in_chans=chans, num_classes=info.num_classes)
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


def _stop_requested(stop: StopSignals) -> bool:
    """Whether a stop signal arrived, agreed by every process (the save is collective)."""
    flag = stop.signum is not None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        flag = bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).max())
    return flag


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
    t_start = time.perf_counter()
    check_config(config)
    model_config(config)                           # budgets checked before any data is read
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the workdir {workdir}: {e.strerror or e}") from e
    try:
        cache_dir = compile_cache.prepare(config.train.compilation_cache, workdir)
    except (ValueError, OSError) as e:
        raise ConfigError(f"config.train.compilation_cache={config.train.compilation_cache!r}: "
                          f"{e}") from None
    with WorkdirLock(workdir, enabled=jax.process_index() == 0, log=log), \
            compile_cache.persistent(cache_dir) as cache_stats:
        return _train(config, workdir, log, t_start, cache_stats)


def _train(config, workdir: str, log: Callable[[str], None], t_start: float,
           cache_stats: compile_cache.CacheStats) -> dict:
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
    phases = budget_phases(config, cfg, total_steps)      # every phase's budget checked
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
        f"{cfg.reduction.label()}; tokens per block {cfg.token_counts()}; "
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

        def check_finite(host_metrics: list[dict], last_step: int) -> None:
            """TrainingDiverged at the first non-finite loss / gradient norm among the steps
            ending at `last_step`: called before every save, so no checkpoint holds
            parameters updated by a non-finite gradient."""
            bad = first_nonfinite(host_metrics, last_step - len(host_metrics) + 1)
            if bad is None:
                return
            bad_step, name, value = bad
            checkpointer.wait()
            kept = checkpointer.latest_step()
            writer.close()
            kept_text = (f"the newest checkpoint, step {kept}, holds finite parameters and "
                         f"rerunning the same command resumes from it on the same data order"
                         if kept is not None else "no checkpoint was written")
            raise TrainingDiverged(
                f"training diverged: {name} is {value} at step {bad_step}; nothing from that "
                f"step on was saved ({kept_text}). Lower config.train.lr (now {t.lr}) or "
                f"config.train.grad_clip (now {t.grad_clip}), or change config.seed")

        progress = _Progress(total_steps, start_step, t.progress, log)
        pending: list[dict] = []
        interval_t0, interval_images = time.perf_counter(), 0
        train_t0, trained_images, compile_s = None, 0, 0.0
        step = start_step
        finished = False
        stop = StopSignals()     # SIGTERM / SIGINT: finish the step, save, raise Preempted
        try:
            stop.__enter__()
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
                    # Keys may differ between warm-up phases (a reducer's loss terms).
                    keys = dict.fromkeys(k for m in host for k in m)
                    info = {k: float(np.mean([m[k] for m in host if k in m])) for k in keys}
                    info["images_per_s"] = ips
                    writer.write(step, {f"train/{k}": v for k, v in info.items()})
                    check_finite(host, step)
                    rate = trained_images / max(now - train_t0, 1e-9)
                    eta = (total_steps - step) * t.batch_size / rate if rate > 0 else None
                    progress.show(step, info, eta)
                    interval_t0, interval_images = now, 0
                if checkpointer.should_save(step) or step == total_steps:
                    check_finite(jax.device_get(pending), step)
                    checkpointer.save(step, current_state(), data_iterator=loader.iterator,
                                      config=config_json, force=step == total_steps)
                if _stop_requested(stop):
                    check_finite(jax.device_get(pending), step)
                    checkpointer.wait()          # a save of this very step may be in flight
                    if checkpointer.latest_step() != step:
                        checkpointer.save(step, current_state(), data_iterator=loader.iterator,
                                          config=config_json, force=True)
                        checkpointer.wait()
                    writer.close()
                    log(f"preempted at step {step}; rerun the same command to resume")
                    raise Preempted(step, stop.signum or signal.SIGTERM)
                if config.eval.every_steps and step % config.eval.every_steps == 0 \
                        and step != total_steps:
                    res = run_eval(step)
                    progress.write(f"step {step}: eval top-1 {res['top1']:.4f} top-5 "
                                   f"{res['top5']:.4f} loss {res['loss']:.4f}")
            checkpointer.wait()
            finished = True
        finally:
            stop.__exit__()
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
            export_lib.export(export_dir, graphdef, current_state().params, rest, cfg,
                            train_config=config_json)
            log(f"exported parameters + config to {export_dir} (model.safetensors: timm names)")
    writer.close()
    if cache_stats.directory is not None:
        log(cache_stats.summary())
    result = {"step": step, "top1": eval_res["top1"], "top5": eval_res["top5"],
              "eval_loss": eval_res["loss"], "train_seconds": round(train_s, 1),
              "compile_seconds": round(compile_s, 1),
              "train_images_per_s": round(trained_images / train_s, 1) if train_s else None,
              "wall_seconds": round(time.perf_counter() - t_start, 1),
              "resumed_from": latest, "compilation_cache": cache_stats.as_dict()}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
