"""KV-cache presses against the authors' code (../shared/golden/kv_*.npz; see its README).

The golden inputs are q [B, Hq, L, D] and k, v [B, Hkv, L, D] (no RoPE: taken as already
rotated). Each test builds what the prefill gives a press — the attention statistics from
this library's `attention()` over the L slots, causal — and checks the plan: the kept set per
head equal to the reference's, the order where the reference defines it (no ties inside the
kept set), the gathered keys and values bit-equal, and the scores the reference ranked.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_golden
from jax_tokens.attention import attention
from jax_tokens.models.llama import cache as kvc
from jax_tokens.reducers import presses
from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.pyramidkv import pyramid_budget
from jax_tokens.reducers.presses.snapkv import snapkv_scores


def _inputs(q, k, v, *, stats, query_index=0, layer=0, num_layers=1):
    """PressInputs of one layer from [B, H, L, D] golden arrays (k / v with the heads the
    cache holds); the statistics from the causal attention of every query over the L keys."""
    q, k, v = (jnp.asarray(np.swapaxes(a, 1, 2)) for a in (q, k, v))   # [B, L, H, D]
    b, length, kvh, _ = k.shape
    _, st = attention(q, k, v, causal=True, stats=stats, query_index=query_index, impl="xla")
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :, None], (b, length, kvh))
    return base.PressInputs(keys=k, values=v, positions=pos, valid=jnp.ones((b, length, kvh),
                                                                            bool),
                            stats=st, queries=None,
                            query_positions=jnp.broadcast_to(jnp.arange(length), (b, length)),
                            layer=layer, groups=q.shape[2] // kvh, num_layers=num_layers)


def _check_plan(plan, inputs, g, *, ordered, prefix=""):
    """Kept set per head == the golden one; order too when `ordered`; k / v rows bit-equal."""
    got = np.asarray(plan.kept_idx)
    want = g[prefix + "kept_idx"].astype(np.int64)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))
    if ordered:
        np.testing.assert_array_equal(got, want)
    k_out = np.swapaxes(np.asarray(plan.apply(inputs.keys)), 1, 2)         # [B, H, K, D]
    v_out = np.swapaxes(np.asarray(plan.apply(inputs.values)), 1, 2)
    order = np.argsort(got, -1), np.argsort(want, -1)
    for ours, theirs in ((k_out, g[prefix + "k_out"]), (v_out, g[prefix + "v_out"])):
        a = np.take_along_axis(ours, order[0][..., None], 2)
        b = np.take_along_axis(theirs, order[1][..., None], 2)
        np.testing.assert_array_equal(a, b)


def _meta(g):
    return json.loads(str(g["meta"]))


# --------------------------------------------------------------------------------------------
# SnapKV / KVCache-Factory SnapKV / PyramidKV
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["snapkv_avgpool", "snapkv_maxpool_gqa", "snapkv_short",
                                  "kvfsnapkv_avgpool", "kvfsnapkv_gqa_kvhead"])
def test_snapkv_matches_reference(name):
    g = load_golden(f"kv_{name}.npz")
    n_rep, w, cap = int(g["n_rep"]), int(g["window_size"]), int(g["max_capacity_prompt"])
    k, v = np.repeat(g["k"], n_rep, 1), np.repeat(g["v"], n_rep, 1)   # what the call got
    press = presses.get("snapkv")(window=w, capacity=cap, kernel_size=int(g["kernel_size"]),
                                  pooling=str(g["pooling"]),
                                  gqa_agg=str(g["gqa_score_agg"]) if "gqa_score_agg" in g
                                  else "mean")
    length = k.shape[2]
    inputs = _inputs(g["q"], k, v, stats=press.request(length).stats,
                     query_index=press.request(length).query_index)
    plan = press.plan(inputs)
    if "scores" in g:
        s = snapkv_scores(inputs.stats["cls_probs"], length, w, groups=inputs.groups,
                          gqa_agg=press.gqa_agg, kernel_size=press.kernel_size,
                          pooling=press.pooling)
        np.testing.assert_allclose(np.asarray(s), g["scores"], rtol=1e-4, atol=1e-6)
        _check_plan(plan, inputs, g, ordered=not _meta(g)["ties_in_kept"])
    else:   # L < capacity: unchanged
        np.testing.assert_array_equal(np.asarray(plan.kept_idx), g["kept_idx"])


@pytest.mark.parametrize("name", ["pyramidkv_layer0", "pyramidkv_layer6", "pyramidkv_uniform"])
def test_pyramidkv_matches_reference(name):
    g = load_golden(f"kv_{name}.npz")
    w, cap = int(g["window_size"]), int(g["max_capacity_prompt"])
    press = presses.get("pyramidkv")(window=w, capacity=cap, beta=int(g["beta"]),
                                     kernel_size=int(g["kernel_size"]),
                                     pooling=str(g["pooling"]))
    length = g["k"].shape[2]
    req = press.request(length)
    inputs = _inputs(g["q"], g["k"], g["v"], stats=req.stats, query_index=req.query_index,
                     layer=int(g["layer_idx"]), num_layers=int(g["num_hidden_layers"]))
    plan = press.plan(inputs)
    assert plan.n_out == g["kept_idx"].shape[-1]
    _check_plan(plan, inputs, g, ordered=not _meta(g)["ties_in_kept"])


def test_pyramid_budget_schedule():
    # 8 layers, capacity 24, window 8, beta 20, a 128-token prompt: 32 + 8 down to 4 + 8
    got = [pyramid_budget(128, 24, 8, 20, layer, 8) for layer in range(8)]
    assert got == [40, 36, 32, 28, 24, 20, 16, 12]
    assert pyramid_budget(30, 24, 8, 20, 3, 8) == 24       # T < 2 (C - W): uniform
    assert pyramid_budget(20, 24, 8, 20, 3, 8) == 20       # T < C: nothing evicted


# --------------------------------------------------------------------------------------------
# H2O, TOVA, StreamingLLM, Knorm
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["kvfh2o_mha", "kvfh2o_gqa_kvhead"])
def test_h2o_one_shot_matches_kvcache_factory(name):
    g = load_golden(f"kv_{name}.npz")
    w, cap = int(g["window_size"]), int(g["max_capacity_prompt"])
    press = presses.get("h2o")(heavy=cap - w, recent=w,
                               gqa_agg=str(g["gqa_score_agg"]) if "gqa_score_agg" in g
                               else "mean")
    inputs = _inputs(g["q"], g["k"], g["v"], stats=press.request(0).stats)
    plan = press.plan(inputs)
    # KVCache-Factory orders the heavy hitters by score, H2O's cache by position: same sets
    _check_plan(plan, inputs, g, ordered=False)
    s = base.group_scores(inputs.stats["key_mass"][..., :-w], inputs.groups, press.gqa_agg)
    np.testing.assert_allclose(np.asarray(s), g["scores"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["h2o_seq", "h2o_grow"])
def test_h2o_prefill_matches_official(name):
    """The official H2O cache's first call (the prefill) keeps what this press keeps, in the
    same (position) order."""
    g = load_golden(f"kv_{name}.npz")
    press = presses.get("h2o")(heavy=int(g["hh_size"]), recent=int(g["recent_size"]))
    inputs = _inputs(g["step0/q"], g["step0/k_new"], g["step0/v_new"],
                     stats=press.request(0).stats)
    np.testing.assert_allclose(np.asarray(inputs.stats["key_mass"]).sum(0),
                               g["step0/attn"].sum(0).sum(1), rtol=1e-5, atol=1e-5)
    _check_plan(press.plan(inputs), inputs, g, ordered=True, prefix="step0/")


@pytest.mark.parametrize("name", ["tova_single", "tova_seq_gqa"])
def test_tova_prefill_matches_official(name):
    g = load_golden(f"kv_{name}.npz")
    press = presses.get("tova")(cache_size=int(g["cache_size"]))
    length = g["step0/k_new"].shape[2]
    req = press.request(length)
    inputs = _inputs(g["step0/q"], g["step0/k_new"], g["step0/v_new"], stats=req.stats,
                     query_index=req.query_index)
    np.testing.assert_allclose(np.asarray(inputs.stats["cls_probs"]),
                               g["step0/attn"][:, :, -1], rtol=1e-5, atol=1e-6)
    _check_plan(press.plan(inputs), inputs, g, ordered=True, prefix="step0/")


@pytest.mark.parametrize("name", ["kvfstreaming_mha", "kvfstreaming_gqa_kvhead"])
def test_streaming_llm_matches_kvcache_factory(name):
    g = load_golden(f"kv_{name}.npz")
    w, cap = int(g["window_size"]), int(g["max_capacity_prompt"])
    press = presses.get("streaming_llm")(sinks=cap - w, window=w)
    inputs = _inputs(g["q"], g["k"], g["v"], stats=())
    _check_plan(press.plan(inputs), inputs, g, ordered=True)


@pytest.mark.parametrize("name", ["streamingllm_evict", "streamingllm_noevict"])
def test_streaming_llm_matches_official(name):
    g = load_golden(f"kv_{name}.npz")
    press = presses.get("streaming_llm")(sinks=int(g["start_size"]),
                                         window=int(g["recent_size"]))
    for layer in range(g["k"].shape[0]):
        k, v = g["k"][layer], g["v"][layer]
        inputs = _inputs(k, k, v, stats=())
        plan = press.plan(inputs)
        b, h = k.shape[:2]
        want = np.broadcast_to(g["kept_idx"], (b, h, g["kept_idx"].size))
        np.testing.assert_array_equal(np.asarray(plan.kept_idx), want)
        k_out = np.swapaxes(np.asarray(plan.apply(inputs.keys)), 1, 2)
        np.testing.assert_array_equal(k_out, g["k_out"][layer])
        # evict_for_space(num_coming): room for the tokens to come
        space = press.plan_for(inputs, coming=int(g["num_coming"]))
        want = np.broadcast_to(g["space_kept_idx"], (b, h, g["space_kept_idx"].size))
        np.testing.assert_array_equal(np.asarray(space.kept_idx), want)
        np.testing.assert_array_equal(np.swapaxes(np.asarray(space.apply(inputs.keys)), 1, 2),
                                      g["space_k_out"][layer])


def test_knorm_matches_kvpress():
    g = load_golden("kv_knorm_gqa.npz")
    press = presses.get("knorm")(compression_ratio=float(g["compression_ratio"]))
    keys = g["keys"]
    q = np.zeros((keys.shape[0], int(g["num_attention_heads"])) + keys.shape[2:], np.float32)
    inputs = _inputs(q, keys, g["values"], stats=())
    plan = press.plan(inputs)
    assert plan.n_out == int(g["n_kept"])
    _check_plan(plan, inputs, g, ordered=not _meta(g)["ties_in_kept"])


# --------------------------------------------------------------------------------------------
# Padding, budgets, errors, the registry
# --------------------------------------------------------------------------------------------

def _padded_inputs(b=2, length=24, kvh=2, groups=2, pad=(0, 6), seed=0):
    """Random keys / statistics for left-padded rows (row i has pad[i] padding slots)."""
    rng = np.random.default_rng(seed)
    h = kvh * groups
    valid = np.ones((b, length, kvh), bool)
    pos = np.broadcast_to(np.arange(length)[None, :, None], (b, length, kvh)).copy()
    for i, p in enumerate(pad):
        valid[i, :p] = False
        pos[i] = np.maximum(pos[i] - p, 0)
    probs = rng.random((b, h, 8, length)).astype(np.float32)
    probs *= valid[:, None, None, :, 0]                # padding gets no attention
    stats = {"cls_probs": jnp.asarray(probs), "key_mass": jnp.asarray(probs.sum(2))}
    keys = jnp.asarray(rng.normal(size=(b, length, kvh, 8)), jnp.float32)
    return base.PressInputs(keys=keys, values=keys, positions=jnp.asarray(pos),
                            valid=jnp.asarray(valid), stats=stats, queries=None,
                            query_positions=jnp.asarray(pos[..., 0]), layer=0, groups=groups)


@pytest.mark.parametrize("press", [
    presses.get("snapkv")(window=4, capacity=12, kernel_size=3),
    presses.get("pyramidkv")(window=4, capacity=10),     # layer 0 of 1 keeps 2x: 12 + 4
    presses.get("h2o")(heavy=8, recent=4),
    presses.get("tova")(cache_size=12),
    presses.get("streaming_llm")(sinks=4, window=8),
    presses.get("knorm")(compression_ratio=0.5),
    presses.get("random_kv")(capacity=12),
    presses.get("expected_attention")(capacity=12, n_sink=2, n_future_positions=16),
], ids=lambda p: p.method)
def test_padding_is_never_kept_over_real_tokens(press):
    """Row 1 has 6 padding slots and 18 real tokens: every press keeps 12 (PyramidKV 16) real
    ones."""
    inputs = _padded_inputs()
    if isinstance(press, presses.get("tova")):      # one query row: [B, H, C]
        inputs = inputs.replace(stats={"cls_probs": inputs.stats["cls_probs"][:, :, -1]})
    if press.method == "expected_attention":          # raw queries and RoPE frequencies
        q = jax.random.normal(jax.random.key(1), (2, 24, 4, 8))
        inputs = inputs.replace(queries=q, inv_freq=1.0 / 10000 ** (jnp.arange(0, 8, 2) / 8))
    plan = press.plan(inputs)
    assert plan.n_out == press.n_kept(24) == (16 if press.method == "pyramidkv" else 12)
    kept_valid = np.asarray(plan.apply(inputs.valid))
    assert kept_valid.all(), press
    # StreamingLLM's sinks are the first real tokens (positions 0..3), not the padding
    if press.method == "streaming_llm":
        kept_pos = np.asarray(plan.apply(inputs.positions))[1, :4, 0]
        np.testing.assert_array_equal(kept_pos, [0, 1, 2, 3])


@pytest.mark.parametrize("method, kw, match", [
    ("snapkv", dict(window=8), r"give exactly one of capacity .* and compression_ratio"),
    ("snapkv", dict(window=8, capacity=8), r"capacity=8 must be larger than press.window=8"),
    ("snapkv", dict(window=8, capacity=32, kernel_size=4), r"kernel_size=4 must be odd"),
    ("snapkv", dict(window=8, capacity=32, pooling="mean"), r"pooling='mean' is not one of"),
    ("snapkv", dict(window=8, compression_ratio=1.0), r"compression_ratio=1.0 must be a float "
                                                      r"in \[0, 1\)"),
    ("snapkv", dict(window=8, capacity=32, gqa_agg="min"), r"gqa_agg='min' is not one of"),
    ("h2o", dict(heavy=-1), r"press.heavy=-1 must be an int >= 0"),
    ("h2o", dict(heavy=0, recent=0), r"heavy \+ press.recent must be >= 1"),
    ("tova", dict(cache_size=0), r"press.cache_size=0 must be an int >= 1"),
    ("knorm", dict(compression_ratio=-0.1), r"compression_ratio=-0.1"),
    ("streaming_llm", dict(sinks=2.5), r"press.sinks=2.5 must be an int"),
])
def test_bad_budgets_name_the_field(method, kw, match):
    with pytest.raises(ValueError, match=match):
        presses.get(method)(**kw)


def test_window_longer_than_the_prompt_is_an_error():
    press = presses.get("snapkv")(window=32, capacity=64)
    with pytest.raises(ValueError, match=r"window=32 is not shorter than the prompt \(24"):
        press.plan(_padded_inputs())


def test_registry():
    assert set(presses.names()) >= {"snapkv", "pyramidkv", "h2o", "tova", "streaming_llm",
                                    "knorm", "random_kv"}
    p = presses.from_config({"method": "snapkv", "window": 4, "capacity": 12})
    assert p == presses.get("snapkv")(window=4, capacity=12)
    assert presses.from_config(None) is None and presses.from_config({"method": "none"}) is None
    with pytest.raises(ValueError, match=r"press.method='snap' is not one of the registered "
                                         r"presses \("):
        presses.from_config({"method": "snap"})
    with pytest.raises(ValueError, match=r"press.windw is not a field of press 'snapkv'"):
        presses.from_config({"method": "snapkv", "windw": 3})
    assert kvc.KVPlan is base.KVPlan and kvc.PressRequest is base.PressRequest
    assert jax.tree.leaves(base.KVPlan(jnp.zeros((1, 1, 2), jnp.int32), 4))


# --------------------------------------------------------------------------------------------
# Eviction while decoding: the official H2O and TOVA caches, step by step
# --------------------------------------------------------------------------------------------

def _run_decode_steps(g, press):
    """Prefill + one-token steps through this library's cache (one layer): the prefill's
    statistics over the cache slots, `compress(decoding=True)`, then per step the new token
    written to a free slot, the new query's attention over the slots and `decode_evict`.
    Yields (step, cache) after every call."""
    from jax_tokens.attention import attention as attn
    q0, k0, v0 = (np.swapaxes(g[f"step0/{n}"], 1, 2) for n in ("q", "k_new", "v_new"))
    b, t0, kvh, d = k0.shape
    groups = q0.shape[2] // kvh
    n_steps = int(g["n_steps"])
    cache = kvc.KVCache(k=jnp.zeros((1, b, t0, kvh, d)), v=jnp.zeros((1, b, t0, kvh, d)),
                        pos=jnp.full((1, b, t0, kvh), -1, jnp.int32),
                        valid=jnp.zeros((1, b, t0, kvh), bool), index=jnp.zeros((1,), jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(t0, dtype=jnp.int32), (b, t0))
    cache = cache.write_layer(0, jnp.asarray(k0), jnp.asarray(v0), positions)
    req = press.request(t0)
    _, st = attn(jnp.asarray(q0), cache.k[0], cache.v[0], causal=True, stats=req.stats,
                 query_index=req.query_index, impl="xla")
    cache, _, state = kvc.compress(cache, press, {k: v[None] for k, v in st.items()},
                                   positions, groups, room=n_steps, decoding=True)
    yield 0, cache

    @jax.jit
    def step(cache, state, q, k, v, pos):
        cache = cache.write_layer(0, k, v, pos)
        layer = cache.layer(0)
        _, st = attn(q, layer.k, layer.v, bias=layer.attention_bias(pos, 1),
                     stats=press.decode_stats, impl="xla")
        return kvc.decode_evict(cache, press, {n: a[None] for n, a in st.items()}, state,
                                groups)

    for i in range(1, n_steps):
        q, k, v = (np.swapaxes(g[f"step{i}/{n}"], 1, 2) for n in ("q", "k_new", "v_new"))
        cache, state = step(cache, state, q, k, v, jnp.full((b, 1), t0 + i - 1, jnp.int32))
        yield i, cache


def _check_cache(g, i, cache):
    """The cache's valid slots, in position order, hold what the reference's cache holds."""
    pos, valid = np.asarray(cache.pos[0]), np.asarray(cache.valid[0])      # [B, C, KVH]
    want_idx, want_k = g[f"step{i}/kept_idx"], g[f"step{i}/k_out"]         # [B, KVH, T']
    for bi in range(pos.shape[0]):
        for h in range(pos.shape[2]):
            slots = np.nonzero(valid[bi, :, h])[0]
            slots = slots[np.argsort(pos[bi, slots, h])]
            np.testing.assert_array_equal(pos[bi, slots, h], want_idx[bi, h],
                                          err_msg=f"step {i}, row {bi}, head {h}")
            np.testing.assert_array_equal(np.asarray(cache.k[0, bi, slots, h]), want_k[bi, h])


@pytest.mark.parametrize("name", ["h2o_seq", "h2o_grow"])
def test_h2o_decoding_matches_official(name):
    g = load_golden(f"kv_{name}.npz")
    press = presses.get("h2o")(heavy=int(g["hh_size"]), recent=int(g["recent_size"]))
    for i, cache in _run_decode_steps(g, press):
        _check_cache(g, i, cache)
        assert int(np.asarray(cache.valid[0, 0, :, 0]).sum()) <= press.decode_budget()


def test_tova_decoding_matches_official():
    g = load_golden("kv_tova_seq_gqa.npz")
    press = presses.get("tova")(cache_size=int(g["cache_size"]))
    for i, cache in _run_decode_steps(g, press):
        _check_cache(g, i, cache)
        assert cache.capacity == press.cache_size + 1


# --------------------------------------------------------------------------------------------
# End to end on a tiny random decoder: generation, memory, one compile per press
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from jax_tokens.models import llama
    return llama.create(llama.LlamaConfig.tiny(), seed=5)


PROMPTS = [[5, 9, 30, 31, 32, 7, 8, 100, 101, 17, 18, 19], [40, 41, 42, 43, 44, 45, 46],
           [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
PRESSES = [
    presses.get("snapkv")(window=4, capacity=10, kernel_size=3),
    presses.get("pyramidkv")(window=4, capacity=8),
    presses.get("h2o")(heavy=6, recent=4),
    presses.get("tova")(cache_size=10),
    presses.get("streaming_llm")(sinks=2, window=8),
    presses.get("knorm")(compression_ratio=0.5),
    presses.get("random_kv")(compression_ratio=0.5),
    presses.get("expected_attention")(compression_ratio=0.5, n_future_positions=32),
]


@pytest.mark.parametrize("press", PRESSES, ids=lambda p: p.method)
def test_generation_with_a_press(tiny, press):
    from jax_tokens.models import llama
    kw = dict(max_new_tokens=12, pad_multiple=16, pad_id=0)
    plain, _, _, _ = llama.prefill(tiny, PROMPTS, capacity=32, **{k: kw[k] for k in
                                                                  ("max_new_tokens",
                                                                   "pad_multiple")})
    state, _, _, plans = llama.prefill(tiny, PROMPTS, capacity=32, press=press,
                                       max_new_tokens=12, pad_multiple=16)
    assert len(plans) == tiny.cfg.num_layers
    # the compressed cache is smaller: the kept slots + room for 11 tokens, or the decoding
    # budget + 1 for the presses that evict while decoding
    budget = press.decode_budget()
    kept = max(p.n_out for p in plans)
    want = budget + 1 if budget is not None else kept + 16
    assert state.cache.capacity == min(want, kept + 16) < plain.cache.capacity
    out = llama.decode(tiny, state, max_new_tokens=12, press=press)
    assert out.tokens.shape == (3, 12) and np.asarray(out.tokens).max() < tiny.cfg.vocab_size
    before = llama.TRACES["generate"]
    a = llama.generate(tiny, PROMPTS, press=press, **kw)
    b = llama.generate(tiny, [p[::-1] for p in PROMPTS], press=press, **kw)   # no retrace
    assert llama.TRACES["generate"] == before + 1
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(out.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


@pytest.mark.parametrize("press", [
    presses.get("snapkv")(window=4, capacity=16), presses.get("h2o")(heavy=24, recent=8),
    presses.get("tova")(cache_size=32), presses.get("streaming_llm")(sinks=4, window=29),
    presses.get("knorm")(capacity=16),
], ids=lambda p: p.method)
def test_a_press_with_room_for_everything_changes_nothing(tiny, press):
    from jax_tokens.models import llama
    kw = dict(max_new_tokens=12, pad_multiple=16, pad_id=0)
    want = llama.generate(tiny, PROMPTS, **kw)
    got = llama.generate(tiny, PROMPTS, press=press, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


def test_decode_needs_the_decoding_press(tiny):
    from jax_tokens.models import llama
    press = presses.get("h2o")(heavy=6, recent=4)
    state, _, _, _ = llama.prefill(tiny, PROMPTS, capacity=32, press=press, max_new_tokens=8,
                                   pad_multiple=16)
    with pytest.raises(ValueError, match=r"decode\(press=...\) must be the press given to "
                                         r"prefill"):
        llama.decode(tiny, state, max_new_tokens=8)


@pytest.mark.parametrize("name", ["expattn_gqa", "expattn_nocov_eps"])
def test_expected_attention_matches_kvpress(name):
    g = load_golden(f"kv_{name}.npz")
    hq, d = int(g["num_attention_heads"]), int(g["head_dim"])
    h = g["hidden_states"]
    q = (h @ g["q_proj_weight"].T).reshape(h.shape[0], h.shape[1], hq, d)   # before RoPE
    press = presses.get("expected_attention")(
        compression_ratio=float(g["compression_ratio"]),
        n_future_positions=int(g["n_future_positions"]), n_sink=int(g["n_sink"]),
        use_covariance=bool(g["use_covariance"]), use_vnorm=bool(g["use_vnorm"]),
        epsilon=float(g["epsilon"]))
    inputs = _inputs(np.swapaxes(q, 1, 2), g["keys"], g["values"], stats=())
    inv_freq = 1.0 / (float(g["rope_theta"]) ** (np.arange(0, d, 2) / d))
    inputs = inputs.replace(queries=jnp.asarray(q, jnp.float32),
                            inv_freq=jnp.asarray(inv_freq, jnp.float32))
    from jax_tokens.reducers.presses.expected_attention import expected_attention_scores
    t = inputs.n_prompt
    s = expected_attention_scores(inputs.queries, inputs.keys, inputs.values, inputs.valid,
                                  inputs.positions, inputs.query_positions, inputs.inv_freq,
                                  n_future=press.n_future_positions, n_sink=press.n_sink,
                                  use_covariance=press.use_covariance,
                                  use_vnorm=press.use_vnorm, epsilon=press.epsilon)
    np.testing.assert_allclose(np.asarray(s), g["scores"], rtol=1e-4, atol=1e-6)
    plan = press.plan(inputs)
    assert plan.n_out == int(g["n_kept"]) and t == g["keys"].shape[2]
    _check_plan(plan, inputs, g, ordered=not _meta(g)["ties_in_kept"])


# --------------------------------------------------------------------------------------------
# FastV and PyramidDrop: prompt tokens dropped inside the model
# --------------------------------------------------------------------------------------------

def _numpy_select(scores, start, end, keep):
    """The papers' rule in NumPy: the top `keep` span tokens by score (ties: the earlier
    token), in position order, between the untouched prefix and suffix."""
    out = []
    for row in np.asarray(scores, np.float64):
        span = row[start:end]
        order = sorted(range(len(span)), key=lambda i: (-span[i], i))[:keep]
        out.append(list(range(start)) + [start + i for i in sorted(order)]
                   + list(range(end, len(row))))
    return np.asarray(out)


def test_span_selection_matches_numpy():
    from jax_tokens.reducers.presses.token_drop import select_span
    rng = np.random.default_rng(0)
    scores = rng.random((3, 20)).astype(np.float32)
    scores[1, 5:9] = 0.5                                   # ties inside the span
    for start, end, keep in ((2, 15, 6), (0, 19, 0), (4, 12, 8)):
        np.testing.assert_array_equal(np.asarray(select_span(jnp.asarray(scores), start, end,
                                                             keep)),
                                      _numpy_select(scores, start, end, keep))


@pytest.fixture(scope="module")
def tiny4():
    from jax_tokens.models import llama
    return llama.create(llama.LlamaConfig.tiny(num_layers=4), seed=7)


def _manual_dropping(model, tokens, stages, span):
    """Layer segments without a cache: plain causal attention over the current tokens, the
    last token's head-mean attention of the layer before each drop, `_numpy_select`."""
    from flax import nnx
    x = model.embed_tokens(jnp.asarray(tokens))
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    layer, (start, end) = 0, span
    for k, keep in stages:
        x, _, st = model.run_layers(x, pos, start=layer, stop=k, stats=("cls_probs",),
                                    query_index=x.shape[1] - 1, causal_only=True)
        idx = _numpy_select(np.asarray(st["cls_probs"][-1]).mean(1), start, end, keep)
        x = jnp.take_along_axis(x, jnp.asarray(idx)[..., None], 1)
        pos = jnp.take_along_axis(pos, jnp.asarray(idx), 1)
        end, layer = start + keep, k
    x, _, _ = model.run_layers(x, pos, start=layer)
    del nnx
    return np.asarray(model.logits(model.norm(x)[:, -1])), x.shape[1]


@pytest.mark.parametrize("press, kept", [
    (presses.get("fastv")(layer=2, ratio=0.5, span=(2, -3)), 20 - 15 + 7),
    (presses.get("pdrop")(layers=(1, 2, 3), keep=0.5, span=(1, 17)), 20 - 16 + 2),
], ids=["fastv", "pdrop"])
def test_token_dropping_matches_a_numpy_transcription(tiny4, press, kept):
    """The cache path (one prefill with the press) equals the layers run segment by segment
    on the tokens the NumPy rule keeps; the later layers' caches hold only those tokens."""
    from jax_tokens.models import llama
    tokens = np.random.default_rng(1).integers(3, 250, (2, 20)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    stages = press.stages(20, 4)
    want, n = _manual_dropping(tiny4, tokens, stages, press.span_slots(20))
    assert n == kept
    state, _, _, plans = llama.prefill(tiny4, tokens, mask=mask, capacity=32, press=press,
                                       max_new_tokens=4)
    assert plans == []
    np.testing.assert_allclose(np.asarray(state.logits), want, atol=1e-4)
    first = stages[0][0]
    counts = np.asarray(state.cache.valid[:, 0, :, 0]).sum(-1)     # per layer
    assert list(counts[:first]) == [20] * first and counts[-1] == kept
    out = llama.decode(tiny4, state, max_new_tokens=4)
    assert out.tokens.shape == (2, 4)


def test_token_dropping_keeping_everything_changes_nothing(tiny4):
    from jax_tokens.models import llama
    kw = dict(max_new_tokens=6, pad_multiple=16, pad_id=0)
    want = llama.generate(tiny4, PROMPTS, **kw)
    got = llama.generate(tiny4, PROMPTS, press=presses.get("fastv")(layer=1, ratio=0.0,
                                                                    span=(0, -2)), **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


def test_token_dropping_schedules_and_errors():
    assert presses.get("pdrop")(layers=(8, 16, 24), keep=0.5, span=(10, 110)).stages(
        128, 30) == ((8, 50), (16, 25), (24, 12))
    assert presses.get("fastv")(layer=2, ratio=0.75, span=(-90, -10)).stages(
        100, 30) == ((2, 20),)
    with pytest.raises(ValueError, match=r"span=\(0, 20\) is slots \[0, 20\) of a 20-token "
                                         r"prompt: it must .* ends before the last token"):
        presses.get("fastv")(span=(0, 20)).stages(20, 4)
    with pytest.raises(ValueError, match=r"drop layer 4 must lie in \[1, 4\)"):
        presses.get("fastv")(layer=4, span=(0, 5)).stages(20, 4)
    with pytest.raises(ValueError, match=r"layers=\(3, 2\) must be a non-empty tuple of "
                                         r"increasing ints"):
        presses.get("pdrop")(layers=(3, 2))
    with pytest.raises(ValueError, match=r"ratio=1.0 must be a float in \[0, 1\)"):
        presses.get("fastv")(ratio=1.0)
