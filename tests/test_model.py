"""The NNX ViT: parity with ToMe's and EViT's reference models, timm round trip, variants,
transforms, FLOPs against XLA's cost analysis, and config errors."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import tokens as tk
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens import reducers
from jax_tokens.reducers.evit import EViT
from jax_tokens.reducers.identity import NoReduction
from jax_tokens.reducers.token_learner import TokenLearner
from jax_tokens.reducers.tome import ToMe
from jax_tokens.reducers.topk import TopK
from jax_tokens.models import convert


# Compile time dominates on CPU; backend optimisation level 0 compiles faster, same arithmetic.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit_forward(model, images, **kw):
    """One compiled forward (much faster than op-by-op eager on CPU)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kw),
                   compiler_options=FAST_COMPILE)(state, images)


def make_model(cfg, seed=0):
    """Initialises under one jit (eager init compiles every op separately on CPU)."""
    return nnx.jit(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(seed)))()


def _timm_state(d):
    return {k[len("param/"):]: v for k, v in d.items() if k.startswith("param/")}


def _nhwc(images):
    return jnp.asarray(images.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("r", [0, 4, 8])
def test_tome_vit_matches_reference(golden, r):
    d = golden("tome_vit_small.npz")
    meta = json.loads(str(d["meta"]))
    c = meta["cfg"]
    cfg = ViTConfig(img_size=c["img_size"], patch_size=c["patch_size"], embed_dim=c["embed_dim"],
                    depth=c["depth"], num_heads=c["num_heads"], num_classes=c["num_classes"],
                    attn_impl="xla", trace_source=True,
                    reduction=ToMe(r=r, prop_attn=meta["prop_attn"]))
    model = convert.from_timm(_timm_state(d), cfg)
    logits, aux = jit_forward(model, _nhwc(d["images"]))
    np.testing.assert_allclose(logits, d[f"logits_r{r}"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(aux["features"], d[f"features_r{r}"], atol=1e-4, rtol=0)
    if r:
        np.testing.assert_allclose(aux["size"], d[f"size_r{r}"], atol=1e-4, rtol=0)
        source = tk.source_matrix(aux["source_index"], aux["size"].shape[1])
        np.testing.assert_allclose(source, d[f"source_r{r}"], atol=1e-4, rtol=0)
        assert aux["tokens"][-1] == d[f"size_r{r}"].shape[1]


@pytest.mark.parametrize("variant", ["evit_fuse", "evit_nofuse"])
def test_evit_matches_reference(golden, variant):
    d = golden(f"{variant}.npz")
    meta = json.loads(str(d["meta"]))
    c = meta["cfg"]
    layers = tuple(i for i, k in enumerate(meta["keep_rate"]) if k < 1)
    rate = [k for k in meta["keep_rate"] if k < 1][0]
    cfg = ViTConfig(img_size=c["img_size"], patch_size=c["patch_size"], embed_dim=c["embed_dim"],
                    depth=c["depth"], num_heads=c["num_heads"], num_classes=c["num_classes"],
                    attn_impl="xla",
                    reduction=TopK(keep_rate=rate, layers=layers, score="cls_attn",
                                   order="score", fuse=meta["fuse_token"]))
    # token counts per block equal EViT's left_tokens (+1 for the class token)
    assert [n - 1 for n in cfg.token_counts()[1:]] == meta["left_tokens"]
    model = convert.from_timm(_timm_state(d), cfg)
    images = _nhwc(d["images"])
    logits, aux = jit_forward(model, images)
    np.testing.assert_allclose(logits, d["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(aux["features"], d["features"], atol=1e-4, rtol=0)
    for i, plan in enumerate(aux["plans"]):
        np.testing.assert_array_equal(plan.kept_idx, d[f"kept_idx_{i}"])
    _, aux1 = jit_forward(model, images, reduction=NoReduction())
    np.testing.assert_allclose(aux1["features"], d["features_keep1"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_reduced_vit_with_interpret_mode_kernels_matches_reference(golden, impl):
    """The reducers take their scores from the Pallas kernels (CLS probabilities for EViT;
    the mean key and the key-size bias for ToMe) and reproduce the reference models."""
    d = golden("evit_fuse.npz")
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                    num_classes=10, attn_impl=impl,
                    reduction=EViT(keep_rate=0.7, layers=(1, 3, 5)))
    logits, aux = jit_forward(convert.from_timm(_timm_state(d), cfg), _nhwc(d["images"]))
    np.testing.assert_allclose(logits, d["logits"], atol=1e-4, rtol=0)
    for i, plan in enumerate(aux["plans"]):
        np.testing.assert_array_equal(plan.kept_idx, d[f"kept_idx_{i}"])
    d = golden("tome_vit_small.npz")
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                    num_classes=10, attn_impl=impl,
                    reduction=ToMe(r=8, prop_attn=True))
    logits, aux = jit_forward(convert.from_timm(_timm_state(d), cfg), _nhwc(d["images"]))
    np.testing.assert_allclose(logits, d["logits_r8"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(aux["size"], d["size_r8"], atol=1e-4, rtol=0)


def test_timm_round_trip_is_exact(golden, tmp_path):
    sd = _timm_state(golden("evit_fuse.npz"))
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                    num_classes=10)
    model = convert.from_timm(sd, cfg)
    back = convert.to_timm(model)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    path = tmp_path / "vit.safetensors"
    convert.save_safetensors(model, path)
    again = convert.to_timm(convert.load_safetensors(path, cfg))
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k], err_msg=k)


def test_timm_errors_list_keys_and_shapes(golden):
    sd = _timm_state(golden("evit_fuse.npz"))
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3,
                    num_classes=10)
    broken = dict(sd)
    del broken["blocks.2.mlp.fc1.bias"]
    broken["blocks.9.extra"] = np.zeros(3)
    broken["head.weight"] = np.zeros((11, 96), np.float32)
    with pytest.raises(ValueError) as e:
        convert.from_timm(broken, cfg)
    msg = str(e.value)
    assert "blocks.2.mlp.fc1.bias" in msg and "blocks.9.extra" in msg
    assert "head.weight" in msg and "(11, 96)" in msg


TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5,
            attn_impl="xla")


@pytest.mark.parametrize("kw,red,tokens", [
    (dict(distill_token=True, num_registers=2, layer_scale_init=1e-5),
     ToMe(r=2), [20, 18, 16, 14, 12]),
    (dict(pos_embed="sincos", global_pool="avg", num_registers=1),
     TopK(keep_rate=0.5, layers=(1, 2), fuse=True, order="position"),
     [18, 18, 11, 8, 8]),
    (dict(class_token=False, global_pool="avg", pos_embed="none"),
     ToMe(r=(3, 0.5)), [16, 15, 13, 10, 5]),
    (dict(), TokenLearner(layers=(1,), num_tokens=4), [17, 17, 5, 5, 5]),
    (dict(), TopK(keep_rate=(0.5, 0.5), layers=(0, 2), score="key_mass"), [17, 9, 9, 5, 5]),
])
def test_variants_run_and_count_tokens(kw, red, tokens):
    cfg = ViTConfig(**TINY, **kw, trace_source=True, reduction=red)
    assert cfg.token_counts() == tokens
    model = make_model(cfg)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    logits, aux = jit_forward(model, images)
    assert logits.shape == (2, 5) and bool(jnp.isfinite(logits).all())
    assert aux["size"].shape == (2, tokens[-1], 1)
    src, size = np.asarray(aux["source_index"]), np.asarray(aux["size"][..., 0])
    assert src.shape == (2, cfg.num_tokens)
    # Sizes account for every patch that was not dropped (learned and fused tokens included).
    np.testing.assert_allclose(size.sum(1), (src >= 0).sum(1), rtol=1e-5)
    # The source map is the composition of the returned plans' assignments ...
    want = np.broadcast_to(np.arange(cfg.num_tokens), src.shape)
    for plan in aux["plans"]:
        want = np.take_along_axis(np.asarray(plan.assignment), want, axis=1)
    np.testing.assert_array_equal(src, want)
    # ... and, where tokens are hard groups, a token's size is the number of patches it holds.
    if not red.learned:
        counts = (src[:, :, None] == np.arange(tokens[-1])).sum(1)
        np.testing.assert_array_equal(size, counts)
    # Protected tokens (class, distillation; all prefix tokens under pruning) stay in front.
    front = cfg.num_prefix_tokens if red.picture == "kept" else \
        int(cfg.class_token) + int(cfg.distill_token)
    np.testing.assert_array_equal(src[:, :front], np.broadcast_to(np.arange(front), (2, front)))


def test_random_pruning_needs_key_and_is_keyed():
    cfg = ViTConfig(**TINY, reduction=TopK(keep_rate=0.5, layers=(1,), score="random"))
    model = make_model(cfg)
    images = jnp.ones((1, 16, 16, 3))
    with pytest.raises(ValueError, match="draws random numbers: call the model with key="):
        model(images)
    a = jit_forward(model, images, key=jax.random.key(0))[1]["plans"][0].kept_idx
    b = jit_forward(model, images, key=jax.random.key(1))[1]["plans"][0].kept_idx
    assert a.shape == (1, 8) and not np.array_equal(a, b)


def test_jit_eager_grad_no_retrace():
    cfg = ViTConfig(**TINY, reduction=ToMe(r=3))
    model = make_model(cfg)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    graphdef, state = nnx.split(model)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss_fn(state, x):
        logits, _ = nnx.merge(graphdef, state)(x)
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    for _ in range(3):
        value, grads = value_and_grad(state, images)
    plain = jnp.mean(jax.nn.log_softmax(jit_forward(model, images)[0])[:, 0])
    np.testing.assert_allclose(value, plain, atol=1e-5)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert float(jnp.abs(grads["patch_embed"]["kernel"][...]).sum()) > 0


_KEPT = tuple(197 - 16 * (i + 1) for i in range(11)) + (11,)


@pytest.mark.parametrize("red", [NoReduction(),
                                 ToMe(r=16, clamp_r=True),
                                 TopK(keep_rate=0.7, layers=(3, 6, 9), fuse=True),
                                 EViT(keep_rate=0.7, layers=(3, 6, 9)),
                                 TokenLearner(layers=(3,), num_tokens=49),
                                 reducers.get("mctf")(r=16, layers=tuple(range(1, 12))),
                                 reducers.get("pitome")(ratio=0.88),
                                 reducers.get("diffrate")(prune_kept=(197,) + _KEPT[:-1],
                                                          merge_kept=_KEPT),
                                 reducers.get("atc")(layers=(3, 6, 9), keep_rate=0.5),
                                 reducers.get("kmedoids")(layers=(3, 6, 9), keep_rate=0.5),
                                 reducers.get("dpcknn")(layers=(3, 6, 9), keep_rate=0.5),
                                 reducers.get("tofu")(r=16, prune_layers=3, clamp_r=True),
                                 reducers.get("ppt")(r=16, layers=tuple(range(12)),
                                                     clamp_r=True),
                                 reducers.get("dynamicvit")(layers=(3, 6, 9),
                                                            keep_ratio=(0.7, 0.49, 0.343)),
                                 reducers.get("cropr")(rate=16),
                                 reducers.get("ats")(layers=tuple(range(3, 12)),
                                                     num_tokens=0.9),
                                 reducers.get("fastervlm")(keep=98, layers=(5,), place="mid"),
                                 reducers.get("visionzip")(keep=98, layers=(5,)),
                                 reducers.get("divprune")(keep=98, layers=(5,)),
                                 reducers.get("prumerge")(keep=98, layers=(5,))],
                         ids=lambda r: r.method)
def test_flops_estimate_matches_xla_for_vit_b16(red):
    """Every registered reducer in ViT-B/16 (test_every_registered_reducer_has_a_flops_case
    keeps this list complete). XLA counts the lowered program (before optimisation: the same
    arithmetic, seconds instead of a ViT-B compile)."""
    cfg = ViTConfig.vit_base(attn_impl="xla", reduction=red)
    abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(
        state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert abs(cfg.flops() / cost["flops"] - 1) < 0.05, (cfg.flops(), cost["flops"])


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="reduction.layers contains 7.*allowed: 0..3"):
        ViTConfig(**TINY, reduction=TopK(keep_rate=0.5, layers=(7,)))
    with pytest.raises(ValueError, match=r"keep_rate \(layer 1\)=1.5 .*\(0.0, 1.0\]"):
        ViTConfig(**TINY, reduction=TopK(keep_rate=1.5, layers=(1,)))
    with pytest.raises(ValueError, match="keep_rate has 1 entries but reduction.layers has 2"):
        ViTConfig(**TINY, reduction=TopK(keep_rate=(0.5,), layers=(1, 2)))
    with pytest.raises(ValueError, match=r"reduction.num_tokens=40 at block 1 must be fewer "
                                         r"than the 16"):
        ViTConfig(**TINY, reduction=TokenLearner(layers=(1,), num_tokens=40))
    with pytest.raises(ValueError, match="reduction.method='merge' is not one of"):
        ViTConfig(**TINY, reduction=dict(method="merge"))
    with pytest.raises(ValueError, match="reduction.keep_rate is not a field of reducer 'tome'"):
        ViTConfig(**TINY, reduction=dict(method="tome", keep_rate=0.5))
    with pytest.raises(ValueError, match="block 3 to merge r=5 tokens, but only 9 tokens"):
        ViTConfig(**TINY, reduction=ToMe(r=(0, 4, 4, 5)))
    with pytest.raises(ValueError, match="img_size=30 must be a multiple of patch_size=4"):
        ViTConfig(**{**TINY, "img_size": 30})
    with pytest.raises(ValueError, match="r=-2"):
        ViTConfig(**TINY, reduction=ToMe(r=-2))
    model = make_model(ViTConfig(**TINY))
    with pytest.raises(ValueError, match=r"images must have shape \[batch, 16, 16, 3\]"):
        model(jnp.ones((1, 3, 16, 16)))


def test_every_registered_reducer_has_a_flops_case():
    cases = test_flops_estimate_matches_xla_for_vit_b16.pytestmark[0].args[1]
    library = {n for n in reducers.names() if reducers.get(n).__module__.startswith("jax_tokens.")}
    assert {type(r).method for r in cases} == library


def test_sincos_table_is_big_visions():
    """pos_embed="sincos" is big_vision's posemb_sincos_2d (temperature 10000), typed out here
    independently: [sin(x w), cos(x w), sin(y w), cos(y w)], w_i = 10000^-(i / (D/4 - 1))."""
    cfg = ViTConfig(**{**TINY, "pos_embed": "sincos"})
    table = np.asarray(make_model(cfg).pos_embed[...])[0, 1:]       # [16, 32] after the cls
    d4, grid = 32 // 4, 4
    w = 1.0 / 10000 ** (np.arange(d4) / (d4 - 1))
    want = np.zeros((grid * grid, 32))
    for yy in range(grid):
        for xx in range(grid):
            want[yy * grid + xx] = np.concatenate([np.sin(xx * w), np.cos(xx * w),
                                                   np.sin(yy * w), np.cos(yy * w)])
    np.testing.assert_allclose(table, want, atol=1e-6)
