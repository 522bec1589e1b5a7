"""ATS (Adaptive Token Sampling): parity with the reference (adaptivetokensampling/ATS
`ats_block.py`) step by step and through a 3-block chain, bit parity of the CDF and `ys`,
the reducer in a small ViT (empty slots masked by log(size), finite gradients, jit == eager,
no retrace), vmap, the plan contract, and budget errors.

Every comparison computes from the golden inputs (never copies outputs): indices exactly, floats
within 1e-5 (the chain within 1e-4). Empty slots hold nonzero values after our MLP (the
reference multiplies them by its policy, 0), so blocks are compared on live tokens."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import reducers
from jax_tokens.attention import xla as attention_xla
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.models import convert
from jax_tokens.models.vit import Attention
from jax_tokens.reducers import ats

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")
CHAIN = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")                     # 64 patches + CLS = the golden chain's 65


def _layout(n, c=32, heads=4, prefix=1):
    return reducers.TokenLayout(depth=1, num_tokens=n, num_prefix_tokens=prefix,
                                class_token=True, embed_dim=c, num_heads=heads)


_sample = jax.jit(ats.sample, static_argnums=1, static_argnames="drop_tokens")


def _live_sorted(order, live):
    """The sorted indices of live tokens only (empty slots tie at score 0: unspecified order)."""
    return [o[l[o]] for o, l in zip(order, live)]


# --------------------------------------------------------------------------------------------
# The sampler, step by step
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["nodrop", "drop_masked"])
def test_sampler_steps_match_reference(golden, case):
    """From the reference's attention and values: scores, sorted order, CDF, ys, picks, unique
    indices, the sampled tokens and the policy.

    drop_masked: 10 empty tokens per example in 65 slots. Such an input is not compacted (the
    reference's drop chain always hands a block its batch's widest live count), so the CDF rule
    is the plain one (min 0: the example has zero scores), and drop mode is the compaction of
    the output: our first N' slots are its N' tokens, the rest are empty."""
    d = golden(f"ats_sampler_{case}.npz")
    b, h, n, _ = d["attn"].shape
    k = int(d["n_ref_tokens"]) - 1
    live = d["policy_in"][:, 1:, 0] > 0
    vnorm = attention_xla.value_norm(jnp.asarray(d["v"]).transpose(0, 2, 1, 3), h)
    s = _sample(ats.significance(d["attn"][:, :, 0], vnorm), k, live)
    for a, g in zip(_live_sorted(np.asarray(s.sorted_indices), live),
                    _live_sorted(d["sorted_indices"], live)):
        np.testing.assert_array_equal(a, g)
    np.testing.assert_allclose(s.sorted_scores, d["sorted_scores"], atol=1e-7, rtol=1e-5)
    np.testing.assert_allclose(s.normalized_cdf, d["normalized_cdf"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(s.ys, d["ys"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(s.picks, d["tokens_to_pick_ind"])
    np.testing.assert_array_equal(s.unique_indices, d["unique_indices"])
    # The output: [CLS, sampled tokens of raw_x in ascending significance, empty slots].
    plan = ats.plan_from_sampling(s, n, 1)
    m = d["selected_x"].shape[1]                          # N' (N without drop_tokens)
    np.testing.assert_array_equal(plan.apply(jnp.asarray(d["raw_x"]))[:, :m], d["selected_x"])
    np.testing.assert_array_equal(plan.valid[:, :m], d["policy"][..., 0] > 0)
    assert not np.asarray(plan.valid[:, m:]).any()
    np.testing.assert_array_equal(plan.kept, d["policy"].sum((1, 2)).astype(int))
    valid = np.asarray(plan.valid)
    if d["drop_tokens"]:      # flat b * n_tokens + n over the pre-compaction policy
        np.testing.assert_array_equal(np.flatnonzero(valid), d["sampler"])
    else:
        np.testing.assert_array_equal(np.argwhere(valid), d["sampler"][:, :2])


@pytest.mark.parametrize("case", ["nodrop", "drop_masked"])
def test_cdf_and_ys_are_bit_exact(golden, case):
    """torch's CPU cumsum (double accumulation), its min-max normalisation and create_ys, bit
    for bit, from the reference's own sorted scores / normalised CDF."""
    d = golden(f"ats_sampler_{case}.npz")
    k = int(d["n_ref_tokens"]) - 1
    np.testing.assert_array_equal(jax.jit(ats.normalized_cdf)(jnp.asarray(d["sorted_scores"])),
                                  d["normalized_cdf"])
    np.testing.assert_array_equal(ats.create_ys(jnp.asarray(d["normalized_cdf"]), k), d["ys"])
    np.testing.assert_array_equal(
        jax.jit(ats.create_ys, static_argnums=1)(jnp.asarray(d["normalized_cdf"]), k), d["ys"])
    np.testing.assert_array_equal(
        jax.jit(ats.cumsum_f64)(d["sorted_scores"]),
        np.cumsum(d["sorted_scores"].astype(np.float64), axis=1).astype(np.float32))
    lin = ats.torch_linspace(k)
    assert lin[0] == 0.0 and lin[-1] == 1.0 and np.all(np.diff(lin) > 0)


@pytest.mark.parametrize("case", ["nodrop", "drop_masked"])
def test_reducer_after_our_attention_matches_reference(golden, case):
    """Our attention (the golden qkv / proj weights, empty tokens masked by log(size)) gives the
    statistics; the reducer on raw_x + attention output gathers the reference's
    selected_x + x_out (exact softmax here, the reference's eps = 1e-6 terms there)."""
    d = golden(f"ats_sampler_{case}.npz")
    b, n, c = d["x"].shape
    h = int(d["v"].shape[1])
    attn = Attention(c, h, True, "xla", None, rngs=nnx.Rngs(0))
    attn.qkv.kernel.set_value(jnp.asarray(d["param/qkv.weight"].T))
    attn.qkv.bias.set_value(jnp.asarray(d["param/qkv.bias"]))
    attn.proj.kernel.set_value(jnp.asarray(d["param/proj.weight"].T))
    attn.proj.bias.set_value(jnp.asarray(d["param/proj.bias"]))
    size = jnp.asarray(d["policy_in"])
    red = ats.ATS(layers=(0,), num_tokens=n - 1)
    layout = _layout(n, c, h)
    spec = red.schedule(layout)[0]
    assert (spec.n_in, spec.n_out, spec.budget) == (n, n, n - 1)
    out, st = jax.jit(lambda m, x, s: m(x, key_size=s, stats=red.stats(layout, spec)))(
        attn, jnp.asarray(d["x"]), size[..., 0])
    np.testing.assert_allclose(st["cls_probs"], d["attn"][:, :, 0], atol=1e-5, rtol=0)
    live = d["policy_in"][..., 0] > 0
    assert np.all(np.asarray(st["cls_probs"])[~np.broadcast_to(live[:, None], (b, h, n))] == 0)
    ref_norm = np.linalg.norm(d["v"].transpose(0, 2, 1, 3).reshape(b, n, c), axis=-1)
    np.testing.assert_allclose(np.asarray(st["value_norm"])[live], ref_norm[live], rtol=1e-5)
    y, new_size, plan = jax.jit(lambda *a: red.reduce(layout, spec, *a))(
        jnp.asarray(d["raw_x"]) + out, size, st)
    m = d["selected_x"].shape[1]
    keep = d["policy"][..., 0] > 0
    np.testing.assert_array_equal(np.asarray(new_size)[:, :m], d["policy"])
    np.testing.assert_allclose(np.asarray(y)[:, :m][keep],
                               (d["selected_x"] + d["x_out"])[keep], atol=1e-5, rtol=0)
    assert not np.asarray(y)[:, :m][~keep].any() and not np.asarray(y)[:, m:].any()


# --------------------------------------------------------------------------------------------
# Three blocks in a row, through our ViT blocks
# --------------------------------------------------------------------------------------------

def _chain_model(golden_params, drop):
    red = ats.ATS(layers=(0, 1, 2), num_tokens=1.0, drop_tokens=drop)
    cfg = ViTConfig(**CHAIN, reduction=red)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    convert.load_timm_into(model, golden_params, strict=False)
    return model, red, cfg


def _params(d):
    return {k[len("param/"):]: v for k, v in d.items()
            if k.startswith("param/") and not k.endswith("out_zero_mask")}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _block(red, layout, spec, blk, x, size):
    """One block as the model runs it, plus the sampler's steps (for the unique picks)."""
    x, st = blk.attend(x, key_size=size[..., 0],     # log(1) = 0 at block 0
                       stats=red.stats(layout, spec))
    live = size[:, 1:, 0] > 0
    s = ats.sample(ats.significance(st["cls_probs"], st["value_norm"]), spec.budget, live,
                   drop_tokens=red.drop_tokens)
    x, size, plan = red.reduce(layout, spec, x, size, st)
    return blk.feed_forward(x), size, plan, st, s


@pytest.mark.parametrize("mode", ["nodrop", "drop"])
def test_chain_matches_reference(golden, mode):
    """Block by block: the live tokens (the reference's policy, its order), their values, and
    the unique picks. drop: the compaction rule decides the CDF minimum (at block 2 example 1
    has as many live tokens as the batch's widest, so its least significant token cannot be
    picked: 37 kept, not 38); positions in its compacted sort are ours minus the extra empty
    slots."""
    d = golden("ats_chain_n65.npz")
    model, red, cfg = _chain_model(_params(d), mode == "drop")
    layout, specs = cfg.layout(), cfg.schedule()
    x = jnp.asarray(d["x"])
    size = jnp.ones(x.shape[:2] + (1,), jnp.float32)
    width = x.shape[1]                                     # the reference's input width
    for l, blk in enumerate(model.blocks):
        live_in = np.asarray(size[:, 1:, 0]) > 0
        x, size, plan, st, s = _block(red, layout, specs[l], blk, x, size)
        if l:   # empty slots: CLS attention exactly 0, so score 0; never picked
            assert np.all(np.asarray(st["cls_probs"])[:, :, 1:][
                np.broadcast_to(~live_in[:, None], st["cls_probs"][:, :, 1:].shape)] == 0)
        live_all = np.pad(live_in, ((0, 0), (1, 0)), constant_values=True)
        slots, valid = np.asarray(plan.slots), np.asarray(plan.valid)
        assert np.all(np.take_along_axis(live_all, np.maximum(slots, 0), 1)[valid])
        gx, gp = d[f"{mode}/x_{l}"], d[f"{mode}/policy_{l}"]
        m = gx.shape[1]
        keep = gp[..., 0] > 0
        np.testing.assert_array_equal(np.asarray(plan.valid)[:, :m], keep)
        assert not np.asarray(plan.valid)[:, m:].any()
        np.testing.assert_allclose(np.asarray(x)[:, :m][keep], gx[keep], atol=1e-4, rtol=0)
        # Unique picks: positions in the reference's sort of its `width - 1` tokens.
        gu = d[f"{mode}/unique_indices_{l}"]
        n_patch = specs[l].n_in - 1                           # our sentinel
        ours = np.asarray(s.unique_indices)
        for bi in range(gu.shape[0]):
            g = gu[bi][gu[bi] < width - 1]
            np.testing.assert_array_equal(ours[bi][ours[bi] < n_patch] - (n_patch - (width - 1)),
                                          g)
        width = m


def test_model_end_to_end_matches_chain(golden):
    """The real VisionTransformer forward (given tokens instead of patch embeddings): the plans
    keep the reference's tokens, the final tokens are the norm of its last block's output on
    live tokens, and the empty slots carry size 0."""
    d = golden("ats_chain_n65.npz")

    class GivenTokens(VisionTransformer):
        def embed(self, images):
            return images

    red = ats.ATS(layers=(0, 1, 2))
    cfg = ViTConfig(**CHAIN, reduction=red)
    model = GivenTokens(cfg, rngs=nnx.Rngs(0))
    convert.load_timm_into(model, _params(d), strict=False)
    _, aux = jax.jit(lambda m, x: m(x))(model, jnp.asarray(d["x"]))
    for l, plan in enumerate(aux["plans"]):
        np.testing.assert_array_equal(plan.valid, d[f"nodrop/policy_{l}"][..., 0] > 0)
    keep = d["nodrop/policy_2"][..., 0] > 0
    np.testing.assert_array_equal(np.asarray(aux["size"])[..., 0], keep.astype(np.float32))
    want = np.asarray(model.norm(jnp.asarray(d["nodrop/x_2"])))
    np.testing.assert_allclose(np.asarray(aux["last_hidden_state"])[keep], want[keep],
                               atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# In a small ViT
# --------------------------------------------------------------------------------------------

def _images(seed=0, b=2):
    return jax.random.normal(jax.random.key(seed), (b, 16, 16, 3))


def test_reducer_jit_equals_eager():
    """The reducer call eagerly and under jit: the same slots, tokens and sizes."""
    red = ats.ATS(layers=(0,), num_tokens=12, drop_tokens=True)
    layout = _layout(17, 8, 2)
    spec = red.schedule(layout)[0]
    keys = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(keys[0], (2, 17, 8))
    size = jnp.where(jax.random.uniform(keys[1], (2, 17, 1)) < 0.2, 0.0, 1.0).at[:, 0].set(1.0)
    probs = jax.nn.softmax(jax.random.normal(keys[2], (2, 2, 17)) + jnp.log(size[:, None, :, 0]))
    stats = {"cls_probs": probs, "value_norm": jnp.linalg.norm(x, axis=-1)}
    eager = red.reduce(layout, spec, x, size, stats)
    jitted = jax.jit(lambda *a: red.reduce(layout, spec, *a))(x, size, stats)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(a, b)


def test_vit_grad_finite_and_no_retrace():
    """Two sampling blocks (16 patch slots -> 16 -> 10; the least significant token is never
    picked, so block 1 sees empty slots): the gradient of every parameter is finite although
    empty slots enter the next blocks' attention as log(0) = -inf (their probabilities are
    exactly 0 and no gradient reaches the sizes, gathered constants); one trace."""
    red = ats.ATS(layers=(0, 1), num_tokens=(16, 10))
    cfg = ViTConfig(**SMALL, reduction=red, global_pool="avg")
    assert cfg.token_counts() == [17, 17, 11, 11]
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @chex.assert_max_traces(n=1)
    def loss(state, x):
        out, aux = nnx.merge(graphdef, state)(x)
        return jnp.mean(jax.nn.log_softmax(out)[:, 0]), aux

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    for seed in range(2):
        (value, aux), g = grad(state, _images(seed))
        assert not np.asarray(aux["plans"][0].valid).all()    # empty slots: -inf in play
        assert np.isfinite(float(value))
        assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g))
    assert float(jnp.abs(g["patch_embed"]["kernel"][...]).sum()) > 0


def test_empty_slots_are_masked_keys():
    """A block after ATS: an empty slot's value does not change any live token (it is a key
    of probability exactly 0), and it scores 0 at the next sampling block."""
    red = ats.ATS(layers=(0, 1), num_tokens=(16, 12))
    cfg = ViTConfig(**SMALL, reduction=red)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 17, 32))
    layout, specs = cfg.layout(), cfg.schedule()

    @jax.jit
    def run(blocks, x):
        h, st = blocks[0].attend(x, stats=red.stats(layout, specs[0]))
        y, size, plan = red.reduce(layout, specs[0], h, jnp.ones((2, 17, 1)), st)
        noisy = jnp.where(plan.valid[..., None], y, 1e3)        # garbage in the empty slots
        a, st_a = blocks[1].attend(y, key_size=size[..., 0], stats=red.stats(layout, specs[1]))
        b, _ = blocks[1].attend(noisy, key_size=size[..., 0], stats=red.stats(layout, specs[1]))
        _, _, plan1 = red.reduce(layout, specs[1], a, size, st_a)
        return plan, a, b, st_a["cls_probs"], plan1

    plan, a, b, cls, plan1 = run(list(model.blocks)[:2], x)
    dead = ~np.asarray(plan.valid)
    assert dead.any()
    np.testing.assert_allclose(np.asarray(a)[~dead], np.asarray(b)[~dead], atol=1e-5)
    assert np.all(np.asarray(cls).transpose(0, 2, 1)[dead] == 0)
    valid1 = np.asarray(plan1.valid)
    assert valid1[:, 1:].any()
    assert not np.any(np.take_along_axis(dead, np.maximum(np.asarray(plan1.slots), 0), 1)[valid1])


def test_vmap_and_plan_contract():
    """`sample` under vmap equals the batched call; the plan's matrix / apply / invert."""
    scores = jax.random.uniform(jax.random.key(0), (3, 2, 20))
    live = jax.random.uniform(jax.random.key(1), (3, 2, 20)) > 0.2
    x = jax.random.normal(jax.random.key(2), (6, 21, 5))

    @jax.jit
    def run(scores, live, x):
        batched = ats.sample(scores.reshape(6, 20), 12, live.reshape(6, 20))
        mapped = jax.vmap(lambda s, l: ats.sample(s, 12, l))(scores, live)
        plan = ats.plan_from_sampling(batched, 21, 1)
        return (batched, mapped, plan, plan.apply(x), plan.matrix(),
                plan.invert(plan.apply(x)), plan.assignment)

    batched, mapped, plan, applied, w, back, a = run(scores, live, x)
    for m, b in zip(mapped, batched):
        np.testing.assert_array_equal(np.asarray(m).reshape(np.asarray(b).shape), b)
    assert (plan.n_in, plan.n_out) == (21, 13)
    np.testing.assert_allclose(applied, np.einsum("bmn,bnc->bmc", w, x), atol=1e-6)
    back, a = np.asarray(back), np.asarray(a)
    np.testing.assert_array_equal(back[a >= 0], np.asarray(x)[a >= 0])
    assert not back[a < 0].any()
    # A sampled token is always live, and never sampled twice.
    slots = np.asarray(batched.slots)
    for row, l in zip(slots, np.asarray(live).reshape(6, 20)):
        taken = row[row >= 0]
        assert len(set(taken)) == len(taken) and l[taken].all()


def test_all_zero_scores_keep_only_the_prefix():
    """0 / 0 in the reference (NaN); here every slot is empty and the output is finite."""
    s = _sample(jnp.zeros((2, 10)), 6)
    assert not np.any(np.asarray(s.slots) >= 0)
    assert np.isfinite(np.asarray(s.normalized_cdf)).all()


def test_drop_tokens_changes_only_full_examples():
    """The compaction rule: an example with fewer live tokens than the batch's widest keeps
    min 0 (as without drop_tokens); the widest one cannot pick its least significant token."""
    scores = jax.random.uniform(jax.random.key(5), (2, 30)) + 0.01
    live = np.ones((2, 30), bool)
    live[0, :2] = False                  # the widest example: 28 live tokens
    live[1, :4] = False
    plain, drop = jax.jit(lambda s, l: (ats.sample(s, 30, l),
                                        ats.sample(s, 30, l, drop_tokens=True)))(scores, live)
    np.testing.assert_array_equal(drop.slots[1], plain.slots[1])
    np.testing.assert_array_equal(drop.normalized_cdf[1], plain.normalized_cdf[1])
    least = int(np.asarray(plain.sorted_indices)[0, 2])     # after the 2 empty slots
    assert float(plain.normalized_cdf[0, 2]) > 0.0 and least in np.asarray(plain.slots[0])
    assert float(drop.normalized_cdf[0, 2]) == 0.0 and least not in np.asarray(drop.slots[0])


# --------------------------------------------------------------------------------------------
# Config: budgets, errors, warm-up, FLOPs
# --------------------------------------------------------------------------------------------

def test_schedule_and_fields():
    layout = ViTConfig(**SMALL).layout()
    assert [s.n_out for s in ats.ATS(layers=(0, 2), num_tokens=0.5).schedule(layout)] == \
        [9, 9, 5]
    red = reducers.from_config(dict(method="ats", layers=[1], num_tokens=[10]))
    assert red == ats.ATS(layers=(1,), num_tokens=(10,)) and red.proportional_attention
    assert reducers.from_config(red.to_dict()) == red
    assert red.stats(layout, red.schedule(layout)[1]) == ("cls_probs", "value_norm")
    start = red.anneal(layout, 0.0)
    assert ViTConfig(**SMALL, reduction=start).token_counts() == [17] * 4
    assert red.anneal(layout, 1.0) == red
    assert ats.ATS(layers=(1,), num_tokens=0.5).anneal(layout, 0.5).num_tokens == 0.75


@pytest.mark.parametrize("kw,err,pattern", [
    (dict(num_tokens=1), ValueError, r"reduction.num_tokens=1 is not allowed: it must be >= 2"),
    (dict(num_tokens=1.5), ValueError, r"reduction.num_tokens=1.5 is not allowed.*\(0.0, 1.0\]"),
    (dict(num_tokens=0.0), ValueError, r"reduction.num_tokens=0.0 is not allowed"),
    (dict(num_tokens="8"), TypeError, r"reduction.num_tokens='8' must be an int >= 2"),
    (dict(num_tokens=True), TypeError, r"reduction.num_tokens=True must be an int"),
    (dict(layers=(0, 1), num_tokens=(8,)), ValueError,
     r"num_tokens has 1 entries but reduction.layers has 2"),
    (dict(layers=(2, 1)), ValueError, r"reduction.layers=\[2, 1\] must be strictly increasing"),
    (dict(layers=(-1,)), ValueError, r"reduction.layers entry=-1 is not allowed"),
    (dict(drop_tokens=1), TypeError, r"reduction.drop_tokens=1 must be a bool"),
    (dict(num_tokens=jnp.int32(8)), TypeError, r"reduction.num_tokens must be a static "
                                                r"Python int"),
])
def test_bad_fields_raise(kw, err, pattern):
    with pytest.raises(err, match=pattern):
        ats.ATS(**kw)


def test_bad_budgets_name_the_block():
    with pytest.raises(ValueError, match=r"num_tokens=17 gives block 1 K=17 sampling slots, but "
                                         r"16 tokens \(besides 1 prefix tokens\) enter it "
                                         r"\(allowed: 2..16\)"):
        ViTConfig(**SMALL, reduction=ats.ATS(layers=(1,), num_tokens=17))
    with pytest.raises(ValueError, match=r"gives block 2 K=12 .* but 8 tokens"):
        ViTConfig(**SMALL, reduction=ats.ATS(layers=(1, 2), num_tokens=(8, 12)))
    with pytest.raises(ValueError, match=r"num_tokens=0.05 gives block 0 K=1"):
        ViTConfig(**SMALL, reduction=ats.ATS(layers=(0,), num_tokens=0.05))
    with pytest.raises(ValueError, match=r"reduction.layers contains 3.*allowed: 0..2"):
        ViTConfig(**SMALL, reduction=ats.ATS())
    with pytest.raises(ValueError, match=r"needs class_token=True"):
        ViTConfig(**SMALL, reduction=ats.ATS(layers=(0,)), class_token=False, global_pool="avg")


def test_flops_estimate_matches_xla():
    """The model's FLOP count with ATS (1 + K slots after each sampling block) against XLA's
    count of the lowered program (ViT-B/16 widths, 6 blocks, sampling at 3..5; no compile)."""
    red = ats.ATS(layers=(3, 4, 5), num_tokens=0.9)
    cfg = ViTConfig.vit_base(depth=6, attn_impl="xla", reduction=red)
    abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(
        state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert abs(cfg.flops() / cost["flops"] - 1) < 0.05, (cfg.flops(), cost["flops"])
