"""MCTF (Lee et al., CVPR 2024): parity with the authors' `utils/mctf.py` golden files, the
one-step-ahead block of their `Block_DEIT` rebuilt by hand against the ViT, and the reducer
under jit / grad / vmap without retracing, with its budget errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import reducers
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.reducers import mctf

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")
BSM_CASES = ["default", "onedir_pool0", "noprot_pool3", "prot2_pool2"]
IDX = ["unm_idx", "src_idx", "dst_idx", "unm_idx2", "src_idx2", "dst_idx2"]


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=0)


def _reference_call(d, metric, r):
    """bipartite_soft_matching + merge_wavg + merge_attention + merge_source + unmerge as the
    golden file's call made them, in one jit (one compile per case)."""
    kw = dict(num_protected=int(d["num_protected"]), tau_sim=float(d["tau_sim"]),
              tau_info=float(d["tau_info"]), tau_size=float(d["tau_size"]),
              bidirection=bool(d["bidirection"]), pooling=int(d["pooling_type"]))

    @jax.jit
    def run(metric, x, attn, size):
        plan = mctf.bipartite_soft_matching(metric, r, attn_mean=attn.mean(axis=(1, 2)),
                                            size=size, **kw)
        y, new_size = mctf.merge_wavg(plan, x, size)
        dense = plan.matrix(jnp.ones_like(x[..., :1]) if size is None else size)
        return {"plan": plan, "merged_x": y, "merged_size": new_size,
                "merged_attn": mctf.merge_attention(plan, attn, size),
                "source": mctf.merge_source(plan), "unmerged": mctf.unmerge(plan, y),
                "dense": jnp.einsum("bmn,bnc->bmc", dense, x)}

    return run(metric, d["x"], d["attn"], d.get("size"))   # no "size": the call got None


def _check_outputs(d, out):
    for k in IDX:
        if k in d:
            np.testing.assert_array_equal(np.asarray(getattr(out["plan"], k)), d[k], err_msg=k)
    for k in ("merged_x", "merged_size", "merged_attn", "source", "unmerged"):
        if k in d:
            _close(out[k], d[k])
    if int(d["pooling_type"]) != 2:   # the dense view (max pooling's is the group mean)
        _close(out["dense"], d["merged_x"])


@pytest.mark.parametrize("case", BSM_CASES)
def test_matching_and_pooling_match_reference(golden, case):
    d = golden(f"mctf_bsm_{case}.npz")
    out = _reference_call(d, d["metric"], int(d["r"]))
    _check_outputs(d, out)
    if not d["bidirection"]:
        assert out["plan"].src_idx2.shape[1] == 0


def test_layer_wrapper_clamps_and_merges_like_reference(golden):
    d = golden("mctf_layer_r16.npz")
    t, p = d["x"].shape[1], int(d["num_protected"])
    r = mctf.reference_r(t, float(d["r_eval"]), p)
    assert r == int(d["r_effective"]) == 7
    _check_outputs(d, _reference_call(d, d["x"], r))      # the metric is x itself
    # The reducer's clamp_r schedule is that wrapper, block after block.
    layout = reducers.TokenLayout(depth=3, num_tokens=t, class_token=True, num_prefix_tokens=1)
    specs = mctf.MCTF(r=16, clamp_r=True).schedule(layout)
    assert [s.budget for s in specs] == [7, 0, 0]
    assert [s.budget for s in mctf.MCTF(r=0.3, clamp_r=True).schedule(
        reducers.TokenLayout(depth=2, num_tokens=197, class_token=True))] == [58, 41]


@jax.jit
def _ties_and_distill(metric, x):
    tied = mctf.bipartite_soft_matching(metric, 4, tau_info=0.0)
    plan = mctf.bipartite_soft_matching(x, 4, num_protected=1, distill_token=True, pooling=0)
    return tied, plan.assignment, mctf.merge_wavg(plan, x)[0]


def test_ties_go_to_the_lower_index_and_distill_token_stays():
    x = jax.random.normal(jax.random.key(0), (2, 11, 4))
    tied, a, y = _ties_and_distill(jnp.ones((1, 10, 4)), x)    # every score equal
    np.testing.assert_array_equal(tied.src_idx, [[0, 1]])      # stable descending sort
    np.testing.assert_array_equal(tied.dst_idx, [[0, 0]])      # first maximum
    a = np.asarray(a)
    assert (a[:, 0] == 0).all() and (a[:, 1] == 1).all()
    assert ((a == 0).sum(1) == 1).all() and ((a == 1).sum(1) == 1).all()
    np.testing.assert_array_equal(y[:, :2], x[:, :2])


def _reference_block(blk, x, size, key_size, r, **kw):
    """The authors' Block_DEIT with one_step_ahead=1, from the block's own layers."""
    b, n, c = x.shape
    h = blk.norm1(x)
    qkv = blk.attn.qkv(h).reshape(b, n, 3, 2, c // 2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) * (c // 2) ** -0.5
    if key_size is not None:
        logits = logits + jnp.log(key_size)[:, None, None, :, 0]
    attn = jax.nn.softmax(logits, -1)
    plan = mctf.bipartite_soft_matching(x, r, attn_mean=attn.mean((1, 2)), size=size,
                                        num_protected=1, pooling=1, **kw)
    xm, new_size = mctf.merge_wavg(plan, x, size)
    am = mctf.merge_attention(plan, attn, size)
    v = blk.attn.qkv(blk.norm1(xm)).reshape(b, xm.shape[1], 3, 2, c // 2)[:, :, 2]
    out = jnp.einsum("bhqk,bkhd->bqhd", am, v).reshape(b, xm.shape[1], c)
    xm = xm + blk.attn.proj(out)
    return xm + blk.mlp(blk.norm2(xm)), new_size


def test_vit_is_the_reference_one_step_ahead_model_under_jit_grad_no_retrace():
    cfg = ViTConfig(**SMALL, reduction=mctf.MCTF(r=3, layers=(0, 2)))
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss(state, x):
        logits, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(logits ** 2), (logits, aux["size"])

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    for i in (1, 0):                                     # a second call does not retrace
        (_, (logits, size)), grads = grad_fn(state, images + i)
    assert cfg.token_counts() == [17, 14, 14, 11]
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # q and k of a merging block learn through the merged (one-step-ahead) attention.
    assert np.abs(np.asarray(grads["blocks"][2]["attn"]["qkv"]["kernel"][...])[:, :64]).sum() > 0

    @jax.jit
    def reference(x):   # the authors' Block_DEIT (one_step_ahead=1) in blocks 0 and 2
        x = model.embed(x)
        size = jnp.ones(x.shape[:2] + (1,))
        x, size = _reference_block(model.blocks[0], x, size, None, 3)
        x = model.blocks[1].feed_forward(model.blocks[1].attend(x, key_size=size[..., 0])[0])
        x, size = _reference_block(model.blocks[2], x, size, size, 3)    # prop. attention
        return model.head(model.norm(x)[:, 0]), size

    want_logits, want_size = reference(images)
    np.testing.assert_allclose(size, want_size, atol=1e-6)
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)

    red = cfg.reduction
    assert red.stats(cfg.layout(), cfg.schedule()[0]) == ("probs",)
    assert red.replace(one_step_ahead=0).stats(cfg.layout(), cfg.schedule()[0]) == ("key_mass",)
    assert all(red.flops(cfg.layout(), s) >= 0 for s in cfg.schedule())
    start = red.anneal(cfg.layout(), 0.0)
    assert cfg.token_counts(start) == [17] * 4 and red.anneal(cfg.layout(), 1.0) == red
    assert cfg.token_counts(red.anneal(cfg.layout(), 0.5)) == [17, 15, 15, 13]
    assert reducers.from_config(red.to_dict()) == red


@pytest.mark.parametrize("kw", [dict(one_step_ahead=0, pooling=0),
                                dict(one_step_ahead=2, pooling=2, bidirection=False)])
def test_other_placements_run_in_vit(kw):
    cfg = ViTConfig(**{**SMALL, "depth": 1}, distill_token=True, reduction=mctf.MCTF(r=3, **kw))
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    logits, aux = jax.jit(lambda m, x: m(x))(model, jnp.ones((2, 16, 16, 3)))
    assert np.isfinite(np.asarray(logits)).all() and aux["tokens"] == [18, 15]
    for plan in aux["plans"]:
        assert (np.asarray(plan.assignment)[:, :2] == [0, 1]).all()


def test_vmap_of_the_primitive():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 2, 15, 8)).astype(np.float32)
    logits = rng.normal(size=(2, 2, 2, 15, 15))
    attn = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)

    def run(x, attn):
        plan = mctf.bipartite_soft_matching(x, 5, attn_mean=attn.mean((1, 2)), num_protected=1,
                                            pooling=1)
        return mctf.merge_wavg(plan, x)[0], mctf.merge_attention(plan, attn)

    ys, atts = (np.asarray(v) for v in jax.jit(jax.vmap(run))(x, attn))
    single = jax.jit(run)
    for i in range(2):
        y, a = single(x[i], attn[i])
        np.testing.assert_allclose(ys[i], y, atol=1e-6)
        np.testing.assert_allclose(atts[i], a, atol=1e-6)
    np.testing.assert_allclose(atts.sum(-1), 1.0, atol=1e-5)    # merged rows stay distributions


def test_bad_budgets_name_the_problem():
    layout = ViTConfig(**SMALL).layout()
    with pytest.raises(ValueError, match=r"block 1 to merge r=8 tokens \(r=8\), but only 13 "
                                         r"tokens enter it \(at most 6"):
        mctf.MCTF(r=(4, 8)).schedule(layout)
    with pytest.raises(ValueError, match="reduction.r=1.5 is not allowed"):
        mctf.MCTF(r=1.5)
    with pytest.raises(ValueError, match=r"reduction.r=-1 is not allowed"):
        mctf.MCTF(r=-1)
    with pytest.raises(ValueError, match="r has 4 entries but the model has 3 layers"):
        mctf.MCTF(r=[1, 1, 1, 1]).schedule(layout)
    with pytest.raises(ValueError, match="reduction.layers contains 5"):
        mctf.MCTF(r=2, layers=[5]).schedule(layout)
    with pytest.raises(ValueError, match=r"reduction.pooling=4 is not one of \(0, 1, 2, 3\)"):
        mctf.MCTF(pooling=4)
    with pytest.raises(ValueError, match="reduction.tau_info=-1 is not allowed"):
        mctf.MCTF(tau_info=-1)
    with pytest.raises(ValueError, match="reduction.one_step_ahead=3"):
        mctf.MCTF(one_step_ahead=3)
    with pytest.raises(ValueError, match="block 0 to merge r=9"):
        ViTConfig(**SMALL, reduction=dict(method="mctf", r=0.6))
    with pytest.raises(TypeError, match="r must be a static Python int"):
        jax.jit(lambda r: mctf.bipartite_soft_matching(jnp.ones((1, 5, 2)), r))(2)
