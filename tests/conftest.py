"""Shared test fixtures: the golden files from the reference implementations, the hypothesis
profiles of the property tests, and the runner of the 8-device worker processes."""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(os.environ.get("JAX_TOKENS_GOLDEN", ROOT.parent / "shared" / "golden"))
IMAGENET_SAMPLES = ROOT.parent / "shared" / "data" / "imagenet_samples"


def load_golden(name: str) -> dict:
    path = GOLDEN / name
    if not path.exists():
        raise FileNotFoundError(
            f"golden file {path} is missing: the tests expect ../shared/golden/ beside the "
            "project (set JAX_TOKENS_GOLDEN to point elsewhere)")
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture
def golden():
    return load_golden


# The property tests' profiles (tests/test_properties.py, tests/test_press_properties.py): a
# case is a configuration (static under jit) with INPUT_DRAWS inputs checked through it. CI: 4
# configurations per method, derandomized; "long" (benchmarks/properties.py): the given count.
settings.register_profile("ci", max_examples=4, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None,
                          max_examples=int(os.environ.get("JAX_TOKENS_HYPOTHESIS_EXAMPLES", 50)),
                          suppress_health_check=[HealthCheck.too_slow])
PROPERTY_PROFILE = os.environ.get("JAX_TOKENS_HYPOTHESIS", "ci")
settings.load_profile(PROPERTY_PROFILE)
INPUT_DRAWS = int(os.environ.get("JAX_TOKENS_HYPOTHESIS_INPUTS",
                                 8 if PROPERTY_PROFILE == "long" else 2))


def log_property_case(method: str, n_inputs: int) -> None:
    """benchmarks/properties.py counts the configurations and the inputs checked."""
    if os.environ.get("JAX_TOKENS_PROPERTY_LOG"):
        with open(os.environ["JAX_TOKENS_PROPERTY_LOG"], "a") as f:
            f.write(f"{method} {n_inputs}\n")


# The suite's programs are small and compiling dominates its runtime, so XLA:CPU compiles
# cheaply (no LLVM optimisation, no fusion emitters): measured on the 2-core VM, the property
# tests take 239 s instead of 374 s and test_train + test_pretrained 60 s instead of 97 s, with
# the same results. Set before any test imports JAX; subprocesses (train.py, the workers)
# inherit it. JAX_TOKENS_TEST_XLA_FLAGS="" compiles with XLA's defaults instead.
CHEAP_COMPILE_XLA_FLAGS = os.environ.get(
    "JAX_TOKENS_TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false")
if CHEAP_COMPILE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):   # once (xdist workers)
    os.environ["XLA_FLAGS"] = " ".join(
        f for f in (os.environ.get("XLA_FLAGS", ""), CHEAP_COMPILE_XLA_FLAGS) if f)

# 8 CPU devices for the multi-device workers, compiled as cheaply.
EIGHT_DEVICE_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")


def run_eight_device_worker(script, report_path, *args, timeout: int = 900) -> dict:
    """Runs `python script --worker REPORT ARGS...` with 8 simulated CPU devices (XLA_FLAGS
    must be set before JAX is imported, so the multi-device checks live in a subprocess) and
    returns its JSON report, plus "wall" (seconds) and "stderr" (the worker's log)."""
    env = dict(os.environ, XLA_FLAGS=EIGHT_DEVICE_XLA_FLAGS, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), "--worker", str(report_path),
                           *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode or not pathlib.Path(report_path).exists():
        pytest.fail(f"the 8-device worker failed (rc {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    data = json.loads(pathlib.Path(report_path).read_text())
    data["wall"], data["stderr"] = time.perf_counter() - t0, proc.stderr
    return data
