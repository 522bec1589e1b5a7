"""Long-run safety: a clean stop on SIGTERM that resumes exactly, one run per workdir, export
integrity, config values with one-line errors, and array-like inputs to the primitives."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import data as data_lib
from jax_tokens import merge, prune, reducers
from jax_tokens import tokens as tk
from jax_tokens import train as trainer
from jax_tokens.attention import attention
from jax_tokens.checkpoint import CheckpointError
from jax_tokens.models import convert
from jax_tokens.train import guard

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = str(ROOT / "configs" / "fashion_mnist_vit.py")
STEPS = 150     # enough steps left after the first checkpoint for the signal to land
TINY = {
    "model.patch_size": 7, "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
    "model.mlp_ratio": 2.0, "train.batch_size": 32, "train.total_steps": STEPS,
    "train.lr": 3e-3, "train.warmup_steps": 5, "train.log_every": 10, "train.progress": False,
    "data.num_threads": 1, "eval.at_end": False, "checkpoint.every_steps": 10,
    "checkpoint.keep": 2,
}
REDUCERS = {
    "tome": {"model.reduction.method": "tome", "model.reduction.r": 3},
    # Keep rate 1.0 until step 75, then 0.5: the resume crosses the phase boundary.
    "evit_warmup": {"model.reduction.method": "evit", "model.reduction.layers": (1,),
                    "model.reduction.keep_rate": 0.5, "budget_warmup.fraction": 0.5,
                    "budget_warmup.levels": 1},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data_lib.prepare("fashion_mnist", str(d), max_examples_per_split=512)
    return str(d)


def _env():
    """A relaunch on the same workdir reuses the programs in its compilation_cache/."""
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                JAX_PLATFORMS="cpu")


def _cli(overrides, workdir):
    args = [sys.executable, "train.py", "--config", BASE_CONFIG, "--workdir", str(workdir)]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.mark.parametrize("name", sorted(REDUCERS))
def test_sigterm_saves_the_step_reached_and_resumes_exactly(name, data_dir, tmp_path):
    overrides = {**TINY, **REDUCERS[name], "data.data_dir": data_dir}
    reference = tmp_path / "reference"
    trainer.train(trainer.load_config(BASE_CONFIG, overrides), str(reference), log=lambda s: None)

    workdir = tmp_path / "preempted"
    env = _env()
    proc = subprocess.Popen(_cli(overrides, workdir), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)     # a second signal must not break the save
            break
        time.sleep(0.02)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == guard.PREEMPTED_EXIT_CODE, out
    line = [l for l in out.splitlines() if l.startswith("preempted at step ")]
    assert line and line[0].endswith("rerun the same command to resume"), out
    step = int(line[0].split()[3].rstrip(";"))
    saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert saved[-1] == step and 10 <= step < STEPS, (saved, out)
    assert "Traceback" not in out and not (workdir / "train.lock").exists()

    resumed = subprocess.run(_cli(overrides, workdir), cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {ckpts.resolve()} at step {step}" in resumed.stdout
    if name == "evit_warmup":
        assert "step 75: budget warm-up -> tokens per block [17, 17, 10]" in resumed.stdout
    ref = convert.read_safetensors(reference / "export" / "model.safetensors")
    got = convert.read_safetensors(workdir / "export" / "model.safetensors")
    worst = max(float(np.max(np.abs(ref[k] - got[k]))) for k in ref)
    assert worst <= 1e-6, worst


def test_one_run_per_workdir(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    logs = []
    with guard.WorkdirLock(str(workdir), log=logs.append):
        held = json.loads((workdir / "train.lock").read_text())
        assert held["pid"] == os.getpid() and held["host"]
        with pytest.raises(guard.WorkdirInUseError, match=rf"pid {os.getpid()} on host "):
            with guard.WorkdirLock(str(workdir)):
                pass
    assert not (workdir / "train.lock").exists()
    # A lock left by a process that is gone is taken over, with a warning.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / "train.lock").write_text(json.dumps(
        {"host": held["host"], "pid": dead.pid, "started": "earlier"}))
    with guard.WorkdirLock(str(workdir), log=logs.append):
        assert json.loads((workdir / "train.lock").read_text())["pid"] == os.getpid()
    assert any(f"stale lock of pid {dead.pid}" in l for l in logs), logs
    # The CLI: one error line naming the other run, nothing else touched.
    (workdir / "train.lock").write_text(json.dumps(
        {"host": held["host"], "pid": os.getpid(), "started": "now", "command": "train.py"}))
    out = subprocess.run(_cli(TINY, workdir), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: the workdir is in use by another train.py run: pid "
                                 f"{os.getpid()}"), out.stderr
    assert "Traceback" not in out.stderr and not (workdir / "checkpoints").exists()


def test_export_manifest_names_a_changed_file(data_dir, tmp_path):
    config = trainer.load_config(BASE_CONFIG, {**TINY, "train.total_steps": 2,
                                               "data.data_dir": data_dir})
    trainer.train(config, str(tmp_path / "run"), log=lambda s: None)
    export = tmp_path / "run" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["jax_tokens_version"] and "model.safetensors" in manifest["files"]
    assert any(k.startswith("params/") for k in manifest["files"])
    trainer.load_export(str(export))                    # intact: loads
    (export / "visualize").mkdir()                      # files added later are fine
    (export / "visualize" / "a.png").write_bytes(b"png")
    trainer.load_export(str(export))
    target = export / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not match its sha256"):
        trainer.load_export(str(export))
    target.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        trainer.load_export(str(export))


@pytest.mark.parametrize("key,value", [("train.batch_size", 0), ("eval.batch_size", -4),
                                       ("train.grad_accum_steps", 0), ("checkpoint.keep", 0)])
def test_bad_values_are_one_error_line(key, value, tmp_path):
    out = subprocess.run(_cli({key: value}, tmp_path / "w"), cwd=ROOT,
                         env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (f"error: config.{key}={value} is not allowed: it must be an "
                                  "int >= 1"), out.stderr


def test_public_functions_accept_numpy_and_lists():
    rng = np.random.default_rng(0)
    metric = rng.normal(size=(2, 9, 4)).astype(np.float32)
    x = rng.normal(size=(2, 9, 3)).astype(np.float32)
    plan = merge.bipartite_soft_matching(metric, 3, class_token=True)
    for mode in ("mean", "sum", "amax"):
        np.testing.assert_allclose(merge.merge(plan, x, mode), merge.merge(plan, jnp.asarray(x),
                                                                           mode))
    y, size = merge.merge_wavg(plan, x, np.ones((2, 9, 1), np.float32))
    np.testing.assert_allclose(merge.unmerge(plan, np.asarray(y)), merge.unmerge(plan, y))
    assert merge.merge_source(plan, np.eye(9, dtype=np.float32)[None].repeat(2, 0)).shape == \
        (2, 6, 9)
    assert merge.kth_bipartite_soft_matching(metric.tolist(), 3).n_out == 3
    assert merge.random_bipartite_soft_matching(metric, 2, key=jax.random.key(0)).n_out == 7
    probs = rng.random((2, 2, 9)).astype(np.float32)
    scores = prune.cls_attention(probs, 1)
    np.testing.assert_allclose(prune.key_mass(probs.tolist(), 1), scores, rtol=1e-6)
    assert prune.l2_norm(x, 1).shape == (2, 8)
    pplan = prune.topk(np.asarray(scores), 4, protected=1, fuse=True)
    kept = prune.prune(pplan, x)
    np.testing.assert_allclose(prune.prune_size(pplan, np.ones((2, 9, 1))).sum((1, 2)), 9)
    np.testing.assert_allclose(prune.unprune(pplan, np.asarray(kept), fill="fused"),
                               pplan.invert(kept))
    a = np.asarray(plan.assignment)
    np.testing.assert_allclose(tk.reduce_by_assignment(x, a, 6, "mean"), plan.matrix() @ x,
                               atol=1e-5)
    assert tk.assignment_matrix(a.tolist(), 6).shape == (2, 6, 9)
    assert tk.gather_tokens(x, a[:, :2]).shape == (2, 2, 3)
    assert tk.invert_by_assignment(np.asarray(y), a).shape == (2, 9, 3)
    assert tk.update_source_index(np.arange(9)[None].repeat(2, 0), a).shape == (2, 9)
    # attention and every registered reducer's reduce take NumPy input too.
    q = rng.normal(size=(2, 9, 2, 4)).astype(np.float32)
    out, st = attention(q.tolist(), q, q, key_size=np.ones((2, 9), np.float32),
                        stats=("lse", "cls_probs", "key_mass", "mean_key"), impl="xla")
    ref, st_ref = attention(jnp.asarray(q), jnp.asarray(q), jnp.asarray(q),
                            key_size=jnp.ones((2, 9)), stats=("lse", "cls_probs"), impl="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_allclose(st["cls_probs"], st_ref["cls_probs"], rtol=1e-6)
    layout = reducers.TokenLayout(depth=1, num_tokens=9, num_prefix_tokens=1, class_token=True,
                                  embed_dim=8, num_heads=2)
    xs = rng.normal(size=(2, 9, 8)).astype(np.float32)
    stats = {k: np.asarray(v) for k, v in st.items()}
    for name, kw in [("tome", dict(r=3)), ("evit", dict(keep_rate=0.5, layers=(0,))),
                     ("topk", dict(keep_rate=0.5, layers=(0,), score="key_mass", fuse=True)),
                     ("token_learner", dict(layers=(0,), num_tokens=3))]:
        red = reducers.get(name)(**kw)
        spec = red.schedule(layout)[0]
        module = red.make_module(layout, spec, rngs=nnx.Rngs(0)) if red.learned else None
        y_np = red.reduce(layout, spec, xs, np.ones((2, 9, 1), np.float32), stats,
                          module=module)[0]
        y_jnp = red.reduce(layout, spec, jnp.asarray(xs), jnp.ones((2, 9, 1)),
                           {k: jnp.asarray(v) for k, v in stats.items()}, module=module)[0]
        np.testing.assert_allclose(y_np, y_jnp, rtol=1e-6, err_msg=name)
    with pytest.raises(TypeError, match="x must be an array"):
        merge.merge(plan, {"not": "an array"})
    with pytest.raises(TypeError, match="scores must be an array"):
        prune.topk(np.array([["a", "b"]]), 1)


def test_nonfinite_loss_stops_training_before_any_save(data_dir, tmp_path, monkeypatch):
    """A gradient norm that turns NaN at step 26 (the train step poisoned from there on):
    training stops with TrainingDiverged naming the step, no checkpoint from step 26 on is
    written (checkpoints every 10 steps: 10 and 20 stay, 30 never comes), and the message names
    the checkpoint a rerun resumes from."""
    from jax_tokens.train import loop
    real = loop.make_train_step

    def poisoned(*args, **kwargs):
        fn = real(*args, **kwargs)

        def step(state, rest, batch):
            new_state, metrics = fn(state, rest, batch)
            bad = state.step >= 25                        # the 26th step and later
            return new_state, dict(metrics, grad_norm=jnp.where(bad, jnp.nan,
                                                                metrics["grad_norm"]))
        return step

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    overrides = {**TINY, "data.data_dir": data_dir, "train.total_steps": 40,
                 "checkpoint.every_steps": 10, "checkpoint.keep": 5, "train.log_every": 7}
    workdir = tmp_path / "diverged"
    with pytest.raises(guard.TrainingDiverged, match=r"grad_norm is nan at step 26; nothing "
                       r"from that step on was saved \(the newest checkpoint, step 20"):
        trainer.train(trainer.load_config(BASE_CONFIG, overrides), str(workdir),
                      log=lambda s: None)
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps == [10, 20], steps
    assert not (workdir / "results.json").exists()


def test_exploding_learning_rate_is_a_one_line_error(data_dir, tmp_path):
    """A learning rate of 1e30 really diverges: train.py prints one error line naming the
    step and the remedy, exits 1 and leaves no checkpoint of non-finite parameters."""
    overrides = {**TINY, "data.data_dir": data_dir, "train.total_steps": 30,
                 "train.lr": 1e30, "checkpoint.every_steps": 10}
    workdir = tmp_path / "exploded"
    out = subprocess.run(_cli(overrides, workdir), cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "training diverged" in errors[0] and "Lower config.train.lr (now 1e+30)" in errors[0]
    bad_step = int(errors[0].split(" at step ")[1].split(";")[0])
    ckpts = workdir / "checkpoints"
    saved = [int(s) for s in os.listdir(ckpts) if s.isdigit()] if ckpts.exists() else []
    assert all(s < bad_step for s in saved), (saved, bad_step)
