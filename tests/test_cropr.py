"""Token Cropr: parity with the reference (benbergner/cropr `cls/cropr.py`,
`cls/vision_transformer.py`): the module (scores, kept / pruned tokens, the auxiliary head) and
whole models with and without last-layer fusion, loaded through the timm converter; the
training path (auxiliary losses, stopped gradients into the backbone); jit, no retrace; budget
errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_tokens import reducers
from jax_tokens.models import VisionTransformer, ViTConfig, convert
from jax_tokens.reducers import cropr as cr

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5,
             attn_impl="xla")


def _module(d, meta):
    cfg = meta["cfg"]
    x = d["x"]
    mod = cr.CroprModule(x.shape[-1], 10, num_queries=cfg.get("num_queries", 1),
                         num_heads=cfg.get("num_heads", 1),
                         pre_attn_norm=cfg.get("pre_attn_norm", False),
                         q_proj=cfg.get("q_proj", False), k_proj=cfg.get("k_proj", False),
                         v_proj=cfg.get("v_proj", False), mlp=cfg.get("mlp", True),
                         rngs=nnx.Rngs(0))
    names = mod.torch_names()
    assert set(names) == {k[len("param/"):] for k in d if k.startswith("param/")}
    for name, (var, kind) in names.items():
        a = d[f"param/{name}"]
        var.set_value(jnp.asarray(a.T if kind == "linear" else a))
    return mod


@pytest.mark.parametrize("case", ["default", "proj"])
def test_module_matches_reference(golden, case):
    d = golden(f"cropr_module_{case}.npz")
    meta = json.loads(str(d["meta"]))
    mod = _module(d, meta)
    x = jnp.asarray(d["x"])
    b, n, c = x.shape
    rate = int(d["pruning_rate"])
    np.testing.assert_allclose(mod.scores(x), d["scores"], atol=1e-5, rtol=1e-6)
    scores, pred = mod.predict(x)
    np.testing.assert_allclose(scores, d["scores"], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(pred, d["pred"], atol=1e-5, rtol=0)
    layout = reducers.TokenLayout(depth=2, num_tokens=n, num_prefix_tokens=1, class_token=True,
                                  embed_dim=c, num_heads=2, num_classes=10)
    red = cr.Cropr(rate=rate - 1, llf=False, layers=(0,))   # the first module prunes rate
    spec = red.schedule(layout)[0]
    assert (spec.n_in, spec.n_out) == (n, n - rate)
    for r in (red, red.training()):
        out, size, plan = r.reduce(layout, spec, x, jnp.ones((b, n, 1)), {}, module=mod)
        np.testing.assert_allclose(out, d["x_keep"], atol=1e-6)
        np.testing.assert_allclose(plan.set_aside(x), d["x_pruned"], atol=1e-6)
        assert size.shape == (b, n - rate, 1)


@pytest.mark.parametrize("case", ["llf", "nollf"])
def test_model_matches_reference(golden, case):
    d = golden(f"cropr_vit_{case}.npz")
    meta = json.loads(str(d["meta"]))
    kw, cc = meta["kw"], meta["cropr_cfg"]
    cfg = ViTConfig(img_size=kw["img_size"], patch_size=kw["patch_size"],
                    embed_dim=kw["embed_dim"], depth=kw["depth"], num_heads=kw["num_heads"],
                    num_classes=kw["num_classes"], global_pool="avg_all", fc_norm=True,
                    attn_impl="xla",
                    reduction=dict(method="cropr", rate=cc["pruning_rate"], llf=cc["llf"]))
    sd = {k[len("param/"):]: d[k] for k in d if k.startswith("param/")}
    model = convert.from_timm(sd, cfg)
    n = 65
    if case == "llf":   # 65 -> 56 -> 48, then block 2 on 48 and the last block on all 65
        assert cfg.token_counts() == [65, 56, 48, 65, 65]
    else:
        assert cfg.token_counts() == [65, 56, 48, 40, 40]
    images = jnp.asarray(d["images"].transpose(0, 2, 3, 1))
    logits, aux = model(images)
    np.testing.assert_allclose(logits, d["logits"], atol=1e-4, rtol=0)
    for i, plan in enumerate(aux["plans"]):
        assert plan.n_out == d[f"kept_{i}"].shape[1] and plan.n_in == n
        n = plan.n_out
    # Training mode: the auxiliary heads' predictions; the main logits are unchanged.
    t_logits, t_aux = model(images, reduction=cfg.reduction.training())
    np.testing.assert_allclose(t_logits, d["logits"], atol=1e-4, rtol=0)
    for i, plan in enumerate(t_aux["plans"]):
        np.testing.assert_allclose(plan.logits, d[f"aux_pred_{i}"], atol=1e-4, rtol=0)
    back = convert.to_timm(model)
    assert "cropr.1.head.head.weight" in back and "fc_norm.weight" in back


def test_kept_and_pruned_tokens_inside_the_model(golden):
    """The first module's kept / pruned tokens are the reference's (eval mode)."""
    d = golden("cropr_vit_llf.npz")
    meta = json.loads(str(d["meta"]))
    kw = meta["kw"]
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                    num_classes=10, global_pool="avg_all", fc_norm=True, attn_impl="xla",
                    reduction=dict(method="cropr", rate=8, llf=True))
    assert kw["embed_dim"] == 64
    model = convert.from_timm({k[6:]: d[k] for k in d if k.startswith("param/")}, cfg)
    images = jnp.asarray(d["images"].transpose(0, 2, 3, 1))
    x = model.embed(images)
    x, _ = model.blocks[0].attend(x)
    x = model.blocks[0].feed_forward(x)
    layout, spec = cfg.layout(), cfg.schedule()[0]
    kept, _, plan = cfg.reduction.reduce(layout, spec, x, jnp.ones(x.shape[:2] + (1,)), {},
                                         module=model.blocks[0].reducer)
    np.testing.assert_allclose(kept, d["kept_0"], atol=1e-5)
    np.testing.assert_allclose(plan.set_aside(x), d["pruned_0"], atol=1e-5)


def test_training_loss_and_stopped_gradients():
    cfg = ViTConfig(**SMALL, reduction=dict(method="cropr", rate=3, llf=True))
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    red = cfg.reduction.training()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    labels = jnp.asarray([0, 3, 1])
    traces = []

    def aux_loss(params):
        traces.append(1)
        m = nnx.merge(graphdef, params, rest)
        logits, aux = m(images, reduction=red)
        total, terms = red.loss(cfg.layout(), logits, aux, labels=labels)
        return total, (terms, aux)

    (total, (terms, aux)), grads = jax.jit(jax.value_and_grad(aux_loss, has_aux=True))(params)
    assert len(terms) == 2 == len(aux["plans"])          # modules after blocks 0 and 1
    want = sum(optax.softmax_cross_entropy_with_integer_labels(p.logits, labels).mean()
               for p in aux["plans"])
    np.testing.assert_allclose(total, want, rtol=1e-6)
    # The auxiliary losses train the modules only: the backbone gets no gradient from them.
    assert float(jnp.abs(grads["blocks"][0]["reducer"]["head"]["kernel"][...]).sum()) > 0
    backbone = [grads["patch_embed"], grads["blocks"][0]["attn"], grads["blocks"][1]["mlp"]]
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(backbone))
    assert cfg.token_counts() == [17, 13, 10, 17, 17]


def test_eval_jit_no_retrace():
    cfg = ViTConfig(**SMALL, reduction=dict(method="cropr", rate=2, llf=False))
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traces = []

    @jax.jit
    def fwd(params, images):
        traces.append(1)
        return nnx.merge(graphdef, params, rest)(images)[0]

    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    out = fwd(params, images)
    fwd(params, images * 2)
    assert len(traces) == 1 and out.shape == (2, 5) and np.isfinite(np.asarray(out)).all()
    assert cfg.token_counts() == [17, 14, 12, 10, 10]


@pytest.mark.parametrize("kw, match", [
    (dict(rate=0), r"reduction.rate"),
    (dict(rate=20), r"reduction.rate=20 at layer 0 prunes 21 of the 16 patch tokens"),
    (dict(layers=(3,)), r"reduction.layers contains 3: with llf=True .* follow blocks 0..2"),
    (dict(layers=(4,), llf=False), r"reduction.layers contains 4, but the model has 4 blocks"),
    (dict(num_heads=3), r"reduction.num_heads=3 must divide"),
    (dict(llf=1), r"reduction.llf=1 must be a bool"),
])
def test_bad_budgets(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ViTConfig(**SMALL, reduction=dict(method="cropr", **kw))


def test_reduce_vmaps_over_examples():
    """Eval and training reductions of one example at a time (jax.vmap) equal the batched."""
    cfg = ViTConfig(**SMALL, reduction=dict(method="cropr", rate=3, llf=True))
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    layout, spec = cfg.layout(), cfg.schedule()[0]
    x = jax.random.normal(jax.random.key(4), (3, spec.n_in, 32))
    size = jnp.ones((3, spec.n_in, 1))
    for red in (cfg.reduction, cfg.reduction.training()):
        def one(xi, si, red=red):
            y, s, plan = red.reduce(layout, spec, xi[None], si[None], {},
                                    module=model.blocks[0].reducer)
            return y[0], plan.set_aside(xi[None])[0]

        y, aside = jax.vmap(one)(x, size)
        y_b, _, plan = red.reduce(layout, spec, x, size, {}, module=model.blocks[0].reducer)
        np.testing.assert_allclose(y, y_b, atol=1e-6)
        np.testing.assert_allclose(aside, plan.set_aside(x), atol=1e-6)
