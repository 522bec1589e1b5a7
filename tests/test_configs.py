"""Config files, the schema, overrides and budget checks (no training)."""

import os
import pathlib
import subprocess
import sys

import pytest

from jax_tokens import train as trainer
from jax_tokens import reducers
from jax_tokens.reducers.evit import EViT

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _cfg(name: str) -> str:
    return str(CONFIGS / name)


@pytest.mark.parametrize("name", ["fashion_mnist_vit.py", "fashion_mnist_tome.py",
                                  "fashion_mnist_evit.py", "fashion_mnist_lookup.py",
                                  "fashion_mnist_mctf.py", "fashion_mnist_pitome.py",
                                  "imagenet_deit_s.py", "imagenet_deit_s.py:tome",
                                  "imagenet_deit_s.py:evit", "imagenet_deit_s.py:lookup",
                                  "imagenet_deit_b.py", "imagenet_deit_b.py:tome",
                                  "imagenet_deit_b.py:evit"])
def test_config_files_load_and_convert(name):
    config = trainer.load_config(_cfg(name))
    cfg = trainer.vit_config(config)
    expected = {"pitome": "pitome", "mctf": "mctf", "tome": "tome", "evit": "evit",
                "lookup": "token_learner"}      # "pitome" before its substring "tome"
    method = next((v for k, v in expected.items() if k in name), "none")
    assert cfg.reduction.method == method
    if name.startswith("fashion_mnist"):
        assert (cfg.img_size, cfg.patch_size, cfg.num_tokens) == (28, 4, 50)
    else:
        assert cfg.num_tokens == 197
        assert cfg.embed_dim == (768 if "deit_b" in name else 384)
    counts = cfg.token_counts()
    assert counts[0] == cfg.num_tokens
    if method != "none":
        assert counts[-1] < cfg.num_tokens


def test_unknown_imagenet_argument():
    with pytest.raises(trainer.ConfigError, match="not one of"):
        trainer.load_config(_cfg("imagenet_deit_s.py:foo"))


def test_overrides_and_unknown_keys_list_valid_ones():
    config = trainer.load_config(_cfg("fashion_mnist_tome.py"), {"model.reduction.r": 6})
    assert trainer.vit_config(config).reduction.r == 6
    with pytest.raises(trainer.ConfigError) as e:
        trainer.load_config(_cfg("fashion_mnist_evit.py"), {"model.reduction.rr": 3})
    msg = str(e.value)
    assert "config.model.reduction.rr" in msg and "keep_rate" in msg and "layers" in msg
    assert "registered reducers: " + ", ".join(reducers.names()) in msg
    # ToMe's field on an EViT config: an error naming EViT's fields, not a silent new key.
    with pytest.raises(trainer.ConfigError, match=r"reduction.r'.*valid keys there: method, "
                                                  r"keep_rate, layers, fuse"):
        trainer.load_config(_cfg("fashion_mnist_evit.py"), {"model.reduction.r": 3})
    with pytest.raises(trainer.ConfigError, match="valid keys there: .*model.*train"):
        trainer.load_config(_cfg("fashion_mnist_vit.py"), {"trian.lr": 1.0})


def test_unknown_key_in_a_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from jax_tokens.train.schema import default_config\n"
                    "def get_config(arg=None):\n"
                    "    c = default_config()\n"
                    "    c.train.unlock()\n"
                    "    c.train.learning_rate = 1.0\n"
                    "    return c\n")
    with pytest.raises(trainer.ConfigError, match=r"config.train.learning_rate.*valid keys"):
        trainer.load_config(str(path))


def test_override_flags_are_parsed_and_checked():
    rest, overrides = trainer.split_override_flags(
        ["--config", "c.py", "--config.train.lr=0.1", "--config.model.reduction.layers=(1, 2)",
         "--config.data.data_dir=/tmp/d", "--noconfig.train.progress",
         "--config.model.reduction.method", "tome", "--config.train.augment=true",
         "--workdir", "x"])
    assert rest == ["--config", "c.py", "--workdir", "x"]
    assert overrides == {"train.lr": 0.1, "model.reduction.layers": (1, 2),
                         "data.data_dir": "/tmp/d", "train.progress": False,
                         "model.reduction.method": "tome", "train.augment": True}
    trainer.load_config(_cfg("fashion_mnist_vit.py"), {"train.lr": 0.1})
    with pytest.raises(trainer.ConfigError, match="valid keys there"):
        trainer.load_config(_cfg("fashion_mnist_vit.py"), {"model.depthh": 3})
    with pytest.raises(trainer.ConfigError, match=r"config.train.lr='fast' has the wrong type"):
        trainer.load_config(_cfg("fashion_mnist_vit.py"), {"train.lr": "fast"})


@pytest.mark.parametrize("overrides,pattern", [
    ({"model.reduction.method": "tome", "model.reduction.r": 30},
     r"block 0 to merge r=30 tokens, but only 50 tokens enter it"),
    ({"model.reduction.method": "tome", "model.reduction.r": (10, 10, 10, 12)},
     r"block 3 to merge r=12 tokens, but only 20 tokens enter it"),
    ({"model.reduction.method": "token_learner", "model.reduction.layers": (2,),
      "model.reduction.num_tokens": 49}, r"num_tokens=49 at block 2"),
    ({"model.reduction.method": "topk", "model.reduction.layers": (1, 7)},
     r"contains 7, but the model has 4 blocks"),
    ({"model.reduction.method": "topk", "model.reduction.layers": (1, 2),
      "model.reduction.keep_rate": (0.5, 1.5)}, r"layer 2"),
])
def test_budgets_exceeding_tokens_name_the_layer(overrides, pattern):
    config = trainer.load_config(_cfg("fashion_mnist_vit.py"), overrides)
    with pytest.raises(trainer.ConfigError, match=pattern):
        trainer.vit_config(config)


def test_tome_clamp_r_allows_tome_semantics():
    config = trainer.load_config(_cfg("fashion_mnist_vit.py"), {
        "model.reduction.method": "tome", "model.reduction.r": 16,
        "model.reduction.clamp_r": True})
    assert trainer.vit_config(config).token_counts() == [50, 34, 18, 10, 6]


def test_budget_phases_evit_cosine_levels():
    config = trainer.load_config(_cfg("fashion_mnist_evit.py"))
    cfg = trainer.vit_config(config)
    phases = trainer.budget_phases(config, cfg, 1000)
    assert [p.start for p in phases] == [0, 133, 266, 400]
    assert [p.reduction.keep_rate for p in phases] == pytest.approx([1.0, 0.875, 0.625, 0.5])
    assert cfg.token_counts(phases[0].reduction) == [50] * 5
    assert phases[-1].reduction == cfg.reduction
    assert trainer.phase_at(phases, 0) == 0 and trainer.phase_at(phases, 399) == 2
    assert trainer.phase_at(phases, 400) == 3 and trainer.phase_at(phases, 999) == 3


def test_budget_phases_tome_linear_and_off():
    config = trainer.load_config(_cfg("fashion_mnist_tome.py"), {
        "budget_warmup.fraction": 0.5, "budget_warmup.levels": 2,
        "budget_warmup.shape": "linear", "budget_warmup.start_fraction": 0.1})
    cfg = trainer.vit_config(config)
    phases = trainer.budget_phases(config, cfg, 100)
    assert [(p.start, p.reduction.r) for p in phases] == [(0, (0, 0, 0, 0)), (35, (6, 6, 6, 6)),
                                                         (60, 12)]
    off = trainer.load_config(_cfg("fashion_mnist_tome.py"), {"budget_warmup.fraction": 0.0})
    assert trainer.budget_phases(off, cfg, 100) == [trainer.Phase(0, cfg.reduction)]
    # the config's default: r linear from 0 over the first half, 4 levels
    default = trainer.load_config(_cfg("fashion_mnist_tome.py"))
    assert [(p.start, p.reduction.r) for p in trainer.budget_phases(default, cfg, 100)] == [
        (0, (0, 0, 0, 0)), (12, (3, 3, 3, 3)), (25, (6, 6, 6, 6)), (37, (9, 9, 9, 9)), (50, 12)]


def test_config_diff_ignores_runtime_keys():
    a = trainer.load_config(_cfg("fashion_mnist_vit.py"))
    b = trainer.load_config(_cfg("fashion_mnist_vit.py"), {
        "model.embed_dim": 96, "data.data_dir": "/elsewhere", "checkpoint.keep": 5})
    assert trainer.config_diff(a, b) == ["model.embed_dim: 64 -> 96"]
    assert trainer.config_diff(trainer.config_to_dict(a), a) == []


def test_reduction_config_conversion():
    config = trainer.load_config(_cfg("fashion_mnist_evit.py"))
    red = trainer.reducer_from_config(config.model.reduction)
    assert red == EViT(keep_rate=0.5, layers=(1,), fuse=True)
    assert reducers.from_config(red.to_dict()) == red


def test_switching_the_method_keeps_shared_fields():
    config = trainer.load_config(_cfg("fashion_mnist_evit.py"), {
        "model.reduction.method": "topk", "model.reduction.score": "l2_norm"})
    red = trainer.vit_config(config).reduction
    assert red == reducers.get("topk")(keep_rate=0.5, layers=(1,), fuse=True, score="l2_norm")
    config = trainer.load_config(_cfg("fashion_mnist_evit.py"), {
        "model.reduction.method": "tome", "model.reduction.r": 4})
    assert dict(config.model.reduction) == {"method": "tome", "r": 4}
    with pytest.raises(trainer.ConfigError, match="'merge' is not one of the registered"):
        trainer.load_config(_cfg("fashion_mnist_vit.py"), {"model.reduction.method": "merge"})


def test_configs_written_before_the_registry_are_upgraded():
    legacy = {"method": "prune", "r": 0, "prop_attn": True, "keep_rate": 0.5, "layers": [1],
              "score": "cls_attn", "order": "score", "fuse": True, "num_tokens": 8,
              "clamp_r": False}
    assert reducers.from_config(reducers.upgrade_legacy(legacy)) == reducers.get("topk")(
        keep_rate=0.5, layers=(1,), fuse=True)
    old = trainer.config_to_dict(trainer.load_config(_cfg("fashion_mnist_evit.py")))
    new = trainer.load_config(_cfg("fashion_mnist_evit.py"), {"model.reduction.method": "topk"})
    old["model"]["reduction"] = legacy
    assert trainer.config_diff(old, new) == []     # a legacy checkpoint resumes
    # An export's config.json of that time.
    from jax_tokens import models
    cfg = models.config_from_dict({"img_size": 28, "patch_size": 4, "in_chans": 1,
                                   "num_classes": 10, "embed_dim": 64, "depth": 4,
                                   "num_heads": 4, "reduction": legacy})
    assert cfg.reduction == reducers.get("topk")(keep_rate=0.5, layers=(1,), fuse=True)
    assert models.config_from_dict(models.config_to_dict(cfg)) == cfg
    legacy_tome = dict(legacy, method="tome", r=12, clamp_r=True)
    assert reducers.upgrade_legacy(legacy_tome) == {"method": "tome", "r": 12,
                                                    "prop_attn": True, "clamp_r": True}


def _run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_unknown_key_and_budget_errors(tmp_path):
    out = _run_cli("train.py", "--config", _cfg("fashion_mnist_vit.py"), "--workdir",
                   str(tmp_path / "w"), "--config.model.reduction.rr=3")
    assert out.returncode == 2, out.stderr
    assert "unknown config key 'config.model.reduction.rr'" in out.stderr
    library = sorted(n for n in reducers.names()
                     if reducers.get(n).__module__.startswith("jax_tokens."))
    assert "registered reducers: " + ", ".join(library) in out.stderr, out.stderr
    # Without --config (train.py's default file) the key is checked before the flag is defined,
    # which is when ml_collections would otherwise fail on it with a bare AttributeError.
    out = _run_cli("train.py", "--workdir", str(tmp_path / "w"), "--config.model.dpeth=3")
    assert out.returncode == 2, out.stderr
    assert "unknown config key 'config.model.dpeth'" in out.stderr
    assert "Traceback" not in out.stderr
    # Budget errors come before the data is looked at (the data dir does not exist) and before
    # anything is written to the workdir.
    out = _run_cli("train.py", "--config", _cfg("fashion_mnist_vit.py"), "--workdir",
                   str(tmp_path / "w"), "--config.model.reduction.method=tome",
                   "--config.model.reduction.r=30",
                   f"--config.data.data_dir={tmp_path / 'no_data'}")
    assert out.returncode == 1, out.stderr
    assert "block 0 to merge r=30" in out.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "no_data").exists()
