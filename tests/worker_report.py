"""What the multi-device worker scripts (test_sharding.py, test_llama_sharding.py run with
`--worker` in a subprocess) share: a JSON report written after every section, and tree
comparisons."""

from __future__ import annotations

import json
import time
import traceback

import numpy as np

MESHES = {  # name -> (mesh config, sharding preset): the 8-device layouts both workers check
    "8x1x1": ({"data": 8, "fsdp": 1, "tensor": 1}, "dp"),
    "2x4x1": ({"data": 2, "fsdp": 4, "tensor": 1}, "fsdp"),
    "2x2x2": ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
}


class Report(dict):
    """The worker's findings; `section(name, fn)` stores fn()'s dict (or the traceback of what
    it raised) with its seconds and rewrites the file, so a crash keeps what ran before it."""

    def __init__(self, path: str, **items):
        super().__init__(**items)
        self.path = path

    def save(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self, f, indent=1)

    def section(self, name: str, fn):
        t0 = time.perf_counter()
        try:
            self[name] = fn()
        except Exception:  # pylint: disable=broad-except
            self[name] = {"error": traceback.format_exc()}
        self[name]["seconds"] = round(time.perf_counter() - t0, 1)
        self.save()
        return fn


def flat(tree) -> dict:
    """{key path: host array} of a pytree's leaves."""
    import jax  # pylint: disable=import-outside-toplevel
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def max_diff(a, b) -> float:
    """Largest absolute difference between two pytrees of the same structure."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))
    return max((float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) if fa[k].size else 0.0)
               for k in fa)
