"""Top-k pruning and EViT fusion: properties, the dense view, unprune, transforms, bad input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tokens import prune as P
from jax_tokens import tokens as tk


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _everything(scores, x, size, k, protected, order, fuse):
    plan = P.topk(scores, k, protected=protected, order=order, fuse=fuse)
    y = P.prune(plan, x)
    out = dict(y=y, size=P.prune_size(plan, size), dense=jnp.einsum("bmn,bnc->bmc", plan.matrix(), x),
               assignment=plan.assignment, kept=plan.kept_idx, back=P.unprune(plan, y))
    if fuse:
        out["back_fused"] = P.unprune(plan, y, fill="fused")
    return out


@pytest.mark.parametrize("seed", range(6))
def test_topk_properties(seed):
    rng = np.random.default_rng(seed)
    b, n, c = int(rng.integers(1, 4)), int(rng.integers(4, 50)), int(rng.integers(1, 6))
    protected = int(rng.integers(0, 3))
    k = int(rng.integers(1, n - protected + 1))
    order = ["score", "position"][seed % 2]
    fuse = bool(rng.integers(2))
    scores = rng.random((b, n - protected)).astype(np.float32)
    x = rng.normal(size=(b, n, c)).astype(np.float32)
    size = rng.integers(1, 4, size=(b, n, 1)).astype(np.float32)
    out = jax.tree.map(np.asarray, _everything(scores, x, size, k, protected, order, fuse))
    m = protected + k + int(fuse)
    assert out["y"].shape == (b, m, c)
    # the kept tokens are the k best, in the requested order
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    want = best if order == "score" else np.sort(best, axis=1)
    np.testing.assert_array_equal(out["kept"], want)
    np.testing.assert_array_equal(out["y"][:, :protected], x[:, :protected])
    np.testing.assert_array_equal(out["y"][:, protected:protected + k],
                                  np.take_along_axis(x[:, protected:], want[..., None], 1))
    # dense view equals the fast path
    np.testing.assert_allclose(out["dense"], out["y"], atol=1e-5)
    if fuse:
        dropped = np.ones_like(scores, bool)
        np.put_along_axis(dropped, best, False, axis=1)
        fused = (x[:, protected:] * (scores * dropped)[..., None]).sum(1)
        np.testing.assert_allclose(out["y"][:, -1], fused, atol=1e-5)
        # sizes keep summing to N with fusion
        np.testing.assert_allclose(out["size"].sum((1, 2)), size.sum((1, 2)))
        np.testing.assert_allclose(out["back_fused"][:, protected:][dropped],
                                   np.repeat(out["y"][:, -1:], n - protected, 1)[dropped])
    # unprune: kept tokens back exactly in place, dropped ones zero
    kept_mask = np.zeros((b, n), bool)
    kept_mask[:, :protected] = True
    np.put_along_axis(kept_mask[:, protected:], want, True, axis=1)
    np.testing.assert_array_equal(out["back"][kept_mask], x[kept_mask])
    np.testing.assert_array_equal(out["back"][~kept_mask], 0)
    a = out["assignment"]
    assert ((a >= 0) == (kept_mask | fuse)).all()


def test_scores():
    rng = np.random.default_rng(0)
    probs = rng.random((2, 3, 7)).astype(np.float32)
    np.testing.assert_allclose(P.cls_attention(probs, 1), probs.mean(1)[:, 1:], rtol=1e-6)
    np.testing.assert_allclose(P.key_mass(probs, 2), probs.mean(1)[:, 2:], rtol=1e-6)
    x = rng.normal(size=(2, 7, 4)).astype(np.float32)
    np.testing.assert_allclose(P.l2_norm(x, 1), np.linalg.norm(x, axis=-1)[:, 1:], rtol=1e-6)
    r1 = P.random_scores(jax.random.key(0), 2, 6)
    r2 = P.random_scores(jax.random.key(1), 2, 6)
    assert r1.shape == (2, 6) and not np.array_equal(r1, r2)


def test_jit_grad_vmap_no_retrace():
    rng = np.random.default_rng(1)
    scores = jnp.asarray(rng.random((2, 9)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 10, 4)), jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(scores, x):
        plan = P.topk(scores, 4, protected=1, fuse=True)
        return P.prune(plan, x)

    eager = P.prune(P.topk(scores, 4, protected=1, fuse=True), x)
    for _ in range(3):
        out = f(scores, x)
    np.testing.assert_allclose(out, eager, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(f(scores, x) ** 2))(x)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0
    vm = jax.vmap(f)(jnp.stack([scores, scores]), jnp.stack([x, x + 1]))
    np.testing.assert_allclose(vm[0], eager, atol=1e-6)


def test_keep_count_is_evit_ceil():
    assert P.keep_count(0.7, 64) == 45
    assert P.keep_count(0.7, 46) == 33
    assert P.keep_count(0.7, 34) == 24
    assert P.keep_count(1.0, 10) == 10


def test_bad_input():
    scores = jnp.zeros((2, 9))
    with pytest.raises(ValueError, match=r"k=10 .*<= 9"):
        P.topk(scores, 10)
    with pytest.raises(ValueError, match=r"k=0 .*>= 1"):
        P.topk(scores, 0)
    with pytest.raises(TypeError, match="static Python int"):
        jax.jit(lambda s, k: P.topk(s, k))(scores, 3)
    with pytest.raises(ValueError, match="order='random' is not one of"):
        P.topk(scores, 3, order="random")
    with pytest.raises(ValueError, match="scores must have rank 2"):
        P.topk(jnp.zeros((9,)), 3)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"keep_rate=.* must be in \(0.0, 1.0\]"):
            P.keep_count(bad, 10)
    plan = P.topk(scores, 3, protected=1)
    with pytest.raises(ValueError, match="x has 9 tokens.*expects 10"):
        P.prune(plan, jnp.zeros((2, 9, 4)))
    with pytest.raises(ValueError, match="batch size 3"):
        P.prune(plan, jnp.zeros((3, 10, 4)))
    with pytest.raises(ValueError, match="fill='fused' needs a plan built with fuse=True"):
        P.unprune(plan, jnp.zeros((2, 4, 4)), fill="fused")
    with pytest.raises(ValueError, match="cls_probs must have rank 3"):
        P.cls_attention(jnp.zeros((2, 9)))


def test_source_index_composition():
    # Two pruning steps: the cheap index map equals composing the dense one-hot maps.
    rng = np.random.default_rng(2)
    plan1 = P.topk(jnp.asarray(rng.random((1, 9)), jnp.float32), 5, protected=1)
    plan2 = P.topk(jnp.asarray(rng.random((1, 5)), jnp.float32), 2, protected=1, fuse=True)
    src = tk.init_source_index(1, 10)
    src = tk.update_source_index(src, plan1.assignment)
    src = tk.update_source_index(src, plan2.assignment)
    dense = np.asarray(tk.assignment_matrix(plan2.assignment, plan2.n_out)) @ np.asarray(
        tk.assignment_matrix(plan1.assignment, plan1.n_out))
    np.testing.assert_array_equal(tk.source_matrix(src, plan2.n_out), dense)
