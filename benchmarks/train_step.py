"""Training-step speed and model FLOPs utilisation (MFU) of train.py's own step, on one device.

ViT-S/16 or ViT-B/16 at 224 (random weights, random images), AdamW with clipping as train.py
builds it (`jax_tokens.train.make_train_step`), for each reducer and token multiple given,
timed side by side in interleaved rounds (median of --runs steps after a compiling one).

    python benchmarks/train_step.py                              # CPU: ViT-S, batch 8
    python benchmarks/train_step.py --model vit_b --batch 256 --dtype bfloat16 --runs 10

MFU = model FLOPs per second / the device's peak. Model FLOPs per step are 3x the forward
estimate (`ViTConfig.flops()`: the blocks' matmuls on the schedule's token counts plus the
reducer's own work; backward = 2x forward) times the batch; padding rows, recomputation and
the optimizer are not counted, as is usual for MFU. The peak comes from --peak-tflops, else
from the device kind (H100 / H200: 989 TFLOP/s dense bf16); without one, MFU is not printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jax_tokens import train as trainer  # noqa: E402
from jax_tokens.models import ViTConfig  # noqa: E402
from jax_tokens.reducers.identity import NoReduction  # noqa: E402
from jax_tokens.reducers.tome import ToMe  # noqa: E402

REDUCERS = {"none": NoReduction(), "tome16": ToMe(r=16, clamp_r=True),
            "tome8": ToMe(r=8, clamp_r=True)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}   # dense, per device


def peak_tflops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)


def build(cfg: ViTConfig, batch: int, seed: int = 0):
    """(compiled step, state, rest, batch) for train.py's step on this model config."""
    config = trainer.default_config()
    config.train.lr, config.train.warmup_steps = 1e-3, 10
    tx, schedule = trainer.make_optimizer(config, 1000, 100)
    mesh, rules = trainer.make_mesh_and_rules(config)
    graphdef, state, rest, _ = trainer.init_model(cfg, seed, mesh, rules, tx=tx)
    step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, num_classes=cfg.num_classes),
                   donate_argnums=0)
    rng = np.random.default_rng(seed)
    data = {"image": rng.normal(size=(batch, cfg.img_size, cfg.img_size, 3)).astype(np.float32),
            "label": rng.integers(0, cfg.num_classes, size=(batch,)).astype(np.int32)}
    data = jax.device_put(data)
    t0 = time.perf_counter()
    compiled = step.lower(state, rest, data).compile()
    return compiled, state, rest, data, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_s", choices=("vit_s", "vit_b"))
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--attn-impl", default="auto")
    ap.add_argument("--reducers", default="none,tome16")
    ap.add_argument("--token-multiples", default="1")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for MFU (default: by device kind)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.batch < 1:
        ap.error("--runs and --batch must be >= 1")
    unknown = [r for r in args.reducers.split(",") if r not in REDUCERS]
    if unknown:
        ap.error(f"unknown reducers {unknown}; choose from {list(REDUCERS)}")
    try:
        multiples = [int(m) for m in args.token_multiples.split(",")]
    except ValueError:
        multiples = [0]
    if min(multiples) < 1:
        ap.error(f"--token-multiples={args.token_multiples!r} must be positive ints, e.g. 1,8")
    preset = {"vit_s": ViTConfig.vit_small, "vit_b": ViTConfig.vit_base}[args.model]
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or peak_tflops(kind)
    print(f"# {kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; jax {jax.__version__}; {args.model} at "
          f"{args.img}, batch {args.batch}, {args.dtype}, attention {args.attn_impl}; train.py's "
          f"step (AdamW); median of {args.runs} steps; peak "
          f"{'unknown' if peak is None else f'{peak:g} TFLOP/s'}\n")
    names = [(r, m) for r in args.reducers.split(",") for m in multiples]
    built = {}
    for name in names:
        cfg = preset(img_size=args.img, dtype=args.dtype, attn_impl=args.attn_impl,
                     reduction=REDUCERS[name[0]], token_multiple=name[1])
        compiled, state, rest, data, compile_s = build(cfg, args.batch)
        state, _ = compiled(state, rest, data)                 # warm-up
        jax.block_until_ready(state)
        built[name] = [cfg, compiled, state, rest, data, compile_s]
    times = {name: [] for name in names}
    for _ in range(args.runs):
        for name in names:
            entry = built[name]
            t0 = time.perf_counter()
            entry[2], metrics = entry[1](entry[2], entry[3], entry[4])
            jax.block_until_ready(metrics)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    print("| reducer | token multiple | step ms | images/s | speedup | model TFLOP/s | MFU "
          "| compile s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        cfg, *_, compile_s = built[name]
        t = statistics.median(times[name])
        tflops = 3 * cfg.replace(token_multiple=1).flops() * args.batch / t / 1e12
        mfu = "—" if peak is None else f"{100 * tflops / peak:.1f}%"
        print(f"| {name[0]} | {name[1]} | {1e3 * t:.1f} | {args.batch / t:.1f} | "
              f"{base / t:.2f}x | {tflops:.3f} | {mfu} | {compile_s:.1f} |")


if __name__ == "__main__":
    main()
