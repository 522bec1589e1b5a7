"""Training on a slice of real Fashion-MNIST: the loss falls, runs resume exactly after SIGKILL,
bad checkpoints give clear errors, and failed saves keep the previous checkpoint."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tokens import checkpoint as ckpt_lib
from jax_tokens import data as data_lib
from jax_tokens import metrics
from jax_tokens import train as trainer
from jax_tokens.models import convert

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = str(ROOT / "configs" / "fashion_mnist_vit.py")
STEPS, EVERY = 80, 10

# A tiny ViT (7x7 patches: 16 + CLS tokens) so each step takes milliseconds on a CPU.
TINY = {
    "model.patch_size": 7, "model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2,
    "model.mlp_ratio": 2.0, "train.batch_size": 32, "train.total_steps": STEPS,
    "train.lr": 3e-3, "train.warmup_steps": 5, "train.log_every": 10, "train.progress": False,
    "data.num_threads": 1, "eval.batch_size": 128, "checkpoint.every_steps": EVERY,
    "checkpoint.keep": 2,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data_lib.prepare("fashion_mnist", str(d), max_examples_per_split=512)
    return str(d)


def _overrides(data_dir, **extra):
    return {**TINY, "data.data_dir": data_dir, **extra}


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """An uninterrupted in-process run of the tiny config: (workdir, result)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    config = trainer.load_config(BASE_CONFIG, _overrides(data_dir))
    result = trainer.train(config, workdir, log=lambda s: None)
    return workdir, result


def test_loss_falls_and_outputs_written(reference_run):
    workdir, result = reference_run
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == STEPS // 10
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
    assert result["step"] == STEPS and result["top1"] > 0.3, result
    assert any("eval/top1" in r for r in rows)
    # TensorBoard event files (written without TensorFlow) hold the same scalars.
    tb = os.path.join(workdir, "tensorboard")
    events = [e for f in os.listdir(tb) for e in metrics.read_events(os.path.join(tb, f))]
    assert events[0]["file_version"] == "brain.Event:2"
    tb_losses = [e["scalars"]["train/loss"] for e in events if "train/loss" in e["scalars"]]
    np.testing.assert_allclose(tb_losses, losses, rtol=1e-6)
    # Checkpoints: the last K, each with state, data iterator state and config.
    ckpts = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                   if s.isdigit())
    assert ckpts == [STEPS - EVERY, STEPS]   # every EVERY steps, keep 2
    step_dir = os.path.join(workdir, "checkpoints", str(STEPS))
    assert sorted(p for p in os.listdir(step_dir) if not p.startswith("_")) == [
        "commit_success.txt", "config", "data", "state"]
    # The export: Orbax params + config, and a timm-named safetensors file.
    export = os.path.join(workdir, "export")
    cfg, graphdef, params, rest = trainer.load_export(export)
    assert cfg.embed_dim == 32 and cfg.patch_size == 7
    tensors = convert.read_safetensors(os.path.join(export, "model.safetensors"))
    assert "blocks.0.attn.qkv.weight" in tensors
    np.testing.assert_array_equal(tensors["head.bias"], np.asarray(params["head"]["bias"]))


def _subprocess_env():
    """train.py in a subprocess; its compiled programs persist in the workdir's
    compilation_cache/, so a relaunch on the same workdir compiles nothing."""
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                JAX_PLATFORMS="cpu")


def _cli_args(data_dir, workdir):
    args = [sys.executable, "train.py", "--config", BASE_CONFIG, "--workdir", workdir]
    for k, v in _overrides(data_dir, **{"eval.at_end": False}).items():
        args.append(f"--config.{k}={v}")
    return args


def test_resume_after_sigkill_is_exact(reference_run, data_dir, tmp_path):
    ref_workdir, _ = reference_run
    workdir = str(tmp_path / "killed")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    env = _subprocess_env()
    proc = subprocess.Popen(_cli_args(data_dir, workdir), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = None
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        steps = [int(s) for s in os.listdir(ckpt_dir) if s.isdigit()] \
            if os.path.isdir(ckpt_dir) else []
        if steps:
            proc.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.02)
    out = proc.communicate(timeout=60)[0]
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, out
    assert killed_at < STEPS
    assert not os.path.exists(os.path.join(workdir, "results.json"))   # it did not finish

    resumed = subprocess.run(_cli_args(data_dir, workdir), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    match = [l for l in resumed.stdout.splitlines() if l.startswith("resumed from")]
    assert match, resumed.stdout
    step = int(match[0].rsplit(" ", 1)[1])
    assert EVERY <= step < STEPS, match
    cache = [l for l in resumed.stdout.splitlines() if l.startswith("compilation cache ")]
    assert cache and " 0 programs loaded" not in cache[0], resumed.stdout  # the train step
    ref = convert.read_safetensors(os.path.join(ref_workdir, "export", "model.safetensors"))
    got = convert.read_safetensors(os.path.join(workdir, "export", "model.safetensors"))
    assert ref.keys() == got.keys()
    worst = max(float(np.max(np.abs(ref[k] - got[k]))) for k in ref)
    assert worst <= 1e-6, worst
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["resumed_from"] == step


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_incompatible_config_is_a_clear_error(reference_run, data_dir, tmp_path):
    workdir = _copy_run(reference_run[0], tmp_path / "run")
    config = trainer.load_config(BASE_CONFIG, _overrides(
        data_dir, **{"model.embed_dim": 48, "train.lr": 1e-3, "checkpoint.keep": 5}))
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
        trainer.train(config, workdir, log=lambda s: None)
    msg = str(e.value)
    assert "model.embed_dim: 32 -> 48" in msg and "train.lr: 0.003 -> 0.001" in msg
    assert "checkpoint.keep" not in msg      # runtime keys may change
    # Another reducer on the same workdir: the method and its fields are named.
    config = trainer.load_config(BASE_CONFIG, _overrides(
        data_dir, **{"model.reduction.method": "tome", "model.reduction.r": 2}))
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"model.reduction.method: 'none' -> 'tome'"):
        trainer.train(config, workdir, log=lambda s: None)


def test_corrupt_checkpoint_is_a_clear_error(reference_run, data_dir, tmp_path):
    workdir = _copy_run(reference_run[0], tmp_path / "run")
    state_dir = pathlib.Path(workdir, "checkpoints", str(STEPS), "state")
    for f in state_dir.rglob("*"):
        if f.is_file() and f.name not in ("_METADATA", "commit_success.txt"):
            f.write_bytes(b"garbage")
    config = trainer.load_config(BASE_CONFIG, _overrides(data_dir))
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        trainer.train(config, workdir, log=lambda s: None)
    msg = str(e.value)
    assert f"checkpoint step {STEPS}" in msg and "corrupt" in msg
    assert f"resume from step {STEPS - EVERY}" in msg
    # A corrupt config item is reported before anything else happens.
    cfg_dir = pathlib.Path(workdir, "checkpoints", str(STEPS), "config")
    for f in cfg_dir.rglob("*"):
        if f.is_file() and f.name != "commit_success.txt":
            f.write_text("{not json")
    with pytest.raises(ckpt_lib.CheckpointError, match=f"step {STEPS}.*its config"):
        trainer.train(config, workdir, log=lambda s: None)


def _state(value: float):
    return {"w": jnp.full((4, 3), value), "step": jnp.asarray(int(value), jnp.int32)}


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import async_path
    directory = str(tmp_path / "ckpt")
    abstract = jax.eval_shape(lambda: _state(0.0))
    ck = ckpt_lib.Checkpointer(directory, every=1, keep=2)
    ck.save(1, _state(1.0), config={"a": 1})
    ck.wait()

    # A disk error in the background commit (the atomic rename of the finished tmp dir).
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(async_path, "rename", no_space)
        ck.save(2, _state(2.0), config={"a": 1})
        with pytest.raises(ckpt_lib.CheckpointSaveError,
                           match=r"step 2 .*No space left.*last good checkpoint is step 1"):
            ck.wait()
    ck.close(quiet=True)

    # A failure in the synchronous part of a save (the data iterator's state cannot be read).
    class BrokenIterator:
        def get_state(self):
            raise OSError(5, "Input/output error")

    ck = ckpt_lib.Checkpointer(directory, every=1, keep=2)
    assert ck.all_steps() == [1]
    with pytest.raises(ckpt_lib.CheckpointSaveError,
                       match=r"step 3 .*Input/output error.*last good checkpoint is step 1"):
        ck.save(3, _state(3.0), data_iterator=BrokenIterator())
    ck.close(quiet=True)

    # Reopening: the unfinished tmp dirs do not count, and step 1 restores.
    ck = ckpt_lib.Checkpointer(directory, every=1, keep=2)
    assert ck.all_steps() == [1]
    restored = ck.restore(1, abstract)
    np.testing.assert_array_equal(restored["w"], np.full((4, 3), 1.0))
    assert ck.read_config(1) == {"a": 1}
    ck.save(2, _state(2.0))
    ck.wait()
    assert ck.all_steps() == [1, 2]
    ck.close()


def test_grad_accumulation_matches_one_big_batch_and_bf16_runs():
    from jax_tokens import sharding as shd
    from jax_tokens.models.vit import ViTConfig
    config = trainer.load_config(BASE_CONFIG, {"train.total_steps": 10, "train.warmup_steps": 0})
    mesh, rules = shd.make_mesh(None), shd.rules_from_config(None)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, size=8), jnp.int32)}
    out = {}
    tx, schedule = trainer.make_optimizer(config, 10, 10)
    cfg = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16,
                    depth=1, num_heads=2)
    with shd.use_mesh(mesh, rules):
        _, state0, rest, _ = trainer.init_model(cfg, 0, mesh, rules, tx=tx)
        for dtype, accum in (("float32", 1), ("float32", 4), ("bfloat16", 2)):
            # The parameters are float32 either way: only the graph (compute dtype) differs.
            graphdef, _, _, _ = trainer.init_model(cfg.replace(dtype=dtype), 0, mesh, rules,
                                                   tx=tx, abstract=True)
            step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, num_classes=10,
                                                   reduction=cfg.reduction,
                                                   grad_accum_steps=accum))
            out[(dtype, accum)] = step(state0, rest, batch)
    (s1, m1), (s4, m4) = out[("float32", 1)], out[("float32", 4)]
    assert int(s4.step) == 1
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    sb, mb = out[("bfloat16", 2)]
    assert np.isfinite(float(mb["loss"])) and abs(float(mb["loss"]) - float(m1["loss"])) < 0.1
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(sb.params))  # fp32 master weights


def test_seed_reaches_init_and_data_order(data_dir, tmp_path):
    """The same seed repeats a run exactly; another seed changes the initialisation, the data
    order and hence the trajectory (issue 17: accuracy is compared over seeds)."""
    steps = 20
    extra = {"train.total_steps": steps, "checkpoint.every_steps": steps, "eval.at_end": False}

    def run(seed, name):
        config = trainer.load_config(BASE_CONFIG, _overrides(data_dir, seed=seed, **extra))
        workdir = str(tmp_path / name)
        trainer.train(config, workdir, log=lambda s: None)
        losses = [r["train/loss"] for r in metrics.read_jsonl(
            os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
        _, _, params, _ = trainer.load_export(os.path.join(workdir, "export"))
        return np.asarray(losses), jax.tree.leaves(params)

    loss_a, params_a = run(0, "a")
    loss_b, params_b = run(0, "b")
    loss_c, params_c = run(1, "c")
    assert len(loss_a) == steps // 10
    np.testing.assert_array_equal(loss_a, loss_b)
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)
    assert np.all(loss_a != loss_c), (loss_a, loss_c)
    assert max(float(np.abs(a - c).max()) for a, c in zip(params_a, params_c)) > 1e-3
    # Each ingredient on its own: initial parameters and the first batch depend on the seed.
    from jax_tokens import sharding as shd
    mesh, rules = shd.make_mesh(None), shd.rules_from_config(None)
    config = trainer.load_config(BASE_CONFIG, _overrides(data_dir))
    cfg = trainer.dataset_model_config(config, data_dir)
    with shd.use_mesh(mesh, rules):
        inits = [jax.tree.leaves(trainer.init_model(cfg, s, mesh, rules)[1]) for s in (0, 0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(inits[0], inits[1]))
    assert not all(np.array_equal(a, c) for a, c in zip(inits[0], inits[2]))
    firsts = [next(iter(data_lib.make_train_loader("fashion_mnist", data_dir, 32, seed=s)))
              for s in (0, 0, 1)]
    np.testing.assert_array_equal(firsts[0]["image"], firsts[1]["image"])
    assert not np.array_equal(firsts[0]["label"], firsts[2]["label"])


def test_compilation_cache_makes_a_rerun_compile_nothing(data_dir, tmp_path):
    """train.compilation_cache: a second run of the same config (another workdir sharing the
    cache directory) loads every program the first one compiled and compiles none; the
    result is the same; the settings of the process are restored afterwards."""
    cache = str(tmp_path / "cache")
    extra = {"train.total_steps": 20, "checkpoint.every_steps": 20,
             "train.compilation_cache": cache}
    config = trainer.load_config(BASE_CONFIG, _overrides(data_dir, **extra))
    first = trainer.train(config, str(tmp_path / "a"), log=lambda s: None)
    lines = []
    second = trainer.train(config, str(tmp_path / "b"), log=lines.append)
    assert first["compilation_cache"]["written"] >= 2, first     # the train and eval steps
    assert second["compilation_cache"]["loaded"] >= first["compilation_cache"]["written"]
    assert second["compilation_cache"]["written"] == 0, second
    assert second["top1"] == first["top1"] and second["eval_loss"] == first["eval_loss"]
    assert any(l.startswith(f"compilation cache {cache}: ") for l in lines), lines
    assert jax.config.jax_compilation_cache_dir is None
    # The default keeps the cache in the workdir; '' turns it off.
    off = trainer.train(trainer.load_config(BASE_CONFIG, _overrides(
        data_dir, **{**extra, "train.compilation_cache": ""})), str(tmp_path / "c"),
        log=lambda s: None)
    assert off["compilation_cache"]["directory"] is None
    assert not os.path.exists(tmp_path / "c" / "compilation_cache")
    # A directory that cannot be created is a config error naming the key.
    (tmp_path / "file").write_text("x")
    bad = trainer.load_config(BASE_CONFIG, _overrides(
        data_dir, **{**extra, "train.compilation_cache": str(tmp_path / "file" / "cache")}))
    with pytest.raises(trainer.ConfigError, match="config.train.compilation_cache=.*cannot "
                       "create the cache directory"):
        trainer.train(bad, str(tmp_path / "d"), log=lambda s: None)
