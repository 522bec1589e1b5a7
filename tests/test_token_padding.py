"""Token arrays rounded up to a multiple (`ViTConfig.token_multiple`): the padding is masked out
of attention and of every statistic, gradients stay exact and finite, FLOPs count the rows.
(Every registered reducer on padded arrays: tests/test_reducers.py; eval.py: test_eval.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens.attention import STATS, attention
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.models import token_padding as tp


def test_round_up_and_pad():
    assert [tp.round_up(n, 8) for n in (1, 8, 9, 197)] == [8, 8, 16, 200]
    x, size = jnp.ones((2, 5, 3)), jnp.full((2, 5, 1), 2.0)
    px, ps = tp.pad(x, size, 4)
    assert px.shape == (2, 8, 3) and ps.shape == (2, 8, 1)
    assert float(px[:, 5:].sum()) == 0 and float(ps[:, 5:].sum()) == 0
    assert tp.pad(x, size, 5)[0] is x
    np.testing.assert_array_equal(tp.key_size(ps, 5, True)[0], [2, 2, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(tp.key_size(ps, 5, False)[0], [1, 1, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("impl,proportional", [("xla", False), ("xla", True),
                                               ("pallas_gpu", True), ("pallas_tpu", True)])
def test_every_statistic_of_the_real_tokens(impl, proportional):
    """Attention on 13 real tokens carried in 16 rows: the real queries' outputs and every
    statistic equal those of the 13 tokens alone (key_mass without the padding queries), in
    the XLA path and the Pallas kernels (interpreted on CPU)."""
    n, rows, h, d = 13, 16, 3, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (2, rows, h, d)) for kk in keys[:3])
    size = jax.random.uniform(keys[3], (2, rows, 1), minval=1.0, maxval=4.0)
    stats = tuple(STATS)
    # On CPU the kernels are interpreted (float32 throughout); compiled on a GPU, their float32
    # dots run in TF32 (errors ~1e-3, as in the compiled oracle tests).
    tol = 2e-5 if jax.default_backend() == "cpu" else 5e-3
    with jax.default_matmul_precision("highest"):
        want_out, want = attention(q[:, :n], k[:, :n], v[:, :n], stats=stats, impl="xla",
                                   key_size=size[:, :n, 0] if proportional else None)
        ks = tp.key_size(size, n, proportional)
        out, got = attention(q, k, v, key_size=ks, stats=stats, impl=impl)
        got = tp.valid_stats(got, n, q, k, ks, d ** -0.5)
    np.testing.assert_allclose(out[:, :n], want_out, atol=tol)
    assert set(got) == set(want)
    for name in stats:
        assert got[name].shape == want[name].shape, name
        scale = max(1.0, float(jnp.abs(want[name]).max()))
        np.testing.assert_allclose(got[name], want[name], atol=tol * scale, err_msg=name)


def _cfg(**kw):
    return ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                     num_classes=5, attn_impl="xla", **kw)


@pytest.mark.parametrize("reduction", [dict(method="tome", r=3),
                                       dict(method="kmedoids", layers=(1,), keep_rate=0.5)])
def test_gradients_through_padding_are_exact_and_finite(reduction):
    """log 0 on the padding keys must not leak NaN into the gradients."""
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    grads = []
    for multiple in (1, 8):
        model = VisionTransformer(_cfg(reduction=reduction, token_multiple=multiple),
                                  rngs=nnx.Rngs(0))

        def loss(model):
            logits, aux = model(images)
            return (logits ** 2).mean() + aux["last_hidden_state"].mean()

        grads.append(jax.tree.leaves(nnx.state(nnx.jit(nnx.grad(loss))(model))))
    for a, b in zip(*grads):
        assert bool(jnp.isfinite(b).all())
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def test_flops_count_the_padding_rows_and_bad_multiples_are_named():
    cfg = _cfg(reduction=dict(method="tome", r=3))
    assert cfg.token_counts() == [17, 14, 11, 8]
    padded = cfg.replace(token_multiple=8)
    assert padded.token_counts() == cfg.token_counts()            # the real tokens
    assert tp.round_up(17, padded.row_multiple()) == 24
    assert padded.flops() > cfg.flops()
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match=r"token_multiple=.* must be a positive int"):
            _cfg(token_multiple=bad)
