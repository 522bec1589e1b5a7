"""eval.py on a tiny model trained on a slice of real Fashion-MNIST: accuracy, throughput,
XLA GFLOPs, tokens per block, the --sweep table and --visualize PNGs."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from jax_tokens import data as data_lib
from jax_tokens import train as trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = str(ROOT / "configs" / "fashion_mnist_vit.py")
TINY = {
    "model.patch_size": 7, "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
    "model.mlp_ratio": 2.0, "train.batch_size": 32, "train.total_steps": 40, "train.lr": 3e-3,
    "train.warmup_steps": 5, "train.log_every": 10, "train.progress": False,
    "data.num_threads": 1, "eval.batch_size": 128, "checkpoint.every_steps": 20,
    # EViT at block 1, so that keep_rate sweeps have layers to prune.
    "model.reduction.method": "evit", "model.reduction.layers": (1,),
    "model.reduction.keep_rate": 0.5, "model.reduction.fuse": True,
    # Keep rate 1.0 for the first half of training, then 0.5 (two compiled train steps).
    "budget_warmup.fraction": 0.5, "budget_warmup.levels": 1,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("data"))
    data_lib.prepare("fashion_mnist", data_dir, max_examples_per_split=256)
    workdir = str(tmp_path_factory.mktemp("run"))
    config = trainer.load_config(BASE_CONFIG, {**TINY, "data.data_dir": data_dir})
    logs = []
    result = trainer.train(config, workdir, log=logs.append)
    assert any(l.startswith("budget warm-up: step 0: [17, 17, 17], step 20: [17, 17, 10]")
               for l in logs), logs
    assert "step 20: budget warm-up -> tokens per block [17, 17, 10]" in logs
    return workdir, result


def _table(stdout: str) -> list[list[str]]:
    lines = [l for l in stdout.splitlines() if l.startswith("| ") and not l.startswith("| budget")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def test_cli_sweep_prints_table_and_visualizes(run, tmp_path):
    workdir, _ = run
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    out_json = tmp_path / "sweep.json"
    vis_dir = tmp_path / "vis"
    proc = subprocess.run(
        [sys.executable, "eval.py", "--workdir", workdir, "--sweep", "tome:r=0,2,4",
         "--rounds", "2",
         "--visualize", "2", "--visualize_dir", str(vis_dir), "--json", str(out_json)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| budget | tokens per block | top-1 | top-5 | images/s | speed-up | GFLOPs (XLA) |" \
        in out
    rows = _table(out)
    assert [r[0] for r in rows] == ["r=0", "r=2", "r=4"]
    assert [r[1] for r in rows] == ["17 17 17", "17 15 13", "17 13 9"]
    assert rows[0][5] == "1.00x"
    xla = [float(r[6]) for r in rows]
    assert xla[0] > xla[1] > xla[2] > 0          # fewer tokens, fewer FLOPs (XLA's count)
    for r in rows:
        assert 0 <= float(r[2]) <= 100 and float(r[4]) > 0
    saved = json.loads(out_json.read_text())
    assert [r["tokens"] for r in saved["rows"]] == [[17, 17, 17], [17, 15, 13], [17, 13, 9]]
    assert sorted(os.listdir(vis_dir)) == ["image_000.png", "image_001.png"]


@pytest.fixture(scope="module")
def eval_cli():
    """eval.py imported in this process (its absl flags defined once)."""
    spec = importlib.util.spec_from_file_location("jax_tokens_eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def call(*argv):
        flags.FLAGS.unparse_flags()
        argv, overrides = trainer.split_override_flags(["eval.py", *argv])
        module._OVERRIDES = overrides       # what eval.py's __main__ takes out of argv
        flags.FLAGS(argv)
        return module.main(["eval.py"])
    return call


def test_export_eval_keep_rate_sweep(run, eval_cli, capsys):
    workdir, result = run
    assert eval_cli("--checkpoint", os.path.join(workdir, "export"), "--rounds", "1",
                    "--sweep", "keep_rate=1.0,0.5,0.25") == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert [r[0] for r in rows] == ["keep_rate=1", "keep_rate=0.5", "keep_rate=0.25"]
    assert [r[1] for r in rows] == ["17 17 17", "17 17 10", "17 17 6"]
    # The trained budget (keep_rate 0.5) reproduces the accuracy train.py measured.
    assert float(rows[1][2]) == pytest.approx(100 * result["top1"], abs=0.006)


def test_single_eval_and_errors(run, eval_cli, capsys, tmp_path):
    workdir, result = run
    assert eval_cli("--workdir", workdir, "--rounds", "1") == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert len(rows) == 1 and rows[0][1] == "17 17 10"
    assert float(rows[0][2]) == pytest.approx(100 * result["top1"], abs=0.006)
    assert float(rows[0][6]) > 0
    assert eval_cli("--workdir", str(tmp_path)) == 1
    assert "no committed checkpoint" in capsys.readouterr().err
    assert eval_cli("--workdir", workdir, "--sweep", "num_tokens=4") == 1
    err = capsys.readouterr().err
    assert "--sweep key 'num_tokens' is not a field of reducer 'evit'" in err
    assert "keep_rate, layers, fuse" in err


def test_padded_token_arrays_give_the_trained_accuracy(run, eval_cli, capsys):
    """--config.model.token_multiple=8 on a model trained without it: 17 and 10 tokens carried
    in 24 and 16 rows, the same accuracy (and more FLOPs by XLA's count), from the export and
    from the workdir."""
    workdir, result = run
    with open(os.path.join(workdir, "config.json")) as f:
        data_dir = json.load(f)["data"]["data_dir"]
    overrides = [f"--config.{k}={v!r}" for k, v in {**TINY, "data.data_dir": data_dir}.items()]
    gflops = []
    for multiple in (1, 8):
        for source in (("--checkpoint", os.path.join(workdir, "export")),
                       ("--workdir", workdir)):
            assert eval_cli(*source, "--rounds", "1", "--config", BASE_CONFIG, *overrides,
                            f"--config.model.token_multiple={multiple}") == 0
            rows = _table(capsys.readouterr().out)
            assert rows[0][1] == "17 17 10"
            assert float(rows[0][2]) == pytest.approx(100 * result["top1"], abs=0.006)
            gflops.append(float(rows[0][6]))
    assert gflops[2] > gflops[0] and gflops[3] > gflops[1]     # the padding rows are computed
