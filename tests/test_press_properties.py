"""Property tests (hypothesis) over every registered KV-cache press: random batch, prompt length,
KV heads, query heads per KV head, head width, left padding per row, dtype, budgets (the
smallest and largest legal ones included), layer of a pyramid, and ties (duplicate keys,
constant statistics). Invariants of the plan:

* `kept_idx` has the static shape [B, KVH, K] with K = `press.n_kept(T, layer, L)` <= T;
* indices are prompt slots [0, T), distinct per head;
* padding is never kept over a real token: a row with at least K real tokens keeps only real
  ones, a shorter row keeps all of its real tokens;
* `plan.apply` is the gather of those slots (bit-equal keys) and `plan.assignment` its inverse;
* the windows the press promises are kept: SnapKV / PyramidKV the last `window` slots, H2O the
  last `recent`, StreamingLLM the first `sinks` real tokens and the last `window`;
* `jax.jit` equals eager.

The presses that drop prompt tokens inside the model (FastV, PyramidDrop) have no cache plan:
their static schedules are checked instead (layers in [1, L), span tokens kept never grow).
Profiles as in test_properties.py: a case is a configuration (press, prompt length, batch,
heads, width, layer, dtype) with `INPUT_DRAWS` inputs (left padding per row, ties, seed) run
through its one compiled plan (CI: 4 configurations per press, 2 inputs each;
`JAX_TOKENS_HYPOTHESIS=long`: 8 inputs each).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import INPUT_DRAWS, log_property_case
from jax_tokens.reducers import presses
from jax_tokens.reducers.presses import base


def _ratio(k: int, t: int) -> float:
    """A compression ratio whose int(t * (1 - ratio)) is exactly k (1 <= k <= t)."""
    return 1.0 - (k + 0.5) / t if k < t else 0.0


def _budget(t, least=1):
    """capacity=k or compression_ratio giving k, for k in [least, t]."""
    return st.integers(least, t).flatmap(lambda k: st.sampled_from(
        [dict(capacity=k), dict(compression_ratio=_ratio(k, t))]))


def _snapkv(cls, t, **extra):
    return st.integers(1, t - 2).flatmap(lambda w: _budget(t, least=w + 1).flatmap(
        lambda budget: st.builds(
            lambda **kw: cls(window=w, **budget, **kw, **extra),
            kernel_size=st.sampled_from([1, 3, 5]),
            pooling=st.sampled_from(list(base.POOLINGS)),
            gqa_agg=st.sampled_from(list(base.GQA_AGGREGATIONS)))))


# method -> strategy of presses for a prompt of t tokens (t >= 4). A registered press without
# an entry fails test_every_registered_press_has_a_strategy.
STRATEGIES = {
    "snapkv": lambda t: _snapkv(presses.get("snapkv"), t),
    "pyramidkv": lambda t: _snapkv(presses.get("pyramidkv"), t),
    "h2o": lambda t: st.integers(0, t).flatmap(lambda heavy: st.builds(
        lambda recent, **kw: presses.get("h2o")(heavy=heavy, recent=recent, **kw),
        recent=st.integers(0 if heavy else 1, t),
        gqa_agg=st.sampled_from(list(base.GQA_AGGREGATIONS)))),
    "tova": lambda t: st.builds(presses.get("tova"), cache_size=st.integers(1, t + 2)),
    "streaming_llm": lambda t: st.builds(presses.get("streaming_llm"),
                                         sinks=st.integers(0, t), window=st.integers(1, t)),
    "knorm": lambda t: _budget(t).map(lambda b: presses.get("knorm")(**b)),
    "random_kv": lambda t: _budget(t).flatmap(lambda b: st.builds(
        lambda seed: presses.get("random_kv")(seed=seed, **b), seed=st.integers(0, 9))),
    "expected_attention": lambda t: _budget(t).flatmap(lambda b: st.builds(
        lambda **kw: presses.get("expected_attention")(**b, **kw),
        n_future_positions=st.sampled_from([1, 16]), n_sink=st.integers(0, 3),
        use_covariance=st.booleans(), use_vnorm=st.booleans(),
        epsilon=st.sampled_from([0.0, 1e-2]))),
    "fastv": lambda t: st.builds(
        lambda start, length, **kw: presses.get("fastv")(span=(start, start + length), **kw),
        start=st.integers(0, t - 3), length=st.integers(1, 2),
        layer=st.integers(1, 3), ratio=st.sampled_from([0.0, 0.25, 0.5, 0.99])),
    "pdrop": lambda t: st.builds(
        lambda layers, keep: presses.get("pdrop")(layers=layers, keep=keep, span=(0, -1)),
        layers=st.sampled_from([(1,), (1, 2), (1, 3), (2, 3)]),
        keep=st.sampled_from([0.25, 0.5, 1.0])),
}

def test_every_registered_press_has_a_strategy():
    assert set(STRATEGIES) == set(presses.names())


@st.composite
def cases(draw, method):
    t = draw(st.integers(4, 40))
    press = draw(STRATEGIES[method](t))
    b = draw(st.integers(1, 3))
    kvh = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 3]))
    hd = draw(st.sampled_from([2, 4, 8]))
    num_layers = draw(st.integers(1, 4))
    layer = draw(st.integers(0, num_layers - 1))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    inputs = draw(st.lists(st.tuples(st.tuples(*[st.integers(0, t - 2)] * b),   # pads per row
                                     st.sampled_from(["none", "duplicate_keys", "constant"]),
                                     st.integers(0, 2 ** 16)),                   # seed
                           min_size=INPUT_DRAWS, max_size=INPUT_DRAWS))
    return press, t, b, kvh, groups, hd, num_layers, layer, dtype, tuple(inputs)


def _inputs(press, t, b, kvh, groups, hd, num_layers, layer, dtype, pads, ties, seed):
    """Left-padded prompts: keys, values, positions and the statistics the press requests
    (causal attention probabilities that give padding nothing), drawn with NumPy."""
    rng = np.random.default_rng(seed)
    h = kvh * groups
    valid = np.ones((b, t, kvh), bool)
    pos = np.broadcast_to(np.arange(t)[None, :, None], (b, t, kvh)).copy()
    for i, p in enumerate(pads):
        valid[i, :p] = False
        pos[i] = np.maximum(pos[i] - p, 0)
    keys = rng.normal(size=(b, t, kvh, hd)).astype(np.float32)
    if ties == "duplicate_keys":
        keys = np.repeat(keys[:, : (t + 1) // 2], 2, axis=1)[:, :t]
    elif ties == "constant":
        keys = np.broadcast_to(keys[:, :1], keys.shape).copy()
    values = rng.normal(size=(b, t, kvh, hd)).astype(np.float32)
    req = press.request(t)
    rows = (req.query_index,) if isinstance(req.query_index, int) else tuple(req.query_index)
    logits = rng.normal(size=(b, h, len(rows), t)) if ties == "none" else \
        np.zeros((b, h, len(rows), t))
    causal = np.arange(t)[None, :] <= np.asarray(rows)[:, None]             # [W, T]
    mask = causal[None, None] & valid[:, None, None, :, 0]
    probs = np.where(mask, np.exp(logits), 0.0)
    probs = (probs / np.maximum(probs.sum(-1, keepdims=True), 1e-30)).astype(np.float32)
    stats = {"cls_probs": probs[:, :, 0] if isinstance(req.query_index, int) else probs,
             "key_mass": probs.sum(2)}
    stats = {k: jnp.asarray(v) for k, v in stats.items() if k in req.stats}
    queries = inv_freq = None
    if req.queries:
        queries = jnp.asarray(rng.normal(size=(b, t, h, hd)), dtype)
        inv_freq = jnp.asarray(1.0 / 10000 ** (np.arange(0, hd, 2) / hd), jnp.float32)
    return base.PressInputs(keys=jnp.asarray(keys, dtype), values=jnp.asarray(values, dtype),
                            positions=jnp.asarray(pos, jnp.int32), valid=jnp.asarray(valid),
                            stats=stats, queries=queries,
                            query_positions=jnp.asarray(pos[..., 0], jnp.int32), layer=layer,
                            groups=groups, num_layers=num_layers, inv_freq=inv_freq)


def _check_schedule(press, t, num_layers):
    layers = num_layers + 3                       # the strategies' layers lie in [1, 3]
    start, end = press.span_slots(t)
    stages = press.stages(t, layers)
    assert [layer for layer, _ in stages] == sorted({layer for layer, _ in stages})
    assert all(1 <= layer < layers for layer, _ in stages)
    kept = [end - start] + [k for _, k in stages]
    assert all(0 <= b <= a for a, b in zip(kept, kept[1:])), kept


def _check(method, case):
    """One configuration: its plan compiled once, every drawn input checked through it."""
    press, t, b, kvh, groups, hd, num_layers, layer, dtype, inputs = case
    schedule_only = getattr(press, "drops_tokens", False)
    log_property_case(method, 0 if schedule_only else len(inputs))
    if schedule_only:
        _check_schedule(press, t, num_layers)
        return
    plan_jit = jax.jit(press.plan)
    for pads, ties, seed in inputs:
        _check_input(method, press, _inputs(*case[:-1], pads, ties, seed), pads, plan_jit)


def _check_input(method, press, inputs, pads, plan_jit):
    """The invariants of the plan for one input (eager), and jit == eager."""
    b, t, kvh, hd = inputs.keys.shape
    k = press.n_kept(t, inputs.layer, inputs.num_layers)
    plan = press.plan(inputs)
    idx = np.asarray(plan.kept_idx)
    # Static shape, prompt slots, distinct per head.
    assert idx.shape == (b, kvh, k) and idx.dtype == np.int32 and 1 <= k <= t, (idx.shape, k)
    assert idx.min() >= 0 and idx.max() < t
    assert all(len(set(row)) == k for row in idx.reshape(-1, k))
    # Padding is never kept over a real token.
    valid = np.asarray(inputs.valid)                                     # [B, T, KVH]
    for i in range(b):
        for j in range(kvh):
            kept_valid = valid[i, idx[i, j], j]
            if valid[i, :, j].sum() >= k:
                assert kept_valid.all(), (i, j, idx[i, j], pads[i])
            else:
                assert set(np.flatnonzero(valid[i, :, j])) <= set(idx[i, j])
    # apply is the gather; assignment its inverse.
    keys = np.asarray(inputs.keys.astype(jnp.float32))
    gathered = np.asarray(plan.apply(inputs.keys).astype(jnp.float32))       # [B, K, KVH, hd]
    want = np.stack([keys[i, idx[i, j], j] for i in range(b) for j in range(kvh)])
    np.testing.assert_array_equal(
        np.transpose(gathered, (0, 2, 1, 3)).reshape(b * kvh, k, hd), want)
    assign = np.asarray(plan.assignment)                                    # [B, KVH, T]
    np.testing.assert_array_equal(np.take_along_axis(assign, idx, -1),
                                  np.broadcast_to(np.arange(k), idx.shape))
    assert ((assign >= 0).sum(-1) == k).all()
    # The promised windows.
    window = {"snapkv": getattr(press, "window", 0), "pyramidkv": getattr(press, "window", 0),
              "h2o": getattr(press, "recent", 0),
              "streaming_llm": getattr(press, "window", 0)}.get(method, 0)
    window = min(window, k)
    for row in idx.reshape(b * kvh, k):
        assert set(range(t - window, t)) <= set(row), (method, window, row)
    if method == "streaming_llm" and press.sinks + press.window < t:
        for i in range(b):
            real = min(press.sinks, t - pads[i])
            for j in range(kvh):
                assert set(range(pads[i], pads[i] + real)) <= set(idx[i, j])
    # jit == eager.
    idx_jit = np.asarray(plan_jit(inputs).kept_idx)
    np.testing.assert_array_equal(idx_jit, idx)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_press_properties(method):
    given(case=cases(method))(lambda case: _check(method, case))()
