"""DiffRate: parity with the reference golden files (`diffrate_*.npz`, OpenGVLab/DiffRate
`DiffRate/merge.py` + the size updates of `DiffRate/patch/deit.py`), the whole block's
selection (sort by CLS attention, prune, merge) against a NumPy transcription of
`DiffRateBlock.forward` (inference branch), the reducer in a small ViT under jit / grad / vmap
without retracing, and the bad-budget errors."""

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
from jax_tokens.reducers import diffrate as D

CASES = ["cls", "nocls", "cls_one"]
SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")


@functools.partial(jax.jit, static_argnums=(3, 4))
def _golden_outputs(metric, x, size, k, exclude):
    """Every golden output from the primitives, in one compiled function."""
    b, n, _ = x.shape
    dst, node_max = D.similarity_match(metric, k, exclude=exclude)
    plan = D.DiffRatePlan(order=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
                          dst_idx=dst, node_max=node_max, n_mid=n, n_out=k)
    return dict(
        dst_idx=dst, node_max=node_max,
        merged_x=D.merge_sorted(x, dst, k, "mean"),
        merged_size=D.merge_size(size, dst, node_max, k, "reference"),
        merged_x_train=D.merge_sorted(x, dst, k, "mean", training=True),
        merged_size_train=D.merge_size(size, dst, node_max, k, "train", training=True),
        source=D.merge_sorted(jnp.broadcast_to(jnp.eye(n), (b, n, n)), dst, k, "amax"),
        # The same through a plan with the identity order (the golden inputs come sorted).
        plan_source=tk.assignment_matrix(plan.assignment, k),
        plan_x=plan.apply(x),
        plan_matrix_x=plan.matrix(size) @ x,                  # size does not weight x
        plan_size=D.diffrate_merge(plan, x, size, "reference")[1],
        default_size=D.merge_size(size, dst, node_max, k))


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_golden(golden, case):
    d = golden(f"diffrate_{case}.npz")
    k, cls = int(d["kept_number"]), bool(d["class_token"])
    out = jax.tree.map(np.asarray, _golden_outputs(d["metric"], d["x"], d["size"], k,
                                                   int(cls)))
    np.testing.assert_array_equal(out["dst_idx"], d["dst_idx"])
    for name in ("node_max", "merged_x", "merged_size", "merged_x_train", "merged_size_train",
                 "source"):
        np.testing.assert_allclose(out[name], d[name], atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_array_equal(out["plan_source"], d["source"])
    for name, ref in (("plan_x", "merged_x"), ("plan_matrix_x", "merged_x"),
                      ("plan_size", "merged_size")):
        np.testing.assert_allclose(out[name], d[ref], atol=1e-5, rtol=0, err_msg=name)
    # The default rule floors negative cosines at 0 (the nocls case has some).
    if (d["node_max"] >= 0).all():
        np.testing.assert_allclose(out["default_size"], d["merged_size"], atol=1e-5, rtol=0)
    else:
        assert out["default_size"].min() >= 1.0
        assert not np.allclose(out["default_size"], d["merged_size"])


def _reference_block(cls_attn, x, size, prune_kept, merge_kept):
    """NumPy transcription of DiffRateBlock.forward's inference branch (after attention):
    cls_attn [B, N] is attn[:, :, 0].mean(heads); class token at 0."""
    out_x, out_s = [], []
    for b in range(x.shape[0]):
        idx = np.concatenate([[0], 1 + np.argsort(-cls_attn[b, 1:], kind="stable")])
        xs, ss = x[b, idx][:prune_kept], size[b, idx][:prune_kept]
        if merge_kept < prune_kept:
            m = xs / np.linalg.norm(xs, axis=-1, keepdims=True)
            sim = m[merge_kept:] @ m[:merge_kept].T
            sim[:, 0] = -np.inf
            dst, node_max = sim.argmax(-1), sim.max(-1)
            xd, sd = xs[:merge_kept].copy(), ss[:merge_kept].copy()
            cnt = np.ones(merge_kept)
            for j, t in enumerate(dst):
                xd[t] += xs[merge_kept + j]
                sd[t] += ss[merge_kept + j] * node_max[j]
                cnt[t] += 1
            xs, ss = xd / cnt[:, None], sd
        out_x.append(xs)
        out_s.append(ss)
    return np.stack(out_x), np.stack(out_s)


@pytest.mark.parametrize("prune_kept,merge_kept", [(13, 7), (17, 10), (9, 9), (17, 2)])
def test_block_matches_numpy_transcription(prune_kept, merge_kept):
    rng = np.random.default_rng(prune_kept * 31 + merge_kept)
    b, n, c = 3, 17, 8
    x = rng.normal(size=(b, n, c)).astype(np.float32)
    size = rng.integers(1, 4, size=(b, n, 1)).astype(np.float32)
    cls_attn = rng.dirichlet(np.ones(n), size=b).astype(np.float32)
    want_x, want_s = _reference_block(cls_attn, x, size, prune_kept, merge_kept)
    # The reducer's path: cls_probs [B, H, N] (head mean = cls_attn), class token protected.
    red = D.DiffRate(prune_kept=(prune_kept,), merge_kept=(merge_kept,),
                     size_update="reference")
    layout = reducers.TokenLayout(depth=1, num_tokens=n, num_prefix_tokens=1, class_token=True,
                                  embed_dim=c, num_heads=2)
    spec = red.schedule(layout)[0]
    assert (spec.n_in, spec.budget, spec.n_out) == (n, prune_kept, merge_kept)
    assert spec.active == (merge_kept < n)

    @jax.jit
    def run(probs, x, size):
        y, s, plan = red.reduce(layout, spec, x, size, {"cls_probs": probs})
        return y, s, plan, plan.matrix(), plan.invert(y)

    probs = np.stack([cls_attn * 0.5, cls_attn * 1.5], axis=1)
    y, s, plan, w, back = run(probs, x, size)
    assert isinstance(plan, tk.Plan) and (plan.n_in, plan.n_out) == (n, merge_kept)
    np.testing.assert_allclose(y, want_x, atol=1e-5, rtol=0)
    np.testing.assert_allclose(s, want_s, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.einsum("bmn,bnc->bmc", w, x), want_x, atol=1e-5)
    a = np.asarray(plan.assignment)
    assert (a[:, 0] == 0).all() and (a >= 0).sum(1).tolist() == [prune_kept] * b
    np.testing.assert_allclose(np.asarray(back)[a < 0], 0.0)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(y), np.maximum(a, 0)[..., None],
                                                  1)[a >= 0], np.asarray(back)[a >= 0])


def test_ties_sort_lower_index_first():
    scores = jnp.asarray([[0.2, 0.5, 0.2, 0.5, 0.1]])
    np.testing.assert_array_equal(D.sort_by_score(scores, 1), [[0, 2, 4, 1, 3, 5]])


def test_in_a_small_vit_jit_grad_vmap_no_retrace():
    red = D.DiffRate(prune_kept=(17, 13, 9), merge_kept=(15, 11, 6))
    cfg = ViTConfig(**SMALL, reduction=red, trace_source=True)
    assert cfg.token_counts() == [17, 15, 11, 6]
    graphdef, state = nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def diffrate_step(state, images):   # logits and their gradient, one compiled function
        def f(im):
            logits, aux = nnx.merge(graphdef, state)(im)
            return logits.sum(), (logits, aux)
        (_, (logits, aux)), g = jax.value_and_grad(f, has_aux=True)(images)
        return logits, aux, g

    logits, aux, g = diffrate_step(state, images)
    diffrate_step(state, images + 1.0)                             # no retrace
    assert logits.shape == (2, 5) and bool(jnp.isfinite(logits).all())
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0
    assert aux["size"].shape == (2, 6, 1) and float(aux["size"].min()) >= 1.0
    assert [p.n_out for p in aux["plans"]] == [15, 11, 6]
    src = np.asarray(aux["source_index"])
    assert (src[:, 0] == 0).all()                                  # the class token stays put
    # vmap of the primitives over a leading axis equals the batched call.
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.random((2, 3, 10)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 3, 11, 4)), jnp.float32)
    f = lambda s, x: D.diffrate_merge(D.diffrate_match(s, x, 8, 5), x)   # noqa: E731
    (vy, vs), (y, s) = jax.jit(lambda s, x: (jax.vmap(f)(s, x), f(s[1], x[1])))(scores, x)
    np.testing.assert_allclose(vy[1], y, atol=1e-6)
    np.testing.assert_allclose(vs[1], s, atol=1e-6)


def test_size_rules_and_anneal():
    layout = ViTConfig(**SMALL).layout()
    red = D.DiffRate(prune_kept=(17, 13, 9), merge_kept=(15, 11, 6))
    assert ViTConfig(**SMALL, reduction=red.anneal(layout, 0.0)).token_counts() == [17] * 4
    assert red.anneal(layout, 1.0) == red
    half = red.anneal(layout, 0.5)
    assert half.merge_kept == (16, 14, 11) and half.prune_kept == (17, 15, 13)
    assert reducers.from_config(red.to_dict()) == red
    # One token of size 2 merged with cosine -0.5 into a destination of size 2.
    size, cos, dst = jnp.full((1, 2, 1), 2.0), jnp.asarray([[-0.5]]), jnp.zeros((1, 1), int)
    got = {r: float(D.merge_size(size, dst, cos, 1, r)[0, 0, 0]) for r in D.SIZE_RULES}
    assert got == {"similarity": 2.0, "reference": 1.0, "train": 3.0, "sum": 4.0}


def test_paper_schedule_needs_clamp_and_counts_are_checked():
    # DiffRate's searched DeiT-S schedule at 2.5 GFLOPs (compression_rate.json): block 6 asks
    # to prune to 111 tokens when 107 are left; the reference reads that as "keep all".
    prune_k = [197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3]
    merge_k = [197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3]
    layout = reducers.TokenLayout(depth=12, num_tokens=197, num_prefix_tokens=1,
                                  class_token=True, embed_dim=384, num_heads=6)
    with pytest.raises(ValueError, match=r"reduction.prune_kept\[6\]=111 at block 6 exceeds "
                                         r"the 107 tokens .* counts cannot grow"):
        D.DiffRate(prune_kept=prune_k, merge_kept=merge_k).schedule(layout)
    specs = D.DiffRate(prune_kept=prune_k, merge_kept=merge_k, clamp=True).schedule(layout)
    assert [s.n_out for s in specs] == [197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3]
    assert specs[6].budget == 107 and specs[7].budget == 96
    with pytest.raises(ValueError, match=r"reduction.merge_kept has 2 entries but the model "
                                         r"has 12 blocks"):
        D.DiffRate(merge_kept=[150, 100]).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.merge_kept\[1\]=170 at block 1 exceeds "
                                         r"the 160 tokens that reach its merging step"):
        D.DiffRate(prune_kept=[197, 160] + [100] * 10,
                   merge_kept=[197, 170] + [100] * 10).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.prune_kept\[2\]=1 at block 2 is not "
                                         r"allowed: it must keep the 1 prefix"):
        D.DiffRate(prune_kept=[197, 150, 1] + [1] * 9).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.prune_kept\[0\] \(block 0\)=-3"):
        D.DiffRate(prune_kept=[-3])
    with pytest.raises(ValueError, match="reduction.size_update='log' is not one of"):
        D.DiffRate(size_update="log")
    nocls = reducers.TokenLayout(depth=1, num_tokens=16, embed_dim=8)
    with pytest.raises(ValueError, match="score='cls_attn' needs a class token"):
        D.DiffRate(merge_kept=[8]).schedule(nocls)
    assert D.DiffRate(merge_kept=[8], score="key_mass").schedule(nocls)[0].n_out == 8
    with pytest.raises(ValueError, match="kept must be > exclude"):
        D.similarity_match(jnp.ones((1, 5, 3)), 1, exclude=1)
