"""Fashion-MNIST: the ViT vs ToMe, EViT, TokenLearner, LookupViT, MCTF, PiToMe, DynamicViT and
Token Cropr, one recipe.

    python benchmarks/fashion_mnist.py --train --root /tmp/fm_bench     # train all nine, then
    python benchmarks/fashion_mnist.py --root /tmp/fm_bench             # compare them again

`--train` runs `train.py` once per config
(configs/fashion_mnist_{vit,tome,evit,lookup,lookupvit,mctf,pitome,dynamicvit,cropr}.py) into ROOT/<name> (a run
that finished is skipped; an interrupted one resumes). The comparison then
loads every run's export in ONE process and prints a markdown table: test top-1 / top-5 on the
10,000 test images, eval images/s of the compiled forward pass on one batch (all models
timed side by side in interleaved rounds, the median round reported, so a load spike on a shared
machine hits them alike), the speed-up over the baseline, GFLOPs per image from XLA's cost
analysis, tokens per block and the training wall time.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMES = ("vit", "tome", "evit", "lookup", "lookupvit", "mctf", "pitome", "dynamicvit", "cropr")


def train_all(root: str, names, extra) -> None:
    for name in names:
        workdir = os.path.join(root, name)
        if os.path.exists(os.path.join(workdir, "results.json")):
            print(f"{name}: already trained in {workdir}", flush=True)
            continue
        cmd = [sys.executable, str(ROOT / "train.py"), "--config",
               str(ROOT / "configs" / f"fashion_mnist_{name}.py"), "--workdir", workdir,
               "--config.train.progress=False", *extra]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        with open(os.path.join(root, f"{name}.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)


def compare(root: str, names, batch_size: int, rounds: int) -> list[dict]:
    from jax_tokens import sharding as shd  # pylint: disable=import-outside-toplevel
    from jax_tokens import train as trainer  # pylint: disable=import-outside-toplevel
    import ml_collections  # pylint: disable=import-outside-toplevel

    mesh, rules = shd.make_mesh(None), shd.rules_from_config(None)
    rows, fns, models = [], {}, {}
    with shd.use_mesh(mesh, rules):
        for name in names:
            export = os.path.join(root, name, "export")
            cfg, graphdef, params, rest = trainer.load_export(export, mesh, rules)
            with open(os.path.join(export, "train_config.json")) as f:
                config = ml_collections.ConfigDict(json.load(f))
            with open(os.path.join(root, name, "results.json")) as f:
                trained = json.load(f)
            models[name] = (cfg, graphdef, params, rest, config, trained)
        config0 = models[names[0]][4]
        data_dir = trainer.ensure_dataset(config0)
        loader = trainer.make_eval_loader(config0, data_dir, batch_size)
        first = next(iter(loader))
        batch = shd.put_batch(first, mesh, rules)
        for name in names:
            cfg, graphdef, params, rest, config, trained = models[name]
            step = trainer.jit_eval_step(trainer.make_eval_step(graphdef), mesh,
                                         shd.state_shardings(mesh, params, rules),
                                         shd.state_shardings(mesh, rest, rules), rules)
            compiled = step.lower(params, rest, batch).compile()
            fns[name] = (compiled, params, rest)
            acc = trainer.evaluate(compiled, params, rest, loader, mesh, rules)
            gflops = trainer.compiled_gflops(compiled)
            rows.append({"name": name, "method": cfg.reduction.method,
                         "tokens": cfg.token_counts(), "top1": acc["top1"], "top5": acc["top5"],
                         "examples": acc["examples"],
                         "gflops_xla": None if gflops is None else gflops / batch_size,
                         "gflops_estimate": cfg.flops() / 1e9,
                         "train_wall_s": trained.get("wall_seconds"),
                         "train_s": trained.get("train_seconds")})
            print(f"{name}: top-1 {acc['top1']:.4f} ({acc['examples']} images)", flush=True)
        # Different parameters per model: time each on its own arguments, interleaved.
        bound = {name: (lambda f=f, p=p, r=r: f(p, r, batch)) for name, (f, p, r) in fns.items()}
        speed = trainer.measure_throughput(bound, (), batch_size=batch_size, rounds=rounds)
    base = speed[names[0]]
    for row in rows:
        row["images_per_s"] = speed[row["name"]]
        row["speedup"] = speed[row["name"]] / base
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/fm_bench", help="one workdir per config")
    parser.add_argument("--train", action="store_true", help="train the configs first")
    parser.add_argument("--names", default=",".join(NAMES))
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", default=None)
    args, extra = parser.parse_known_args(argv)
    names = [n for n in args.names.split(",") if n]
    os.makedirs(args.root, exist_ok=True)
    if args.train:
        train_all(args.root, names, extra)
    rows = compare(args.root, names, args.batch_size, args.rounds)
    import jax  # pylint: disable=import-outside-toplevel
    print(f"\nFashion-MNIST test set (10,000 images); {jax.default_backend()}, "
          f"{os.cpu_count()} CPU cores; images/s: compiled eval step (forward + top-k) on one "
          f"batch of {args.batch_size}, median of {args.rounds} interleaved rounds\n")
    print("| model | tokens per block | top-1 | top-5 | images/s | speed-up | GFLOPs (XLA) | "
          "train wall time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gx = "n/a" if r["gflops_xla"] is None else f"{r['gflops_xla']:.4f}"
        wall = "n/a" if r["train_wall_s"] is None else f"{r['train_wall_s']:.0f} s"
        print(f"| {r['name']} | {' '.join(map(str, r['tokens']))} | {100 * r['top1']:.2f} | "
              f"{100 * r['top5']:.2f} | {r['images_per_s']:.0f} | {r['speedup']:.2f}x | {gx} | "
              f"{wall} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "time": time.time()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
