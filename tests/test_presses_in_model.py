"""KV-cache presses inside the decoder: eviction while decoding step by step against the
official H2O and TOVA caches (../shared/golden/kv_h2o_*, kv_tova_*), generation with every
press on a tiny random decoder (memory, one compile per press), and FastV / PyramidDrop
against a NumPy transcription of their selection rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_golden
from jax_tokens.models.llama import cache as kvc
from jax_tokens.reducers import presses


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


def test_streaming_llm_positions_are_the_papers(tiny):
    """With `reindex` (the default), reading through StreamingLLM's cache gives the logits of
    the paper's numbering: cached tokens renumbered 0..K-1 in cache order (sinks, then the
    window), keys rotated with those numbers, the new tokens after them."""
    from jax_tokens.models.llama import generation
    from jax_tokens.models.llama.rope import apply_rope, rope_inv_freq, rope_tables
    tokens = jnp.asarray([[5, 9, 30, 31, 32, 7, 8, 100, 101, 17, 18, 19, 60, 61, 62, 63]])
    cont = jnp.asarray([[70, 71, 72, 73]])
    inv = rope_inv_freq(tiny.cfg)

    def read(press):
        state, _ = generation._prefill(tiny, tokens, jnp.ones_like(tokens, bool), capacity=24,
                                       press=press, cache_dtype="float32", decoding=False)
        pos = state.next_pos[:, None] + jnp.arange(4)[None]
        return state.cache, tiny(cont, positions=pos, cache=state.cache, logits="all")[0]

    cache, ours = read(presses.get("streaming_llm")(sinks=2, window=6))
    assert cache.sink_shift == 2
    _, plain = read(presses.get("streaming_llm")(sinks=2, window=6, reindex=False))
    # The paper's cache: slots 0..7 hold sinks 0, 1 and the window 10..15, renumbered 0..7.
    k = 8
    slot = jnp.arange(cache.capacity)[None, None, :, None]
    new_pos = jnp.where(cache.valid, jnp.broadcast_to(slot, cache.pos.shape), -1)
    np.testing.assert_array_equal(np.asarray(cache.pos[0, 0, :k, 0]),
                                  [0, 1, 10, 11, 12, 13, 14, 15])

    def rotate(x, p):                         # x [L, B, C, KVH, hd], p [L, B, C, KVH]
        flat = p.reshape(-1, p.shape[2] * p.shape[3])
        cos, sin = rope_tables(flat, inv)
        shape = x.shape
        y = apply_rope(x.reshape(flat.shape[0], shape[2] * shape[3], 1, shape[4]), cos, sin)
        return y.reshape(shape)

    raw = rotate(cache.k, -cache.pos)                       # undo the true positions' rotation
    paper = cache.replace(k=rotate(raw, new_pos), pos=new_pos, sink_shift=0)
    want = tiny(cont, positions=k + jnp.arange(4)[None], cache=paper, logits="all")[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(want), atol=2e-4, rtol=1e-4)
    assert float(jnp.abs(plain - want).max()) > 1e-3      # true positions differ
