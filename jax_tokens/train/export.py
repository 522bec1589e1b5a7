"""Exports for inference: parameters + the model config, readable without the trainer's state.

An export `<dir>/` holds `config.json` (the model config, its reducer as {"method": ...}),
`params/` (Orbax, the parameters only), `train_config.json` (the run's config, which eval.py
reads), for ViTs `model.safetensors` (timm's names,
`jax_tokens.models.convert.save_safetensors`), and `manifest.json`: the jax_tokens version and
the sha256 of every other file, which `load_export` verifies (naming a file that is missing or
changed). Exports on remote storage (`gs://`) carry no manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import jax_tokens
import jax
import orbax.checkpoint as ocp
from flax import nnx

from jax_tokens import models
from jax_tokens import sharding as shd
from jax_tokens.checkpoint import CheckpointError
from jax_tokens.train.state import init_model

__all__ = ["export", "load_export", "read_export_config", "verify_manifest"]

MANIFEST = "manifest.json"


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def export(directory: str | os.PathLike, graphdef, params, rest, cfg, *,
           train_config: Mapping | None = None) -> str:
    """Writes config.json, params/ (Orbax), model.safetensors (ViTs: timm names) and, if
    given, train_config.json to `directory`.

    Every process must call it (the Orbax save is collective); process 0 writes the other
    files (the safetensors file needs the parameters on that host: single-host runs).
    """
    from jax_tokens.models import convert  # pylint: disable=import-outside-toplevel
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()        # every process takes part
    checkpointer.save(os.path.join(directory, "params"), params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() != 0:
        return directory
    model = nnx.merge(graphdef, params, rest)
    if isinstance(model, models.VisionTransformer):
        convert.save_safetensors(model, os.path.join(directory, "model.safetensors"))
    if train_config is not None:
        _write_json_atomic(os.path.join(directory, "train_config.json"), dict(train_config))
    _write_json_atomic(os.path.join(directory, "config.json"), models.config_to_dict(cfg))
    if "://" not in directory:
        _write_json_atomic(os.path.join(directory, MANIFEST),
                           {"jax_tokens_version": jax_tokens.__version__,
                            "files": _hashes(directory)})
    return directory


def _hashes(directory: str) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` but the manifest."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel == MANIFEST or rel.endswith(".tmp"):
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            out[rel] = digest.hexdigest()
    return dict(sorted(out.items()))


def verify_manifest(directory: str | os.PathLike) -> None:
    """CheckpointError naming the first file of an export's manifest that is missing or
    changed. Exports without a manifest (older, or remote) are not checked."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if "://" in directory or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            want = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"the export manifest {path} is unreadable ({e}); re-export the "
                              "run (rerun train.py on its workdir)") from e
    got = _hashes(directory)      # files added later (e.g. eval.py's pictures) are ignored
    for rel in sorted(want):
        if rel not in got:
            problem = "is missing"
        elif got[rel] != want[rel]:
            problem = "does not match its sha256 in the manifest (changed or corrupt)"
        else:
            continue
        raise CheckpointError(f"export {directory}: {rel} {problem}; re-export the run (rerun "
                              "train.py on its workdir) or restore the file")


def read_export_config(directory: str | os.PathLike):
    """The model config of an export (one written before the reducer registry works too)."""
    path = os.path.join(os.fspath(directory), "config.json")
    try:
        with open(path) as f:
            return models.config_from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot read the export config {path}: {e}") from e


def load_export(directory: str | os.PathLike, mesh=None, rules=None):
    """(cfg, graphdef, params, rest) from an export directory written by `export`, placed on
    `mesh` (default: all devices, data parallel) by `rules`."""
    directory = os.path.abspath(os.fspath(directory))
    verify_manifest(directory)
    cfg = read_export_config(directory)
    mesh = shd.make_mesh(None) if mesh is None else mesh
    graphdef, abstract_params, rest, _ = init_model(cfg, 0, mesh, rules, abstract=True)
    if jax.tree.leaves(rest):       # constants such as a sin-cos table are not exported
        _, _, rest, _ = init_model(cfg, 0, mesh, rules)
    checkpointer = ocp.StandardCheckpointer()
    try:
        params = checkpointer.restore(os.path.join(directory, "params"), abstract_params)
    except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f"cannot restore the parameters in {directory}/params: "
                              f"{type(e).__name__}: {e}") from e
    finally:
        checkpointer.close()
    return cfg, graphdef, params, rest
