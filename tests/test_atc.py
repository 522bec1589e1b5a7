"""ATC (agglomerative token clustering): parity with the reference's golden files (sklearn's
labels exactly, including its cluster numbering), with scipy + sklearn's `_hc_cut` on inputs
full of ties, and the reducer in a small ViT (jit, grad, vmap, no retrace, budget errors)."""

from __future__ import annotations

import functools
import heapq
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import groups as grp
from jax_tokens import reducers
from jax_tokens import tokens as tk
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.reducers import atc

hierarchy = pytest.importorskip("scipy.cluster.hierarchy")

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden"
CASES = ["single_cls", "complete_cls", "average_cls", "average_nocls"]
SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")


def _load(case):
    path = GOLDEN / f"atc_{case}.npz"
    if not path.exists():
        pytest.skip(f"golden file {path} not found")
    return dict(np.load(path))


def _sklearn_labels(dist: np.ndarray, k: int, linkage: str) -> np.ndarray:
    """What `AgglomerativeClustering(k, metric="precomputed", linkage)` does: scipy's linkage
    on the float32 upper triangle (as float64), then the heap walk of sklearn's `_hc_cut`."""
    n = dist.shape[0]
    children = hierarchy.linkage(dist[np.triu_indices(n, 1)].astype(np.float64),
                                 method=linkage)[:, :2].astype(int)
    nodes = [-(max(children[-1]) + 1)]
    for _ in range(k - 1):
        pair = children[-nodes[0] - n]
        heapq.heappush(nodes, -pair[0])
        heapq.heappushpop(nodes, -pair[1])

    def leaves(node):
        return [node] if node < n else leaves(children[node - n][0]) + leaves(
            children[node - n][1])

    labels = np.zeros(n, int)
    for i, node in enumerate(nodes):
        labels[leaves(-node)] = i
    return labels


# ----------------------------------------------------------------------------------------------
# Golden files
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    g = _load(case)
    meta = json.loads(str(g["meta"]))
    cls, linkage = bool(g["class_token"]), str(g["linkage"])
    k = int(meta["num_clusters_effective"])
    labels = g["cluster_labels"]
    # The distances sklearn saw (the reference's fp32 ops; a few ulps apart from torch's).
    dist = atc.cosine_distance(g["metric"][:, int(cls):])
    off = ~np.eye(dist.shape[-1], dtype=bool)
    np.testing.assert_allclose(np.asarray(dist)[:, off], g["dist"][:, off], atol=1e-6)
    # The reference's labels, exactly: sklearn's cluster numbering, class token 0.
    plan = atc.agglomerative_clustering(g["metric"], int(g["num_clusters"]), linkage,
                                        class_token=cls)
    assert plan.n_out == k + int(cls) == g["merged_x"].shape[1]
    np.testing.assert_array_equal(plan.groups, labels)
    # merge_wavg with and without sizes, and the source map (merge(eye(T), "amax")).
    x, size = grp.merge_groups(plan, g["x"], g["size"])
    np.testing.assert_allclose(x, g["merged_x"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(size, g["merged_size"], atol=1e-5)
    x0, size0 = grp.merge_groups(plan, g["x"], None)
    np.testing.assert_allclose(x0, g["merged_x_nosize"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(size0, g["merged_size_nosize"], atol=1e-5)
    np.testing.assert_array_equal(tk.assignment_matrix(plan.groups, plan.n_out), g["source"])
    np.testing.assert_allclose(plan.matrix(g["size"]) @ g["x"], g["merged_x"], atol=1e-5)
    # The reference's own distances give the same tree and labels.
    children, heights = atc.linkage_tree(g["dist"], linkage)
    assert bool((jnp.diff(heights, axis=1) >= 0).all())
    ref = labels[:, int(cls):] - int(cls)
    np.testing.assert_array_equal(atc.cut_tree(children, k), ref)
    # First-appearance numbering: the golden canon_order maps it to the reference's ids.
    app = np.asarray(atc.cut_tree(children, k, order="appearance"))
    canon = g["canon_order"][:, int(cls):] - int(cls)
    np.testing.assert_array_equal(np.take_along_axis(canon, app, axis=1), ref)


# ----------------------------------------------------------------------------------------------
# scipy + sklearn's cut on hard inputs (ties everywhere)
# ----------------------------------------------------------------------------------------------

def _hard_metrics(seed):
    """[2, 16, 4] metrics: random, every token duplicated (exact-zero distances and equal rows),
    and integer-rounded (many equal distances)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(3, 2, 16, 4)).astype(np.float32)
    m[1] = np.repeat(m[1][:, :8], 2, axis=1)[:, rng.permutation(16)]
    m[2] = np.round(m[2])
    m[2][m[2] == 0] = 1.0
    return m


@pytest.mark.parametrize("linkage", atc.LINKAGES)
def test_tree_and_numbering_match_scipy_and_sklearn_with_ties(linkage):
    for m in _hard_metrics(0):
        dist = atc.cosine_distance(m)
        children, _ = atc.linkage_tree(dist, linkage)
        d = np.asarray(dist)
        for b in range(2):
            z = hierarchy.linkage(d[b][np.triu_indices(16, 1)].astype(np.float64), linkage)
            np.testing.assert_array_equal(children[b], z[:, :2].astype(int))
        for k in (1, 5, 6, 16):
            want = np.stack([_sklearn_labels(d[b], k, linkage) for b in range(2)])
            np.testing.assert_array_equal(atc.cut_tree(children, k), want)


def test_protected_tokens_and_clamped_count():
    m = jnp.asarray(_hard_metrics(1)[0])
    both = atc.agglomerative_clustering(jnp.concatenate([m[:, :2], m], 1), 6, "average",
                                        class_token=True, distill_token=True)
    alone = atc.agglomerative_clustering(m, 6, "average")
    np.testing.assert_array_equal(both.groups[:, :2], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(both.groups[:, 2:], alone.groups + 2)
    assert both.n_out == 8
    # More clusters than tokens: clamped as the reference clamps (every token its own).
    every = atc.agglomerative_clustering(m, 99, "average")
    assert every.n_out == 16
    np.testing.assert_array_equal(np.sort(np.asarray(every.groups), 1), [np.arange(16)] * 2)
    with pytest.raises(ValueError, match="linkage='ward' is not one of"):
        atc.linkage_tree(jnp.zeros((1, 4, 4)), "ward")
    with pytest.raises(ValueError, match="order='size' is not one of"):
        atc.cut_tree(jnp.zeros((1, 3, 2), jnp.int32), 2, order="size")
    with pytest.raises(TypeError, match="num_clusters must be a static Python int"):
        jax.jit(lambda k: atc.agglomerative_clustering(m, k))(3)


def test_vmap_of_the_primitive():
    m = jnp.asarray(_hard_metrics(2)[:, :, :8])                  # [3, 2, 8, 4]
    groups = jax.jit(jax.vmap(lambda m: atc.agglomerative_clustering(m, 3, "single").groups))(m)
    for i in range(3):
        d = np.asarray(atc.cosine_distance(m[i]))
        for b in range(2):
            np.testing.assert_array_equal(groups[i, b], _sklearn_labels(d[b], 3, "single"))


# ----------------------------------------------------------------------------------------------
# The reducer
# ----------------------------------------------------------------------------------------------

def test_schedule_budgets_and_errors():
    layout = reducers.TokenLayout(depth=4, num_tokens=197, num_prefix_tokens=1, class_token=True,
                                  embed_dim=64, num_heads=2)
    # The reference's single ratio: int(196 * 0.9 ** (i + 1)) clusters at the i-th block.
    red = atc.ATC(layers=(0, 2, 3), keep_rate=0.9, linkage="complete")
    assert [s.n_out for s in red.schedule(layout)] == [1 + 176, 177, 1 + 158, 1 + 142]
    assert [s.active for s in red.schedule(layout)] == [True, False, True, True]
    red = atc.ATC(layers=[1, 2], num_clusters=[100, 50])
    assert red.num_clusters == (100, 50) and red.layers == (1, 2)
    assert [s.n_in for s in red.schedule(layout)] == [197, 197, 101, 51]
    assert all(red.flops(layout, s) > 0 for s in red.schedule(layout) if s.active)
    assert atc.ATC(layers=(1,), num_clusters=196).schedule(layout)[1].active is False
    assert not any(s.active for s in atc.ATC(layers=(1,)).schedule(layout))
    # Warm-up: fraction 0 reduces nothing, 1 is the reducer.
    for r in (red, atc.ATC(layers=(0, 2), keep_rate=0.5)):
        assert not any(s.active for s in r.anneal(layout, 0.0).schedule(layout))
        assert r.anneal(layout, 1.0) == r
    assert red.anneal(layout, 0.5).num_clusters == (148, 123)
    with pytest.raises(ValueError, match=r"asks block 2 for 60 clusters, but only 50 tokens"):
        atc.ATC(layers=(1, 2), num_clusters=(50, 60)).schedule(layout)
    with pytest.raises(ValueError, match=r"asks block 0 for 300 clusters, but only 196"):
        atc.ATC(layers=(0,), num_clusters=300).schedule(layout)
    with pytest.raises(ValueError, match=r"keep_rate=0.01 leaves block 2 with 0 clusters"):
        atc.ATC(layers=(0, 2), keep_rate=0.01).schedule(layout)
    with pytest.raises(ValueError, match="reduction.layers contains 7"):
        atc.ATC(layers=(7,), num_clusters=4).schedule(layout)
    bad = [(dict(layers=(1,), num_clusters=(3, 2)), ValueError, "has 2 entries but reduction"
            ".layers has 1"),
           (dict(layers=(2, 1), num_clusters=4), ValueError, "must be strictly increasing"),
           (dict(layers=(1,), num_clusters=0), ValueError, r"num_clusters=0 is not allowed"),
           (dict(layers=(1,), num_clusters=(-1,)), ValueError, r"\(block 1\)=-1 is not allowed"),
           (dict(layers=(1,), keep_rate=1.5), ValueError, r"keep_rate=1.5 is not allowed"),
           (dict(layers=(1,), keep_rate=0.5, num_clusters=3), ValueError, "are both set"),
           (dict(linkage="ward"), ValueError, r"reduction.linkage='ward' is not one of"),
           (dict(order="size"), ValueError, r"reduction.order='size' is not one of"),
           (dict(prop_attn=1), TypeError, "reduction.prop_attn=1 must be a bool")]
    for kw, err, msg in bad:
        with pytest.raises(err, match=msg):
            atc.ATC(**kw)


def test_reduce_weights_follow_prop_attn():
    layout = reducers.TokenLayout(depth=1, num_tokens=17, num_prefix_tokens=1, class_token=True,
                                  embed_dim=8, num_heads=1)
    m = jnp.asarray(_hard_metrics(3)[0])
    metric = jnp.concatenate([m[:, :1], m], 1)                    # [2, 17, 4]
    x = jax.random.normal(jax.random.key(0), (2, 17, 8))
    size = jax.random.randint(jax.random.key(1), (2, 17, 1), 1, 5).astype(jnp.float32)
    for prop in (True, False):
        red = atc.ATC(layers=(0,), num_clusters=6, prop_attn=prop)
        spec = red.schedule(layout)[0]
        y, s, plan = red.reduce(layout, spec, x, size, {"mean_key": metric})
        assert y.shape == (2, 7, 8) and plan.n_out == 7
        np.testing.assert_allclose(y, plan.matrix(size if prop else None) @ x, atol=1e-5)
        np.testing.assert_allclose(s, grp.group_sum(plan, size), atol=1e-6)   # sizes add up


def test_in_a_small_vit():
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    red = reducers.from_config(dict(method="atc", layers=[1], num_clusters=8,
                                    linkage="single"))
    cfg = ViTConfig(**SMALL, reduction=red, trace_source=True)
    assert cfg.token_counts() == [17, 17, 9, 9]
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    traces = []

    @functools.partial(jax.jit, static_argnames="red")
    def fwd(m, x, red):
        traces.append(1)
        return m(x, reduction=red)

    logits, aux = fwd(model, images, red)
    fwd(model, images + 1.0, red)
    assert len(traces) == 1                                       # no retrace
    assert logits.shape == (2, 5) and bool(jnp.isfinite(logits).all())
    np.testing.assert_allclose(aux["size"].sum((1, 2)), 17.0)
    plan = aux["plans"][0]
    assert plan.n_out == 9
    a = np.asarray(plan.assignment)
    assert (a[:, 0] == 0).all() and (a[:, 1:] >= 1).all()       # the class token stays alone
    assert all(len(np.unique(a[b])) == 9 for b in range(2))      # K non-empty clusters
    g = jax.grad(lambda x: fwd(model, x, red)[0].sum())(images)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0
