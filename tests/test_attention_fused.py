"""impl="cudnn": jax.nn.dot_product_attention (cuDNN's fused kernel on a GPU; its XLA
implementation here, on CPU) with the O(N * d) statistics beside it, against the oracle
(`attention_xla`): output, the statistics it offers and the gradients of q, k, v, key_size and
bias, for grouped-query attention, biases per query head and per KV head, proportional
attention, causal masks (square and with fewer queries than keys) and several CLS rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_tokens.attention import attention, attention_xla
from jax_tokens.attention.fused import FUSED_STATS

STATS = ("cls_probs", "lse", "mean_key", "value_norm")
ON_GPU = jax.default_backend() == "gpu"
# On a GPU the cuDNN path refuses float32 (the kernel takes bf16 / fp16): the float32 oracle
# cases run where it falls back to XLA, the compiled test below runs them in bf16 on the GPU.
float32_fallback = pytest.mark.skipif(ON_GPU, reason="float32 is refused on a GPU; see "
                                      "test_fused_path_compiled_on_gpu")


def _inputs(seed, b, nq, nk, h, kvh, d, dtype, key_size, bias_heads):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (b, nq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, nk, kvh, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, nk, kvh, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(keys[3], (b, nq, h, d), jnp.float32)
    size = jax.random.randint(keys[4], (b, nk), 1, 6).astype(jnp.float32) if key_size else None
    bias = (jax.random.normal(keys[5], (b, bias_heads, nq, nk), jnp.float32)
            if bias_heads else None)
    return q, k, v, ct, size, bias


def _evaluate(impl, q, k, v, ct, size, bias, causal, query_index):
    @jax.jit
    def run(q, k, v, size, bias):
        def loss(q, k, v, size, bias):
            out, stats = attention(q, k, v, key_size=size, bias=bias, causal=causal,
                                   stats=STATS, query_index=query_index, impl=impl)
            return jnp.sum(out.astype(jnp.float32) * ct), (out, stats)
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, size, bias)
    return run(q, k, v, size, bias)


CASES = [   # b, nq, nk, h, kvh, d, key_size, bias heads, causal, query_index
    ("vit_cls", 2, 17, 17, 4, 4, 8, False, None, False, 0),
    ("tome_proportional", 2, 13, 13, 2, 2, 8, True, None, False, 0),
    ("bias_per_query_head", 1, 9, 9, 4, 4, 4, True, 4, False, (0, 3)),
    ("gqa_bias_per_kv_head", 2, 11, 11, 6, 2, 8, False, 2, False, -1),
    ("gqa_causal_square", 2, 12, 12, 4, 2, 8, False, None, True, (0, -1)),
    ("causal_fewer_queries", 1, 5, 12, 2, 1, 8, True, 1, True, 2),
]


@float32_fallback
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_path_matches_oracle(case):
    _, b, nq, nk, h, kvh, d, key_size, bias_heads, causal, query_index = case
    q, k, v, ct, size, bias = _inputs(0, b, nq, nk, h, kvh, d, jnp.float32, key_size,
                                      bias_heads)
    (gq, gk, gv, gs, gb), (out, stats) = _evaluate("cudnn", q, k, v, ct, size, bias, causal,
                                                   query_index)
    (rq, rk, rv, rs, rb), (rout, rstats) = _evaluate("xla", q, k, v, ct, size, bias, causal,
                                                     query_index)
    np.testing.assert_allclose(out, rout, atol=1e-5, rtol=1e-5)
    for name in STATS:
        assert stats[name].shape == rstats[name].shape, name
        assert stats[name].dtype == rstats[name].dtype, name
        np.testing.assert_allclose(stats[name], rstats[name], atol=1e-5, rtol=1e-5,
                                   err_msg=name)
    for name, got, want in [("q", gq, rq), ("k", gk, rk), ("v", gv, rv), ("key_size", gs, rs),
                            ("bias", gb, rb)]:
        if want is not None:
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
    # the CLS rows are probabilities: non-negative, each summing to one
    np.testing.assert_allclose(np.asarray(stats["cls_probs"]).sum(-1), 1.0, rtol=1e-5)


@float32_fallback
def test_fused_path_full_width_statistics_and_bfloat16():
    """PruMerge's full-width statistics, and bf16 inputs (the dtype cuDNN runs) within bf16
    rounding of the oracle run in float32 on the same values."""
    q, k, v, _, size, _ = _inputs(1, 2, 9, 9, 2, 2, 8, jnp.float32, True, None)
    names = ("full_key", "full_cls_probs", "cls_probs")
    out, stats = attention(q, k, v, key_size=size, stats=names, impl="cudnn")
    rout, rstats = attention_xla(q, k, v, key_size=size, stats=names)
    for name in names:
        np.testing.assert_allclose(stats[name], rstats[name], atol=1e-5, rtol=1e-5)
    bq, bk, bv = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out, stats = attention(bq, bk, bv, key_size=size, stats=("cls_probs", "lse"), impl="cudnn")
    rout, rstats = attention_xla(*(x.astype(jnp.float32) for x in (bq, bk, bv)), key_size=size,
                                 stats=("cls_probs", "lse"))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), rout, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(stats["cls_probs"], rstats["cls_probs"], atol=1e-2)
    np.testing.assert_allclose(stats["lse"], rstats["lse"], atol=5e-2, rtol=1e-2)


def test_fused_path_refuses_statistics_that_need_every_probability():
    q, k, v, *_ = _inputs(2, 1, 5, 5, 1, 1, 4, jnp.float32, False, None)
    assert set(FUSED_STATS) >= set(STATS)
    for name in ("key_mass", "probs"):
        with pytest.raises(ValueError, match=f"impl='cudnn'.*'{name}'.*impl='xla'"):
            attention(q, k, v, stats=(name,), impl="cudnn")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: cuDNN's fused kernel compiled for it")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_path_compiled_on_gpu(case):
    """The oracle cases in bf16 through cuDNN's kernel, against the oracle run in float32 on
    the same bf16 values: output, statistics and gradients within bf16 rounding."""
    _, b, nq, nk, h, kvh, d, key_size, bias_heads, causal, query_index = case
    d = max(d, 64)                   # cuDNN's head dims: multiples of 8 up to 128
    q, k, v, ct, size, bias = _inputs(0, b, nq, nk, h, kvh, d, jnp.bfloat16, key_size,
                                      bias_heads)
    grads, (out, stats) = _evaluate("cudnn", q, k, v, ct, size, bias, causal, query_index)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        rgrads, (rout, rstats) = _evaluate("xla", *f32, ct, size, bias, causal, query_index)
    np.testing.assert_allclose(np.asarray(out, np.float32), rout, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(stats["cls_probs"], rstats["cls_probs"], atol=1e-2)
    np.testing.assert_allclose(stats["lse"], rstats["lse"], atol=5e-2, rtol=1e-2)
    for name, got, want in zip(("q", "k", "v", "key_size", "bias"), grads, rgrads):
        if want is not None:
            scale = float(jnp.abs(want).max()) + 1e-6
            np.testing.assert_allclose(np.asarray(got, np.float32) / scale,
                                       np.asarray(want) / scale, atol=5e-2, err_msg=name)
