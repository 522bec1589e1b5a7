"""Multi-host training for real: 2 JAX processes on this machine (a localhost coordinator, gloo
collectives between them, 2 CPU devices each) run train.py's code path on Fashion-MNIST and
must equal one process with the same 4 devices.

The batches are checked example by example in tests/test_data.py (two shards of every global
batch are exactly one process's batch); here the whole job is: losses, parameters and AdamW
state, the collective checkpoint, resuming it with 2 processes and with 1 (another mesh), and a
lost process stopping the others within a bounded time with the lost process named.
"""

import json
import os
import pathlib
import shutil
import signal
import time

import numpy as np
import pytest

from jax_tokens import data as data_lib
from jax_tokens.train import launch

# One xdist worker runs this module, so the module-scoped runs happen once.
ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 16, 8
TINY = ["--config.model.patch_size=7", "--config.model.embed_dim=32", "--config.model.depth=2",
        "--config.model.num_heads=2", "--config.model.mlp_ratio=2.0",
        "--config.train.batch_size=32", "--config.train.warmup_steps=4",
        "--config.train.log_every=4", "--config.train.progress=False",
        "--config.data.num_threads=1", "--config.eval.batch_size=128",
        "--config.eval.at_end=False",
        f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=2"]
CONFIGS = {"tome": "fashion_mnist_tome.py", "evit": "fashion_mnist_evit.py"}
REDUCTION = {"tome": ["--config.model.reduction.r=2", "--config.budget_warmup.fraction=0"],
             "evit": ["--config.model.reduction.layers=[1]"]}
# The bar: fp32 results within 1e-6 of one process (measured: bitwise equal).
LOSS_TOL = PARAM_TOL = 1e-6


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    data_lib.prepare("fashion_mnist", str(d), max_examples_per_split=256)
    return str(d)


def _argv(method, data_dir, workdir, steps=STEPS):
    return [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / CONFIGS[method]),
            "--workdir", str(workdir), *TINY, *REDUCTION[method],
            f"--config.train.total_steps={steps}", f"--config.data.data_dir={data_dir}"]


def _run(n, argv, log_dir, **kw):
    results = launch.launch_local(n, argv, log_dir=str(log_dir), devices_per_process=4 // n,
                                  timeout_s=300, **kw)
    return results


def _ok(results):
    assert all(r.returncode == 0 for r in results), launch.describe(results)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _state(workdir, step):
    """Parameters and optimizer state of a checkpoint, read by one process (as a user
    inspecting a pod's checkpoint would)."""
    from jax_tokens import checkpoint as ckpt_lib
    return ckpt_lib.read_state_arrays(os.path.join(workdir, "checkpoints"), step)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a if a[k].size)


@pytest.fixture(scope="session")
def runs(data_dir, tmp_path_factory):
    """{method: (2-process workdir, 1-process workdir)} trained to STEPS."""
    out = {}
    for method in CONFIGS:
        two = tmp_path_factory.mktemp(f"{method}_2proc")
        one = tmp_path_factory.mktemp(f"{method}_1proc")
        _ok(_run(2, _argv(method, data_dir, two / "w"), two / "logs"))
        _ok(_run(1, _argv(method, data_dir, one / "w"), one / "logs"))
        out[method] = (str(two / "w"), str(one / "w"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_two_processes_equal_one(runs, method):
    two, one = runs[method]
    l2, l1 = _losses(two), _losses(one)
    assert sorted(l2) == sorted(l1) == list(range(4, STEPS + 1, 4))
    for step in l1:
        assert abs(l2[step] - l1[step]) <= LOSS_TOL, (step, l2[step], l1[step])
    s2, s1 = _state(two, STEPS), _state(one, STEPS)
    assert any("opt_state" in k or "mu" in k for k in s1), list(s1)[:5]
    assert _max_diff(s2, s1) <= PARAM_TOL
    # One checkpoint per save step, written collectively (no per-process copies), and an
    # export that one process reads.
    steps = sorted(int(s) for s in os.listdir(os.path.join(two, "checkpoints")) if s.isdigit())
    assert steps == [STEPS - EVERY, STEPS]
    from jax_tokens.train import export
    export.verify_manifest(os.path.join(two, "export"))


@pytest.mark.slow
def test_resume_with_two_processes_and_with_one(runs, data_dir, tmp_path):
    """The 2-process checkpoint at step EVERY, resumed by 2 processes and by 1 process (a
    4-device mesh in one process), reaches the uninterrupted run's final state."""
    two, _ = runs["tome"]
    final = _state(two, STEPS)
    for n in (2, 1):
        w = tmp_path / f"resume{n}"
        shutil.copytree(two, w)
        shutil.rmtree(w / "checkpoints" / str(STEPS))
        shutil.rmtree(w / "export")
        results = _run(n, _argv("tome", data_dir, w), tmp_path / f"logs{n}")
        _ok(results)
        assert f"at step {EVERY}" in results[0].output(), results[0].output()
        assert _max_diff(_state(str(w), STEPS), final) <= PARAM_TOL


@pytest.mark.slow
def test_a_lost_process_stops_the_others_and_keeps_the_checkpoint(data_dir, tmp_path):
    work = tmp_path / "w"

    def kill_process_1_after_a_checkpoint(procs):
        ckpt = work / "checkpoints" / str(EVERY)
        deadline = time.monotonic() + 240
        while not (ckpt / "commit_success.txt").exists() and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                return
            time.sleep(0.2)
        os.killpg(procs[1].pid, signal.SIGKILL)

    t0 = time.monotonic()
    results = _run(2, _argv("tome", data_dir, work, steps=100000), tmp_path / "logs",
                   heartbeat_s=5, on_start=kill_process_1_after_a_checkpoint)
    assert results[1].returncode == -signal.SIGKILL, launch.describe(results)
    # Process 0 stopped by itself (not killed at the deadline), soon, naming task 1.
    assert results[0].returncode not in (0, None), launch.describe(results)
    assert results[0].seconds - results[1].seconds < 60, launch.describe(results)
    assert "unhealthy" in results[0].output() and "\n1\n" in results[0].output(), \
        results[0].output()[-3000:]
    assert time.monotonic() - t0 < 300
    # The last committed checkpoint is intact: it restores (state and data iterator state).
    last = max(int(s) for s in os.listdir(work / "checkpoints") if s.isdigit()
               and (work / "checkpoints" / s / "commit_success.txt").exists())
    state = _state(str(work), last)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
    assert os.listdir(work / "checkpoints" / str(last) / "data")


def test_data_position_from_another_process_count(runs, tmp_path):
    """One process continues a 2-process checkpoint's data position (every process saved the
    same one); positions that differ cannot be mapped and say how to resume."""
    from jax_tokens import checkpoint as ckpt_lib
    two, _ = runs["tome"]
    w = tmp_path / "w"
    shutil.copytree(os.path.join(two, "checkpoints"), w)
    ck = ckpt_lib.Checkpointer(str(w), every=EVERY, keep=2)
    try:
        assert ck._data_state_from_other_topology(EVERY) == {"next_index": EVERY}
        other = w / str(EVERY) / "data" / "process_1-of-2.json"
        other.write_text(json.dumps({"next_index": EVERY + 1}))
        with pytest.raises(ckpt_lib.CheckpointError, match="resume it with 2 processes"):
            ck._data_state_from_other_topology(EVERY)
    finally:
        ck.close(quiet=True)
