"""K-Medoids Token Pooling: parity with the reference (JoakimHaurum/TokenReduction
`models/kmedoids.py`), torch.cdist's numerics, the plan contract, the reducer in a small ViT
(jit, grad, no retrace), vmap of the primitive, and budget errors."""

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
from jax_tokens.reducers import kmedoids as km

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")


@pytest.mark.parametrize("case", ["w", "w_n24_it3", "eq"])
def test_k_medoids_matches_reference(golden, case):
    d = golden(f"kmedoids_{case}.npz")
    x = jnp.asarray(d["x"])
    np.testing.assert_allclose(km.cdist(x, x), d["cdist"], atol=1e-5, rtol=0)
    k, iters = int(d["cluster_num"]), int(d["iterations"])
    if d["weighted"]:
        # The model's weights: attention received per key, summed over heads and queries.
        mass = d["attn"].sum(axis=2)                                    # key_mass [B, H, N+1]
        np.testing.assert_allclose(mass.sum(1)[:, 1:, None], d["token_weight"], rtol=1e-5)
        plan = km.k_medoids(x, k, iters, jnp.asarray(d["token_weight"][..., 0]))
        start = km.k_medoids(x, k, 0, jnp.asarray(d["token_weight"][..., 0])).medoids
        np.testing.assert_array_equal(start, np.argsort(-d["token_weight"][..., 0], 1)[:, :k])
    else:
        plan = km.k_medoids(x, k, iters, None, int(d["init_idx"][0]))
    np.testing.assert_array_equal(plan.medoids, d["cluster_idx"])
    np.testing.assert_array_equal(plan.assignment, d["assignment"])
    np.testing.assert_allclose(plan.apply(x), d["centers"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["w", "eq"])
def test_reducer_reproduces_reference_with_a_class_token(golden, case):
    """The reducer on [cls, x] with the golden attention as key_mass (a class token row/col)."""
    d = golden(f"kmedoids_{case}.npz")
    b, n, c = d["x"].shape
    k = int(d["cluster_num"])
    x = np.concatenate([np.full((b, 1, c), 7.0, np.float32), d["x"]], axis=1)
    size = np.arange(1, b * (n + 1) + 1, dtype=np.float32).reshape(b, n + 1, 1)
    layout = reducers.TokenLayout(depth=1, num_tokens=n + 1, num_prefix_tokens=1,
                                  class_token=True, embed_dim=c, num_heads=2)
    if d["weighted"]:
        red = km.KMedoids(layers=(0,), num_clusters=(k,), iterations=int(d["iterations"]))
        stats = {"key_mass": jnp.asarray(d["attn"].sum(axis=2))}
    else:
        red = km.KMedoids(layers=(0,), num_clusters=(k,), iterations=int(d["iterations"]),
                          equal_weight=True, init_index=int(d["init_idx"][0]))
        stats = {}
    assert red.stats(layout, red.schedule(layout)[0]) == (("key_mass",) if d["weighted"] else ())
    spec = red.schedule(layout)[0]
    assert (spec.n_in, spec.n_out, spec.active) == (n + 1, k + 1, True)
    y, new_size, plan = red.reduce(layout, spec, jnp.asarray(x), jnp.asarray(size), stats)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])                    # class token in front
    np.testing.assert_allclose(y[:, 1:], d["centers"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(plan.medoids[:, 1:] - 1, d["cluster_idx"])
    np.testing.assert_array_equal(plan.assignment[:, 1:] - 1, d["assignment"])
    # Sizes: the class token's own, then each medoid the sum of its cluster's sizes.
    want = np.stack([np.bincount(d["assignment"][i], size[i, 1:, 0], minlength=k)
                     for i in range(b)])
    np.testing.assert_allclose(new_size[:, 1:, 0], want, rtol=1e-6)
    np.testing.assert_array_equal(new_size[:, 0], size[:, 0])
    # The plan's contract: matrix == what reduce did; invert gives each token its medoid.
    assert isinstance(plan, tk.Plan) and (plan.n_in, plan.n_out) == (n + 1, k + 1)
    np.testing.assert_allclose(np.einsum("bmn,bnc->bmc", plan.matrix(), x), y, atol=1e-6)
    np.testing.assert_array_equal(plan.invert(y), np.take_along_axis(
        np.asarray(y), np.asarray(plan.assignment)[..., None], 1))


def test_cdist_uses_the_matrix_product_formula_above_25_tokens():
    x = jax.random.normal(jax.random.key(0), (2, 30, 64))
    d = np.asarray(km.cdist(x, x))
    xn = np.asarray(x, np.float64)
    exact = np.sqrt(((xn[:, :, None] - xn[:, None]) ** 2).sum(-1))
    off = ~np.eye(30, dtype=bool)
    np.testing.assert_allclose(d[:, off], exact[:, off], rtol=1e-4)
    diag = d[:, ~off]
    assert (diag >= 0).all() and diag.max() > 0 and diag.max() < 0.05   # not exactly 0
    small = np.asarray(km.cdist(x[:, :25], x[:, :25]))                   # exact path
    np.testing.assert_array_equal(np.diagonal(small, axis1=1, axis2=2), 0)
    assert km.cdist(x[:, :25], x[:, :26]).shape == (2, 25, 26)


def test_farthest_point_start_takes_the_max_over_centers():
    # Points on a line: 0, 1, 2, 10. From 1: farthest is 10; then max distance to {1, 10}:
    # token 0 has max(1, 10) = 10, token 2 has max(1, 8) = 8, so 0 (a min rule would pick 2).
    x = jnp.asarray([[[0.0], [1.0], [2.0], [10.0]]])
    dist = km.cdist(x, x)
    np.testing.assert_array_equal(km.k_medoids_init(dist, 3, None, 1), [[1, 3, 0]])


def test_duplicate_tokens_give_empty_clusters_as_the_reference():
    """All tokens equal: every token joins cluster 0, empty clusters move to token 0 (argmin
    over the 1e6 fill); sizes still sum to the input."""
    x = jnp.ones((1, 6, 3))
    plan = km.k_medoids(x, 3, 2, jnp.asarray([[0.1, 0.5, 0.2, 0.9, 0.3, 0.4]]))
    np.testing.assert_array_equal(plan.medoids, [[0, 0, 0]])
    np.testing.assert_array_equal(plan.assignment, [[0] * 6])
    np.testing.assert_array_equal(plan.group_size(jnp.ones((1, 6, 1)))[..., 0], [[6, 0, 0]])


def test_jit_vmap_grad_and_no_retrace():
    x = jax.random.normal(jax.random.key(1), (2, 12, 5))
    w = jax.random.uniform(jax.random.key(2), (2, 11))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, w):
        plan = km.k_medoids(x, 4, 3, w, protected=1)
        return plan.apply(x), plan.assignment

    y, a = f(x, w)
    y2, _ = f(x + 0.0, w * 2.0)                                 # no second trace
    eager = km.k_medoids(x, 4, 3, w, protected=1)
    np.testing.assert_array_equal(a, eager.assignment)
    np.testing.assert_array_equal(y, eager.apply(x))
    vm_y, vm_a = jax.vmap(f)(jnp.stack([x, -x]), jnp.stack([w, w]))
    np.testing.assert_array_equal(vm_a[0], a)
    np.testing.assert_array_equal(vm_a[1], f(-x, w)[1])
    g = jax.grad(lambda x: jnp.sum(f(x, w)[0] ** 2))(x)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0
    # A drawn start (traced init_index) under jit.
    start = jax.random.randint(jax.random.key(3), (), 0, 12)
    p1 = jax.jit(lambda x, s: km.k_medoids(x, 4, 2, None, s))(x, start)
    np.testing.assert_array_equal(p1.medoids, km.k_medoids(x, 4, 2, None, int(start)).medoids)


def test_in_a_small_vit():
    """Weighted (key_mass) at block 1 under jit, no retrace, a finite grad of the logits; the
    unweighted start drawn from the model's key at blocks 0 and 2."""
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    red = reducers.from_config(dict(method="kmedoids", layers=[1], keep_rate=0.5))
    cfg = ViTConfig(**SMALL, reduction=red)
    assert cfg.token_counts() == [17, 17, 9, 9]
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    traces = []

    @functools.partial(jax.jit, static_argnames="red")
    def fwd(m, x, key, red):
        traces.append(1)
        return m(x, key=key, reduction=red)

    logits, aux = fwd(model, images, jax.random.key(1), red)
    fwd(model, images + 1.0, jax.random.key(2), red)
    assert len(traces) == 1                                     # no retrace
    assert logits.shape == (2, 5) and bool(jnp.isfinite(logits).all())
    np.testing.assert_allclose(aux["size"].sum((1, 2)), 17.0)
    assert aux["plans"][0].n_out == 9
    g = jax.grad(lambda x: fwd(model, x, jax.random.key(1), red)[0].sum())(images)
    assert bool(jnp.isfinite(g).all())
    start = red.anneal(cfg.layout(), 0.0)
    assert cfg.token_counts(start) == [17] * 4 and red.anneal(cfg.layout(), 1.0) == red

    eq = km.KMedoids(layers=(0, 2), num_clusters=(10, 5), equal_weight=True)
    assert eq.needs_key and cfg.token_counts(eq) == [17, 11, 11, 6]
    assert cfg.token_counts(eq.anneal(cfg.layout(), 0.0)) == [17] * 4
    assert cfg.token_counts(eq.anneal(cfg.layout(), 0.5)) == [17, 14, 14, 11]
    with pytest.raises(ValueError, match="key="):
        model(images, reduction=eq)
    # The start is drawn from the key the block gets, once for the whole batch.
    x = jax.random.normal(jax.random.key(3), (2, 17, 32))
    y, size, plan = eq.reduce(cfg.layout(), cfg.schedule(eq)[0], x, jnp.ones((2, 17, 1)), {},
                              key=jax.random.key(4))
    start = int(jax.random.randint(jax.random.key(4), (), 0, 16))
    want = km.k_medoids(x, 10, 3, None, start, protected=1)
    np.testing.assert_array_equal(plan.medoids, want.medoids)
    np.testing.assert_allclose(size.sum((1, 2)), 17.0)


def test_budget_errors_name_the_block():
    layout = ViTConfig(**SMALL).layout()                   # 17 tokens: class + 16 patches
    with pytest.raises(ValueError, match=r"asks block 1 for 17 clusters, but 16 tokens \(besides "
                                         r"1 prefix tokens\) enter it \(allowed: 1..16\)"):
        km.KMedoids(layers=(1,), num_clusters=(17,)).schedule(layout)
    with pytest.raises(ValueError, match=r"asks block 2 for 9 clusters, but 8 tokens .*must not "
                                         r"grow \(the block before kept 8\)"):
        km.KMedoids(layers=(0, 2), num_clusters=(8, 9)).schedule(layout)
    with pytest.raises(ValueError, match=r"asks block 1 for 0 clusters"):
        km.KMedoids(layers=(1,), keep_rate=0.05).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.num_clusters has 1 entries but "
                                         r"reduction.layers has 2"):
        km.KMedoids(layers=(0, 1), num_clusters=(4,))
    with pytest.raises(ValueError, match=r"reduction.num_clusters \(block 1\)=0 is not allowed"):
        km.KMedoids(layers=(1,), num_clusters=(0,))
    with pytest.raises(ValueError, match=r"give one of them"):
        km.KMedoids(layers=(1,), num_clusters=(4,), keep_rate=0.5)
    with pytest.raises(ValueError, match=r"reduction.layers=\[2, 1\] must be strictly increasing"):
        km.KMedoids(layers=(2, 1), keep_rate=0.5)
    with pytest.raises(ValueError, match=r"reduction.keep_rate=1.5 is not allowed"):
        km.KMedoids(layers=(1,), keep_rate=1.5)
    with pytest.raises(ValueError, match=r"reduction.layers contains 3, but the model has 3"):
        km.KMedoids(layers=(3,), keep_rate=0.5).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.init_index=9 at block 2 must be below the 8"):
        km.KMedoids(layers=(0, 2), num_clusters=(8, 4), equal_weight=True,
                    init_index=9).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.iterations=-1 is not allowed"):
        km.KMedoids(layers=(1,), iterations=-1)
    with pytest.raises(ValueError, match=r"num_clusters=5 is not allowed: it must be <= 4"):
        km.k_medoids(jnp.ones((1, 5, 2)), 5, 1, jnp.ones((1, 4)), protected=1)
    with pytest.raises(ValueError, match=r"needs init_index"):
        km.k_medoids(jnp.ones((1, 5, 2)), 2)
