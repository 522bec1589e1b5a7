"""ToMe merging: parity with the reference golden files, properties, transforms, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tokens import merge as M
from jax_tokens import tokens as tk
from jax_tokens.schedule import parse_r

BSM_CASES = ["cls_even", "cls_odd", "nocls", "cls_distill", "r_too_big"]


@pytest.mark.parametrize("case", BSM_CASES)
def test_bipartite_soft_matching_matches_reference(golden, case):
    d = golden(f"tome_bsm_{case}.npz")
    plan = M.bipartite_soft_matching(jnp.asarray(d["metric"]), int(d["r"]),
                                     class_token=bool(d["class_token"]),
                                     distill_token=bool(d["distill_token"]))
    x, size = M.merge_wavg(plan, jnp.asarray(d["x"]), jnp.asarray(d["size"]))
    np.testing.assert_allclose(x, d["merged_x"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(size, d["merged_size"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(M.merge_source(plan), d["source"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(M.merge(plan, jnp.asarray(d["x"]), "amax"), d["merged_amax"],
                               atol=1e-5, rtol=0)
    unmerged = M.unmerge(plan, jnp.asarray(d["merged_x"]), reference_layout=True)
    np.testing.assert_allclose(unmerged, d["unmerged"], atol=1e-5, rtol=0)
    if not d["distill_token"]:  # the two layouts agree without a distillation token
        np.testing.assert_array_equal(M.unmerge(plan, jnp.asarray(d["merged_x"])), unmerged)


def test_r_too_big_is_clamped_like_reference(golden):
    d = golden("tome_bsm_r_too_big.npz")
    t = d["metric"].shape[1]
    plan = M.bipartite_soft_matching(jnp.asarray(d["metric"]), int(d["r"]), class_token=True)
    assert plan.r == (t - 1) // 2
    assert plan.n_out == d["merged_x"].shape[1]


def test_distill_unmerge_inverts_interleave(golden):
    d = golden("tome_bsm_cls_distill.npz")
    plan = M.bipartite_soft_matching(jnp.asarray(d["metric"]), int(d["r"]), class_token=True,
                                     distill_token=True)
    x = jnp.asarray(d["x"])
    back = M.unmerge(plan, M.merge(plan, x, "mean"))
    # Class and distillation tokens are never merged, so they come back exactly in place.
    np.testing.assert_array_equal(back[:, :2], x[:, :2])


def _random_case(seed, b, t, c, r, class_token, distill_token=False):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    metric = jax.random.normal(k1, (b, t, c))
    x = jax.random.normal(k2, (b, t, c))
    size = jax.random.randint(k3, (b, t, 1), 1, 5).astype(jnp.float32)
    plan = M.bipartite_soft_matching(metric, r, class_token=class_token,
                                     distill_token=distill_token)
    return metric, x, size, plan


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _everything(metric, x, size, r, class_token, distill):
    """All the views of one plan, in one compiled program (keeps the suite fast)."""
    plan = M.bipartite_soft_matching(metric, r, class_token=class_token, distill_token=distill)
    xm, sm = M.merge_wavg(plan, x, size)
    a = plan.assignment
    mean = M.merge(plan, x, "mean")
    return dict(
        xm=xm, sm=sm, assignment=a, mean=mean, back=M.unmerge(plan, mean),
        dense=jnp.einsum("bmn,bnc->bmc", plan.matrix(size), x),
        oracle_wavg=tk.reduce_by_assignment(x, a, plan.n_out, "mean", size[..., 0]),
        oracle_mean=tk.reduce_by_assignment(x, a, plan.n_out, "mean"),
        sum=M.merge(plan, x, "sum"), oracle_sum=tk.reduce_by_assignment(x, a, plan.n_out, "sum"),
        amax=M.merge(plan, x, "amax"),
        oracle_amax=tk.reduce_by_assignment(x, a, plan.n_out, "amax"),
        source=M.merge_source(plan), onehot=tk.assignment_matrix(a, plan.n_out))


@pytest.mark.parametrize("seed", range(8))
def test_properties_random_shapes(seed):
    rng = np.random.default_rng(seed)
    b, t, c = int(rng.integers(1, 4)), int(rng.integers(3, 40)), int(rng.integers(1, 9))
    r = int(rng.integers(0, t))
    distill = bool(rng.integers(2))
    class_token = bool(rng.integers(2)) or distill
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    metric = jax.random.normal(k1, (b, t, c))
    x = np.asarray(jax.random.normal(k2, (b, t, c)))
    size = np.asarray(jax.random.randint(k3, (b, t, 1), 1, 5).astype(jnp.float32))
    out = jax.tree.map(np.asarray, _everything(metric, x, size, r, class_token, distill))
    protected = int(class_token) + int(distill)
    r_eff = max(0, min(r, (t - protected) // 2))
    n_out = t - r_eff
    assert out["xm"].shape == (b, n_out, c) and out["sm"].shape == (b, n_out, 1)
    # sizes add up to the input total
    np.testing.assert_allclose(out["sm"].sum(axis=(1, 2)), size.sum(axis=(1, 2)), rtol=1e-6)
    # the dense [B, M, N] view equals the fast path, for every mode
    for fast, dense in [("xm", "dense"), ("xm", "oracle_wavg"), ("mean", "oracle_mean"),
                        ("sum", "oracle_sum"), ("amax", "oracle_amax")]:
        np.testing.assert_allclose(out[fast], out[dense], atol=1e-5, err_msg=f"{fast}/{dense}")
    # every input token lands in exactly one output slot, and every slot is used
    a = out["assignment"]
    assert a.min() >= 0 and all(len(np.unique(row)) == n_out for row in a)
    # unmerge puts unmerged tokens back exactly; merged ones get their group's value
    counts = np.stack([np.bincount(row, minlength=n_out) for row in a])
    alone = np.take_along_axis(counts, a, axis=1) == 1
    np.testing.assert_array_equal(out["back"][alone], x[alone])
    # protected tokens stay in front, unmerged
    if class_token:
        np.testing.assert_array_equal(out["mean"][:, 0], x[:, 0])
    if distill and r_eff > 0:
        np.testing.assert_array_equal(out["mean"][:, 1], x[:, 1])
    # the dense source is the one-hot of the assignment
    np.testing.assert_array_equal(out["source"], out["onehot"])


def test_unmerged_order_without_class_token_is_by_similarity():
    metric, x, size, plan = _random_case(3, 2, 16, 8, 4, class_token=False)
    m = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    node_max = jnp.einsum("bic,bjc->bij", m[:, ::2], m[:, 1::2]).max(-1)
    kept_scores = np.take_along_axis(np.asarray(node_max), np.asarray(plan.unm_idx), 1)
    assert (np.diff(kept_scores, axis=1) <= 0).all()


def test_kth_matching():
    b, t, c, k = 2, 23, 6, 3
    metric = jax.random.normal(jax.random.key(0), (b, t, c))
    x = jax.random.normal(jax.random.key(1), (b, t, c))
    plan = M.kth_bipartite_soft_matching(metric, k)
    y = M.merge(plan, x, "sum")
    assert y.shape == (b, t // k, c)
    # all tokens of full groups are accounted for; the tail (23 - 21 = 2) is dropped
    np.testing.assert_allclose(y.sum(1), x[:, : (t // k) * k].sum(1), atol=1e-4)
    back = M.unmerge(plan, y)
    np.testing.assert_array_equal(back[:, (t // k) * k:], 0)
    # Every destination comes back as its group's value, and every other token of a full group
    # as the value of its most similar destination (cosine similarity, computed here directly).
    full = (t // k) * k
    np.testing.assert_array_equal(back[:, k - 1: full: k], y)
    m = np.asarray(metric) / np.linalg.norm(np.asarray(metric), axis=-1, keepdims=True)
    dst_pos = np.arange(k - 1, full, k)
    best = np.einsum("bnc,bjc->bnj", m[:, :full], m[:, dst_pos]).argmax(-1)    # [b, full]
    np.testing.assert_array_equal(back[:, :full], np.take_along_axis(
        np.asarray(y), best[..., None], axis=1))
    assert M.kth_bipartite_soft_matching(metric, 1).n_out == t


def test_random_matching_is_keyed_and_static():
    b, t, c, r = 2, 20, 4, 7
    metric = jax.random.normal(jax.random.key(0), (b, t, c))
    x = jax.random.normal(jax.random.key(1), (b, t, c))
    p1 = M.random_bipartite_soft_matching(metric, r, key=jax.random.key(5))
    p2 = M.random_bipartite_soft_matching(metric, r, key=jax.random.key(5))
    p3 = M.random_bipartite_soft_matching(metric, r, key=jax.random.key(6))
    y, s = M.merge_wavg(p1, x)
    assert y.shape == (b, t - r, c)
    np.testing.assert_allclose(s.sum((1, 2)), t)
    np.testing.assert_array_equal(p1.a_pos, p2.a_pos)
    assert not np.array_equal(p1.a_pos, p3.a_pos)
    np.testing.assert_allclose(jnp.einsum("bmn,bnc->bmc", p1.matrix(), x),
                               M.merge(p1, x, "mean"), atol=1e-5)


def test_jit_vmap_grad_agree_and_no_retrace():
    metric, x, size, _ = _random_case(0, 3, 17, 8, 5, True)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(metric, x, size):
        plan = M.bipartite_soft_matching(metric, 5, class_token=True)
        return M.merge_wavg(plan, x, size)

    eager = M.merge_wavg(M.bipartite_soft_matching(metric, 5, class_token=True), x, size)
    for _ in range(3):
        jitted = f(metric, x, size)
    np.testing.assert_allclose(jitted[0], eager[0], atol=1e-6)
    np.testing.assert_allclose(jitted[1], eager[1], atol=1e-6)

    # vmap over an extra leading axis equals a loop
    stacked = [jnp.stack([a, a * 2]) for a in (metric, x, size)]
    vm = jax.vmap(f)(*stacked)
    np.testing.assert_allclose(vm[0][0], eager[0], atol=1e-6)

    # gradients flow to the tokens (not through the matching)
    def loss(x):
        plan = M.bipartite_soft_matching(metric, 5, class_token=True)
        return jnp.sum(M.merge_wavg(plan, x, size)[0] ** 2)

    g = jax.grad(loss)(x)
    assert g.shape == x.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0
    w = M.bipartite_soft_matching(metric, 5, class_token=True).matrix(size)
    g_dense = jax.grad(lambda x: jnp.sum(jnp.einsum("bmn,bnc->bmc", w, x) ** 2))(x)
    np.testing.assert_allclose(g, g_dense, atol=1e-4)


def test_plan_works_under_scan():
    metric, x, size, _ = _random_case(1, 2, 16, 4, 3, True)

    def body(carry, _):
        plan = M.bipartite_soft_matching(metric, 3, class_token=True)
        return carry + M.merge(plan, x).sum(), None

    out, _ = jax.lax.scan(body, jnp.zeros(()), None, length=3)
    eager = M.merge(M.bipartite_soft_matching(metric, 3, class_token=True), x).sum()
    np.testing.assert_allclose(out, 3 * eager, rtol=1e-5)


def test_parse_r_matches_tome():
    assert parse_r(4, 8) == [8, 8, 8, 8]
    assert parse_r(4, [1, 2]) == [1, 2, 0, 0]
    # ToMe: min = int(r * (1 - inflect)); max = 2r - min; linear between.
    assert parse_r(5, (8, 0.5)) == [4, 6, 8, 10, 12]
    assert parse_r(5, (8, -0.5)) == [12, 10, 8, 6, 4]


def test_bad_input():
    metric = jnp.zeros((2, 10, 4))
    with pytest.raises(ValueError, match=r"r=-1 .*>= 0"):
        M.bipartite_soft_matching(metric, -1)
    with pytest.raises(TypeError, match="r must be an int"):
        M.bipartite_soft_matching(metric, 2.5)
    with pytest.raises(ValueError, match=r"metric must have rank 3.*\(10, 4\)"):
        M.bipartite_soft_matching(jnp.zeros((10, 4)), 2)
    with pytest.raises(TypeError, match="static Python int"):
        jax.jit(lambda m, r: M.bipartite_soft_matching(m, r))(metric, 2)
    with pytest.raises(ValueError, match=r"k=11 .*<= 10"):
        M.kth_bipartite_soft_matching(metric, 11)
    with pytest.raises(ValueError, match=r"r=10 .*<= 9"):
        M.random_bipartite_soft_matching(metric, 10, key=jax.random.key(0))
    plan = M.bipartite_soft_matching(metric + 1.0, 2, class_token=True)
    with pytest.raises(ValueError, match="x has 9 tokens.*expects 10"):
        M.merge(plan, jnp.zeros((2, 9, 4)))
    with pytest.raises(ValueError, match="batch size 3.*batch size 2"):
        M.merge(plan, jnp.zeros((3, 10, 4)))
    with pytest.raises(ValueError, match="mode='max' is not one of"):
        M.merge(plan, jnp.zeros((2, 10, 4)), mode="max")
    with pytest.raises(ValueError, match=r"x must have shape \[2, 8, ...\]"):
        M.unmerge(plan, jnp.zeros((2, 10, 4)))
    with pytest.raises(ValueError, match="r has 5 entries but the model has 3 layers"):
        parse_r(3, [1, 1, 1, 1, 1])


def test_zero_metric_gives_no_nan():
    metric = jnp.zeros((1, 9, 4))
    plan = M.bipartite_soft_matching(metric, 3, class_token=True)
    x, size = M.merge_wavg(plan, jnp.ones((1, 9, 4)))
    assert bool(jnp.isfinite(x).all()) and bool(jnp.isfinite(size).all())


def test_zero_sizes_give_no_nan():
    metric = jax.random.normal(jax.random.key(0), (1, 9, 4))
    plan = M.bipartite_soft_matching(metric, 4, class_token=True)
    size = jnp.zeros((1, 9, 1))  # e.g. padding tokens
    x, new_size = M.merge_wavg(plan, jnp.ones((1, 9, 4)), size)
    assert bool(jnp.isfinite(x).all()) and float(new_size.sum()) == 0.0
