"""DPC-KNN Token Pooling: parity with the reference (JoakimHaurum/TokenReduction
`models/dpcknn.py`), the plan contract, the reducer in a small ViT (learned weights; jit, grad,
no retrace), vmap of the primitive, and budget errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import reducers
from jax_tokens import tokens as tk
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.reducers import dpcknn as dp
from jax_tokens.reducers import kmedoids as km

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")


@pytest.mark.parametrize("case", ["first", "second"])
def test_dpc_knn_matches_reference(golden, case):
    d = golden(f"dpcknn_{case}.npz")
    x = jnp.asarray(d["x"])
    k, nn = int(d["cluster_num"]), int(d["k"])
    np.testing.assert_allclose(km.cdist(x, x), d["cdist"], atol=1e-5, rtol=0)
    idx_cluster, index_down = dp.cluster_dpc_knn(x, k, nn, jnp.asarray(d["density_noise"]))
    np.testing.assert_array_equal(idx_cluster, d["idx_cluster"])
    np.testing.assert_array_equal(index_down, d["index_down"])
    if "idx_cluster_nonoise" in d:                     # zero noise, the reducer's default
        idx0, down0 = dp.cluster_dpc_knn(x, k, nn)
        np.testing.assert_array_equal(idx0, d["idx_cluster_nonoise"])
        np.testing.assert_array_equal(down0, d["index_down_nonoise"])
    for suffix, w in (("", d["token_weight"]), ("_eq", None)):
        merged, idx_token, agg = dp.merge_tokens(x, d["idx_token"], d["agg_weight"],
                                                 idx_cluster, k, w)
        np.testing.assert_allclose(merged, d["merged_x" + suffix], atol=1e-5, rtol=0)
        np.testing.assert_allclose(agg, d["agg_weight_new" + suffix], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(idx_token, d["idx_token_new"])


def test_reducer_reproduces_reference_with_a_class_token(golden):
    """Equal weights (no learned score): the reducer on [cls, x] gives [cls, merged_x_eq]."""
    d = golden("dpcknn_first.npz")
    b, n, c = d["x"].shape
    k = int(d["cluster_num"])
    x = np.concatenate([np.full((b, 1, c), 3.0, np.float32), d["x"]], axis=1)
    size = np.arange(1, b * (n + 1) + 1, dtype=np.float32).reshape(b, n + 1, 1)
    layout = reducers.TokenLayout(depth=1, num_tokens=n + 1, num_prefix_tokens=1,
                                  class_token=True, embed_dim=c, num_heads=1)
    red = dp.DPCKNN(layers=(0,), num_clusters=(k,), k=int(d["k"]), equal_weight=True)
    assert not red.learned and not red.needs_key and red.stats(layout, None) == ()
    spec = red.schedule(layout)[0]
    y, new_size, plan = red.reduce(layout, spec, jnp.asarray(x), jnp.asarray(size), {})
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    np.testing.assert_allclose(y[:, 1:], d["merged_x_eq"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(plan.assignment[:, 1:] - 1, d["idx_cluster_nonoise"])
    want = np.stack([np.bincount(d["idx_cluster"][i], size[i, 1:, 0], minlength=k)
                     for i in range(b)])
    np.testing.assert_allclose(new_size[:, 1:, 0], want, rtol=1e-6)
    np.testing.assert_array_equal(new_size[:, 0], size[:, 0])
    # The plan's contract: matrix == what reduce did (sizes do not enter it).
    assert isinstance(plan, tk.Plan) and (plan.n_in, plan.n_out) == (n + 1, k + 1)
    np.testing.assert_allclose(np.einsum("bmn,bnc->bmc", plan.matrix(), x), y, atol=1e-5)
    np.testing.assert_array_equal(plan.matrix(jnp.asarray(size)), plan.matrix())
    back = np.asarray(plan.invert(y))
    np.testing.assert_array_equal(back[:, 0], x[:, 0])
    np.testing.assert_array_equal(back, np.take_along_axis(
        np.asarray(y), np.asarray(plan.assignment)[..., None], 1))


def test_noise_from_a_key_and_ties():
    x = jax.random.normal(jax.random.key(0), (2, 9, 4))
    u = jax.random.uniform(jax.random.key(5), (2, 9), jnp.float32)
    a = dp.cluster_dpc_knn(x, 3, 2, jax.random.key(5))
    b = dp.cluster_dpc_knn(x, 3, 2, u)
    for s, t in zip(a, b):
        np.testing.assert_array_equal(s, t)
    # All tokens equal: equal scores, so the first K tokens are the centers (lax.top_k keeps
    # the lower index first); the rest join center 0 (argmin: first), centers themselves.
    idx, down = dp.cluster_dpc_knn(jnp.ones((1, 6, 2)), 3, 2)
    np.testing.assert_array_equal(down, [[0, 1, 2]])
    np.testing.assert_array_equal(idx, [[0, 1, 2, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"noise must be a PRNG key or an array of shape"):
        dp.cluster_dpc_knn(x, 3, 2, jnp.zeros((2, 8)))


def test_jit_vmap_grad_and_no_retrace():
    x = jax.random.normal(jax.random.key(1), (2, 12, 6))
    w = jnp.exp(jax.random.normal(jax.random.key(2), (2, 11)))
    traces = []

    @jax.jit
    def f(x, w):
        traces.append(1)
        idx, _ = dp.cluster_dpc_knn(x[:, 1:], 4, 3)
        plan = dp.cluster_plan(idx, 4, w, protected=1)
        return plan.apply(x), plan.assignment

    y, a = f(x, w)
    f(x * 2.0, w)
    assert len(traces) == 1
    idx, _ = dp.cluster_dpc_knn(x[:, 1:], 4, 3)
    np.testing.assert_array_equal(a[:, 1:] - 1, idx)
    vm_y, vm_a = jax.vmap(f)(jnp.stack([x, -x]), jnp.stack([w, w]))
    np.testing.assert_allclose(vm_y[0], y, atol=1e-6)
    np.testing.assert_array_equal(vm_a[1], f(-x, w)[1])
    gx, gw = jax.grad(lambda x, w: jnp.sum(f(x, w)[0] ** 2), argnums=(0, 1))(x, w)
    assert bool(jnp.isfinite(gx).all() and jnp.isfinite(gw).all())
    assert float(jnp.abs(gw).sum()) > 0                          # the weights get a gradient


def test_in_a_small_vit():
    """The learned score (exp(Linear(x))) owned by block 1, under jit without retracing, its
    gradient; the noisy variant draws from the model's key."""
    red = reducers.from_config(dict(method="dpcknn", layers=[1], keep_rate=0.5, k=3))
    assert red.learned and not red.needs_key
    cfg = ViTConfig(**SMALL, reduction=red)
    assert cfg.token_counts() == [17, 17, 9, 9]
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    assert model.blocks[1].reducer is not None and model.blocks[0].reducer is None
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    traces = []

    @functools.partial(jax.jit, static_argnames="red")
    def fwd(m, x, key, red):
        traces.append(1)
        return m(x, key=key, reduction=red)

    logits, aux = fwd(model, images, jax.random.key(1), red)
    fwd(model, images + 1.0, jax.random.key(2), red)
    assert len(traces) == 1
    assert logits.shape == (2, 5) and bool(jnp.isfinite(logits).all())
    np.testing.assert_allclose(aux["size"].sum((1, 2)), 17.0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: fwd(nnx.merge(graphdef, p, rest), images, jax.random.key(1),
                                   red)[0].sum())(params)
    gscore = grads["blocks"][1]["reducer"]["score"]["kernel"][...]
    assert bool(jnp.isfinite(gscore).all()) and float(jnp.abs(gscore).sum()) > 0
    assert cfg.token_counts(red.anneal(cfg.layout(), 0.0)) == [17] * 4
    assert red.anneal(cfg.layout(), 1.0) == red
    noisy = red.replace(noise=True)
    assert noisy.needs_key and not noisy.per_example(None)
    with pytest.raises(ValueError, match="key="):
        model(images, reduction=noisy)
    # The noisy reducer draws from the key it gets: the same draw as an explicit array.
    layout, spec = cfg.layout(), cfg.schedule(noisy)[1]
    x = jax.random.normal(jax.random.key(3), (2, 17, 32))
    ones = jnp.ones((2, 17, 1))
    _, _, plan = noisy.reduce(layout, spec, x, ones, {}, key=jax.random.key(4),
                              module=model.blocks[1].reducer)
    want, _ = dp.cluster_dpc_knn(x[:, 1:], 8, 3, jax.random.uniform(jax.random.key(4), (2, 16)))
    np.testing.assert_array_equal(plan.assignment[:, 1:] - 1, want)


def test_budget_errors_name_the_block():
    layout = ViTConfig(**SMALL).layout()
    with pytest.raises(ValueError, match=r"asks block 0 for 20 clusters, but 16 tokens"):
        dp.DPCKNN(layers=(0,), num_clusters=(20,)).schedule(layout)
    with pytest.raises(ValueError, match=r"asks block 1 for 6 clusters, but 4 tokens .*must not "
                                         r"grow"):
        dp.DPCKNN(layers=(0, 1), num_clusters=(4, 6)).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.k=5 at block 2 must be at most the 4 "
                                         r"tokens clustered there"):
        dp.DPCKNN(layers=(0, 2), num_clusters=(4, 2), k=5).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.num_clusters has 2 entries but "
                                         r"reduction.layers has 1"):
        dp.DPCKNN(layers=(1,), num_clusters=(4, 2))
    with pytest.raises(ValueError, match=r"reduction.k=0 is not allowed"):
        dp.DPCKNN(layers=(1,), k=0)
    with pytest.raises(TypeError, match=r"reduction.noise=1 must be a bool"):
        dp.DPCKNN(layers=(1,), noise=1)
    with pytest.raises(ValueError, match=r"num_clusters=7 is not allowed: it must be <= 6"):
        dp.cluster_dpc_knn(jnp.ones((1, 6, 2)), 7, 2)
