"""Visual-token selectors (FasterVLM, VisionZip, DivPrune, LLaVA-PruMerge): parity with the
references' golden files (vbdi/divprune, dvlab-research/VisionZip, 42Shawn/LLaVA-PruMerge) for
the functional cores and for the reducers on [class token, tokens]; FasterVLM against a NumPy
transcription of its rule; the full-width attention statistics PruMerge reads; the merging
configurations against the dense view (which the property test cannot take); each reducer in a
small ViT (jit == eager, finite grad, no retrace); vmap of the cores; and budget errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import prune, reducers
from jax_tokens import tokens as tk
from jax_tokens.attention import attention
from jax_tokens.attention.pallas import attention_pallas
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.reducers import divprune as dp
from jax_tokens.reducers import fastervlm as fv
from jax_tokens.reducers import prumerge as pm
from jax_tokens.reducers import visionzip as vz

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")
ATOL = dict(atol=1e-5, rtol=0)


def _layout(n, c, heads=1, p=1):
    return reducers.TokenLayout(depth=1, num_tokens=n, num_prefix_tokens=p, class_token=p > 0,
                                embed_dim=c, num_heads=heads)


def _with_cls(tokens, value=7.0):
    b, _, c = tokens.shape
    return np.concatenate([np.full((b, 1, c), value, np.float32), tokens], axis=1)


def _normal(seed, *shapes):
    """Float32 normal draws (NumPy: jax.random would compile a program per shape)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def _sizes(b, n):
    return np.arange(1, b * n + 1, dtype=np.float32).reshape(b, n, 1)


def _reduced(red, layout, x, size, stats):
    """(y, new_size, plan, its dense view {"matrix", "apply", "invert", "assignment"}) of the
    reducer at its block; called inside one jitted program per case (it keeps the file fast)."""
    spec = red.schedule(layout)[red.block(layout)]
    y, new_size, plan = red.reduce(layout, spec, x, size, stats)
    view = dict(matrix=plan.matrix(), apply=plan.apply(x), invert=plan.invert(y),
                assignment=plan.assignment)
    return y, new_size, plan, view


def _compiled(f, *args):
    """f(*args) under jit, as NumPy arrays."""
    return jax.tree.map(np.asarray, jax.jit(f)(*args))


def _reduce(red, layout, x, size, stats):
    """`_reduced` in its own program, with the spec in front."""
    spec = red.schedule(layout)[red.block(layout)]
    return (spec,) + _compiled(lambda x, s, st: _reduced(red, layout, x, s, st), x, size, stats)


def _check_dense_view(view, x, y, size, new_size):
    """y == matrix() @ x == apply(x); sizes sum by assignment; invert is the gather by it."""
    np.testing.assert_allclose(np.einsum("bmn,bnc->bmc", view["matrix"], np.asarray(x)), y,
                               **ATOL)
    np.testing.assert_allclose(view["apply"], y, **ATOL)
    a = view["assignment"]
    want = np.where(a[..., None] >= 0, np.asarray(size), 0).sum((1, 2))
    np.testing.assert_allclose(np.asarray(new_size).sum((1, 2)), want, rtol=1e-6)
    np.testing.assert_array_equal(view["invert"], np.where(a[..., None] >= 0, np.take_along_axis(
        np.asarray(y), np.maximum(a, 0)[..., None], 1), 0))


# --------------------------------------------------------------------------------------------
# DivPrune
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["n64_r025", "n196_r01", "ties_half"])
def test_divprune_matches_reference(golden, case):
    d = golden(f"divprune_{case}.npz")
    assert json.loads(str(d["meta"]))["commit"].startswith("799e2d9")
    k = dp.keep_from_ratio(float(d["threshold_ratio"]), int(d["N"]))
    assert k == int(d["num_selected"])                  # ties_half: round(4.5) = 4
    feats = d["feats"][None]
    if "cosine_matrix_in" in d:     # the distance matrix is given: feats play no part
        for sel in _compiled(lambda dist: (dp.divprune(None, k, distance=dist),
                                           dp.divprune(None, k, distance=dist, repeat=True)),
                             d["cosine_matrix_in"][None]):
            np.testing.assert_array_equal(sel[0], d["selected"])
        return
    # The core, and the reducer on [cls, feats]: kept tokens in input order, the class token
    # in front.
    n, c = d["feats"].shape
    x = _with_cls(feats)
    layout = _layout(n + 1, c)
    red = dp.DivPrune(keep=k, layers=(0,))
    spec = red.schedule(layout)[0]
    size = _sizes(1, n + 1)
    dist, picks, (y, new_size, plan, view) = _compiled(
        lambda f, x, s: (dp.cosine_distance(f), (dp.divprune(f, k),
                                                 dp.divprune(f, k, repeat=True)),
                         _reduced(red, layout, x, s, {})), feats, x, size)
    np.testing.assert_allclose(dist[0], d["cosine_matrix"], **ATOL)
    for sel in picks:                                   # distinct tokens: the same picks
        np.testing.assert_array_equal(sel[0], d["selected"])
    assert (spec.n_in, spec.n_out, spec.budget, spec.active) == (n + 1, k + 1, k, True)
    assert red.stats(layout, spec) == () and red.placement(spec) == "after"
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    np.testing.assert_array_equal(plan.kept_idx[0], d["selected_sorted"])
    np.testing.assert_allclose(y[0, 1:], d["selected_features_sorted"], **ATOL)
    np.testing.assert_array_equal(new_size[0, 1:, 0], size[0, 1 + d["selected_sorted"], 0])
    _check_dense_view(view, x, y, size, new_size)


def test_divprune_never_repicks_a_token():
    """Four copies of one token and two others: the reference's rule re-picks (D[s, s] = 0 is
    the best remaining score), ours takes distinct tokens."""
    base = np.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]], np.float32)
    feats = jnp.asarray(base[[0, 0, 0, 0, 1, 2]])[None]
    ours, ref = jax.jit(lambda f: (dp.divprune(f, 5), dp.divprune(f, 5, repeat=True)))(feats)
    assert len(set(np.asarray(ours)[0].tolist())) == 5
    ref = np.asarray(ref)[0]
    assert len(set(ref.tolist())) < 5


def test_parallel_tokens_tie_exactly_eager_and_under_jit():
    """One channel: every cosine is exactly +-1, so distances tie; under jit XLA would turn
    x / ||x|| into x * rsqrt(x^2) and break the ties by rounding noise (`l2_normalize`)."""
    feats = jnp.asarray([[[-0.9063372], [-0.7481722], [-1.1713669], [0.5]]])
    eager = dp.divprune(feats, 2)
    np.testing.assert_array_equal(jax.jit(lambda f: dp.divprune(f, 2))(feats), eager)
    np.testing.assert_array_equal(eager, [[3, 0]])     # the lone positive, then the first
    np.testing.assert_array_equal(jax.jit(fv.l2_normalize)(feats), fv.l2_normalize(feats))
    np.testing.assert_array_equal(fv.l2_normalize(feats)[0, :, 0], [-1, -1, -1, 1])


# --------------------------------------------------------------------------------------------
# VisionZip
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["n197", "n65_trunc", "n33_step1"])
def test_visionzip_matches_reference(golden, case):
    d = golden(f"visionzip_{case}.npz")
    meta = json.loads(str(d["meta"]))
    dom, ctx = int(d["dominant_num"]), int(d["contextual_num"])
    b, h, n = d["attn"].shape[:3]
    c = d["hidden_states"].shape[-1]
    if case == "n65_trunc":       # arange(0, 50, 6) has 9 entries, cut to 8
        assert len(np.arange(0, 50, 6)) == 9 and list(vz.targets(50, 8)) == list(range(0, 48, 6))
    # The functional core on the patch columns.
    # And the reducer, with the golden attention row and keys as its statistics.
    red = vz.VisionZip(keep=dom + ctx, contextual=ctx, layers=(0,))
    layout = _layout(n, c, heads=h)
    spec = red.schedule(layout)[0]
    stats = {"cls_probs": d["attn"][:, :, 0], "mean_key": d["metric"]}
    size = _sizes(b, n)

    def run(x, s, st):
        plan = vz.visionzip(st["cls_probs"][:, :, 1:].sum(1), st["mean_key"][:, 1:], dom, ctx,
                            protected=1)
        return (plan.dominant, plan.apply(x)), _reduced(red, layout, x, s, st)

    (dominant, out), (y, new_size, plan, view) = _compiled(run, d["hidden_states"], size, stats)
    np.testing.assert_array_equal(dominant + 1, d["all_indices"][:, 1:])
    np.testing.assert_allclose(out, d["tokens"], **ATOL)
    assert meta["step"] == max(1, meta["remaining"] // ctx)
    assert (spec.n_out, spec.budget) == (1 + dom + ctx, dom + ctx)
    assert red.stats(layout, spec) == ("cls_probs", "mean_key")
    np.testing.assert_allclose(y, d["tokens"], **ATOL)
    np.testing.assert_array_equal(plan.dominant + 1, d["all_indices"][:, 1:])
    # Sizes: dominant tokens their own, each contextual token its target's plus its members'.
    np.testing.assert_array_equal(new_size[:, 0], size[:, 0])
    np.testing.assert_array_equal(new_size[:, 1:1 + dom, 0],
                                  np.take_along_axis(size[..., 0],
                                                     np.sort(d["all_indices"][:, 1:], 1), 1))
    _check_dense_view(view, d["hidden_states"], y, size, new_size)


def test_visionzip_default_split_is_54_to_10():
    assert [vz.default_contextual(k) for k in (64, 128, 192)] == [10, 20, 30]
    red = vz.VisionZip(keep=64, layers=(-1,))
    assert red.num_contextual == 10
    assert vz.VisionZip(keep=64, layers=(0,), contextual=0).num_contextual == 0


# --------------------------------------------------------------------------------------------
# LLaVA-PruMerge and its attention statistics
# --------------------------------------------------------------------------------------------

def _full_width_stats(q, k, heads=2):
    """The reducer's statistics from full-width q, k [B, N, C], through the attention API
    (the heads are a split of the width; full_* undo it)."""
    b, n, c = q.shape
    split = lambda a: jnp.asarray(a).reshape(b, n, heads, c // heads)
    return attention(split(q), split(k), split(k), stats=("full_cls_probs", "full_key"),
                     impl="xla")[1]


@pytest.mark.parametrize("case", ["fixed_n196_r8", "fixed_n64_r4", "adaptive_n196"])
def test_prumerge_matches_reference(golden, case):
    d = golden(f"prumerge_{case}.npz")
    q, k, hidden = d["q"], d["k"], d["hidden_states"]
    b, n1, c = q.shape
    n, left = n1 - 1, int(d["left_tokens"])
    want = d["image_features"]
    adaptive = bool(d["if_adaptive"])
    cap = left + 5 if adaptive else left          # adaptive: a cap above L (invalid slots)
    red = pm.PruMerge(keep=cap, adaptive=adaptive, layers=(0,))
    layout = _layout(n1, c, heads=2)
    spec = red.schedule(layout)[0]
    size = _sizes(b, n1)

    def run(q, k, x, s):
        stats = _full_width_stats(q, k)
        a = stats["full_cls_probs"][:, 1:]
        plan = pm.prumerge(a, stats["full_key"][:, 1:], cap, adaptive=adaptive)
        core = (pm.outlier_count(a.reshape(-1)), pm.adaptive_keep(a, "batch"), plan.num_kept,
                plan.apply(x[:, 1:]))
        return stats, core, _reduced(red, layout, x, s, stats)

    stats, (count, keep, num_kept, out), (y, new_size, plan, view) = _compiled(
        run, q, k, hidden, size)
    np.testing.assert_array_equal(stats["full_key"], k)
    logits = np.einsum("bqc,bkc->bqk", q.astype(np.float64), k.astype(np.float64)) * c ** -0.5
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref = (ref / ref.sum(-1, keepdims=True))[:, 0]
    np.testing.assert_allclose(stats["full_cls_probs"], ref, atol=1e-7, rtol=1e-5)
    if adaptive:
        np.testing.assert_allclose(stats["full_cls_probs"][:, 1:], d["cls_attn"], atol=1e-7,
                                   rtol=1e-5)
        assert int(count) / (b * n) == float(d["adaptive_ratio"])  # the ratio, exactly
        np.testing.assert_array_equal(keep, [left] * b)
    else:
        assert int(n * float(d["reduction_ratio"])) == left
    # The functional core on the patch tokens (the reference drops the class token).
    np.testing.assert_array_equal(num_kept, [left] * b)
    np.testing.assert_allclose(out[:, :left], want[:, :left], **ATOL)
    np.testing.assert_allclose(out[:, -1], want[:, -1], **ATOL)
    np.testing.assert_array_equal(out[:, left:-1], 0)              # invalid slots (cap > L)
    # The reducer on [cls, tokens] with the statistics of the attention call.
    assert (spec.n_out, spec.budget) == (1 + cap + 1, cap)
    assert red.stats(layout, spec) == ("full_cls_probs", "full_key")
    assert red.per_example(spec) == (not adaptive)
    np.testing.assert_array_equal(y[:, 0], hidden[:, 0])
    np.testing.assert_allclose(y[:, 1:1 + left], want[:, :left], **ATOL)
    np.testing.assert_allclose(y[:, -1], want[:, -1], **ATOL)
    # Sizes: kept tokens their own, the extra token the rest's, invalid slots 0.
    kept = plan.kept[:, :left]
    np.testing.assert_array_equal(new_size[:, 1:1 + left, 0],
                                  np.take_along_axis(size[:, 1:, 0], kept, 1))
    np.testing.assert_array_equal(new_size[:, 1 + left:-1], 0)
    np.testing.assert_allclose(new_size.sum((1, 2)), size.sum((1, 2)), rtol=1e-6)
    _check_dense_view(view, hidden, y, size, new_size)


def test_adaptive_rule_is_numpys_percentile_and_python_floats():
    rng = np.random.default_rng(0)
    values = [(rng.random(n) ** 4).astype(np.float32) for n in (2, 3, 7, 49, 196, 577)]
    # int(P * (c / count)) in float64: (1 / 49) * 49 is 0.999..., so one outlier of 49 keeps 0.
    one = np.zeros((1, 49), np.float32)
    one[0, 3] = 1.0
    # "batch": one count over the whole batch; "image": one per example.
    two = np.zeros((2, 8), np.float32)
    two[0, :2] = 1.0

    def run(values, one, two):
        rules = [(pm.percentile(jnp.sort(v), 0.25), pm.percentile(jnp.sort(v), 0.75),
                  pm.outlier_count(v)) for v in values]
        return rules, (pm.adaptive_keep(one, "image"), pm.adaptive_keep(two, "batch"),
                       pm.adaptive_keep(two, "image"))

    rules, keeps = _compiled(run, values, one, two)
    for v, (q1, q3, count) in zip(values, rules):
        assert q1 == np.percentile(v, 25) and q3 == np.percentile(v, 75)   # the same bits
        assert count == int((v > q3 + 1.5 * (q3 - q1)).sum())
    for got, want in zip(keeps, ([0], [1, 1], [2, 0])):
        np.testing.assert_array_equal(got, want)


def test_full_width_statistics():
    """full_key / full_cls_probs: XLA vs NumPy (key sizes, a causal mask, several query rows),
    the Pallas path (interpreted) the same, no gradient through the probabilities, errors."""
    b, n, h, d = 2, 9, 2, 16
    q, k = _normal(0, (b, n, h, d), (b, n, h, d))
    size = jnp.arange(1, b * n + 1, dtype=jnp.float32).reshape(b, n)
    names = ("full_cls_probs", "full_key")
    qf = np.asarray(q, np.float64).reshape(b, n, -1)
    kf = np.asarray(k, np.float64).reshape(b, n, -1)
    configs = ((False, 0), (True, (0, 4, -1)))

    @jax.jit
    def stats(q, k, size):      # every implementation and configuration in one program
        out = []
        for causal, qi in configs:
            kw = dict(stats=names, key_size=size, causal=causal, query_index=qi)
            out.append((attention(q, k, k, impl="xla", **kw)[1],
                        attention_pallas(q, k, k, backend="gpu", interpret=True, **kw)[1]))
        grad = jax.grad(lambda q: attention(q, k, k, stats=("full_cls_probs",), impl="xla")[1][
            "full_cls_probs"].sum())(q)
        return out, grad

    got, g = stats(q, k, size)
    for (causal, qi), both in zip(configs, got):
        rows = np.atleast_1d(qi) % n
        logits = np.einsum("blc,bkc->blk", qf[:, rows], kf) * (h * d) ** -0.5
        logits = logits + np.log(np.asarray(size, np.float64))[:, None]
        if causal:
            logits = np.where(np.arange(n)[None, None] <= rows[None, :, None], logits, -np.inf)
        ref = np.exp(logits - logits.max(-1, keepdims=True))
        ref = ref / ref.sum(-1, keepdims=True)
        ref = ref[:, 0] if isinstance(qi, int) else ref
        for st in both:                                  # XLA, then Pallas
            np.testing.assert_allclose(st["full_cls_probs"], ref, atol=1e-6, rtol=1e-5)
            np.testing.assert_array_equal(st["full_key"], np.asarray(k).reshape(b, n, -1))
    assert not np.asarray(g).any()
    with pytest.raises(ValueError, match="need as many key heads as query heads"):
        attention(q, k[:, :, :1], k[:, :, :1], stats=("full_key",), impl="xla")
    with pytest.raises(ValueError, match="takes no bias"):
        attention(q, k, k, bias=jnp.zeros((1, 1, 1, n)), stats=("full_cls_probs",),
                  impl="xla")


# --------------------------------------------------------------------------------------------
# FasterVLM: a NumPy transcription of its rule
# --------------------------------------------------------------------------------------------

def _fastervlm_numpy(x, cls_probs, p, keep):
    score = cls_probs[:, :, p:].astype(np.float64).mean(axis=1)
    idx = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :keep], axis=1)
    return np.concatenate([x[:, :p], np.take_along_axis(x, p + idx[..., None], 1)], 1), idx


@pytest.mark.parametrize("p,keep", [(1, 5), (3, 1), (1, 12)])
def test_fastervlm_matches_numpy(p, keep):
    rng = np.random.default_rng(p + keep)
    b, n, h, c = 2, 15, 3, 6
    x = rng.normal(size=(b, n, c)).astype(np.float32)
    logits = rng.normal(size=(b, h, n)) * 3
    cls_probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    cls_probs[1, :, p + 2] = cls_probs[1, :, p + 6] = 0.9    # an exact tie: lower index first
    want, idx = _fastervlm_numpy(x, cls_probs, p, keep)
    red = fv.FasterVLM(keep=keep, layers=(0,))
    layout = _layout(n, c, heads=h, p=p)
    size = _sizes(b, n)
    spec, y, new_size, plan, view = _reduce(red, layout, x, size,
                                            {"cls_probs": jnp.asarray(cls_probs)})
    assert red.stats(layout, spec) == ("cls_probs",) and spec.n_out == p + keep
    np.testing.assert_array_equal(plan.kept_idx, idx)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(new_size, np.concatenate(
        [size[:, :p], np.take_along_axis(size, p + idx[..., None], 1)], 1))
    _check_dense_view(view, x, y, size, new_size)
    if keep == 1:
        assert idx[1, 0] == 2                                  # the tie went to the lower index


# --------------------------------------------------------------------------------------------
# The merging configurations, which the property test leaves out (its invert check takes a
# token of weight 1 for a token alone in its slot)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("red", [
    vz.VisionZip(keep=7, contextual=3, layers=(0,)),
    pm.PruMerge(keep=9, neighbors=3, adaptive=True, scope="image", prop_attn=True, layers=(0,)),
], ids=["visionzip", "prumerge"])
def test_merging_configurations_follow_the_dense_view(red):
    layout = _layout(19, 8, heads=2, p=2)
    spec = red.schedule(layout)[0]
    x, qk = _normal(3, (3, 19, 8), (3, 19, 2, 4))
    size = jnp.asarray(np.random.default_rng(4).integers(1, 5, (3, 19, 1)), jnp.float32)
    stats = jax.jit(lambda qk, v: attention(qk, qk, v, stats=red.stats(layout, spec),
                                            impl="xla")[1])(qk, x.reshape(3, 19, 2, 4))

    def reduce(x_):
        return red.reduce(layout, spec, x_, size, stats)

    (y, new_size, plan, view), g = _compiled(            # compiled: outputs, view, a gradient
        lambda x: (_reduced(red, layout, x, size, stats),
                   jax.grad(lambda x_: jnp.sum(reduce(x_)[0] ** 2))(x)), x)
    assert np.isfinite(g).all() and np.abs(g).sum() > 0
    assert y.shape == (3, spec.n_out, 8) and new_size.shape == (3, spec.n_out, 1)
    assert (plan.n_in, plan.n_out) == (spec.n_in, spec.n_out)
    _check_dense_view(view, x, y, size, new_size)
    # Tokens alone in their slot with weight 1 come back exactly; merged slots hold more.
    w, a = view["matrix"], view["assignment"]
    alone = (w != 0).sum(axis=2) == 1                                       # [B, M]
    own = np.take_along_axis(w, np.maximum(a, 0)[:, None, :], axis=1)[:, 0]
    ok = (a >= 0) & (own == 1.0) & np.take_along_axis(alone, np.maximum(a, 0), 1)
    np.testing.assert_array_equal(view["invert"][ok], np.asarray(x)[ok])
    assert ((a >= 0) & (own == 1.0) & ~ok).any()                  # some merges took place
    ye, se, _ = reduce(x)                                         # eager == jit
    np.testing.assert_allclose(ye, y, **ATOL)
    np.testing.assert_array_equal(se, new_size)


# --------------------------------------------------------------------------------------------
# In a small ViT; vmap of the cores
# --------------------------------------------------------------------------------------------

# Mostly at the last block: the blocks before it run on the same shapes in every case, so the
# eager runs share their compiled ops. PruMerge (adaptive) has a block after it, which masks its
# size-0 slots (prop_attn).
VIT_CASES = {     # method: (fields, tokens entering each block and after, sizes' sum)
    "fastervlm": (dict(keep=8, layers=(-1,)), [17, 17, 17, 9], 9),
    "visionzip": (dict(keep=8, contextual=3, layers=(-1,), place="mid"), [17, 17, 17, 9], 17),
    "divprune": (dict(keep=6, layers=(2,)), [17, 17, 17, 7], 7),
    "prumerge": (dict(keep=16, neighbors=4, layers=(-2,), adaptive=True, prop_attn=True),
                 [17, 17, 18, 18], 17),
}


@pytest.mark.parametrize("name", sorted(VIT_CASES))
def test_in_a_small_vit(name):
    """jit == eager, no retrace, a finite gradient; PruMerge adaptive with its size-0 slots
    masked in the blocks after it (prop_attn)."""
    kw, counts, size_sum = VIT_CASES[name]
    red = reducers.from_config(dict(method=name, **kw))
    cfg = ViTConfig(**SMALL, reduction=red)
    assert cfg.token_counts() == counts and cfg.flops() > 0
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    images, = _normal(0, (2, 16, 16, 3))
    traces = []

    @functools.partial(jax.jit, static_argnames="red")
    def step(m, x, red):
        traces.append(1)

        def loss(x_):
            logits, aux = m(x_, reduction=red)
            return logits.sum(), (logits, aux)

        return jax.value_and_grad(loss, has_aux=True)(x)

    (_, (logits, aux)), g = step(model, images, red)
    step(model, images + 1.0, red)
    assert len(traces) == 1                                        # no retrace
    if name in ("fastervlm", "divprune"):   # the others' eager == jit: on the reducer alone
        eager, eager_aux = model(images)
        np.testing.assert_allclose(logits, eager, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(aux["size"], eager_aux["size"])
    assert logits.shape == (2, 5) and bool(jnp.isfinite(logits).all())
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0
    assert aux["plans"][0].n_out == counts[-1]
    # Sizes: the kept patches (pruning) or all 17 (merging), the class token's included.
    size = np.asarray(aux["size"])
    np.testing.assert_allclose(size.sum((1, 2)), size_sum, rtol=1e-6)
    if name == "prumerge":     # invalid slots: size 0, as many as the plan says
        valid = np.asarray(aux["plans"][0].valid)
        assert (size[:, 1:17, 0] == 0).sum() == (~valid).sum() > 0


def test_vmap_of_the_cores():
    x, logits, keys = _normal(5, (2, 3, 12, 6), (2, 3, 12), (2, 3, 12, 4))   # [V, B, P, C]
    attn = np.exp(3 * logits) / np.exp(3 * logits).sum(-1, keepdims=True)
    cases = {
        "divprune": lambda x, a, k: dp.divprune(x, 5),
        "visionzip": lambda x, a, k: vz.visionzip(a, k, 3, 2).apply(x),
        "prumerge": lambda x, a, k: pm.prumerge(a, k, 6, adaptive=True, neighbors=3,
                                                scope="image").apply(x),
        "fastervlm": lambda x, a, k: tk.gather_tokens(x, prune.topk(
            a, 4, protected=0, order="position").kept_idx),
    }

    flat = lambda a: a.reshape((-1,) + a.shape[2:])

    for name, f in cases.items():     # vmapped, and on the batch of all slices
        got, whole = _compiled(lambda x, a, k: (jax.vmap(f)(x, a, k),
                                                f(flat(x), flat(a), flat(k))), x, attn, keys)
        np.testing.assert_allclose(flat(got), whole, err_msg=name, **ATOL)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_bad_budgets_raise_naming_the_argument():
    layout = ViTConfig(**SMALL).layout()                  # 17 tokens: class + 16 patches
    for cls in (fv.FasterVLM, dp.DivPrune, vz.VisionZip, pm.PruMerge):
        with pytest.raises(ValueError, match=r"reduction.keep=17 at block 1: 16 patch tokens "
                                             r"\(besides 1 prefix tokens\) enter it \(allowed: "
                                             r"1..16\)"):
            cls(keep=17, layers=(1,), **({"neighbors": 4} if cls is pm.PruMerge else {})
                ).schedule(layout)
        with pytest.raises(ValueError, match=r"reduction.keep=0 is not allowed"):
            cls(keep=0, layers=(1,))
        with pytest.raises(TypeError, match=r"reduction.keep must be an int"):
            cls(keep=0.5, layers=(1,))
        with pytest.raises(ValueError, match=r"exactly one block"):
            cls(keep=4)
        with pytest.raises(ValueError, match=r"reduction.layers=\[0, 2\]: .* exactly one block"):
            cls(keep=4, layers=(0, 2))
        with pytest.raises(ValueError, match=r"reduction.layers contains -4, but the model has "
                                             r"3 blocks \(allowed: -3..2\)"):
            cls(keep=4, layers=(-4,)).schedule(layout)
        with pytest.raises(ValueError, match=r"reduction.place='before' is not one of"):
            cls(keep=4, layers=(0,), place="before")
    with pytest.raises(ValueError, match=r"reduction.contextual=9 is not allowed: it must be "
                                         r"<= 8"):
        vz.VisionZip(keep=8, contextual=9, layers=(0,))
    with pytest.raises(ValueError, match=r"reduction.neighbors=32 at block 2: each kept token "
                                         r"merges its nearest of the other 15 patch tokens "
                                         r"\(allowed: 0..15\)"):
        pm.PruMerge(keep=4, layers=(2,)).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.neighbors=-1 is not allowed"):
        pm.PruMerge(keep=4, neighbors=-1, layers=(0,))
    with pytest.raises(ValueError, match=r"reduction.scope='all' is not one of"):
        pm.PruMerge(keep=4, scope="all", layers=(0,))
    with pytest.raises(TypeError, match=r"reduction.adaptive=1 must be a bool"):
        pm.PruMerge(keep=4, adaptive=1, layers=(0,))
    with pytest.raises(ValueError, match=r"reduction.keep=20 at block 0"):
        ViTConfig(**SMALL, reduction=dict(method="fastervlm", keep=20, layers=[0]))
    # The functional cores.
    x = jnp.ones((1, 6, 3))
    with pytest.raises(ValueError, match=r"k=7 is not allowed: it must be <= 6"):
        dp.divprune(x, 7)
    with pytest.raises(ValueError, match=r"contextual=3 is not allowed: it must be <= 2"):
        vz.visionzip(jnp.ones((1, 6)), x, 4, 3)
    with pytest.raises(ValueError, match=r"neighbors=6 is not allowed: it must be <= 5"):
        pm.prumerge(jnp.ones((1, 6)), x, 2, neighbors=6)
    with pytest.raises(ValueError, match=r"keep=7 is not allowed: it must be <= 6"):
        pm.prumerge(jnp.ones((1, 6)), x, 7, neighbors=2)
    with pytest.raises(TypeError, match=r"keep must be a static Python int"):
        jax.jit(lambda k: pm.prumerge(jnp.ones((1, 6)), x, k, neighbors=2))(3)
    with pytest.raises(ValueError, match=r"ratio=1.5 is not allowed"):
        dp.keep_from_ratio(1.5, 10)
