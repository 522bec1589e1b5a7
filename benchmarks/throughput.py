"""Throughput of ViT-S/16 and ViT-B/16 at 224 with and without token reduction.

Prints, per model and reducer: images/s (median of --runs timed calls), the speedup over the
unreduced model measured in the same run, the FLOP ratio (our estimate and XLA's cost
analysis), and compile seconds. Configurations are timed in interleaved rounds (every config
once per round) so that load changes on a shared machine hit all of them alike.

    python benchmarks/throughput.py                     # CPU: batch 16, both models
    python benchmarks/throughput.py --models vit_b --batch 64 --runs 10   # on a GPU
    python benchmarks/throughput.py --models vit_b --reducers none,tome16 --token-multiples 1,8

`--token-multiples 1,8` times every reducer twice: as is, and with its token arrays rounded up
to multiples of 8 (`ViTConfig.token_multiple`, the padding masked); the "padding" column is each
configuration's speed over the same reducer at the first multiple given (1: unpadded), measured
in the same rounds.

Targets (checked and printed, not asserted): ViT-B/16 with r=16 is at least as much faster
as its FLOP ratio predicts, and compiling with reduction takes at most 1.5x the unreduced
compile time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from jax_tokens import reducers  # noqa: E402
from jax_tokens.models import VisionTransformer, ViTConfig  # noqa: E402
from jax_tokens.reducers.evit import EViT  # noqa: E402
from jax_tokens.reducers.identity import NoReduction  # noqa: E402
from jax_tokens.reducers.token_learner import TokenLearner  # noqa: E402
from jax_tokens.reducers.tome import ToMe  # noqa: E402

# DiffRate with ToMe r=16's token counts: no pruning, 16 merged per block (11 left at the end).
_KEPT = tuple(197 - 16 * (i + 1) for i in range(11)) + (11,)

REDUCERS = {  # id -> (description, reducer)
    "none": ("none", NoReduction()),
    "tome8": ("ToMe r=8", ToMe(r=8, clamp_r=True)),
    "tome13": ("ToMe r=13", ToMe(r=13, clamp_r=True)),
    "tome16": ("ToMe r=16", ToMe(r=16, clamp_r=True)),
    "evit": ("EViT keep 0.7 @ blocks 3,6,9 (fused)", EViT(keep_rate=0.7, layers=(3, 6, 9))),
    "lookup": ("TokenLearner M=49 after block 3", TokenLearner(layers=(3,), num_tokens=49)),
    # The merging family, each at about half the FLOPs of ViT-B/16 (FLOP ratio column).
    "mctf": ("MCTF r=16 @ blocks 1-11 (one-step-ahead)", reducers.get("mctf")(
        r=16, layers=tuple(range(1, 12)))),
    "pitome": ("PiToMe ratio 0.88 per block", reducers.get("pitome")(ratio=0.88)),
    "diffrate": ("DiffRate merge 16 per block", reducers.get("diffrate")(
        prune_kept=(197,) + _KEPT[:-1], merge_kept=_KEPT)),
    "atc": ("ATC average, keep 0.5 @ blocks 3,6,9", reducers.get("atc")(
        layers=(3, 6, 9), keep_rate=0.5, linkage="average")),
    "kmedoids": ("K-Medoids keep 0.5 @ blocks 3,6,9", reducers.get("kmedoids")(
        layers=(3, 6, 9), keep_rate=0.5)),
    "dpcknn": ("DPC-KNN keep 0.5 @ blocks 3,6,9 (learned weights)", reducers.get("dpcknn")(
        layers=(3, 6, 9), keep_rate=0.5)),
    "tofu": ("ToFu r=16 (prune blocks 0-2, MLERP after)", reducers.get("tofu")(
        r=16, prune_layers=3, clamp_r=True)),
    "ppt": ("PPT r=16 every block", reducers.get("ppt")(r=16, layers=tuple(range(12)),
                                                        clamp_r=True)),
    # Pruning and token selection, each at about half the FLOPs of ViT-B/16.
    "dynamicvit": ("DynamicViT keep 0.5, 0.25, 0.125 before blocks 3,6,9", reducers.get(
        "dynamicvit")(layers=(3, 6, 9), keep_ratio=(0.5, 0.25, 0.125))),
    "cropr": ("Token Cropr rate 19 per block, LLF", reducers.get("cropr")(rate=19)),
    "ats": ("ATS K = 0.5 of the slots @ blocks 3,6,9", reducers.get("ats")(
        layers=(3, 6, 9), num_tokens=0.5)),
    "fastervlm": ("FasterVLM keep 64 @ block 3", reducers.get("fastervlm")(
        keep=64, layers=(3,), place="mid")),
    "visionzip": ("VisionZip keep 64 @ block 3", reducers.get("visionzip")(
        keep=64, layers=(3,), place="mid")),
    "divprune": ("DivPrune keep 64 @ block 3", reducers.get("divprune")(
        keep=64, layers=(3,), place="mid")),
    "prumerge": ("PruMerge keep 64 (+1) @ block 3", reducers.get("prumerge")(
        keep=64, layers=(3,), place="mid")),
}


def build(cfg: ViTConfig, batch: int):
    """Random weights (initialised under one jit) and the compiled forward."""
    model = nnx.jit(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    images = jax.random.normal(jax.random.key(0), (batch, cfg.img_size, cfg.img_size, 3))
    t0 = time.perf_counter()
    compiled = fwd.lower(state, images).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, state, images, compile_s, float(cost.get("flops", float("nan")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit_s,vit_b")
    ap.add_argument("--reducers", default=",".join(REDUCERS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attn-impl", default="auto",
                    help="attention implementation (auto, xla, pallas_gpu, pallas_tpu); "
                         "auto = the Pallas kernels on GPU/TPU, XLA on CPU")
    ap.add_argument("--token-multiples", default="1",
                    help="comma-separated ViTConfig.token_multiple values to time each "
                         "reducer at (1: unpadded)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.batch < 1:
        ap.error(f"--runs and --batch must be >= 1 (got {args.runs}, {args.batch})")
    try:
        multiples = [int(m) for m in args.token_multiples.split(",")]
    except ValueError:
        multiples = [0]
    if min(multiples) < 1:
        ap.error(f"--token-multiples={args.token_multiples!r} must be positive ints, e.g. 1,8")
    unknown = [r for r in args.reducers.split(",") if r not in REDUCERS]
    if unknown:
        ap.error(f"unknown reducers {unknown}; choose from {list(REDUCERS)}")
    presets = {"vit_s": ViTConfig.vit_small, "vit_b": ViTConfig.vit_base}
    device = jax.devices()[0]
    print(f"# device: {device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; jax {jax.__version__}; "
          f"batch {args.batch}; {args.dtype}; attention {args.attn_impl}; "
          f"token multiples {multiples}; median of {args.runs} runs")
    results = []
    for mname in args.models.split(","):
        if mname not in presets:
            ap.error(f"unknown model {mname!r}; choose from {list(presets)}")
        names = [(r, m) for r in args.reducers.split(",") for m in multiples]
        built = {}
        for name in names:
            cfg = presets[mname](img_size=args.img, dtype=args.dtype, attn_impl=args.attn_impl,
                                 reduction=REDUCERS[name[0]][1], token_multiple=name[1])
            built[name] = (cfg,) + build(cfg, args.batch)
            jax.block_until_ready(built[name][1](built[name][2], built[name][3]))  # warm-up
        times = {name: [] for name in names}
        for _ in range(args.runs):
            for name in names:
                _, compiled, state, images, _, _ = built[name]
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(state, images))
                times[name].append(time.perf_counter() - t0)
        base = names[0]
        base_cfg, base_t = built[base][0], statistics.median(times[base])
        print(f"\n## {mname} ({base_cfg.num_tokens} tokens)\n")
        print("| reducer | token multiple | tokens in last block | images/s | speedup | padding "
              "| FLOP ratio (est) | FLOP ratio (XLA) | GFLOPs/img (XLA) | compile s "
              "| compile ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            cfg, _, _, _, compile_s, xla_flops = built[name]
            t = statistics.median(times[name])
            t_unpadded = statistics.median(times[name[0], multiples[0]])
            row = dict(model=mname, reducer=name[0], token_multiple=name[1],
                       padding_speedup=t_unpadded / t, tokens_last=cfg.token_counts()[-2],
                       images_per_s=args.batch / t, speedup=base_t / t,
                       flop_ratio_est=cfg.flops() / base_cfg.flops(),
                       flop_ratio_xla=xla_flops / built[base][5],
                       gflops_xla=xla_flops / args.batch / 1e9,
                       compile_s=compile_s, compile_ratio=compile_s / built[base][4],
                       runs=times[name])
            results.append(row)
            print(f"| {REDUCERS[name[0]][0]} | {name[1]} | {row['tokens_last']} | "
                  f"{row['images_per_s']:.2f} | {row['speedup']:.2f}x | "
                  f"{row['padding_speedup']:.2f}x | {row['flop_ratio_est']:.3f} | "
                  f"{row['flop_ratio_xla']:.3f} | {row['gflops_xla']:.2f} | {compile_s:.1f} | "
                  f"{row['compile_ratio']:.2f}x |")
    if jax.default_backend() != "cpu":
        print("\nnote: XLA's cost analysis on GPU/TPU leaves out library calls (cuBLAS GEMMs, "
              "Pallas kernels), so the (XLA) FLOP columns undercount there; the target below "
              "uses the estimate.")
    for row in results:
        if row["model"] == "vit_b" and row["reducer"] == "tome16" and \
                row["token_multiple"] == multiples[0]:
            predicted = 1 / row["flop_ratio_est"]
            print(f"\ntarget: ViT-B/16 r=16 speedup {row['speedup']:.2f}x vs FLOP-predicted "
                  f"{predicted:.2f}x -> {'MET' if row['speedup'] >= predicted else 'NOT MET'}")
            print(f"target: compile ratio {row['compile_ratio']:.2f}x <= 1.5x -> "
                  f"{'MET' if row['compile_ratio'] <= 1.5 else 'NOT MET'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
