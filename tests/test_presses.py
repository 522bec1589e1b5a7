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


