"""Shared test fixtures: the golden files from the reference implementations."""

import os
import pathlib

import numpy as np
import pytest

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
