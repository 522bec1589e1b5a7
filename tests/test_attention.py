"""Pallas attention kernels against the XLA oracle, on CPU in interpret mode.

Both kernel families run here without an accelerator: the GPU (Triton) kernels in Pallas's
generic interpreter, the TPU (Mosaic) kernels in the generic interpreter for the size sweep and
in TPU interpret mode (`pltpu.InterpretParams`: simulated VMEM, NaN-filled uninitialised
memory, out-of-bounds reads raise) for one small case with every feature. The lowering test
runs the real Mosaic and Triton lowering passes from CPU. Every case checks the output, all four
statistics and the gradients of q, k, v (and of key_size / bias where given) in one jitted
function, so each case costs one compile. On a machine with a GPU,
`test_gpu_kernels_compiled_match_oracle` also compiles the Triton kernels for it (skipped in CI).

Tolerances (max error <= tol * max|reference|, elementwise rtol = tol):
  float32:  1e-4 for everything.
  bfloat16: the reference is the oracle run in float32 on the same (bf16-valued) inputs;
            statistics 1e-4 (logits are exact products accumulated in fp32), output 1e-2,
            gradients 2e-2 (p and dS are rounded to bf16 before their matmuls); the measured
            errors are 3e-3 to 6e-3, the same as the XLA oracle run in bf16.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jax_tokens.attention import api, attention, attention_xla
from jax_tokens.attention.pallas import attention_pallas

ALL_STATS = ("lse", "cls_probs", "key_mass", "mean_key", "probs")
TOL = {jnp.float32: dict(out=1e-4, stats=1e-4, grad=1e-4),
       jnp.bfloat16: dict(out=1e-2, stats=1e-4, grad=2e-2)}


def _inputs(seed, b, nq, nk, h, d, dtype, key_size, bias_shape):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (b, nq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, nk, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, nk, h, d), jnp.float32).astype(dtype)
    ct = jax.random.normal(keys[3], (b, nq, h, d), jnp.float32)
    size = (jax.random.randint(keys[4], (b, nk), 1, 6).astype(jnp.float32)
            if key_size else None)
    bias = (jax.random.normal(keys[5], bias_shape, jnp.float32) if bias_shape else None)
    return q, k, v, ct, size, bias


# Compile time dominates these tests (interpreted kernels run in milliseconds); XLA's backend
# optimisation level 0 compiles about a third faster and does not change the arithmetic.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.partial(jit, static_argnames=("fn", "causal", "query_index"))
def _evaluate(q, k, v, ct, size, bias, *, fn, causal, query_index):
    """Output, statistics and gradients (q, k, v, key_size, bias) of one implementation."""
    def loss(q, k, v, size, bias):
        out, stats = fn(q, k, v, key_size=size, bias=bias, causal=causal, stats=ALL_STATS,
                        query_index=query_index)
        return jnp.sum(out.astype(jnp.float32) * ct), (out, stats)
    grads, (out, stats) = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        q, k, v, size, bias)
    return out, stats, grads


def _close(name, got, want, tol):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)


def _check_against_oracle(backend, interpret, *, b, nq, nk, h, d, dtype, key_size=False,
                          causal=False, bias_shape=None, blocks=(None, None),
                          query_index=0, seed=0, tol=None):
    q, k, v, ct, size, bias = _inputs(seed, b, nq, nk, h, d, dtype, key_size, bias_shape)
    kernel = functools.partial(attention_pallas, backend=backend, interpret=interpret,
                               block_q=blocks[0], block_k=blocks[1])
    out, stats, grads = _evaluate(q, k, v, ct, size, bias, fn=kernel, causal=causal,
                                  query_index=query_index)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):  # the oracle in true fp32 on GPU/TPU too
        r_out, r_stats, r_grads = _evaluate(f32(q), f32(k), f32(v), ct, size, bias,
                                            fn=attention_xla, causal=causal,
                                            query_index=query_index)
    tol = tol or TOL[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    _close("out", out, r_out, tol["out"])
    assert set(stats) == set(ALL_STATS)
    for name in ("lse", "cls_probs", "key_mass", "probs"):
        assert stats[name].dtype == jnp.float32, name
        _close(name, stats[name], r_stats[name], tol["stats"])
    _close("mean_key", stats["mean_key"], r_stats["mean_key"], tol["out"])
    for name, g, r in zip(("dq", "dk", "dv", "dkey_size", "dbias"), grads, r_grads):
        if r is None:
            assert g is None, name
            continue
        _close(name, g, r, tol["grad"])


# Sparse grid: every N in {65, 197, 577, 1025}, head counts 1-4, head dims 16-64 (40 is not a
# power of two), with/without key_size, causal or not, general bias (full and broadcast), cross
# attention (Nq != Nk, causal offset), fp32 and bf16, int and sequence query_index; large N with
# B = H = 1. Custom blocks exercise several blocks plus padding at small N.
CASES = [
    # id,            nq,   nk,  b, h, d,  dtype,        key_size, causal, bias shape,   query_index
    ("n65-ks",       65,   65,  2, 2, 32, jnp.float32,  True,  False, None,             -2),
    ("n197-causal",  197,  197, 1, 3, 64, jnp.float32,  True,  True,  None,             (0, 3, -1)),
    ("n577-bf16",    577,  577, 1, 4, 40, jnp.bfloat16, True,  False, None,             0),
    ("n1025",        1025, 1025, 1, 1, 16, jnp.float32, False, True,  None,             (0, 1024)),
    ("n197-bias",    197,  197, 2, 2, 32, jnp.float32,  True,  True,  (1, 2, 197, 197), (5, 100)),
    ("cross-65x197", 65,   197, 1, 2, 32, jnp.bfloat16, False, True,  (1, 1, 1, 197),   (0, 64)),
]
GPU_BLOCKS = {"n65-ks": (16, 32), "cross-65x197": (32, 64)}
TPU_BLOCKS = {"n577-bf16": (256, 128)}


def _case_kwargs(case, blocks):
    cid, nq, nk, b, h, d, dtype, key_size, causal, bias_shape, query_index = case
    return dict(b=b, nq=nq, nk=nk, h=h, d=d, dtype=dtype, key_size=key_size, causal=causal,
                bias_shape=bias_shape, query_index=query_index,
                blocks=blocks.get(cid, (None, None)))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_kernels_match_oracle(case):
    _check_against_oracle("gpu", True, **_case_kwargs(case, GPU_BLOCKS))


# Compiled on a GPU, the Triton kernels' float32 dots run in TF32 (10-bit mantissa), so float32
# gets bf16-like tolerances there; bfloat16 keeps its interpret-mode tolerances.
COMPILED_GPU_TOL = {jnp.float32: dict(out=5e-3, stats=5e-3, grad=1e-2),
                    jnp.bfloat16: TOL[jnp.bfloat16]}


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiles the Triton kernels for a GPU; CI has none (run on a GPU)")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_kernels_compiled_match_oracle(case):
    kwargs = _case_kwargs(case, GPU_BLOCKS)
    _check_against_oracle("gpu", False, tol=COMPILED_GPU_TOL[kwargs["dtype"]], **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tpu_kernels_match_oracle(case):
    _check_against_oracle("tpu", True, **_case_kwargs(case, TPU_BLOCKS))


def test_tpu_kernels_in_tpu_interpret_mode():
    """interpret=None on CPU means TPU interpret mode for the Mosaic kernels: simulated VMEM
    scratch and HBM, uninitialised memory filled with NaN (an output block or accumulator the
    kernel forgot to write shows up as NaN), out-of-bounds reads raise."""
    try:
        _check_against_oracle("tpu", None, b=1, nq=197, nk=197, h=2, d=32, dtype=jnp.float32,
                              key_size=True, causal=True, bias_shape=(1, 1, 197, 197),
                              query_index=(0, 196))
    finally:  # the simulator keeps global state after an exception
        pltpu.reset_tpu_interpret_mode_state()


def test_statistics_carry_no_gradient():
    q, k, v, _, _, _ = _inputs(2, 1, 65, 65, 1, 16, jnp.float32, False, None)

    @jit
    def grad_of_stats(q):
        def loss(q):
            _, s = attention_pallas(q, k, v, backend="gpu", interpret=True,
                                    stats=("lse", "key_mass", "cls_probs"))
            return s["lse"].sum() + s["key_mass"].sum() + s["cls_probs"].sum()
        return jax.grad(loss)(q)
    np.testing.assert_array_equal(grad_of_stats(q), jnp.zeros_like(q))


def test_api_dispatch():
    q, k, v, _, size, _ = _inputs(3, 1, 65, 65, 2, 16, jnp.float32, True, None)
    assert api.resolve_impl("auto") == "xla"  # the tests run on CPU
    run = jit(lambda q, k, v, size, impl, stats: attention(
        q, k, v, key_size=size, stats=stats, impl=impl), static_argnums=(4, 5))
    out, stats = run(q, k, v, size, "auto", ("key_mass",))
    r_out, r_stats = run(q, k, v, size, "xla", ("key_mass",))
    np.testing.assert_array_equal(out, r_out)
    np.testing.assert_array_equal(stats["key_mass"], r_stats["key_mass"])
    out, stats = run(q, k, v, size, "pallas_gpu", ("key_mass",))
    assert set(stats) == {"key_mass"}
    _close("pallas_gpu out", out, r_out, 1e-4)
    _close("pallas_gpu key_mass", stats["key_mass"], r_stats["key_mass"], 1e-4)
    # pallas_tpu reaches the Mosaic kernels (their numerics are tested above): trace only.
    jaxpr = jax.make_jaxpr(lambda q: attention(q, k, v, impl="pallas_tpu"))(q)
    assert "jax_tokens_flash_fwd_tpu" in str(jaxpr)


def test_jit_compiles_once_and_batches():
    @jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v, size):
        return attention_pallas(q, k, v, backend="gpu", key_size=size, causal=True,
                                stats=("lse", "key_mass"), interpret=True)

    q, k, v, _, size, _ = _inputs(4, 2, 65, 65, 1, 16, jnp.float32, True, None)
    for i in range(3):
        out, stats = f(q + i, k, v, size)
    out, stats = f(q, k, v, size)
    assert set(stats) == {"lse", "key_mass"}
    r_out, r_stats = jit(lambda q, k, v, s: attention_xla(
        q, k, v, key_size=s, causal=True, stats=("key_mass",)))(q, k, v, size)
    _close("out", out, r_out, 1e-4)
    _close("key_mass", stats["key_mass"], r_stats["key_mass"], 1e-4)
    # vmap over the batch (the kernels see B = 1) gives the batched result.
    per_example = jax.vmap(lambda q, k, v, s: attention_pallas(
        q[None], k[None], v[None], backend="gpu", key_size=s[None], causal=True,
        stats=("key_mass",), interpret=True)[1]["key_mass"][0])
    _close("vmapped key_mass", jit(per_example)(q, k, v, size), r_stats["key_mass"], 1e-4)


@pytest.mark.parametrize("backend, platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_their_device(backend, platform):
    """Forward, statistics and backward lower to Mosaic / Triton custom calls (no device needed).

    This runs the Pallas TPU and Triton lowering passes (block-shape rules, supported ops);
    compiling the lowered kernels still needs the device.
    """
    q = jnp.zeros((2, 197, 2, 40), jnp.bfloat16)
    size = jnp.ones((2, 197))
    bias = jnp.zeros((1, 2, 197, 197))

    def f(q, k, v, size, bias):
        out, st = attention_pallas(q, k, v, backend=backend, key_size=size, bias=bias,
                                   causal=True, stats=("lse", "key_mass", "cls_probs"),
                                   interpret=False)
        return out.astype(jnp.float32).sum() + sum(x.sum() for x in st.values())

    text = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4))).trace(q, q, q, size, bias).lower(
        lowering_platforms=(platform,)).as_text()
    target = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}[backend]
    assert text.count(f"custom_call @{target}") == 4  # forward, key mass, dk/dv, dq


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(backend="cuda"), ValueError, "backend='cuda'"),
    (dict(q_shape=(2, 8, 16)), ValueError, "q must have rank 4"),
    (dict(dtype=jnp.float16), TypeError, "float16"),
    (dict(k_dtype=jnp.bfloat16), TypeError, "one dtype"),
    (dict(key_size_shape=(2, 9)), ValueError, "key_size must have shape"),
    (dict(bias_shape=(2, 3, 8, 8)), ValueError, "bias must broadcast"),
    (dict(stats=("cls",)), ValueError, "unknown"),
    (dict(block_q=64), ValueError, "block_q=64 must be a positive multiple of 128"),
    (dict(backend="gpu", block_k=48), ValueError, "block_k=48 must be a power of two"),
    (dict(stats=("cls_probs",), query_index=8), ValueError, "query_index=8 is out of range"),
    (dict(stats=("cls_probs",), query_index=[[0]]), ValueError, "1-D sequence of ints"),
])
def test_bad_inputs_raise(kwargs, error, match):
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", jnp.float32)
    q = jnp.zeros(kwargs.pop("q_shape", (2, 8, 2, 16)), dtype)
    k = jnp.zeros((2, 8, 2, 16), kwargs.pop("k_dtype", dtype))
    v = jnp.zeros((2, 8, 2, 16), dtype)
    if "key_size_shape" in kwargs:
        kwargs["key_size"] = jnp.ones(kwargs.pop("key_size_shape"))
    if "bias_shape" in kwargs:
        kwargs["bias"] = jnp.zeros(kwargs.pop("bias_shape"))
    kwargs.setdefault("backend", "tpu")
    kwargs.setdefault("interpret", True)
    with pytest.raises(error, match=match):
        attention_pallas(q, k, v, **kwargs)


def test_traced_scale_raises():
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(TypeError, match="scale must be a static Python float"):
        jax.jit(lambda s: attention_pallas(q, q, q, backend="gpu", scale=s,
                                           interpret=True))(0.5)


@pytest.mark.parametrize("bias_heads", [None, 1, 2, 6])
def test_grouped_query_attention_equals_repeated_heads(bias_heads):
    """k / v with 2 heads for q's 6: the same output and statistics as k / v repeated to 6
    heads (query head i reads KV head i // 3), for the XLA path (grouped, no repeat) and a
    Pallas kernel (repeated for it); a bias with one row per KV head is shared by its group."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 8, 6, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 8, 2, 16)), jnp.float32) for _ in range(2))
    bias = None if bias_heads is None else jnp.asarray(
        rng.normal(size=(2, bias_heads, 8, 8)), jnp.float32)
    rep_bias = bias if bias_heads in (None, 1, 6) else jnp.repeat(bias, 3, axis=1)
    stats = ("lse", "cls_probs", "key_mass", "mean_key", "probs")
    want_out, want = attention(q, jnp.repeat(k, 3, 2), jnp.repeat(v, 3, 2), bias=rep_bias,
                               causal=True, stats=stats, impl="xla")
    out, st = attention(q, k, v, bias=bias, causal=True, stats=stats, impl="xla")
    results = [(out, st)]
    if bias is None:              # the kernels take key sizes, not a bias: no bias case only
        k6, v6, _ = api.repeat_kv_heads(q, k, v, None)
        results.append(attention_pallas(q, k6, v6, causal=True, stats=stats, backend="tpu",
                                        interpret=True))
    for out, st in results:
        np.testing.assert_allclose(out, want_out, atol=1e-5)
        for name in stats:
            np.testing.assert_allclose(st[name], want[name], atol=1e-5, err_msg=name)
    with pytest.raises(ValueError, match="k has 4 heads, which must divide q's 6 heads"):
        attention(q, jnp.zeros((2, 8, 4, 16)), jnp.zeros((2, 8, 4, 16)), impl="xla")
    with pytest.raises(ValueError, match=r"bias must broadcast .* \(or have k's 2 heads\)"):
        attention(q, k, v, bias=jnp.zeros((2, 3, 8, 8)), impl="xla")
