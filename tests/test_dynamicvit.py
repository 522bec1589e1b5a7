"""DynamicViT: parity with the reference (raoyongming/DynamicViT `models/dyvit.py`): the
predictor and a whole eval-mode model loaded through the timm converter; the training path
(Gumbel keep policies at static N, the policy-masked attention, the paper's losses) against
NumPy transcriptions of the reference's formulas; jit, grad, no retrace; budget errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import reducers
from jax_tokens.models import VisionTransformer, ViTConfig, convert
from jax_tokens.reducers import dynamicvit as dv

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")


def _load_predictor(d, prefix=""):
    pred = dv.Predictor(d[f"param/{prefix}in_conv.1.weight"].shape[0], rngs=nnx.Rngs(0))
    for name, (var, kind) in pred.torch_names().items():
        a = d[f"param/{prefix}{name}"]
        var.set_value(jnp.asarray(a.T if kind == "linear" else a))
    return pred


@pytest.mark.parametrize("case", ["n64", "ones"])
def test_predictor_matches_reference(golden, case):
    d = golden(f"dynamicvit_predictor_{case}.npz")
    pred = _load_predictor(d)
    out = pred(jnp.asarray(d["x"]), jnp.asarray(d["policy"]))
    np.testing.assert_allclose(out, d["log_probs"], atol=1e-5, rtol=0)


def _golden_model(d):
    import json
    meta = json.loads(str(d["meta"]))
    c = meta["cfg"]
    cfg = ViTConfig(img_size=c["img_size"], patch_size=c["patch_size"],
                    embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                    num_classes=c["num_classes"], attn_impl="xla",
                    reduction=dict(method="dynamicvit", layers=meta["pruning_loc"],
                                   keep_ratio=meta["token_ratio"]))
    sd = {k[len("param/"):]: d[k] for k in d if k.startswith("param/")}
    return convert.from_timm(sd, cfg), meta


def test_predictor_with_every_token_dropped_stays_finite():
    """An image whose every patch token an earlier stage dropped (policy all 0): the
    reference's 0/0 would make its log-probs (and the whole loss) NaN, as one Fashion-MNIST
    seed showed at step 958; here they and the gradients stay finite, and the other images'
    outputs do not change."""
    pred = dv.Predictor(16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    policy = jnp.stack([jnp.zeros((7, 1)), jnp.ones((7, 1)).at[3].set(0.0)])

    def loss(x, policy):
        return jnp.sum(pred(x, policy)[..., 0])

    out = pred(x, policy)
    assert np.isfinite(np.asarray(out)).all()
    gx, gp = jax.grad(loss, argnums=(0, 1))(x, policy)
    assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gp)).all()
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(pred(x[1:], policy[1:])[0]))


def test_eval_model_matches_reference(golden):
    d = golden("dynamicvit_vit_tiny.npz")
    model, meta = _golden_model(d)
    # Tokens entering each block, before its (input-side) pruning; then the final count.
    assert model.cfg.token_counts() == [197, 197, 138, 138, 97, 97, 68]
    images = jnp.asarray(d["images"].transpose(0, 2, 3, 1))
    logits, aux = model(images)
    np.testing.assert_allclose(logits, d["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(aux["last_hidden_state"], d["features"], atol=1e-4, rtol=0)
    for p, plan in enumerate(aux["plans"]):
        np.testing.assert_array_equal(plan.keep_positions, d[f"keep_idx_{p}"])
    # The state dict round-trips under the reference's names.
    back = convert.to_timm(model)
    assert "score_predictor.2.out_conv.4.weight" in back
    np.testing.assert_array_equal(back["score_predictor.1.in_conv.1.weight"],
                                  d["param/score_predictor.1.in_conv.1.weight"])


def _np_softmax_with_policy(logits, policy, eps=1e-6):
    """The reference's softmax_with_policy, transcribed in NumPy (float64)."""
    n = logits.shape[-1]
    pol = policy[:, None, None, :]
    pol = pol + (1.0 - pol) * np.eye(n)
    a = np.exp(logits - logits.max(-1, keepdims=True)) * pol
    return (a + eps / n) / (a.sum(-1, keepdims=True) + eps)


def test_policy_attention_matches_reference_formula():
    model = VisionTransformer(ViTConfig(**SMALL), rngs=nnx.Rngs(0))
    attn = model.blocks[0].attn
    x = jax.random.normal(jax.random.key(1), (2, 7, 32))
    policy = jnp.asarray([[1, 1, 0, 1, 0, 0, 1], [1, 0, 1, 1, 1, 0, 0]], jnp.float32)
    probs = attn.probabilities(x, key_policy=policy)
    qkv = np.asarray(attn.qkv(x)).reshape(2, 7, 3, 2, 16)
    logits = np.einsum("bqhd,bkhd->bhqk", qkv[:, :, 0], qkv[:, :, 1]) / 4.0
    np.testing.assert_allclose(probs, _np_softmax_with_policy(logits, np.asarray(policy)),
                               atol=1e-6)
    # A dropped key gets eps-level weight from every other query, its own query sees it.
    assert float(probs[0, 0, 0, 2]) < 1e-6 and float(probs[0, 0, 2, 2]) > 1e-3


def _train_model(**kw):
    red = dict(method="dynamicvit", layers=(1, 2), keep_ratio=(0.5, 0.25), **kw)
    return VisionTransformer(ViTConfig(**SMALL, reduction=red), rngs=nnx.Rngs(0))


def test_training_path_keeps_every_token_and_masks_by_policy():
    model = _train_model()
    red = model.cfg.reduction.training()
    assert red.needs_key and red.needs_teacher and red.policy_attention
    assert [s.n_in for s in red.schedule(model.cfg.layout())] == [17, 17, 17]
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    logits, aux = model(images, key=jax.random.key(3), reduction=red)
    d1, d2 = (p.decision for p in aux["plans"])
    assert aux["last_hidden_state"].shape == (4, 17, 32)
    # Hard samples (up to the straight-through estimator's rounding, as in torch).
    np.testing.assert_allclose(np.round(d1), d1, atol=1e-6)
    assert np.all(np.asarray(d2) <= np.asarray(d1) + 1e-6)            # decisions only shrink
    np.testing.assert_array_equal(aux["size"][:, 1:, 0], d2)   # the policy rides in the sizes
    # The Gumbel sample follows the key; the same key gives the same policy.
    _, aux2 = model(images, key=jax.random.key(3), reduction=red)
    np.testing.assert_array_equal(aux2["plans"][0].decision, d1)
    with pytest.raises(ValueError, match="draws random numbers"):
        model(images, reduction=red)


def test_training_loss_matches_reference_formulas():
    model = _train_model()
    red = model.cfg.reduction.training()
    layout = model.cfg.layout()
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    logits, aux = model(images, key=jax.random.key(5), reduction=red)
    t_logits, t_aux = model(images, reduction=reducers.get("none")())
    total, terms = red.loss(layout, logits, aux, labels=jnp.zeros(4, jnp.int32),
                            teacher=(t_logits, t_aux))
    dec = [np.asarray(p.decision, np.float64) for p in aux["plans"]]
    ratio = sum(np.mean((d.mean(1) - r) ** 2) for d, r in zip(dec, (0.5, 0.25))) / 2
    ls = np.asarray(jax.nn.log_softmax(logits), np.float64)
    lt = np.asarray(jax.nn.log_softmax(t_logits), np.float64)
    kl = np.sum(np.exp(lt) * (lt - ls)) / 4
    mask = dec[-1].reshape(-1) > 0.5
    s_tok = np.asarray(aux["last_hidden_state"][:, 1:]).reshape(-1, 32)[mask]
    t_tok = np.asarray(t_aux["last_hidden_state"][:, 1:]).reshape(-1, 32)[mask]
    mse = np.mean((s_tok - t_tok) ** 2)
    np.testing.assert_allclose(terms["ratio_loss"], ratio, rtol=1e-5)
    np.testing.assert_allclose(terms["cls_distill"], kl, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(terms["token_distill"], mse, rtol=1e-4)
    np.testing.assert_allclose(total, 2.0 * ratio + 0.5 * (kl + mse), rtol=1e-4)


def test_training_gradients_reach_the_predictor_through_the_policy():
    model = _train_model()
    red = model.cfg.reduction.training()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    traces = []

    @jax.jit
    def loss_fn(params):
        traces.append(1)
        m = nnx.merge(graphdef, params, rest)
        logits, aux = m(images, key=jax.random.key(2), reduction=red)
        extra, _ = red.loss(m.cfg.layout(), logits, aux, labels=jnp.zeros(4, jnp.int32))
        return jnp.mean(logits ** 2) + extra

    grads = jax.grad(loss_fn)(params)
    jax.grad(loss_fn)(params)
    assert len(traces) == 1
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    pred_grad = grads["blocks"][1]["reducer"]["out3"]["kernel"][...]
    assert float(jnp.abs(pred_grad).sum()) > 0       # straight-through reaches the predictor


def test_eval_model_jit_and_no_retrace():
    model = _train_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traces = []

    @jax.jit
    def fwd(params, images):
        traces.append(1)
        logits, aux = nnx.merge(graphdef, params, rest)(images)
        return logits, aux["plans"][-1].keep_positions

    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    logits, keep = fwd(params, images)
    fwd(params, images + 1.0)
    assert len(traces) == 1 and logits.shape == (2, 5) and keep.shape == (2, 1 + 4)
    assert np.isfinite(np.asarray(logits)).all()
    assert model.cfg.token_counts() == [17, 17, 1 + 8, 1 + 4]


@pytest.mark.parametrize("kw, match", [
    (dict(layers=(1, 2), keep_ratio=(0.3, 0.5)), r"keep_ratio=0.5 at layer 2 .* must not grow"),
    (dict(layers=(1,), keep_ratio=(1.5,)), r"reduction.keep_ratio \(layer 1\)"),
    (dict(layers=(1, 2), keep_ratio=(0.5,)), r"keep_ratio has 1 entries"),
    (dict(layers=(2, 1), keep_ratio=(0.5, 0.4)), r"strictly increasing"),
    (dict(layers=(), keep_ratio=()), r"at least one block"),
])
def test_bad_budgets(kw, match):
    with pytest.raises(ValueError, match=match):
        dv.DynamicViT(**kw)


def test_budget_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"layer 1 keeps int\(16 \* ratio\) = 0"):
        ViTConfig(**SMALL, reduction=dict(method="dynamicvit", layers=(1,), keep_ratio=(0.05,)))
    with pytest.raises(ValueError, match="contains 7"):
        ViTConfig(**SMALL, reduction=dict(method="dynamicvit", layers=(7,), keep_ratio=(0.5,)))


def test_reduce_vmaps_over_examples():
    """The eval reduction of one example at a time (jax.vmap) equals the batched one."""
    model = _train_model()
    red, layout = model.cfg.reduction, model.cfg.layout()
    spec = red.schedule(layout)[1]
    x = jax.random.normal(jax.random.key(4), (3, spec.n_in, 32))
    size = jnp.ones((3, spec.n_in, 1))
    batched = red.reduce(layout, spec, x, size, {}, module=model.blocks[1].reducer)[0]
    one = jax.vmap(lambda xi, si: red.reduce(layout, spec, xi[None], si[None], {},
                                             module=model.blocks[1].reducer)[0][0])(x, size)
    np.testing.assert_allclose(one, batched, atol=1e-6)
