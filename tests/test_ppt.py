"""PPT: there is no golden file for it, so the reducer is tested against a plain NumPy
transcription, written below, of the reference's `pp_block_adaptive.forward` and
`PPTAttention.score_assignment_step` (xjwu1024/PPT, `ppt_deit.py`, with ToMe's
`bipartite_soft_matching` / `merge_wavg` from its `tome.py`): per image, the normalised
CLS-attention significance scores, their unbiased variance, then ToMe pooling (variance below
the threshold) or pruning of the r lowest scores (kept in descending score order). Also: the
reducer in a small ViT under jit / grad / vmap without retracing, and the bad-budget errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import reducers
from jax_tokens import tokens as tk
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.reducers import ppt as P

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")


# ----------------------------------------------------------------------------------------------
# The NumPy transcription of the reference (class token at 0, no distillation token)
# ----------------------------------------------------------------------------------------------

def _np_scores(cls_row, v_norm=None):
    """score_assignment_step: CLS row summed over heads (x ||v||), tokens 1:, sum 1."""
    s = cls_row.sum(axis=1)
    if v_norm is not None:
        s = s * v_norm
    s = s[:, 1:]
    return s / s.sum(axis=1, keepdims=True)


def _np_tome(metric, x, size, r):
    """ToMe's bipartite_soft_matching(class_token=True) + merge_wavg for one image."""
    m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    sc = m[::2] @ m[1::2].T
    sc[0] = -np.inf
    node_max, node_idx = sc.max(1), sc.argmax(1)
    edge = np.argsort(-node_max, kind="stable")
    unm, src = np.sort(edge[r:]), edge[:r]
    xa, xb = (x * size)[::2].copy(), (x * size)[1::2].copy()
    sa, sb = size[::2].copy(), size[1::2].copy()
    for s_, d_ in zip(src, node_idx[src]):
        xb[d_] += xa[s_]
        sb[d_] += sa[s_]
    xs, ss = np.concatenate([xa[unm], xb]), np.concatenate([sa[unm], sb])
    return xs / ss, ss


def _np_ppt(cls_row, metric, x, size, r, threshold):
    n = x.shape[1]
    r = min(r, (n - 1) // 2)
    scores = _np_scores(cls_row)
    var = scores.var(axis=1, ddof=1)
    out_x, out_s = [], []
    for b in range(x.shape[0]):
        if var[b] < threshold:
            xb, sb = _np_tome(metric[b], x[b], size[b], r)
        else:
            full = np.concatenate([[2.0], scores[b]])      # the class token's score is 2
            keep = np.argsort(-full, kind="stable")[: n - r]
            xb, sb = x[b, keep], size[b, keep]
        out_x.append(xb)
        out_s.append(sb)
    return np.stack(out_x), np.stack(out_s), var >= threshold


def _inputs(seed, b=4, n=17, h=2, c=8):
    rng = np.random.default_rng(seed)
    # Attention rows from peaked (high variance) to flat (low variance).
    alphas = np.geomspace(0.1, 30.0, b)
    cls_row = np.stack([rng.dirichlet(np.full(n, a), size=h) for a in alphas]).astype(np.float32)
    metric = rng.normal(size=(b, n, c)).astype(np.float32)
    x = rng.normal(size=(b, n, c)).astype(np.float32)
    size = rng.integers(1, 4, size=(b, n, 1)).astype(np.float32)
    return cls_row, metric, x, size


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reduce(red, layout, cls_row, metric, x, size):
    spec = red.schedule(layout)[0]
    y, s, plan = red.reduce(layout, spec, x, size, {"cls_probs": cls_row, "mean_key": metric})
    return y, s, plan, plan.matrix(size), plan.matrix(), plan.apply(x), plan.invert(y)


@pytest.mark.parametrize("r,threshold", [(8, "mid"), (3, 0.0), (6, float("inf"))])
def test_matches_numpy_transcription(r, threshold):
    cls_row, metric, x, size = _inputs(r)
    var = _np_scores(cls_row).var(axis=1, ddof=1)
    if threshold == "mid":          # between the 2nd and 3rd variance: a mixed batch
        threshold = float(np.sort(var)[1:3].mean())
    want_x, want_s, want_pruned = _np_ppt(cls_row, metric, x, size, r, threshold)
    n = x.shape[1]
    layout = reducers.TokenLayout(depth=1, num_tokens=n, num_prefix_tokens=1, class_token=True,
                                  embed_dim=8, num_heads=2)
    red = P.PPT(r=r, layers=(0,), threshold=threshold)
    y, s, plan, w_size, w, applied, back = _reduce(red, layout, cls_row, metric, x, size)
    assert isinstance(plan, tk.Plan) and (plan.n_in, plan.n_out) == (n, n - r)
    np.testing.assert_array_equal(np.asarray(plan.pruned), want_pruned)
    np.testing.assert_allclose(np.asarray(plan.variance), var, rtol=1e-5)
    np.testing.assert_allclose(y, want_x, atol=1e-5, rtol=0)
    np.testing.assert_allclose(s, want_s, atol=1e-5, rtol=0)
    # The plan's dense view: matrix(size) gives the output; apply / matrix() the plain means.
    np.testing.assert_allclose(np.einsum("bmn,bnc->bmc", w_size, x), want_x, atol=1e-5)
    np.testing.assert_allclose(applied, np.einsum("bmn,bnc->bmc", w, x), atol=1e-5)
    a = np.asarray(plan.assignment)
    assert (a[:, 0] == 0).all()
    np.testing.assert_array_equal((a < 0).sum(1), np.where(want_pruned, r, 0))
    np.testing.assert_allclose(np.asarray(back)[a < 0], 0.0)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(y), np.maximum(a, 0)[..., None],
                                                  1)[a >= 0], np.asarray(back)[a >= 0])
    if 0.0 < threshold < float("inf"):
        assert want_pruned.any() and not want_pruned.all()


def test_significance_with_value_norm_and_variance():
    cls_row, _, _, _ = _inputs(0)
    v_norm = np.random.default_rng(1).random((4, 17)).astype(np.float32) + 0.5
    got = P.significance(cls_row, 1, value_norm=v_norm)
    np.testing.assert_allclose(got, _np_scores(cls_row, v_norm), rtol=1e-5)
    np.testing.assert_allclose(P.score_variance(got), _np_scores(cls_row, v_norm).var(1, ddof=1),
                               rtol=1e-5)


def test_distillation_token_is_protected_in_both_branches():
    cls_row, metric, x, size = _inputs(3)
    layout = reducers.TokenLayout(depth=1, num_tokens=17, num_prefix_tokens=2, class_token=True,
                                  distill_token=True, embed_dim=8, num_heads=2)
    var = np.asarray(P.score_variance(P.significance(cls_row, 2)))
    red = P.PPT(r=8, layers=(0,), threshold=float(np.sort(var)[1:3].mean()), clamp_r=True)
    assert red.schedule(layout)[0].n_out == 10     # r clamped to (17 - 2) // 2 = 7, both ways
    y, _, plan, *_ = _reduce(red, layout, cls_row, metric, x, size)
    assert set(np.asarray(plan.pruned).tolist()) == {True, False}
    np.testing.assert_allclose(np.asarray(y)[:, :2], x[:, :2], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(plan.assignment)[:, :2], [[0, 1]] * 4)


def test_in_a_small_vit_jit_grad_vmap_no_retrace():
    red = P.PPT(r=(4, 3), layers=(0, 2), threshold=2e-3)
    cfg = ViTConfig(**SMALL, reduction=red, trace_source=True)
    assert cfg.token_counts() == [17, 13, 13, 10]
    graphdef, state = nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def ppt_step(state, images):        # logits and their gradient, one compiled function
        def f(im):
            logits, aux = nnx.merge(graphdef, state)(im)
            return logits.sum(), (logits, aux)
        (_, (logits, aux)), g = jax.value_and_grad(f, has_aux=True)(images)
        return logits, aux, g

    logits, aux, g = ppt_step(state, images)
    ppt_step(state, images * 2.0)                                  # no retrace
    assert logits.shape == (3, 5) and bool(jnp.isfinite(logits).all())
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0
    assert [(p.n_in, p.n_out) for p in aux["plans"]] == [(17, 13), (13, 10)]
    assert aux["plans"][0].pruned.shape == (3,) and aux["size"].shape == (3, 10, 1)
    # vmap of the primitives over a leading axis equals the batched call.
    cls_row, metric, x, size = _inputs(5)
    f = lambda c, m, x, s: P.ppt_merge(P.ppt_match(P.significance(c), m, 5, threshold=1e-3),
                                       x, s)   # noqa: E731
    stack = lambda a: jnp.stack([a, a[::-1]])  # noqa: E731
    (vy, vs), (y, s) = jax.jit(lambda *a: (jax.vmap(f)(*map(stack, a)), f(*a)))(
        cls_row, metric, x, size)
    np.testing.assert_allclose(vy[0], y, atol=1e-6)
    np.testing.assert_allclose(vs[0], s, atol=1e-6)


def test_config_anneal_and_errors():
    layout = ViTConfig(**SMALL).layout()
    red = P.PPT(r=[4, 3], layers=[0, 2])
    assert reducers.from_config(red.to_dict()) == red
    assert ViTConfig(**SMALL, reduction=red.anneal(layout, 0.0)).token_counts() == [17] * 4
    assert red.anneal(layout, 1.0) == red and red.anneal(layout, 0.5).r == (2, 2)
    assert red.flops(layout, red.schedule(layout)[0]) > 0
    with pytest.raises(ValueError, match=r"reduction.r has 1 entries but reduction.layers has "
                                         r"2"):
        P.PPT(r=[4], layers=[0, 2])
    with pytest.raises(ValueError, match=r"reduction.r \(block 2\)=-1 is not allowed"):
        P.PPT(r=[4, -1], layers=[0, 2])
    with pytest.raises(ValueError, match=r"reduction.r asks block 1 to remove r=7 tokens, but "
                                         r"only 13 tokens enter it \(at most 6 can go"):
        P.PPT(r=(4, 7), layers=(0, 1)).schedule(layout)
    assert P.PPT(r=(4, 7), layers=(0, 1), clamp_r=True).schedule(layout)[1].n_out == 7
    with pytest.raises(ValueError, match=r"reduction.layers contains 5, but the model has 3"):
        P.PPT(r=2, layers=(5,)).schedule(layout)
    with pytest.raises(ValueError, match="lists a block twice"):
        P.PPT(r=2, layers=(1, 1))
    with pytest.raises(ValueError, match=r"reduction.threshold=-1.0 is not allowed"):
        P.PPT(r=2, layers=(1,), threshold=-1.0)
    with pytest.raises(ValueError, match=r"reduction.score='cls' is not one of"):
        P.PPT(r=2, layers=(1,), score="cls")
    nocls = reducers.TokenLayout(depth=1, num_tokens=16, embed_dim=8)
    with pytest.raises(ValueError, match="score='cls_attn' needs a class token"):
        P.PPT(r=2, layers=(0,)).schedule(nocls)
    assert P.PPT(r=2, layers=(0,), score="key_mass").schedule(nocls)[0].n_out == 14
