"""Attention + importance statistics: XLA oracle vs Pallas kernels vs jax.nn.dot_product_attention.

    python benchmarks/attention.py                       # all impls, default token counts
    python benchmarks/attention.py --impl xla,pallas --n 197,1025 --grad

Implementations (--impl, comma separated):
  xla     `attention_xla`: materialises the [B, H, N, N] probabilities, plus the statistics;
  pallas  the Pallas kernels for this platform (pallas_gpu on GPU, pallas_tpu on TPU), plus the
          statistics (lse from the forward kernel, key_mass from its kernel, cls_probs);
          pallas_gpu / pallas_tpu name one explicitly;
  dpa     `jax.nn.dot_product_attention` without statistics (implementation=None);
  dpa_cudnn  the same with implementation="cudnn": cuDNN's fused (flash) attention, the
          fused no-statistics floor on NVIDIA GPUs;
  cudnn   `attention(..., impl="cudnn")`: that kernel plus the statistics that need no
          probability matrix (those of --stats in `fused.FUSED_STATS`: lse, cls_probs, ...;
          key_mass is left out), i.e. what ToMe / EViT get on the fused path.

On GPU/TPU it prints, per N, the median time of --runs runs after warm-up and the peak memory
(`memory_stats()["peak_bytes_in_use"]` measured in a fresh subprocess per case, because that
peak cannot be reset; where the device has no memory_stats, the compiled executable's
`memory_analysis()`: arguments + outputs + temporaries), with ratios measured in the same run.

On CPU the kernels can only run in Pallas interpret mode, which proves nothing about their
speed: the script then only checks correctness against the XLA oracle, at small N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_tokens.attention import attention, attention_xla  # noqa: E402
from jax_tokens.attention.fused import FUSED_STATS  # noqa: E402
from jax_tokens.attention.pallas import attention_pallas  # noqa: E402

ACCEL_N = (197, 577, 1025, 2048, 4096, 8192, 16384)
CPU_N = (65, 197, 577)
MiB = 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="xla,pallas,dpa",
                   help="comma-separated: xla, pallas (this platform), pallas_gpu, pallas_tpu, "
                        "dpa")
    p.add_argument("--n", default=None,
                   help="comma-separated token counts (default: %s on GPU/TPU, %s on CPU)"
                        % (",".join(map(str, ACCEL_N)), ",".join(map(str, CPU_N))))
    p.add_argument("--batch", type=int, default=0,
                   help="batch size; 0 = max(1, 16384 // N) so every row does similar work")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--stats", default="lse,key_mass,cls_probs",
                   help="statistics the xla and pallas impls return (dpa returns none)")
    p.add_argument("--key-size", action="store_true", help="pass token sizes (ToMe)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--block-q", type=int, default=None,
                   help="query block of the Pallas kernels (default: the kernels' choice)")
    p.add_argument("--block-k", type=int, default=None, help="key block of the Pallas kernels")
    p.add_argument("--grad", action="store_true", help="time forward + backward (grad of q,k,v)")
    p.add_argument("--runs", type=int, default=10, help="timed runs (median), at least 5")
    p.add_argument("--no-isolate", action="store_true",
                   help="skip the per-case subprocesses that measure peak memory")
    p.add_argument("--check", action="store_true",
                   help="on a GPU/TPU: check the compiled kernels against the XLA oracle "
                        "instead of timing them (exit status 1 on a mismatch)")
    p.add_argument("--timing-on-cpu", action="store_true",
                   help="on CPU, print the timing table anyway (interpret mode: meaningless "
                        "numbers; only exercises the script)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = max(args.runs, 5)
    return args


def platform() -> str:
    return jax.default_backend()


def resolve_impls(spec: str) -> list[str]:
    out = []
    for name in spec.split(","):
        name = name.strip()
        if name == "pallas":
            names = {"gpu": ["pallas_gpu"], "tpu": ["pallas_tpu"]}.get(
                platform(), ["pallas_gpu", "pallas_tpu"])  # CPU: check both kernel families
            out += [x for x in names if x not in out]
            continue
        if name not in ("xla", "pallas_gpu", "pallas_tpu", "dpa", "dpa_cudnn", "cudnn"):
            raise SystemExit(f"unknown --impl {name!r}")
        out.append(name)
    return out


def make_inputs(args, n):
    b = args.batch or max(1, 16384 // n)
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (b, n, args.heads, args.head_dim)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys[:3])
    size = (jax.random.randint(keys[3], (b, n), 1, 4).astype(jnp.float32)
            if args.key_size else None)
    return q, k, v, size


def make_fn(impl, args):
    stats = tuple(s for s in args.stats.split(",") if s)
    if impl == "xla":
        def fwd(q, k, v, size):
            return attention_xla(q, k, v, key_size=size, causal=args.causal, stats=stats)
    elif impl.startswith("pallas"):
        backend = impl.split("_")[1]

        def fwd(q, k, v, size):
            return attention_pallas(q, k, v, backend=backend, key_size=size,
                                    causal=args.causal, stats=stats, block_q=args.block_q,
                                    block_k=args.block_k)
    elif impl == "cudnn":
        fused_stats = tuple(s for s in stats if s in FUSED_STATS)

        def fwd(q, k, v, size):
            return attention(q, k, v, key_size=size, causal=args.causal, stats=fused_stats,
                             impl="cudnn")
    else:
        # dpa: implementation=None (JAX picks; XLA here). dpa_cudnn: cuDNN's fused flash
        # attention, the fused no-statistics floor on NVIDIA GPUs.
        impl_arg = "cudnn" if impl == "dpa_cudnn" else None

        def fwd(q, k, v, size):
            bias = None if size is None else jnp.log(size)[:, None, None, :]
            return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=args.causal,
                                                implementation=impl_arg), {}
    if not args.grad:
        return jax.jit(fwd)

    def loss(q, k, v, size):
        out, st = fwd(q, k, v, size)
        return jnp.sum(out.astype(jnp.float32)), st
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def time_fn(fn, inputs, runs):
    jax.block_until_ready(fn(*inputs))  # compile + warm-up
    jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compiled_bytes(fn, inputs):
    try:
        m = fn.lower(*inputs).compile().memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def peak_bytes(fn, inputs):
    """Peak device memory of one call, from memory_stats (fresh process), else None."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    jax.block_until_ready(fn(*inputs))
    return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])


def run_case(args, impl, n):
    """Returns (median seconds, compiled memory bytes) or raises (e.g. out of memory)."""
    inputs = make_inputs(args, n)
    fn = make_fn(impl, args)
    seconds = time_fn(fn, inputs, args.runs)
    return seconds, compiled_bytes(fn, inputs)


def child(args):
    impl, n = args.child.split(":")
    inputs = make_inputs(args, int(n))
    try:
        peak = peak_bytes(make_fn(impl, args), inputs)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": type(e).__name__}))
        return
    print(json.dumps({"peak": peak}))


def isolated_peak(impl, n):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{impl}:{n}"]
    cmd += [a for a in sys.argv[1:]]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        line = res.stdout.strip().splitlines()[-1]
        return json.loads(line).get("peak")
    except Exception:  # noqa: BLE001
        return None


def fmt_ms(s):
    return "—" if s is None else f"{s * 1e3:.3f}"


def fmt_mib(b):
    return "—" if b is None else f"{b / MiB:.1f}"


def fmt_ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def accelerator_main(args, impls, ns):
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({platform()}), jax {jax.__version__}; "
          f"heads={args.heads} head_dim={args.head_dim} dtype={args.dtype} "
          f"stats={args.stats} key_size={args.key_size} causal={args.causal} "
          f"{'forward+backward' if args.grad else 'forward'}; median of {args.runs} runs")
    use_stats = not args.no_isolate and bool(dev.memory_stats())
    mem_src = ("peak_bytes_in_use (fresh process per case)" if use_stats
               else "compiled memory_analysis (args + outputs + temps)")
    print(f"memory: {mem_src}\n")
    kernel = next((i for i in impls if i.startswith("pallas")), None)
    cols = ["N", "B"]
    for impl in impls:
        cols += [f"{impl} ms", f"{impl} MiB"]
    if kernel and "xla" in impls:
        cols += ["xla/kernel time", "xla/kernel mem"]
    floors = [i for i in ("dpa", "dpa_cudnn", "cudnn") if i in impls]
    if kernel:
        cols += [f"kernel/{i} time" for i in floors]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for n in ns:
        row = {}
        for impl in impls:
            try:
                seconds, mem = run_case(args, impl, n)
                if use_stats:
                    mem = isolated_peak(impl, n)
            except Exception as e:  # noqa: BLE001 - e.g. RESOURCE_EXHAUSTED at large N
                print(f"<!-- {impl} N={n}: {type(e).__name__}: {str(e)[:200]} -->")
                seconds, mem = None, None
            row[impl] = (seconds, mem)
        b = args.batch or max(1, 16384 // n)
        cells = [str(n), str(b)]
        for impl in impls:
            cells += [fmt_ms(row[impl][0]), fmt_mib(row[impl][1])]
        if kernel and "xla" in impls:
            cells += [fmt_ratio(row["xla"][0], row[kernel][0]),
                      fmt_ratio(row["xla"][1], row[kernel][1])]
        if kernel:
            cells += [fmt_ratio(row[kernel][0], row[i][0]) for i in floors]
        print("| " + " | ".join(cells) + " |", flush=True)


def check_main(args, impls, ns, interpret=True):
    """Correctness of the kernels against the XLA oracle run in float32 (exit status 1 if off).

    interpret=True: Pallas's generic interpreter (CPU); False: the kernels compiled for this
    device (`--check` on a GPU/TPU)."""
    if interpret:
        print("CPU: the Pallas kernels run in interpret mode here, which proves nothing about "
              "their speed.\nThis run only checks correctness against the XLA oracle; run this "
              "script on a GPU or TPU for timings.\n")
    else:
        print(f"device: {jax.devices()[0].device_kind}; compiled kernels vs the XLA oracle in "
              "float32 (highest matmul precision)\n")
    kernels = [i for i in impls if i.startswith("pallas")] or ["pallas_gpu", "pallas_tpu"]
    stats = tuple(s for s in args.stats.split(",") if s)
    print("| N | B | kernel | max err out | " + " | ".join(f"max err {s}" for s in stats) + " |")
    print("|" + "---|" * (4 + len(stats)))
    ok = True
    for n in ns:
        q, k, v, size = make_inputs(args, n)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        with jax.default_matmul_precision("highest"):
            ref_out, ref = jax.jit(lambda q, k, v, s: attention_xla(
                q, k, v, key_size=s, causal=args.causal, stats=stats))(*f32, size)
        for impl in kernels:
            # interpret=True: Pallas's generic interpreter (TPU interpret mode is much slower).
            out, got = jax.jit(lambda q, k, v, s, impl=impl: attention_pallas(
                q, k, v, backend=impl.split("_")[1], key_size=s, causal=args.causal,
                stats=stats, interpret=interpret))(q, k, v, size)
            errs = [float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out)))]
            errs += [float(jnp.max(jnp.abs(got[s] - ref[s]))) for s in stats]
            refs = [ref_out] + [ref[s] for s in stats]
            # Compiled on a GPU, float32 dots inside the Triton kernels run in TF32.
            f32_tol = 1e-4 if interpret else 5e-3
            # The output and the key statistics ("mean_key", "full_key") are in the inputs'
            # dtype; the other statistics are float32.
            io_tol = 2e-2 if args.dtype == "bfloat16" else f32_tol
            tols = [io_tol] + [io_tol if s in ("mean_key", "full_key") else f32_tol
                               for s in stats]
            ok &= all(np.isfinite(e) and e <= t * max(1.0, float(jnp.abs(r).max()))
                      for e, t, r in zip(errs, tols, refs))
            print(f"| {n} | {q.shape[0]} | {impl} | "
                  + " | ".join(f"{e:.2e}" for e in errs) + " |", flush=True)
    print("\ncorrectness:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    impls = resolve_impls(args.impl)
    on_cpu = platform() not in ("gpu", "tpu")
    if args.n:
        ns = [int(x) for x in args.n.split(",")]
    else:
        ns = list(CPU_N if on_cpu else ACCEL_N)
    if args.check and not on_cpu:
        return check_main(args, impls, ns, interpret=False)
    if on_cpu and args.timing_on_cpu:
        print("WARNING: CPU timings of Pallas kernels in interpret mode prove nothing about "
              "their speed.\n")
        accelerator_main(args, impls, ns)
        return 0
    if on_cpu:
        if args.batch == 0:
            args.batch = 1
        big = [n for n in ns if n > 1025]
        if big:
            print(f"(skipping N={big} on CPU: interpret mode is too slow to be useful there)")
            ns = [n for n in ns if n <= 1025]
        return check_main(args, impls, ns)
    accelerator_main(args, impls, ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
