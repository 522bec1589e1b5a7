"""Tests for jax_tokens.models.lookupvit: LookupViT as a model (tiny configs; a few compiles)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import lookup
from jax_tokens import sharding as shd
from jax_tokens.models.lookupvit import HR_MLP_FACTOR, LookupViT, LookupViTConfig

# 28x28 grey images, 7x7 patch grid (N = 49), a 3x3 lookup grid (M = 9: non-divisible pooling)
TINY = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2,
            num_heads=2, lookup_grid=(3, 3), attn_impl="xla")
B = 2


@pytest.fixture(scope="module")
def cfg():
    return LookupViTConfig(**TINY)


@pytest.fixture(scope="module")
def model(cfg):
    return LookupViT(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).normal(size=(B, 28, 28, 1)).astype(np.float32))


@pytest.fixture(scope="module")
def eager(model, images):
    return model(images)


def _np(a):
    return np.asarray(a, np.float64)


def _np_ln(x, ln, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * _np(ln.scale[...]) + _np(ln.bias[...])


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

def test_config_defaults_and_derived_sizes(cfg):
    d = LookupViTConfig()
    assert (d.img_size, d.patch_size, d.embed_dim, d.depth, d.num_heads) == (224, 16, 768, 12, 12)
    assert (d.lookup_grid, d.num_lookup, d.num_tokens) == ((7, 7), 49, 196)
    assert d.hr_mlp_ratio is None and d.effective_hr_mlp_ratio == d.mlp_ratio / HR_MLP_FACTOR
    assert (d.mlp_hidden, d.hr_mlp_hidden) == (3072, 768)
    assert (cfg.grid, cfg.num_patches, cfg.num_tokens, cfg.num_lookup) == (7, 49, 49, 9)
    assert cfg.token_counts() == [9, 9, 9]
    # num_lookup alone (a perfect square) sets the grid; replace resets the other field
    assert LookupViTConfig(**{**TINY, "lookup_grid": None, "num_lookup": 16}).lookup_grid == (4, 4)
    assert cfg.replace(num_lookup=4).lookup_grid == (2, 2)
    r = cfg.replace(lookup_grid=[2, 5])
    assert (r.lookup_grid, r.num_lookup) == ((2, 5), 10)
    assert cfg.replace(mlp_ratio=2.0, hr_mlp_ratio=None).effective_hr_mlp_ratio == 0.5
    assert cfg.replace(hr_mlp_ratio=3.0).hr_mlp_hidden == 96
    hash(cfg)  # usable as a static jit argument


@pytest.mark.parametrize("kw,words", [
    (dict(img_size=30), ["img_size=30", "patch_size=4"]),
    (dict(patch_size=0), ["patch_size=0", ">= 1"]),
    (dict(depth=2.0), ["depth=2.0", "int"]),
    (dict(num_heads=3), ["num_heads=3", "embed_dim=32"]),
    (dict(mlp_ratio=0.0), ["mlp_ratio=0.0", "> 0"]),
    (dict(hr_mlp_ratio=-1.0), ["hr_mlp_ratio=-1.0", "> 0"]),
    (dict(hr_mlp_ratio=0.01), ["hr_mlp_ratio=0.01", ">= 1"]),
    (dict(lookup_grid=(8, 2)), ["lookup_grid=(8, 2)", "patch grid side 7"]),
    (dict(lookup_grid=3), ["lookup_grid=3", "pair"]),
    (dict(lookup_grid=None, num_lookup=10), ["num_lookup=10", "perfect square"]),
    (dict(num_lookup=4), ["num_lookup=4", "3 x 3 = 9"]),
    (dict(qkv_bias=1), ["qkv_bias=1", "bool"]),
    (dict(pos_embed="sincos"), ["pos_embed='sincos'", "learn"]),
    (dict(ln_eps=0.0), ["ln_eps=0.0", "> 0"]),
    (dict(attn_impl="flash"), ["attn_impl='flash'", "xla"]),
    (dict(dtype="float16"), ["dtype='float16'", "bfloat16"]),
    (dict(num_classes=0), ["num_classes=0", ">= 1"]),
])
def test_bad_config_values_name_the_field(kw, words):
    with pytest.raises(ValueError) as info:
        LookupViTConfig(**{**TINY, **kw})
    for w in words:
        assert w in str(info.value), (w, str(info.value))


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------

def test_output_shapes_aux_and_parameters(cfg, model, eager):
    logits, aux = eager
    assert logits.shape == (B, 10) and logits.dtype == jnp.float32
    assert set(aux) == {"features", "tokens", "last_hidden_state", "hr_tokens"}
    assert aux["features"].shape == (B, 32)
    assert aux["tokens"] == cfg.token_counts() == [9, 9, 9]
    assert aux["last_hidden_state"].shape == (B, 9, 32)
    assert aux["hr_tokens"].shape == (B, 49, 32)
    np.testing.assert_allclose(np.asarray(aux["features"]),
                               np.asarray(aux["last_hidden_state"]).mean(1), rtol=1e-5,
                               atol=1e-6)

    # readable names; every parameter has one logical axis name per dimension
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for name in ("patch_embed.kernel", "pos_embed", "blocks.0.cross_q.kernel",
                 "blocks.0.hr_mlp.fc1.kernel", "blocks.1.mlp.fc2.kernel", "norm.scale",
                 "head.kernel"):
        assert name in flat, name
    assert not any(k.startswith("blocks.1.hr_mlp") or k.startswith("blocks.1.back_")
                   for k in flat)  # the last block reads nothing back (no dead parameters)
    for name, var in flat.items():
        axes = var.get_metadata("out_sharding", None)
        assert axes is not None and len(axes) == var[...].ndim, (name, axes)
    assert flat["head.kernel"].get_metadata("out_sharding") == ("embed", "classes")
    assert flat["patch_embed.kernel"].get_metadata("out_sharding") == (None, None, "patch",
                                                                       "embed")
    # jax_tokens.sharding places it (one device here; the rules still resolve every name)
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    abstract = nnx.state(nnx.eval_shape(lambda: LookupViT(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    placed = shd.state_shardings(mesh, abstract, shd.axis_rules("fsdp_tp"))
    assert len(jax.tree.leaves(placed)) == len(flat)


def test_logits_equal_recomposition(cfg, model, images, eager):
    """Patch embedding and pooling in numpy, the blocks called one by one, norm + mean + head
    in numpy: the model's forward is exactly this composition."""
    logits, aux = eager
    x_img = _np(images)
    p, g, d = cfg.patch_size, cfg.grid, cfg.embed_dim
    patches = x_img.reshape(B, g, p, g, p, 1).transpose(0, 1, 3, 2, 4, 5).reshape(B, g * g, -1)
    kernel = _np(model.patch_embed.kernel[...]).reshape(-1, d)  # (p, p, C, D), row-major
    x = patches @ kernel + _np(model.patch_embed.bias[...]) + _np(model.pos_embed[...])
    # 7x7 -> 3x3 adaptive pooling: PyTorch bins [0,3), [2,5), [4,7) in each dimension
    bins = [(0, 3), (2, 5), (4, 7)]
    grid = x.reshape(B, g, g, d)
    z = np.stack([grid[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in bins
                  for c0, c1 in bins], axis=1)
    zj, xj = jnp.asarray(z, jnp.float32), jnp.asarray(x, jnp.float32)
    for blk in model.blocks:
        zj, xj = blk(zj, xj)
    zn = _np_ln(_np(zj), model.norm, cfg.ln_eps)
    feats = zn.mean(1)
    ref = feats @ _np(model.head.kernel[...]) + _np(model.head.bias[...])
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["last_hidden_state"]), zn, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["hr_tokens"]), np.asarray(xj), rtol=1e-4,
                               atol=1e-5)
    # the last block leaves the hr tokens as it read them
    z0, x0 = model.blocks[0](jnp.asarray(z, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(aux["hr_tokens"]), np.asarray(x0), rtol=1e-4,
                               atol=1e-5)


def test_jit_and_grad_reach_every_parameter(model, images, eager):
    graphdef, state = nnx.split(model, nnx.Param)
    labels = jnp.arange(B) % 10
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, images):
        def loss_fn(s):
            logits, aux = nnx.merge(graphdef, s)(images)
            ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
            return ce, logits
        return jax.value_and_grad(loss_fn, has_aux=True)(state)

    for i in range(3):
        (loss, logits), grads = step(state, images)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(eager[0]), rtol=1e-5, atol=1e-5)
    ref = -np.take_along_axis(np.asarray(jax.nn.log_softmax(eager[0])),
                              np.asarray(labels)[:, None], 1).mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, f"zero gradient for {'.'.join(map(str, path))}"
    # one parameter's gradient against a central difference of the loss
    def loss_at(delta):
        s = jax.tree.map(lambda a: a, state)
        kernel = s["head"]["kernel"]
        kernel.set_value(kernel[...] + delta)
        return float(step(s, images)[0][0])

    direction = jnp.asarray(np.random.default_rng(1).normal(size=(32, 10)), jnp.float32)
    eps = 1e-2
    fd = (loss_at(eps * direction) - loss_at(-eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float((grads["head"]["kernel"][...] * direction).sum()), fd,
                               rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("kw", [
    dict(embed_dim=384, depth=4, num_heads=6, lookup_grid=(7, 7)),   # ViT-S width, 14 -> 7 pool
    dict(embed_dim=192, depth=2, num_heads=3, lookup_grid=(3, 4)),   # non-divisible, non-square
])
def test_flops_estimate_matches_xla(kw):
    cfg = LookupViTConfig(img_size=224, patch_size=16, attn_impl="xla", **kw)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LookupViT(cfg, rngs=nnx.Rngs(0))))
    cost = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0]).lower(
        state, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert abs(cfg.flops() / cost["flops"] - 1) < 0.05, (cfg.flops(), cost["flops"])
    blocks = sum(lookup.lookup_block_flops(196, cfg.num_lookup, cfg.embed_dim, 4.0, 1.0,
                                           infuse=l < cfg.depth - 1) for l in range(cfg.depth))
    assert cfg.flops() > blocks


def test_reduction_and_bad_images_raise(model, images, eager):
    with pytest.raises(ValueError, match="not allowed for LookupViT.*built into every block"):
        model(images, reduction="tome")
    with pytest.raises(ValueError, match=r"images must have shape \[batch, 28, 28, 1\]"):
        model(jnp.zeros((B, 32, 32, 1)))
    with pytest.raises(TypeError, match="LookupViTConfig"):
        LookupViT(dict(TINY), rngs=nnx.Rngs(0))
    # key is accepted and changes nothing
    logits, _ = model(images, key=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(eager[0]))


def test_bfloat16_compute_tracks_float32(cfg, model, images, eager):
    bf = LookupViT(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))  # same init, bf16 compute
    nnx.update(bf, nnx.state(model, nnx.Param))
    logits, aux = bf(images)
    assert logits.dtype == jnp.float32 and aux["last_hidden_state"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits), np.asarray(eager[0]), rtol=0.05, atol=0.05)


def test_lookupvit_trains_exports_and_evaluates_through_the_trainer(tmp_path):
    """configs/fashion_mnist_lookupvit.py's model through train.py's code path (tiny)."""
    import pathlib

    from jax_tokens import data as data_lib
    from jax_tokens import train as trainer

    root = pathlib.Path(__file__).resolve().parents[1]
    data_dir = str(tmp_path / "data")
    data_lib.prepare("fashion_mnist", data_dir, max_examples_per_split=128)
    config = trainer.load_config(str(root / "configs" / "fashion_mnist_lookupvit.py"), {
        "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2, "model.num_lookup": 4,
        "train.total_steps": 4, "train.batch_size": 32, "train.warmup_steps": 1,
        "train.progress": False, "data.data_dir": data_dir, "data.num_threads": 1,
        "eval.batch_size": 64, "checkpoint.every_steps": 2})
    cfg = trainer.model_config(config)
    assert isinstance(cfg, LookupViTConfig) and cfg.lookup_grid == (2, 2)
    result = trainer.train(config, str(tmp_path / "run"), log=lambda s: None)
    assert result["step"] == 4 and 0.0 <= result["top1"] <= 1.0
    cfg2, graphdef, params, rest = trainer.load_export(str(tmp_path / "run" / "export"))
    assert cfg2 == trainer.model_config(config, in_chans=1, num_classes=10)
    loader = trainer.make_eval_loader(config, data_dir)
    mesh, rules = trainer.make_mesh_and_rules(config)
    acc = trainer.evaluate(jax.jit(trainer.make_eval_step(graphdef)), params, rest, loader,
                           mesh, rules)
    assert acc["top1"] == pytest.approx(result["top1"], abs=1e-6)
    with pytest.raises(trainer.ConfigError, match="'lookupvit' compresses by its architecture"):
        trainer.model_config(trainer.load_config(
            str(root / "configs" / "fashion_mnist_lookupvit.py"),
            {"model.reduction.method": "tome"}))
