"""Bad input gets a clear error: config files, CLI flags and workdirs, images, weight files
(safetensors, ONNX), and the counted table of every bad input in docs/bad_inputs.md (each row
names the test that checks it; this file checks that those tests exist)."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens.models import convert, onnx_import
from jax_tokens.models.lookupvit import LookupViT, LookupViTConfig
from jax_tokens.models.vit import ViTConfig, VisionTransformer
from jax_tokens.train import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "bad_inputs.md"
VIT = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=16, depth=1,
                num_heads=2)


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_error_line(out, code, text):
    assert out.returncode == code, (out.returncode, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert text in lines[0], lines[0]


# -- config files ---------------------------------------------------------------------------

def test_config_files_that_cannot_load_name_the_problem(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return {}['model']\n")
    with pytest.raises(schema.ConfigError,
                       match=r"get_config\(\) in .*broken.py' failed: KeyError: 'model' \(line 2\)"):
        schema.load_config(str(broken))
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(:\n")
    with pytest.raises(schema.ConfigError, match=r"syntax.py' failed to load: SyntaxError"):
        schema.load_config(str(syntax))
    text = tmp_path / "notes.txt"
    text.write_text("model = vit\n")
    with pytest.raises(schema.ConfigError, match="is not a Python file"):
        schema.load_config(str(text))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(schema.ConfigError, match="has no get_config"):
        schema.load_config(str(empty))


def test_config_values_name_the_problem():
    cfg = str(ROOT / "configs" / "fashion_mnist_vit.py")
    with pytest.raises(schema.ConfigError, match="'/nope.py' does not exist"):
        schema.load_config("/nope.py")
    with pytest.raises(schema.ConfigError,
                       match=r"reduction.method='bogus' is not one of the registered reducers "
                             r"\('atc', 'ats'"):
        schema.load_config(cfg, {"model.reduction.method": "bogus"})


def test_error_line_joins_a_multi_line_message():
    assert schema.error_line("differences:\n  a: 1 -> 2\n  b: 3 -> 4\nUse a new --workdir.") == \
        "error: differences: a: 1 -> 2; b: 3 -> 4; Use a new --workdir."
    long = "missing keys:\n" + "\n".join(f"  k{i}" for i in range(30)) + "\nfix it"
    line = schema.error_line(long, max_items=5)
    assert line == "error: missing keys: k0; k1; k2; k3; ... (26 more); fix it"


# -- the CLIs: one error line, nothing written --------------------------------------------------

def test_train_cli_flags_and_workdirs(tmp_path):
    cfg = str(ROOT / "configs" / "fashion_mnist_vit.py")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _one_error_line(_run("train.py", "--config", cfg), 2, "--workdir is required")
    _one_error_line(_run("train.py", "--config", cfg, "--workdir", str(a_file)), 2,
                    f"--workdir={a_file} is a file, not a directory")
    _one_error_line(_run("train.py", "--config", cfg, "--workdir", str(tmp_path / "w"), "oops"),
                    2, "unexpected arguments ['oops']")
    _one_error_line(_run("train.py", "--config", str(a_file), "--workdir", str(tmp_path / "w")),
                    2, "is not a Python file")
    assert not (tmp_path / "w").exists()


def test_eval_cli_bad_weight_files(tmp_path):
    cfg = str(ROOT / "configs" / "fashion_mnist_vit.py")
    truncated = tmp_path / "model.safetensors"
    model = VisionTransformer(VIT, rngs=nnx.Rngs(0))
    convert.save_safetensors(model, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    _one_error_line(_run("eval.py", "--checkpoint", str(truncated), "--config", cfg,
                         f"--config.data.data_dir={tmp_path / 'no_data'}"), 1,
                    "model.safetensors is not a readable safetensors file")
    assert not (tmp_path / "no_data").exists()          # reported before any data is read
    _one_error_line(_run("eval.py", "--checkpoint", str(tmp_path), "stray"), 1,
                    "unexpected arguments ['stray']")
    _one_error_line(_run("eval.py", "--checkpoint", str(tmp_path / "checkpoints" / "15")), 1,
                    "checkpoints/15 does not exist")


# -- images ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model_fn", [
    lambda: VisionTransformer(VIT, rngs=nnx.Rngs(0)),
    lambda: LookupViT(LookupViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                                      embed_dim=16, depth=1, num_heads=2, lookup_grid=(2, 2)),
                      rngs=nnx.Rngs(0)),
], ids=["vit", "lookupvit"])
def test_bad_images_name_the_problem(model_fn):
    model = model_fn()
    good = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
    model(good)                                               # fine
    with pytest.raises(ValueError, match=r"shape \[batch, 28, 28, 1\] \(NHWC\); got \(2, 1, 28, 28\)"):
        model(good.transpose(0, 3, 1, 2))
    with pytest.raises(TypeError, match="dtype uint8.*jax_tokens.images.normalize"):
        model(np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match=r"\|x\| = 255: they look like raw pixel values"):
        model(np.full((2, 28, 28, 1), 255.0, np.float32))
    bad = good.copy()
    bad[1, 3, 4, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(bad)
    # Under jit the values are not looked at (no host sync): only shape and dtype.
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.full((2, 28, 28, 1), 255.0))
    logits = logits[0] if isinstance(logits, tuple) else logits
    assert logits.shape == (2, 10)
    with pytest.raises(TypeError, match="dtype int32"):
        nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, 28, 28, 1), jnp.int32))


# -- weight files ---------------------------------------------------------------------------

def test_bad_safetensors_files(tmp_path):
    from safetensors.numpy import save_file
    model = VisionTransformer(VIT, rngs=nnx.Rngs(0))
    path = tmp_path / "model.safetensors"
    convert.save_safetensors(model, path)
    data = path.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("garbage", b"\xff" * 64)):
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.safetensors is not a readable "
                                             "safetensors file"):
            convert.read_safetensors(bad)
    tensors = convert.read_safetensors(path)
    tensors["head.weight"] = tensors["head.weight"].astype(np.int32)
    del tensors["norm.bias"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError) as e:
        convert.load_safetensors(tmp_path / "wrong.safetensors", VIT)
    msg = str(e.value)
    assert "non-float tensors:\n  head.weight: int32" in msg
    assert "missing keys:\n  norm.bias" in msg and "unexpected keys:\n  extra.weight" in msg


def test_bad_onnx_files(tmp_path):
    pytest.importorskip("onnx")
    import onnx
    from onnx import TensorProto, helper
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x0a\xff\xff\xff\xff not a protobuf")
    with pytest.raises(ValueError, match="corrupt.onnx is not a readable ONNX model"):
        onnx_import.from_onnx(corrupt)
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        onnx_import.from_onnx(tmp_path / "missing.onnx")
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [weight])
    onnx.save(helper.make_model(graph), str(tmp_path / "mlp.onnx"))
    with pytest.raises(ValueError, match="not a Hugging Face ViT / DINOv2"):
        onnx_import.from_onnx(tmp_path / "mlp.onnx")


# -- the counted table ------------------------------------------------------------------------

def _defined_tests() -> dict[str, set[str]]:
    out = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        out[path.name] = {n.name for n in tree.body
                          if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return out


def test_bad_input_table_is_counted_and_names_real_tests():
    text = TABLE.read_text()
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| # ") and "---" not in line]
    numbers = [int(line.split("|")[1]) for line in rows]
    assert numbers == list(range(1, len(rows) + 1)), "rows are numbered 1..N in order"
    count = re.search(r"(\d+) bad inputs", text)
    assert count and int(count.group(1)) == len(rows), "the stated count matches the rows"
    defined = _defined_tests()
    for line in rows:
        refs = re.findall(r"`(test_\w+\.py)::(test_\w+)`", line)
        assert refs, f"row names no test: {line}"
        for file, name in refs:
            assert name in defined.get(file, set()), f"{file}::{name} does not exist ({line})"
