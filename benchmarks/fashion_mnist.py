"""Fashion-MNIST: the ViT vs ToMe, EViT, TokenLearner, LookupViT, MCTF, PiToMe, DynamicViT and
Token Cropr, one recipe, several seeds.

    python benchmarks/fashion_mnist.py --train --root /tmp/fm_bench     # train all, 3 seeds
    python benchmarks/fashion_mnist.py --root /tmp/fm_bench             # compare them again
    python benchmarks/fashion_mnist.py --train --names vit,tome --seeds 0,1,2,3,4

`--train` runs `train.py` once per config and seed
(configs/fashion_mnist_{vit,tome,evit,lookup,lookupvit,mctf,pitome,dynamicvit,cropr}.py with
`--config.seed=S`; the seed sets the initialisation, the data order and the augmentation) into
ROOT/<name>/seed<S> (a run that finished is skipped; an interrupted one resumes). The
comparison then loads every run's export in ONE process and prints a markdown table: test top-1
/ top-5 on the 10,000 test images as mean ± standard deviation over the seeds, the gap to the
baseline (the first name) as the mean ± standard deviation of the per-seed differences (seed S
of a model minus seed S of the baseline: the same data order), eval images/s of the compiled
forward pass on one batch (one seed's model per config, all timed side by side in interleaved
rounds, the median round reported, so a load spike on a shared machine hits them alike), the
speed-up over the baseline, GFLOPs per image from XLA's cost analysis, tokens per block and the
mean training wall time. `--json` writes every per-seed number.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ("vit", "tome", "evit", "lookup", "lookupvit", "mctf", "pitome", "dynamicvit", "cropr")
SEEDS = (0, 1, 2)


def run_dir(root: str, name: str, seed: int) -> str:
    return os.path.join(root, name, f"seed{seed}")


def train_all(root: str, names, seeds, extra) -> None:
    for name in names:
        for seed in seeds:
            workdir = run_dir(root, name, seed)
            if os.path.exists(os.path.join(workdir, "results.json")):
                print(f"{name} seed {seed}: already trained in {workdir}", flush=True)
                continue
            os.makedirs(workdir, exist_ok=True)
            cmd = [sys.executable, str(ROOT / "train.py"), "--config",
                   str(ROOT / "configs" / f"fashion_mnist_{name}.py"), "--workdir", workdir,
                   f"--config.seed={seed}", "--config.train.progress=False", *extra]
            print("$ " + " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            with open(os.path.join(root, f"{name}_seed{seed}.log"), "w") as log:
                subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            print(f"{name} seed {seed}: trained in {time.perf_counter() - t0:.0f} s", flush=True)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def compare(root: str, names, seeds, batch_size: int, rounds: int) -> list[dict]:
    from jax_tokens import sharding as shd  # pylint: disable=import-outside-toplevel
    from jax_tokens import train as trainer  # pylint: disable=import-outside-toplevel
    import ml_collections  # pylint: disable=import-outside-toplevel

    mesh, rules = shd.make_mesh(None), shd.rules_from_config(None)
    rows, fns = [], {}
    with shd.use_mesh(mesh, rules):
        loader = batch = None
        for name in names:
            found = [s for s in seeds
                     if os.path.exists(os.path.join(run_dir(root, name, s), "results.json"))]
            if not found:
                raise SystemExit(f"error: no finished run of {name} under {root} for seeds "
                                 f"{list(seeds)}; train them with --train")
            row = {"name": name, "seeds": found, "per_seed": {}}
            for seed in found:
                export = os.path.join(run_dir(root, name, seed), "export")
                cfg, graphdef, params, rest = trainer.load_export(export, mesh, rules)
                if loader is None:
                    with open(os.path.join(export, "train_config.json")) as f:
                        config0 = ml_collections.ConfigDict(json.load(f))
                    loader = trainer.make_eval_loader(
                        config0, trainer.ensure_dataset(config0), batch_size)
                    batch = shd.put_batch(next(iter(loader)), mesh, rules)
                with open(os.path.join(run_dir(root, name, seed), "results.json")) as f:
                    trained = json.load(f)
                step = trainer.jit_eval_step(trainer.make_eval_step(graphdef), mesh,
                                             shd.state_shardings(mesh, params, rules),
                                             shd.state_shardings(mesh, rest, rules), rules)
                compiled = step.lower(params, rest, batch).compile()
                acc = trainer.evaluate(compiled, params, rest, loader, mesh, rules)
                row["per_seed"][seed] = {"top1": acc["top1"], "top5": acc["top5"],
                                         "examples": acc["examples"],
                                         "train_wall_s": trained.get("wall_seconds")}
                if name not in fns:     # speed does not depend on the seed: time one model
                    fns[name] = (compiled, params, rest)
                    gflops = trainer.compiled_gflops(compiled)
                    row.update(method=cfg.reduction.method, tokens=cfg.token_counts(),
                               gflops_xla=None if gflops is None else gflops / batch_size,
                               gflops_estimate=cfg.flops() / 1e9)
                print(f"{name} seed {seed}: top-1 {acc['top1']:.4f} ({acc['examples']} images)",
                      flush=True)
            per = row["per_seed"]
            row["top1"], row["top1_std"] = mean_std([per[s]["top1"] for s in found])
            row["top5"], row["top5_std"] = mean_std([per[s]["top5"] for s in found])
            walls = [per[s]["train_wall_s"] for s in found if per[s]["train_wall_s"]]
            row["train_wall_s"] = float(np.mean(walls)) if walls else None
            rows.append(row)
        # Different parameters per model: time each on its own arguments, interleaved.
        bound = {name: (lambda f=f, p=p, r=r: f(p, r, batch)) for name, (f, p, r) in fns.items()}
        speed = trainer.measure_throughput(bound, (), batch_size=batch_size, rounds=rounds)
    base = rows[0]
    for row in rows:
        row["images_per_s"] = speed[row["name"]]
        row["speedup"] = speed[row["name"]] / speed[base["name"]]
        paired = [s for s in row["seeds"] if s in base["per_seed"]]
        row["gap_seeds"] = paired
        if paired:
            row["gap"], row["gap_std"] = mean_std(
                [row["per_seed"][s]["top1"] - base["per_seed"][s]["top1"] for s in paired])
        else:
            row["gap"] = row["gap_std"] = None
    return rows


def table(rows) -> str:
    lines = ["| model | tokens per block | seeds | top-1 (%) | gap to baseline (pt) | top-5 (%) | "
             "images/s | speed-up | GFLOPs (XLA) | train wall time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gx = "n/a" if r["gflops_xla"] is None else f"{r['gflops_xla']:.4f}"
        wall = "n/a" if r["train_wall_s"] is None else f"{r['train_wall_s']:.0f} s"
        gap = ("n/a" if r["gap"] is None else
               f"{100 * r['gap']:+.2f} ± {100 * r['gap_std']:.2f}")
        lines.append(
            f"| {r['name']} | {' '.join(map(str, r['tokens']))} | {len(r['seeds'])} | "
            f"{100 * r['top1']:.2f} ± {100 * r['top1_std']:.2f} | {gap} | "
            f"{100 * r['top5']:.2f} ± {100 * r['top5_std']:.2f} | {r['images_per_s']:.0f} | "
            f"{r['speedup']:.2f}x | {gx} | {wall} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/fm_bench", help="one workdir per config and seed")
    parser.add_argument("--train", action="store_true", help="train the configs first")
    parser.add_argument("--names", default=",".join(NAMES),
                        help="configs; the first is the baseline of the gap and speed-up")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", default=None)
    args, extra = parser.parse_known_args(argv)
    names = [n for n in args.names.split(",") if n]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r} must be comma-separated ints >= 0")
    if not seeds or min(seeds) < 0:
        parser.error(f"--seeds={args.seeds!r} must be comma-separated ints >= 0")
    os.makedirs(args.root, exist_ok=True)
    if args.train:
        train_all(args.root, names, seeds, extra)
    rows = compare(args.root, names, seeds, args.batch_size, args.rounds)
    import jax  # pylint: disable=import-outside-toplevel
    print(f"\nFashion-MNIST test set (10,000 images); {jax.default_backend()}, "
          f"{os.cpu_count()} CPU cores; mean ± standard deviation over seeds "
          f"{','.join(map(str, seeds))}; images/s: compiled eval step (forward + top-k) on one "
          f"batch of {args.batch_size}, median of {args.rounds} interleaved rounds\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "time": time.time()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
