"""Prefill and decode speed of the packaged SmolLM2-135M-Instruct, ours vs. transformers/torch.

For every batch size and prompt length: prefill tokens/s and decode tokens/s (median of
--repeats timed runs after a compiling first run), the compile seconds of prefill and decode,
and the KV cache's bytes; side by side with the same GGUF weights through transformers'
`LlamaForCausalLM` (PyTorch, float32, SDPA attention, its dynamic KV cache) when torch and
transformers are importable by this Python or by --torch-python, timed right after ours on
the same prompts, and the ratio of the two.

    python benchmarks/decode.py                               # batch 1, 8 x prompts 512, 2048
    python benchmarks/decode.py --torch-python /tmp/torchenv/bin/python --json out.json
    python benchmarks/decode.py --batches 1 --lengths 512 --repeats 5

Prompts are real text: the project's README through the model's tokenizer, a different
window of it for each row of the batch. Decoding is greedy with no stop token, so every run
makes --new-tokens tokens (the first from the prefill's logits, then --new-tokens - 1 steps of
the model: decode tokens/s = batch x (new tokens - 1) / decode seconds). Both sides use every
core of the machine (XLA's own threads; torch.set_num_threads(os.cpu_count())).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _windows(ids, batch, length):
    """`batch` windows of `length` real tokens, each starting at another offset."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    step = max(1, (len(ids) - length) // max(batch, 1))
    if len(ids) < length:
        raise SystemExit(f"error: the README has {len(ids)} tokens, fewer than --lengths "
                         f"{length}")
    return np.array([ids[i * step:i * step + length] for i in range(batch)], np.int32)


# --------------------------------------------------------------------------------------------
# The torch side (runs in the Python that has torch: this one or --torch-python)
# --------------------------------------------------------------------------------------------

def torch_worker(gguf_path: str, tokens_path: str, new_tokens: int, repeats: int) -> dict:
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    path = gguf_path
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - t0
    tokens = torch.from_numpy(np.load(tokens_path).astype(np.int64))
    b = tokens.shape[0]

    def run():
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(tokens, use_cache=True)
            t1 = time.perf_counter()
            cache, nxt, made = out.past_key_values, out.logits[:, -1].argmax(-1), []
            for _ in range(new_tokens - 1):
                out = model(nxt[:, None], past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
                made.append(nxt)
            t2 = time.perf_counter()
        kv = sum(t.numel() * t.element_size() for layer in cache.layers
                 for t in (layer.keys, layer.values))
        return t1 - t0, t2 - t1, kv, torch.stack(made, 1).numpy()

    first = run()                         # warm-up (allocator, oneDNN kernels)
    times = [run() for _ in range(repeats)]
    prefill_s = statistics.median(t[0] for t in times)
    decode_s = statistics.median(t[1] for t in times)
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "load_s": load_s, "first_prefill_s": first[0], "prefill_s": prefill_s,
            "decode_s": decode_s, "prefill_tok_s": b * tokens.shape[1] / prefill_s,
            "decode_tok_s": b * (new_tokens - 1) / decode_s, "cache_bytes": first[2],
            "tokens": first[3].tolist()}


def _torch_python(arg: str | None) -> str | None:
    if arg:
        return arg
    have = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    return sys.executable if have else None


def _run_torch(python, gguf_path, tokens, new_tokens, repeats):
    import numpy as np  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokens.npy")
        np.save(path, tokens)
        proc = subprocess.run([python, os.path.abspath(__file__), "--torch-worker", gguf_path, path,
                               str(new_tokens), str(repeats)], capture_output=True, text=True,
                              cwd=ROOT, check=False)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------

def jax_run(lm, tokens, new_tokens: int, repeats: int, cache_dtype: str) -> dict:
    # pylint: disable=import-outside-toplevel
    import jax
    import numpy as np

    from jax_tokens.models import llama

    b, length = tokens.shape
    mask = np.ones_like(tokens, bool)
    capacity = llama.cache.default_capacity(length + new_tokens)
    timings: dict = {}
    state, *_ = llama.prefill(lm.model, tokens, mask=mask, capacity=capacity,
                              max_new_tokens=new_tokens, cache_dtype=cache_dtype,
                              timings=timings)
    out = llama.decode(lm.model, state, max_new_tokens=new_tokens, timings=timings)
    prefill_s, decode_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, *_ = llama.prefill(lm.model, tokens, mask=mask, capacity=capacity,
                                  max_new_tokens=new_tokens, cache_dtype=cache_dtype)
        jax.block_until_ready(state)
        t1 = time.perf_counter()
        out = jax.block_until_ready(llama.decode(lm.model, state, max_new_tokens=new_tokens))
        decode_s.append(time.perf_counter() - t1)
        prefill_s.append(t1 - t0)
    p, d = statistics.median(prefill_s), statistics.median(decode_s)
    return {"prefill_s": p, "decode_s": d, "prefill_tok_s": b * length / p,
            "decode_tok_s": b * (new_tokens - 1) / d,
            "prefill_compile_s": timings["prefill_compile_s"],
            "decode_compile_s": timings["decode_compile_s"], "capacity": capacity,
            "cache_bytes": state.cache.nbytes(), "tokens": np.asarray(out.tokens)[:, 1:].tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--torch-python", default=None,
                    help="a Python with torch and transformers (default: this one, if it has "
                         "them; else the torch column is left out)")
    ap.add_argument("--json", default=None, help="write every number here")
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1:
        raise SystemExit("error: --new-tokens must be >= 2 and --repeats >= 1")

    import jax  # pylint: disable=import-outside-toplevel

    from jax_tokens.models import gguf_import  # pylint: disable=import-outside-toplevel

    lm = gguf_import.load_packaged()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        ids = lm.encode(f.read())
    torch_py = _torch_python(args.torch_python)
    machine = {"jax": jax.__version__, "backend": jax.default_backend(),
               "device": str(jax.devices()[0].device_kind), "cpus": os.cpu_count(),
               "processor": platform.processor() or platform.machine(),
               "torch_python": torch_py}
    print(json.dumps(machine))
    rows = []
    head = (f"{'batch':>5} {'prompt':>6} | {'prefill tok/s':>13} {'decode tok/s':>12} "
            f"{'compile s (p/d)':>15} {'cache MB':>8} | {'torch prefill':>13} "
            f"{'torch decode':>12} {'torch MB':>8} | {'prefill x':>9} {'decode x':>8} "
            f"{'same tokens':>11}")
    print(head)
    for length in args.lengths:
        for b in args.batches:
            tokens = _windows(ids, b, length)
            ours = jax_run(lm, tokens, args.new_tokens, args.repeats, args.cache_dtype)
            theirs = (_run_torch(torch_py, gguf_import.packaged_gguf_path(), tokens,
                                 args.new_tokens, args.repeats)
                      if torch_py else {"error": "torch/transformers not installed"})
            row = {"batch": b, "prompt": length, "new_tokens": args.new_tokens,
                   "repeats": args.repeats, "ours": ours, "torch": theirs}
            line = (f"{b:>5} {length:>6} | {ours['prefill_tok_s']:>13.1f} "
                    f"{ours['decode_tok_s']:>12.1f} "
                    f"{ours['prefill_compile_s']:>7.1f}/{ours['decode_compile_s']:<7.1f} "
                    f"{ours['cache_bytes'] / 1e6:>8.1f} | ")
            if "error" in theirs:
                line += f"torch: {theirs['error']}"
            else:
                row["prefill_ratio"] = ours["prefill_tok_s"] / theirs["prefill_tok_s"]
                row["decode_ratio"] = ours["decode_tok_s"] / theirs["decode_tok_s"]
                same = [a == t for a, t in zip(ours["tokens"], theirs["tokens"])]
                row["same_greedy_tokens"] = f"{sum(same)}/{len(same)}"
                line += (f"{theirs['prefill_tok_s']:>13.1f} {theirs['decode_tok_s']:>12.1f} "
                         f"{theirs['cache_bytes'] / 1e6:>8.1f} | {row['prefill_ratio']:>8.2f}x "
                         f"{row['decode_ratio']:>7.2f}x {row['same_greedy_tokens']:>11}")
            print(line, flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--torch-worker":
        print(json.dumps(torch_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                      int(sys.argv[5]))))
        sys.exit(0)
    sys.exit(main())
