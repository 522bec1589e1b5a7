"""Measurements the trainer and eval.py share: accuracy over an eval split, GFLOPs from XLA's
cost analysis, and images/s of several compiled functions timed side by side."""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from jax_tokens import sharding as shd

__all__ = ["evaluate", "compiled_gflops", "measure_throughput"]


def evaluate(eval_step: Callable, params, rest, loader, mesh, rules=None, *,
             max_examples: int | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy and loss over one pass of an EvalLoader (padding masked out)."""
    sums: dict[str, float] = {}
    pending = []
    seen = 0
    t0 = time.perf_counter()
    for batch in loader:
        if max_examples is not None and seen >= max_examples:
            break
        if max_examples is not None:
            keep = np.arange(len(batch["mask"])) < max_examples - seen
            batch = dict(batch, mask=batch["mask"] & keep)
        seen += int(batch["mask"].sum())
        pending.append(eval_step(params, rest, shd.put_batch(batch, mesh, rules)))
    for out in jax.device_get(pending):
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    dt = time.perf_counter() - t0
    n = max(sums.get("count", 0.0), 1.0)
    return {"top1": sums.get("top1", 0.0) / n, "top5": sums.get("top5", 0.0) / n,
            "loss": sums.get("loss", 0.0) / n, "examples": int(sums.get("count", 0)),
            "seconds": dt}


def compiled_gflops(compiled) -> float | None:
    """GFLOPs of one call of a compiled executable (`jax.jit(f).lower(...).compile()`), from
    XLA's cost analysis (None if the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"]) / 1e9


def measure_throughput(fns: Mapping[str, Callable], args: Sequence, *, batch_size: int,
                       rounds: int = 5, min_seconds: float = 0.3) -> dict[str, float]:
    """Images/s of several compiled functions on the same inputs, measured side by side.

    Each function is warmed up, then timed in `rounds` interleaved rounds (each round times
    enough calls to last about `min_seconds`); the median round is reported, so a load spike on
    a shared machine hits every function alike.
    """
    calls = {}
    for name, f in fns.items():
        jax.block_until_ready(f(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        dt = max(time.perf_counter() - t0, 1e-6)
        calls[name] = max(1, int(math.ceil(min_seconds / dt)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                out = f(*args)
            jax.block_until_ready(out)
            samples[name].append(calls[name] * batch_size / (time.perf_counter() - t0))
    return {name: float(np.median(v)) for name, v in samples.items()}
