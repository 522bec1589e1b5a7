"""KV-cache presses on SmolLM2-135M-Instruct and real text, side by side with the full cache.

    python benchmarks/kv_cache.py                     # 512 + 64 tokens, 8 samples: ~20 min, 2 cores
    python benchmarks/kv_cache.py --context 2048 --samples 16 --json out.json   # a GPU

For every press at compression ratios 0.25, 0.5 and 0.75 (the share of the context evicted)
and for the full cache, in one process on the same windows of text (the licence texts of
Debian's `base-files` package, /usr/share/common-licenses, via `jax_tokens.lm_eval`):

  perplexity   of a --continuation-token continuation read through the compressed cache of a
               --context-token context (`llama.continuation_logprobs`);
  dNLL         the mean per-token NLL minus the full cache's, with the standard error of the
               per-sample differences (paired: every press scores the same samples, so this is
               far tighter than the spread of the perplexities themselves);
  cache MB     the compressed cache per sequence (kept slots + room for the continuation);
  decode tok/s greedy decoding of --new-tokens tokens at batch 1 after a compressed prefill
               of the first sample (ratio 0.5 only; median of --repeats), against the full cache.

Budgets per press at ratio r (kept K = int(context * (1 - r))): SnapKV and PyramidKV with a
32-token window and compression_ratio r (PyramidKV's K is the per-layer average), H2O with
recent = 32 and heavy = K - 32, TOVA with cache_size = K, StreamingLLM with 4 sinks and
window = K - 4, Knorm, Expected Attention (512 future positions, 4 sinks) and random with
compression_ratio r.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RATIOS = (0.25, 0.5, 0.75)
WINDOW = 32


def press_config(method: str, ratio: float, context: int) -> dict:
    kept = int(context * (1 - ratio))
    return {
        "snapkv": dict(method="snapkv", window=WINDOW, compression_ratio=ratio),
        "pyramidkv": dict(method="pyramidkv", window=WINDOW, compression_ratio=ratio),
        "h2o": dict(method="h2o", heavy=kept - WINDOW, recent=WINDOW),
        "tova": dict(method="tova", cache_size=kept),
        "streaming_llm": dict(method="streaming_llm", sinks=4, window=kept - 4),
        "knorm": dict(method="knorm", compression_ratio=ratio),
        "random_kv": dict(method="random_kv", compression_ratio=ratio),
        "expected_attention": dict(method="expected_attention", compression_ratio=ratio),
    }[method]


METHODS = ("snapkv", "pyramidkv", "h2o", "tova", "streaming_llm", "knorm",
           "expected_attention", "random_kv")
DROP_METHODS = ("fastv", "pdrop")


def token_drop_config(method: str, ratio: float, n_layers: int, span: tuple) -> dict:
    """FastV and PyramidDrop at matched prefill FLOPs: FastV drops `ratio` of the span at
    layer 2; PyramidDrop keeps a share k at each of layers 2, 10 and 20 (k, k^2, k^3 of the
    span), k chosen so the span tokens averaged over layers 2..L fall by the same `ratio`
    (the span is most of the prompt, so both cut prefill FLOPs by about ratio * (L - 2) / L)."""
    if method == "fastv":
        return dict(method="fastv", layer=2, ratio=ratio, span=span)
    # PyramidDrop: keep k at each of 3 stages over (8, 10, L - 20) layers: choose k so the
    # layer-weighted mean of k, k^2, k^3 equals 1 - ratio.
    stages = (10 - 2, 20 - 10, n_layers - 20)
    target = 1.0 - ratio
    lo, hi = 0.0, 1.0
    for _ in range(60):
        k = (lo + hi) / 2
        mean = sum(w * k ** (i + 1) for i, w in enumerate(stages)) / sum(stages)
        lo, hi = (k, hi) if mean < target else (lo, k)
    return dict(method="pdrop", layers=(2, 10, 20), keep=round((lo + hi) / 2, 4), span=span)


def decode_speed(lm, ids, press, new_tokens: int, repeats: int) -> float:
    # pylint: disable=import-outside-toplevel
    import jax

    from jax_tokens.models import llama
    capacity = llama.cache.default_capacity(len(ids) + new_tokens)
    times = []
    for i in range(repeats + 1):                    # the first run compiles
        state, *_ = llama.prefill(lm.model, [ids], capacity=capacity, press=press,
                                  max_new_tokens=new_tokens, pad_multiple=1)
        t0 = time.perf_counter()
        jax.block_until_ready(llama.decode(lm.model, state, max_new_tokens=new_tokens,
                                           press=press if state.cache.free is not None
                                           else None))
        if i:
            times.append(time.perf_counter() - t0)
    return (new_tokens - 1) / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=list(METHODS + DROP_METHODS),
                    choices=METHODS + DROP_METHODS)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speed-only", action="store_true",
                    help="only the decode tokens/s column (every press at ratio 0.5)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    # pylint: disable=import-outside-toplevel
    import jax

    from jax_tokens import lm_eval
    from jax_tokens.models import gguf_import
    from jax_tokens.reducers import presses

    t_start = time.perf_counter()
    lm = gguf_import.load_packaged()
    base = {"data.context_length": args.context, "data.continuation_length": args.continuation,
            "data.num_samples": args.samples, "eval.batch_size": args.batch}
    print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(),
                      "cpus": os.cpu_count(),
                      "processor": platform.processor() or platform.machine(), **base}),
          flush=True)
    quiet = lambda s: None  # noqa: E731

    def run(press: dict | None) -> dict:
        over = dict(base)
        if press:
            over["press.method"] = press["method"]
            over.update({f"press.{k}": v for k, v in press.items() if k != "method"})
        return lm_eval.evaluate(lm, lm_eval.load_config(lm_eval.DEFAULT_CONFIG, over), log=quiet)

    contexts, _, _ = lm_eval.text_windows(lm_eval.load_config(lm_eval.DEFAULT_CONFIG, base),
                                          lm.encode)
    if args.speed_only:        # interleaved rounds: machine load hits every press alike
        cfgs = {"full cache": None, **{m: presses.from_config(press_config(m, 0.5, args.context))
                                       for m in args.methods}}
        times = {name: [] for name in cfgs}
        for _ in range(args.repeats):
            for name, press in cfgs.items():
                times[name].append(decode_speed(lm, contexts[0], press, args.new_tokens, 1))
        print("| press (ratio 0.5) | decode tok/s | vs full |\n|---|---:|---:|")
        base_speed = statistics.median(times["full cache"])
        for name, ts in times.items():
            print(f"| {name} | {statistics.median(ts):.1f} | "
                  f"{statistics.median(ts) / base_speed:.2f}x |", flush=True)
        return 0
    full = run(None)
    full_speed = decode_speed(lm, contexts[0], None, args.new_tokens, args.repeats)
    rows = [dict(method="full cache", ratio=0.0, perplexity=full["perplexity"], dnll=0.0,
                 dnll_se=0.0, cache_mb=full["cache_bytes_per_sequence"] / 1e6,
                 decode_tok_s=full_speed, per_sample_nll=full["per_sample_nll"])]
    print(f"| press | ratio | perplexity | dNLL vs full (± s.e.) | cache MB/seq | "
          f"decode tok/s |\n|---|---:|---:|---:|---:|---:|\n| full cache | 0 | "
          f"{full['perplexity']:.3f} | 0 | {rows[0]['cache_mb']:.1f} | {full_speed:.1f} |",
          flush=True)
    for method in args.methods:
        for ratio in args.ratios:
            if method in DROP_METHODS:   # the context's tokens but its last one
                cfg = token_drop_config(method, ratio, lm.model.cfg.num_layers, (0, -1))
            else:
                cfg = press_config(method, ratio, args.context)
            res = run(cfg)
            diff = [a - b for a, b in zip(res["per_sample_nll"], full["per_sample_nll"])]
            se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan
            speed = math.nan
            if ratio == 0.5 and method not in DROP_METHODS:
                speed = decode_speed(lm, contexts[0], presses.from_config(cfg),
                                     args.new_tokens, args.repeats)
            row = dict(method=method, ratio=ratio, press=cfg, perplexity=res["perplexity"],
                       dnll=statistics.fmean(diff), dnll_se=se,
                       cache_mb=res["cache_bytes_per_sequence"] / 1e6, decode_tok_s=speed,
                       per_sample_nll=res["per_sample_nll"])
            rows.append(row)
            sp = "-" if math.isnan(speed) else f"{speed:.1f}"
            print(f"| {method} | {ratio} | {row['perplexity']:.3f} | {row['dnll']:+.4f} ± "
                  f"{se:.4f} | {row['cache_mb']:.1f} | {sp} |", flush=True)
    print(f"\n{args.samples} samples of {args.context} context + {args.continuation} scored "
          f"tokens; total {time.perf_counter() - t_start:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
