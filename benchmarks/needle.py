"""Needle in a haystack on SmolLM2-135M-Instruct: can the model still find a fact in a
compressed KV cache?

    python benchmarks/needle.py                          # 512-token haystacks, 20 samples, CPU
    python benchmarks/needle.py --context 1024 --samples 8 --json out.json     # a GPU

A haystack is --context tokens of real English text (the licence texts of Debian's
`base-files` package, /usr/share/common-licenses, the windows `jax_tokens.lm_eval` reads). A
needle, "The special magic number is NNNN." with a random 4-digit number, is put into it at a
sentence boundary at each --depths fraction of its length (0: before the first sentence, 1:
after the last), and the instruct model gets, through its chat template, the text and then
"What is the special magic number mentioned in the text? Answer with the number only."
Greedy decoding of --new-tokens tokens; a sample scores when the first number in the answer
is the needle's (exact match of the extracted answer).

The whole prompt, question included, is prefilled and then pressed (the question-aware
setting of SnapKV's paper: the presses that read the last queries' attention see the
question; kvpress's default, compressing the context before the question arrives, is harder).
FastV and PyramidDrop drop tokens of the haystack span (its last --context tokens before the
question; the question and the chat template are never dropped) inside the prefill, FastV at
layer 2, PyramidDrop at layers 2, 10 and 20, at matched prefill FLOPs (`token_drop_config`):
their "ratio" is the share of span tokens the layers after the first drop no longer see.

Every press runs at compression ratios 0.25, 0.5 and 0.75 of the prompt (the full cache
first), each scored on the same samples, in one process; the table gives accuracy per depth
and overall, with the number of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from kv_cache import (DROP_METHODS, METHODS, RATIOS,  # noqa: E402  pylint: disable=C0413
                      press_config, token_drop_config)

QUESTION = "What is the special magic number mentioned in the text? Answer with the number only."
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def insert_needle(text: str, depth: float, needle: str) -> str:
    """`needle` put into `text` at the sentence boundary (". ") nearest after depth * len."""
    if depth <= 0.0:
        return needle + " " + text
    if depth >= 1.0:
        return text.rstrip() + " " + needle
    at = int(depth * len(text))
    cut = text.find(". ", at)
    cut = len(text) if cut < 0 else cut + 2
    return text[:cut] + needle + " " + text[cut:]


def first_number(answer: str) -> str | None:
    m = re.search(r"\d+", answer)
    return m.group(0) if m else None


def make_samples(lm, context: int, depths, samples: int, seed: int):
    """[(prompt ids, needle value, depth)], every haystack at every depth."""
    # pylint: disable=import-outside-toplevel
    from jax_tokens import lm_eval
    config = lm_eval.load_config(lm_eval.DEFAULT_CONFIG, {
        "data.context_length": context, "data.continuation_length": 1,
        "data.num_samples": samples})
    windows, _, _ = lm_eval.text_windows(config, lm.encode)
    rng = np.random.default_rng(seed)
    out = []
    for window in windows:
        text = lm.decode(window)
        for depth in depths:
            value = str(rng.integers(1000, 10000))
            body = insert_needle(text, depth, f"The special magic number is {value}.")
            prefix = "Read the text below and answer the question.\n\n"
            ids = lm.encode_chat(prefix + body + "\n\n" + QUESTION)
            out.append((ids, value, depth))
    return out


def question_tokens(lm) -> int:
    """Prompt tokens from the question to the end of the chat template's assistant header
    (the same in every sample), plus one for a merge at the boundary."""
    x = lm.encode_chat("x")
    xt = lm.encode("x")[0]
    suffix = len(x) - 1 - max(i for i, t in enumerate(x) if t == xt)
    return len(lm.encode_chat("x\n\n" + QUESTION)) - len(x) + suffix + 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=512, help="haystack tokens")
    ap.add_argument("--samples", type=int, default=4, help="haystacks (each at every depth)")
    ap.add_argument("--depths", type=float, nargs="+", default=list(DEPTHS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS + DROP_METHODS),
                    choices=list(METHODS + DROP_METHODS))
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.context < 32 or args.samples < 1 or not args.depths or \
            not all(0.0 <= d <= 1.0 for d in args.depths):
        ap.error("--context must be >= 32, --samples >= 1, --depths in [0, 1]")

    # pylint: disable=import-outside-toplevel
    import jax

    from jax_tokens.models import gguf_import
    from jax_tokens.models.llama import generation
    from jax_tokens.reducers import presses

    t0 = time.perf_counter()
    lm = gguf_import.load_packaged()
    n_layers = lm.model.cfg.num_layers
    samples = make_samples(lm, args.context, args.depths, args.samples, args.seed)
    prompts = [s[0] for s in samples]
    longest = max(len(p) for p in prompts)
    tail = question_tokens(lm)
    span = (-(tail + args.context), -tail)   # the haystack's last `context` tokens (padded
    #                                          prompts: slots are counted from the end)
    print(json.dumps({"jax": jax.__version__, "backend": jax.default_backend(),
                      "cpus": os.cpu_count(), "context": args.context,
                      "prompt_tokens": [min(len(p) for p in prompts), longest],
                      "samples": len(samples)}), flush=True)

    def score(press) -> list[bool]:
        out = generation.generate(lm.model, prompts, max_new_tokens=args.new_tokens,
                                  press=press, stop_tokens=lm.stop_tokens, pad_id=lm.pad_id,
                                  prompt_length=longest)
        toks = np.asarray(out.tokens)
        hits = []
        for row, (_, value, _) in zip(toks, samples):
            answer = lm.decode([int(t) for t in row], skip_special_tokens=True)
            hits.append(first_number(answer) == value)
        return hits

    def row(name, ratio, press_cfg, hits):
        hits = np.asarray(hits)
        per_depth = {d: float(hits[[s[2] == d for s in samples]].mean()) for d in args.depths}
        return dict(method=name, ratio=ratio, press=press_cfg, accuracy=float(hits.mean()),
                    per_depth=per_depth, hits=hits.tolist())

    rows = [row("full cache", 0.0, None, score(None))]
    head = " | ".join(f"depth {d:g}" for d in args.depths)
    print(f"| press | ratio | {head} | all |\n|---|---:|" + "---:|" * (len(args.depths) + 1))

    def show(r):
        cells = " | ".join(f"{100 * r['per_depth'][d]:.0f}" for d in args.depths)
        print(f"| {r['method']} | {r['ratio']} | {cells} | {100 * r['accuracy']:.0f} |",
              flush=True)

    show(rows[0])
    for method in args.methods:
        for ratio in args.ratios:
            if method in DROP_METHODS:
                cfg = token_drop_config(method, ratio, n_layers, span)
            else:
                cfg = press_config(method, ratio, longest)
            r = row(method, ratio, cfg, score(presses.from_config(cfg)))
            rows.append(r)
            show(r)
    print(f"\n{len(samples)} samples ({args.samples} haystacks of {args.context} tokens x "
          f"{len(args.depths)} depths); accuracy in %; total {time.perf_counter() - t0:.0f} s",
          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
