"""Train-step time and memory per device for each sharding preset, with and without reduction.

Runs on a simulated 8-device CPU mesh by default (XLA_FLAGS=--xla_force_host_platform_device_count
is set here before JAX is imported, unless you set XLA_FLAGS yourself): that checks that every
preset compiles and shows what it does to memory and collectives, but CPU "devices" share the
host's cores, so the step times say nothing about speed on real accelerators.

    python benchmarks/scaling.py                         # markdown table on stdout
    python benchmarks/scaling.py --runs 7 --batch 32 --json results.json

Per (preset, reducer): the median of --runs timed steps (configs interleaved, one step of each
per round, so a load change hits all of them alike), the compiled step's memory per device
(`compiled.memory_analysis()`: arguments = this device's parameters, optimizer state and batch
shard; temporaries = activations and gradients), the collectives in its HLO, and the step time
relative to the unreduced model on the same mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jax_tokens import distributed  # noqa: E402
from jax_tokens import sharding as shd  # noqa: E402
from jax_tokens.models.vit import ViTConfig, VisionTransformer  # noqa: E402
from jax_tokens.reducers.evit import EViT  # noqa: E402
from jax_tokens.reducers.identity import NoReduction  # noqa: E402
from jax_tokens.reducers.token_learner import TokenLearner  # noqa: E402
from jax_tokens.reducers.tome import ToMe  # noqa: E402

PRESETS = {  # name -> (mesh sizes, preset)
    "dp": ({"data": 8, "fsdp": 1, "tensor": 1}, "dp"),
    "fsdp": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    "fsdp_tp": ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
}
REDUCERS = {
    "none": NoReduction(),
    "tome r=8": ToMe(r=8, clamp_r=True),
    "evit 0.5@1+3 fused": EViT(keep_rate=0.5, layers=(1, 3)),
    "lookup M=16@1": TokenLearner(layers=(1,), num_tokens=16),
}


def mib(n) -> float:
    return float(n) / 2 ** 20


def build(cfg: ViTConfig, mesh, rules, batch, tx):
    """Parameters and optimizer state created sharded, the compiled train step, its stats."""
    def init():
        _, params, rest = nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        return params, rest

    graphdef = nnx.split(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))),
                         nnx.Param, ...)[0]

    def step(params, opt_state, rest, b):
        def loss_fn(p):
            logits, _ = nnx.merge(graphdef, p, rest)(b["image"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with shd.use_mesh(mesh, rules):
        abstract = jax.eval_shape(init)
        p_sh, r_sh = shd.state_shardings(mesh, abstract, rules)
        params, rest = jax.jit(init, out_shardings=(p_sh, r_sh))()
        o_sh = shd.state_shardings(mesh, jax.eval_shape(tx.init, abstract[0]), rules)
        opt = jax.jit(tx.init, out_shardings=o_sh)(params)
        b = shd.put_batch(batch, mesh, rules)
        t0 = time.perf_counter()
        compiled = jax.jit(step, in_shardings=(p_sh, o_sh, r_sh, shd.batch_sharding(mesh, rules)),
                           out_shardings=(p_sh, o_sh, shd.replicated(mesh)),
                           donate_argnums=(0, 1)).lower(params, opt, rest, b).compile()
        compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    counts = distributed.collective_counts(compiled.as_text())
    state_bytes = sum(s.data.nbytes for a in jax.tree.leaves((params, opt))
                      for s in a.addressable_shards[:1])
    return {"compiled": compiled, "state": [params, opt], "rest": rest, "batch": b,
            "mesh": mesh, "rules": rules, "compile_s": compile_s,
            "args_mib": mib(mem.argument_size_in_bytes), "temp_mib": mib(mem.temp_size_in_bytes),
            "out_mib": mib(mem.output_size_in_bytes), "alias_mib": mib(mem.alias_size_in_bytes),
            "state_mib": mib(state_bytes), "collectives": counts}


def run_once(e) -> float:
    with shd.use_mesh(e["mesh"], e["rules"]):
        t0 = time.perf_counter()
        params, opt, loss = e["compiled"](*e["state"], e["rest"], e["batch"])
        jax.block_until_ready(loss)
        dt = time.perf_counter() - t0
    e["state"] = [params, opt]
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="timed steps per config (>= 5)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--reducers", default=",".join(REDUCERS))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.runs < 5:
        ap.error("--runs must be >= 5")
    n_dev = len(jax.devices())
    if n_dev != 8:
        print(f"note: {n_dev} devices (the presets assume 8)", file=sys.stderr)

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(args.batch, args.img, args.img, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=(args.batch,)).astype(np.int32)}
    tx = optax.adamw(1e-3, weight_decay=0.05)
    entries = {}
    for pname in args.presets.split(","):
        sizes, preset = PRESETS[pname]
        mesh, rules = shd.make_mesh(sizes), shd.axis_rules(preset)
        shd.check_batch_size(mesh, args.batch, rules)
        for rname in args.reducers.split(","):
            cfg = ViTConfig(img_size=args.img, patch_size=args.patch, in_chans=3, num_classes=10,
                            embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                            reduction=REDUCERS[rname])
            print(f"compiling {pname} / {rname} ...", file=sys.stderr, flush=True)
            e = build(cfg, mesh, rules, batch, tx)
            e["tokens"] = cfg.token_counts()
            e["gflops"] = cfg.flops() * args.batch / 1e9
            run_once(e)                                           # warm-up
            e["times"] = []
            entries[(pname, rname)] = e
    for _ in range(args.runs):                                    # interleaved rounds
        for e in entries.values():
            e["times"].append(run_once(e))

    print(f"\nTrain step (fwd + bwd + AdamW) of a ViT {args.dim}-dim x {args.depth} blocks, "
          f"{args.heads} heads, {args.img}px / patch {args.patch} "
          f"({(args.img // args.patch) ** 2 + 1} tokens), global batch {args.batch}, on "
          f"{n_dev} simulated CPU devices ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}); median of {args.runs} steps. "
          "CPU devices share the host's cores: correct, not fast; compare within a column only.\n")
    print("| preset | mesh (data x fsdp x tensor) | reduction | tokens per block | step ms | "
          "vs none | params+opt MiB/device | args MiB/device | temp MiB/device | "
          "all-gather | all-reduce | reduce-scatter | all-to-all | coll.-permute |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for (pname, rname), e in entries.items():
        med = statistics.median(e["times"]) * 1e3
        base = statistics.median(entries[(pname, "none")]["times"]) * 1e3 \
            if (pname, "none") in entries else float("nan")
        sizes = PRESETS[pname][0]
        c = e["collectives"]
        toks = e["tokens"]
        tok_s = f"{toks[0]}→{toks[-1]}" if toks[0] != toks[-1] else f"{toks[0]}"
        print(f"| {pname} | {sizes['data']}x{sizes['fsdp']}x{sizes['tensor']} | {rname} | "
              f"{tok_s} | {med:.1f} | {med / base:.2f} | {e['state_mib']:.2f} | "
              f"{e['args_mib']:.2f} | {e['temp_mib']:.2f} | {c['all-gather']} | "
              f"{c['all-reduce']} | {c['reduce-scatter']} | {c['all-to-all']} | "
              f"{c['collective-permute']} |")
        results.append({"preset": pname, "mesh": sizes, "reduction": rname, "tokens": toks,
                        "step_ms_median": med, "step_ms_all": [t * 1e3 for t in e["times"]],
                        "ratio_vs_none": med / base, "params_opt_mib_per_device": e["state_mib"],
                        "args_mib_per_device": e["args_mib"],
                        "temp_mib_per_device": e["temp_mib"], "collectives": c,
                        "compile_s": e["compile_s"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": n_dev, "backend": jax.default_backend(), "args": vars(args),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
