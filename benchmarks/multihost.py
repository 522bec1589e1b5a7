"""N real JAX processes (gloo collectives, a localhost coordinator) against one process with the
same devices, on train.py's code path: the multi-host rehearsal to run before a pod job.

    python benchmarks/multihost.py                         # 4 processes x 1 device vs 1 x 4
    python benchmarks/multihost.py --processes 2 --devices-per-process 2 --method evit

Prints, per run, wall seconds and the final loss, and the largest difference of the losses
and of the parameters + AdamW state between the two runs (the tests require <= 1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jax_tokens import checkpoint  # noqa: E402
from jax_tokens import data as data_lib  # noqa: E402
from jax_tokens.train import launch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"tome": ("fashion_mnist_tome.py", ["--config.model.reduction.r=2",
                                               "--config.budget_warmup.fraction=0"]),
           "evit": ("fashion_mnist_evit.py", ["--config.model.reduction.layers=[1]"]),
           "none": ("fashion_mnist_vit.py", [])}


def _state(workdir, step):
    return checkpoint.read_state_arrays(os.path.join(workdir, "checkpoints"), step)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--devices-per-process", type=int, default=1)
    ap.add_argument("--method", choices=sorted(CONFIGS), default="tome")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    args = ap.parse_args(argv)
    n, d = args.processes, args.devices_per_process
    if args.batch % (n * d):
        ap.error(f"--batch {args.batch} must divide by the {n * d} devices")
    root = args.workdir or tempfile.mkdtemp(prefix="multihost_")
    data_dir = os.path.join(root, "data")
    data_lib.prepare("fashion_mnist", data_dir, max_examples_per_split=1024)
    config, extra = CONFIGS[args.method]
    common = ["--config", os.path.join(ROOT, "configs", config),
              "--config.model.patch_size=7", "--config.model.embed_dim=64",
              "--config.model.depth=2", "--config.model.num_heads=2",
              f"--config.train.batch_size={args.batch}", f"--config.train.total_steps={args.steps}",
              "--config.train.warmup_steps=5", "--config.train.log_every=5",
              "--config.train.progress=False", "--config.data.num_threads=1",
              f"--config.checkpoint.every_steps={args.steps}",
              f"--config.data.data_dir={data_dir}", *extra]
    runs = {}
    for label, procs, devs in ((f"{n} processes x {d} device(s)", n, d),
                               (f"1 process x {n * d} devices", 1, n * d)):
        work = os.path.join(root, f"p{procs}")
        results = launch.launch_local(procs, [os.path.join(ROOT, "train.py"), *common,
                                              "--workdir", work],
                                      log_dir=os.path.join(root, f"logs_p{procs}"),
                                      devices_per_process=devs, timeout_s=1800)
        print(launch.describe(results))
        if any(r.returncode != 0 for r in results):
            print(f"error: the run with {label} failed; see the logs above", file=sys.stderr)
            return 1
        runs[label] = (work, max(r.seconds for r in results))
    (multi, t_multi), (single, t_single) = runs.values()
    lm, ls = _losses(multi), _losses(single)
    sm, ss = _state(multi, args.steps), _state(single, args.steps)
    loss_diff = max(abs(lm[k] - ls[k]) for k in ls)
    state_diff = max(float(np.abs(sm[k].astype(np.float64) - ss[k]).max()) for k in ss
                     if ss[k].size)
    print("\n| run | wall s (incl. start-up and compile) | final loss |\n|---|---|---|")
    for label, (work, t) in runs.items():
        losses = _losses(work)
        print(f"| {label} | {t:.1f} | {losses[max(losses)]:.6f} |")
    print(f"\nmax |loss difference| {loss_diff:.3g}; max |parameter / AdamW state difference| "
          f"{state_diff:.3g} ({'equal within 1e-6' if max(loss_diff, state_diff) <= 1e-6 else 'DIFFERENT'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
