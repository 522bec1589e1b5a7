"""PiToMe: parity with the reference golden files, the reducer in a small ViT, bad budgets."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import merge as M
from jax_tokens import reducers
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.reducers import pitome as P

CASES = ["cls", "bsmp_cls", "nocls", "usebsm_cls"]
SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


@functools.partial(jax.jit, static_argnames=("ratio", "margin", "class_token", "alpha",
                                             "use_bsm", "use_bsm_pitome"))
def _run_reference_call(metric, x, size, *, ratio, margin, class_token, alpha, use_bsm,
                        use_bsm_pitome):
    """Everything the golden files hold, in one compiled call."""
    plan = P.pitome_vision(metric, ratio, margin, class_token, alpha, use_bsm, use_bsm_pitome)
    merged_x, merged_size = M.merge_wavg(plan, x, size)
    out = dict(plan=plan, merged_x=merged_x, merged_size=merged_size,
               merged_mean=M.merge(plan, x, "mean"), source=M.merge_source(plan),
               pruned=P.prune_merged(plan, x))
    if not use_bsm:
        out["energy"] = P.energy_score(metric, margin, alpha, protected=int(class_token))
        out["energy_order"] = P.energy_order(out["energy"])
    return out


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(golden, case):
    d = golden(f"pitome_{case}.npz")
    p, use_bsm, bsmp = int(d["class_token"]), bool(d["use_bsm"]), bool(d["use_bsm_pitome"])
    metric, x, size = (jnp.asarray(d[k]) for k in ("metric", "x", "size"))
    t = metric.shape[1]
    n = t if use_bsm else t - p                   # r counts the class token only for bsm
    r = P.ratio_to_r(n, float(d["ratio"]))
    assert r == int(d["r"]) == json.loads(str(d["meta"]))["r"]
    out = _run_reference_call(metric, x, size, ratio=float(d["ratio"]),
                              margin=float(d["margin"]), class_token=bool(d["class_token"]),
                              alpha=float(d["alpha"]), use_bsm=use_bsm, use_bsm_pitome=bsmp)
    plan = out["plan"]
    assert plan.r == r and plan.n_out == t - r
    for k in ("merged_x", "merged_size", "merged_mean", "source"):
        _close(out[k], d[k])
    eq = np.testing.assert_array_equal
    if use_bsm:                                   # A = even, B = odd positions of all tokens
        assert "energy" not in d and "pruned" not in d
        eq(plan.unm_idx, d["unm_idx"])
        eq(plan.src_idx, d["src_idx"])
        eq(plan.dst_idx, d["dst_idx"])
        return
    _close(out["energy"], d["energy"])
    eq(out["energy_order"], d["energy_order"])
    _close(out["pruned"], d["pruned"])
    a_pos, b_pos = np.asarray(plan.a_pos) - p, np.asarray(plan.b_pos) - p
    eq(b_pos, d["b_idx"])
    eq(plan.dst_idx, d["dst_idx"])
    if bsmp:                                      # A = [prefix, a_idx]; unm/src index into A
        eq(a_pos[:, p:], d["a_idx"])
        eq(np.asarray(plan.unm_idx)[:, p:] - p, d["unm_idx"])
        eq(np.asarray(plan.unm_idx)[:, :p], np.zeros((metric.shape[0], p)))
        eq(np.asarray(plan.src_idx) - p, d["src_idx"])
    else:                                         # A = [prefix, protected, a_idx]
        kept = n - 2 * r
        eq(a_pos[:, p:p + kept], d["protected_idx"])
        eq(a_pos[:, p + kept:], d["a_idx"])


def test_budget_and_margin_arithmetic():
    assert P.ratio_to_r(100, 0.55) == 44          # 100 - 55.00000000000001 in float64
    assert P.ratio_to_r(16, 1.0) == 0 and P.ratio_to_r(196, 0.9) == 19
    m = P.default_margins(12)
    assert m[0] == 0.75 and m[6] == pytest.approx(0.375) and len(m) == 12
    assert [P.max_r(v, 17, 1) for v in P.VARIANTS] == [8, 8, 8]
    assert [P.max_r(v, 15, 0) for v in P.VARIANTS] == [7, 8, 8]


def test_ties_go_to_the_lower_index():
    # Duplicated tokens have exactly equal energies: a stable descending order.
    base = jax.random.normal(jax.random.key(0), (2, 5, 8))
    metric = jnp.repeat(base, 2, axis=1)
    e, order = jax.jit(lambda m: (P.energy_score(m, 0.3), P.energy_order(P.energy_score(m, 0.3))))(
        metric)
    np.testing.assert_array_equal(order, np.argsort(-np.asarray(e), axis=-1, kind="stable"))
    np.testing.assert_array_equal(P.energy_order(jnp.zeros((1, 6))), [np.arange(6)])
    # One-channel keys: every row of cos is a permutation of the others, so all energies are
    # equal; the order-invariant mean makes them tie exactly, in jit and eagerly alike.
    signs = jnp.asarray([[[1.3], [-0.2], [0.7], [-1.1], [0.4], [-0.9]]])
    for f in (P.energy_score, jax.jit(P.energy_score, static_argnums=(1, 2))):
        e = np.asarray(f(signs, 0.0, 0.5))
        assert (e == e[0, 0]).all()
        np.testing.assert_array_equal(P.energy_order(e), [np.arange(6)])


@jax.jit
def _prefix_cases(metric, x):
    out = {}
    for name, fn in (("pitome", P.pitome_matching), ("pitome_bsm", P.pitome_bsm_matching)):
        plan = fn(metric, 0, 0.5, protected=3)      # r = 0 only reorders (as the reference)
        out[name, 0] = (plan.n_out, M.unmerge(plan, M.merge(plan, x)))
        plan = fn(metric, 4, 0.5, protected=3)
        out[name, 4] = (plan.n_out, M.merge(plan, x))
    for protected in (0, 1, 2, 3):
        plan = P.bsm_matching(metric, 3, protected=protected)
        out["bsm", protected] = (plan.n_out, M.merge(plan, x))
    return out


def test_zero_r_and_prefix_tokens():
    metric = jax.random.normal(jax.random.key(1), (2, 12, 6))
    x = jax.random.normal(jax.random.key(2), (2, 12, 6))
    out = _prefix_cases(metric, x)
    for name in ("pitome", "pitome_bsm"):
        assert out[name, 0][0] == 12
        np.testing.assert_array_equal(out[name, 0][1], x)
        assert out[name, 4][0] == 8
        np.testing.assert_array_equal(out[name, 4][1][:, :3], x[:, :3])   # prefix in front
    for protected in (0, 1, 2, 3):
        n_out, y = out["bsm", protected]
        assert n_out == 9 and y.shape == (2, 9, 6)
        np.testing.assert_array_equal(y[:, :protected], x[:, :protected])


@jax.jit
def _dense_cases(metric, x, size):
    out = []
    for plan in (P.pitome_matching(metric, 5, 0.4, protected=1),
                 P.pitome_bsm_matching(metric, 6, 0.4, protected=1),
                 P.bsm_matching(metric, 6, protected=1)):
        y, s = M.merge_wavg(plan, x, size)
        out.append((y, s, plan.matrix(size), plan.invert(y), plan.assignment))
    return out


def test_plan_is_the_dense_map_and_inverts():
    metric = jax.random.normal(jax.random.key(3), (2, 13, 4))
    x = jax.random.normal(jax.random.key(4), (2, 13, 5))
    size = jax.random.randint(jax.random.key(5), (2, 13, 1), 1, 5).astype(jnp.float32)
    for y, s, w, back, a in _dense_cases(metric, x, size):
        np.testing.assert_allclose(y, np.einsum("bmn,bnc->bmc", w, np.asarray(x)), atol=1e-5)
        np.testing.assert_allclose(s.sum((1, 2)), size.sum((1, 2)))
        np.testing.assert_array_equal(back, np.take_along_axis(np.asarray(y),
                                                               np.asarray(a)[..., None], 1))


def test_primitive_under_vmap_and_jit():
    metric = jax.random.normal(jax.random.key(6), (3, 2, 11, 4))
    x = jax.random.normal(jax.random.key(7), (3, 2, 11, 4))

    def one(m, x_):
        plan = P.pitome_matching(m, 3, 0.5, protected=1)
        return M.merge_wavg(plan, x_)[0]

    batched = jax.jit(jax.vmap(one))(metric, x)
    single = jax.jit(one)
    for i in range(3):
        np.testing.assert_allclose(batched[i], single(metric[i], x[i]), atol=1e-6)


def test_schedule_variants_flops_and_anneal():
    red = P.PiToMe(ratio=0.75)
    cfg = ViTConfig(**SMALL, reduction=red)
    layout = cfg.layout()
    specs = red.schedule(layout)
    assert [s.variant for s in specs] == ["pitome_bsm", "pitome_bsm", "pitome"]   # DeiT patch
    assert [s.margin for s in specs] == list(P.default_margins(3))
    assert cfg.token_counts() == [17, 13, 10, 8]          # r = 4, 3, 2 (N = 16, 12, 9)
    assert [s.variant for s in P.PiToMe(ratio=0.75, variant="mae").schedule(layout)] == \
        ["pitome", "pitome", "pitome_bsm"]
    bsm = P.PiToMe(ratio=0.75, variant="bsm").schedule(layout)
    assert [s.budget for s in bsm] == [4, 3, 2]           # floor(17 - 12.75), ...
    assert [s.n_out for s in P.PiToMe(r=(2, 0, 3)).schedule(layout)] == [15, 15, 12]
    assert red.flops(layout, specs[0]) == 2 * 16 * 16 * 16 + 2 * 16 * 16
    assert P.PiToMe(ratio=0.75, variant="bsm").flops(layout, bsm[0]) == 2 * 9 * 8 * 16
    assert red.anneal(layout, 1.0) is red
    assert cfg.token_counts(red.anneal(layout, 0.0)) == [17] * 4
    assert cfg.token_counts(P.PiToMe(r=3).anneal(layout, 0.0)) == [17] * 4
    assert red.stats(layout, specs[0]) == ("mean_key",)
    assert reducers.from_config(red.to_dict()) == red


def test_in_a_small_vit_jit_grad_and_no_retrace():
    red = P.PiToMe(ratio=0.7, margin=(0.6, 0.3, 0.0), variant=("pitome", "pitome_bsm", "bsm"),
                   prop_attn=True)
    cfg = ViTConfig(**SMALL, reduction=red)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

    def loss(m, x):
        logits, aux = m(x)
        return logits.sum(), (logits, aux)

    # Logits and their gradient (w.r.t. the parameters and the images) in one compiled step.
    step = jax.jit(chex.assert_max_traces(
        nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True), n=1))
    (_, (logits, aux)), (gp, gx) = step(model, images)
    step(model, images + 1.0)                             # a second call: no retrace
    assert logits.shape == (2, 5) and aux["tokens"] == cfg.token_counts() == [17, 13, 10, 7]
    np.testing.assert_allclose(aux["size"].sum((1, 2)), [17.0, 17.0], rtol=1e-6)
    assert gx.shape == images.shape and bool(jnp.isfinite(gx).all())
    assert all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves(gp))
    assert float(jnp.abs(gx).max()) > 0


@pytest.mark.parametrize("kw, match", [
    (dict(ratio=0.3), r"reduction.ratio=0.3 asks block 0 \(pitome_bsm\) to merge r=11 tokens, "
                      r"but 17 tokens enter it \(1 protected\) and at most 8 can merge"),
    (dict(ratio=0.4, variant="pitome"), r"block 0 \(pitome\) to merge r=9 tokens.*at most 8"),
    (dict(r=(0, 9, 0)), r"reduction.r=\(0, 9, 0\) asks block 1 .* at most 8 can merge.*lower r"),
    (dict(ratio=(0.9, 0.9)), r"reduction.ratio has 2 entries but the model has 3 blocks"),
    (dict(ratio=0.8, margin=(0.5, 0.2)), r"reduction.margin has 2 entries but the model has 3"),
    (dict(ratio=0.8, variant=("pitome",)), r"reduction.variant has 1 entries"),
])
def test_bad_budgets_name_the_block(kw, match):
    layout = ViTConfig(**SMALL).layout()
    with pytest.raises(ValueError, match=match):
        P.PiToMe(**kw).schedule(layout)


@pytest.mark.parametrize("kw, err, match", [
    (dict(margin=-0.1), ValueError, r"reduction.margin=-0.1 is not allowed: it must be in \[0"),
    (dict(margin=(0.5, -1.0, 0.2)), ValueError, r"reduction.margin\[1\]=-1.0 is not allowed"),
    (dict(ratio=0.0), ValueError, r"reduction.ratio=0.0 is not allowed: it must be in \(0"),
    (dict(ratio=1.5), ValueError, r"reduction.ratio=1.5 is not allowed"),
    (dict(r=-1), ValueError, r"reduction.r=-1 is not allowed: it must be >= 0"),
    (dict(r=3, ratio=0.5), ValueError, r"reduction.r=3 and reduction.ratio=0.5 are both set"),
    (dict(variant="tome"), ValueError, r"reduction.variant='tome' is not allowed"),
    (dict(variant=("pitome", "deit", "bsm")), ValueError, r"reduction.variant=.* not allowed"),
    (dict(alpha=-1.0), ValueError, r"reduction.alpha=-1.0 is not allowed"),
    (dict(prop_attn=1), TypeError, r"reduction.prop_attn=1 must be a bool"),
])
def test_bad_fields(kw, err, match):
    with pytest.raises(err, match=match):
        P.PiToMe(**kw)


def test_primitive_budget_errors():
    metric = jnp.zeros((1, 9, 4))
    with pytest.raises(ValueError, match=r"r \(pitome, 9 tokens, 1 protected\)=5 is not allowed"):
        P.pitome_matching(metric, 5, 0.5, protected=1)
    with pytest.raises(TypeError, match="static Python int"):
        P.bsm_matching(metric, jnp.array(2))
    with pytest.raises(TypeError, match="spec from PiToMe.schedule"):
        P.PiToMe(ratio=0.5).reduce(reducers.TokenLayout(1, 9), reducers.LayerSpec(9, 7, 2, True),
                                   metric, jnp.ones((1, 9, 1)), {"mean_key": metric})
