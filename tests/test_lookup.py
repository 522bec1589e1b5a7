"""Tests for jax_tokens.lookup: plans, TokenLearner, the LookupViT block, pooling, FLOPs.

Values are compared against NumPy re-implementations (float64) of each formula, gradients
against closed forms or central finite differences of those re-implementations, FLOP counts
against XLA's cost analysis.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import lookup

RTOL = 1e-5
ATOL = 1e-5


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _random_module(make, seed):
    """Builds a module abstractly (no initializer runs) and fills every parameter (LayerNorm
    scales/biases and Linear biases included) with noise; much cheaper on CPU than a real init."""
    module = nnx.eval_shape(make)
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.normal(size=l.shape).astype(np.float32) * 0.5) for l in leaves]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def _p(var):
    return np.asarray(var[...], np.float64)


# --------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------

def np_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def np_ln(x, ln, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * _p(ln.scale) + _p(ln.bias)


def np_linear(x, lin):
    y = x @ _p(lin.kernel)
    return y + _p(lin.bias) if lin.bias is not None else y


def np_gelu(x, approximate):
    if approximate:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def np_mlp(x, mlp, approximate):
    return np_linear(np_gelu(np_linear(x, mlp.fc1), approximate), mlp.fc2)


def np_mha(q, k, v, heads):
    """q [B, Q, C], k/v [B, K, C] -> [B, Q, C], plain multi-head softmax attention."""
    b, nq, c = q.shape
    d = c // heads
    qh = q.reshape(b, nq, heads, d)
    kh = k.reshape(b, -1, heads, d)
    vh = v.reshape(b, -1, heads, d)
    p = np_softmax(np.einsum("bqhd,bkhd->bhqk", qh, kh) / np.sqrt(d), -1)
    return np.einsum("bhqk,bkhd->bqhd", p, vh).reshape(b, nq, c)


def np_lookup_block(blk, z, x):
    """The LookupViT block written out in numpy (float64)."""
    h, c = blk.num_heads, blk.dim
    d = c // h
    b, m, _ = z.shape
    n = x.shape[1]
    # 1. gather
    q = np_linear(np_ln(z, blk.norm_cross_q), blk.cross_q).reshape(b, m, h, d)
    kv = np_linear(np_ln(x, blk.norm_cross_kv), blk.cross_kv)
    k, v = kv[..., :c].reshape(b, n, h, d), kv[..., c:].reshape(b, n, h, d)
    logits = np.einsum("bmhd,bnhd->bhmn", q, k) / np.sqrt(d)
    gather = np_softmax(logits, -1)
    z = z + np_linear(np.einsum("bhmn,bnhd->bmhd", gather, v).reshape(b, m, c), blk.cross_proj)
    # 2. refine
    qkv = np_linear(np_ln(z, blk.norm1), blk.qkv)
    z = z + np_linear(np_mha(qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:], h), blk.proj)
    z = z + np_mlp(np_ln(z, blk.norm2), blk.mlp, approximate=False)
    if not blk.infuse:
        return z, x, logits, gather, None
    # 3. infuse: softmax over the lookup axis M of the SAME logits, transposed
    scatter = np.swapaxes(np_softmax(logits, -2), -1, -2)  # [B, H, N, M]
    v2 = np_linear(np_ln(z, blk.norm_back_v), blk.back_v).reshape(b, m, h, d)
    x = x + np_linear(np.einsum("bhnm,bmhd->bnhd", scatter, v2).reshape(b, n, c), blk.back_proj)
    x = x + np_mlp(np_ln(x, blk.norm_hr), blk.hr_mlp, approximate=False)
    return z, x, logits, gather, scatter


# --------------------------------------------------------------------------------------------
# compress and the plan
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,n,m,c", [(2, 9, 4, 8), (1, 5, 5, 3)])
def test_compress_plan_contract(b, n, m, c):
    x, logits = _rand(0, b, n, c), _rand(1, b, n, m) * 3
    y, plan = lookup.compress(jnp.asarray(x), jnp.asarray(logits))
    assert y.shape == (b, m, c) and plan.weights.shape == (b, m, n)
    assert (plan.n_in, plan.n_out) == (n, m)
    w = np.asarray(plan.matrix())
    np.testing.assert_allclose(w, np.swapaxes(np_softmax(logits.astype(np.float64), 1), 1, 2),
                               rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(w @ x, np.asarray(plan.apply(jnp.asarray(x))), rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(np.asarray(y), w @ x, rtol=RTOL, atol=ATOL)
    # unapply: each input token gets its highest-weight output token
    assign = np.asarray(plan.assignment)
    np.testing.assert_array_equal(assign, w.argmax(1))
    back = np.asarray(plan.unapply(y))
    assert back.shape == (b, n, c)
    np.testing.assert_array_equal(back, np.take_along_axis(np.asarray(y), assign[..., None], 1))
    np.testing.assert_array_equal(np.asarray(plan.invert(y)), back)  # unapply == invert
    # soft read-back: W^T with rows renormalised
    tp = plan.transpose_plan()
    assert (tp.n_in, tp.n_out) == (m, n)
    wt = np.swapaxes(w.astype(np.float64), 1, 2)
    np.testing.assert_allclose(np.asarray(tp.matrix()), wt / wt.sum(-1, keepdims=True),
                               rtol=1e-5, atol=1e-7)


def test_plan_size_weighting_equals_log_size_bias():
    x, logits = _rand(2, 2, 6, 3), _rand(3, 2, 6, 4)
    size = np.abs(_rand(4, 2, 6, 1)) + 0.5
    _, plan = lookup.compress(jnp.asarray(x), jnp.asarray(logits))
    _, plan_biased = lookup.compress(jnp.asarray(x), jnp.asarray(logits + np.log(size)))
    np.testing.assert_allclose(np.asarray(plan.matrix(jnp.asarray(size))),
                               np.asarray(plan_biased.matrix()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(plan.apply(jnp.asarray(x), jnp.asarray(size))),
                               np.asarray(plan_biased.apply(jnp.asarray(x))), rtol=1e-5,
                               atol=1e-5)


def np_prefix_matrix(w, p, size=None):
    """[B, p + M, p + N] block-diagonal map written out in numpy (size: [B, p + N])."""
    b, m, n = w.shape
    w = w.astype(np.float64)
    if size is not None:
        w = w * size[:, None, p:]
        w = w / w.sum(-1, keepdims=True)
    out = np.zeros((b, p + m, p + n))
    out[:, np.arange(p), np.arange(p)] = 1.0
    out[:, p:, p:] = w
    return out


@pytest.mark.parametrize("p", [1, 2])
def test_plan_prefix_protocol(p):
    b, n, m, c = 2, 7, 3, 4
    logits = _rand(50, b, n, m) * 3
    _, base = lookup.compress(jnp.zeros((b, n, c)), jnp.asarray(logits))
    plan = lookup.LookupPlan(weights=base.weights, prefix=p)
    w = np.swapaxes(np_softmax(logits.astype(np.float64), 1), 1, 2)    # [B, M, N]
    assert (plan.n_in, plan.n_out, plan.prefix) == (p + n, p + m, p)

    ref = np_prefix_matrix(w, p)
    mat = np.asarray(plan.matrix())
    assert mat.shape == (b, p + m, p + n)
    np.testing.assert_allclose(mat, ref, rtol=1e-5, atol=1e-7)

    # apply == matrix @ x, prefix passed through exactly; any trailing shape (or none)
    x = _rand(51, b, p + n, c)
    y = np.asarray(plan.apply(jnp.asarray(x)))
    np.testing.assert_allclose(y, ref @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y[:, :p], x[:, :p])
    x4 = _rand(52, b, p + n, 2, 3)
    np.testing.assert_allclose(np.asarray(plan.apply(jnp.asarray(x4))),
                               np.einsum("bmn,bnij->bmij", ref, x4), rtol=1e-5, atol=1e-5)
    pos = np.arange(p + n, dtype=np.int32)[None].repeat(b, 0)  # integer positions -> float32
    got = plan.apply(jnp.asarray(pos))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.einsum("bmn,bn->bm", ref, pos), rtol=1e-5,
                               atol=1e-4)

    # sizes of all p + N tokens re-weight only the weights block
    size = np.abs(_rand(53, b, p + n)) + 0.5
    ref_s = np_prefix_matrix(w, p, size)
    np.testing.assert_allclose(np.asarray(plan.matrix(jnp.asarray(size[..., None]))), ref_s,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(plan.apply(jnp.asarray(x), jnp.asarray(size))),
                               ref_s @ x, rtol=1e-5, atol=1e-5)

    # assignment: prefix i -> i, others -> p + argmax over M
    assign = np.asarray(plan.assignment)
    assert assign.dtype == np.int32
    np.testing.assert_array_equal(
        assign, np.concatenate([np.tile(np.arange(p), (b, 1)), p + w.argmax(1)], axis=1))

    # invert puts the prefix back exactly and each other token's slot in its place
    yy = _rand(54, b, p + m, c)
    back = np.asarray(plan.invert(jnp.asarray(yy)))
    assert back.shape == (b, p + n, c)
    np.testing.assert_array_equal(back[:, :p], yy[:, :p])
    np.testing.assert_array_equal(back, np.take_along_axis(yy, assign[..., None], 1))
    np.testing.assert_array_equal(np.asarray(plan.unapply(jnp.asarray(yy))), back)
    # invert o apply keeps the prefix tokens
    np.testing.assert_array_equal(np.asarray(plan.invert(plan.apply(jnp.asarray(x))))[:, :p],
                                  x[:, :p])

    # the prefix is static pytree metadata: the plan crosses jit and keeps its behaviour
    leaves, _ = jax.tree.flatten(plan)
    assert len(leaves) == 1
    jy = jax.jit(lambda pl, a: pl.apply(a))(plan, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(jy), y, rtol=1e-6, atol=1e-6)

    # transpose keeps the prefix: [B, p + N, p + M] with W^T rows renormalised
    tp = plan.transpose_plan()
    wt = np.swapaxes(w, 1, 2)
    np.testing.assert_allclose(np.asarray(tp.matrix()),
                               np_prefix_matrix(wt / wt.sum(-1, keepdims=True), p), rtol=1e-5,
                               atol=1e-7)


def test_compress_jit_vmap_grad():
    x, logits = jnp.asarray(_rand(5, 2, 2, 9, 8)), jnp.asarray(_rand(6, 2, 2, 9, 4))
    eager = [lookup.compress(x[i], logits[i])[0] for i in range(2)]
    vm = jax.vmap(lambda a, l: lookup.compress(a, l)[0])(x, logits)
    jt = jax.jit(lambda a, l: lookup.compress(a, l)[0])(x[0], logits[0])
    np.testing.assert_allclose(np.asarray(vm), np.stack(eager), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(jt), np.asarray(eager[0]), rtol=RTOL, atol=ATOL)
    gx, gl = jax.grad(lambda a, l: (lookup.compress(a, l)[0] ** 2).sum(), argnums=(0, 1))(
        x[0], logits[0])
    # closed form of d/dx, d/dlogits of sum(y^2), y = W x, W[m, n] = softmax_n(logits[n, m])
    xn, ln_ = np.asarray(x[0], np.float64), np.asarray(logits[0], np.float64)
    w = np.swapaxes(np_softmax(ln_, 1), 1, 2)                 # [B, M, N]
    dy = 2 * (w @ xn)                                         # [B, M, C]
    dw = dy @ np.swapaxes(xn, 1, 2)                           # [B, M, N]
    dl = w * (dw - (w * dw).sum(-1, keepdims=True))           # softmax backward, over N
    np.testing.assert_allclose(np.asarray(gx), np.swapaxes(w, 1, 2) @ dy, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gl), np.swapaxes(dl, 1, 2), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# TokenLearner and LookupViTBlock (shared small shapes keep CPU compiles few)
# --------------------------------------------------------------------------------------------

B, M, N, C, H = 2, 4, 9, 8, 2


@pytest.fixture(scope="module")
def inputs():
    return jnp.asarray(_rand(21, B, M, C)), jnp.asarray(_rand(22, B, N, C))


def np_token_learner(tl, x):
    scores = np_mlp(np_ln(x, tl.norm), tl.score_mlp, approximate=True)  # [B, N, M]
    w = np.swapaxes(np_softmax(scores, 1), 1, 2)  # softmax over N
    feats = x if tl.feature_mlp is None else np_mlp(x, tl.feature_mlp, approximate=True)
    return w @ feats, w


@pytest.mark.parametrize("feature_hidden_dim", [None, 6])
def test_token_learner_matches_numpy_jit_no_retrace(inputs, feature_hidden_dim):
    _, x = inputs
    tl = _random_module(lambda: lookup.TokenLearner(
        C, M, hidden_dim=5, feature_hidden_dim=feature_hidden_dim, rngs=nnx.Rngs(0)), 10)
    y, plan = tl(x)
    ry, rw = np_token_learner(tl, np.asarray(x, np.float64))
    assert y.shape == (B, M, C) and plan.weights.shape == (B, M, N)
    np.testing.assert_allclose(np.asarray(plan.weights), rw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y), ry, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(plan.weights).sum(-1), 1.0, atol=1e-6)

    graphdef, state = nnx.split(tl)
    chex.clear_trace_counter()  # the counter is keyed by the function's code: per parameter

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(s, x):
        return nnx.merge(graphdef, s)(x)

    for i in range(3):
        jy, jplan = f(state, x + i)
    jy, jplan = f(state, x)
    np.testing.assert_allclose(np.asarray(jy), np.asarray(y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jplan.weights), np.asarray(plan.weights), rtol=1e-5,
                               atol=1e-6)


@pytest.fixture(scope="module")
def block():
    return _random_module(
        lambda: lookup.LookupViTBlock(C, H, mlp_ratio=2.0, hr_mlp_ratio=0.5, rngs=nnx.Rngs(0)),
        20)


@pytest.fixture(scope="module")
def eager(block, inputs):
    return block(*inputs, return_attention=True)


def test_block_matches_numpy_bidirectional(block, inputs, eager):
    z, x = inputs
    z_out, x_out, aux = eager
    rz, rx, logits, gather, scatter = np_lookup_block(block, np.asarray(z, np.float64),
                                                      np.asarray(x, np.float64))
    assert z_out.shape == (B, M, C) and x_out.shape == (B, N, C)
    np.testing.assert_allclose(np.asarray(aux["logits"]), logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["gather"]), gather, rtol=1e-4, atol=1e-6)
    # the hr side reads through the same logits, soft-maxed over the lookup axis
    np.testing.assert_allclose(np.asarray(aux["scatter"]), scatter, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["scatter"]).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(z_out), rz, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_out), rx, rtol=1e-4, atol=1e-4)
    plan, splan = aux["plan"], aux["scatter_plan"]
    assert (plan.n_in, plan.n_out, splan.n_in, splan.n_out) == (N, M, M, N)
    # the plans are the head means of the two softmaxes
    np.testing.assert_allclose(np.asarray(plan.matrix()), gather.mean(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(splan.matrix()), scatter.mean(1), rtol=1e-4,
                               atol=1e-6)


def test_block_without_infusion_matches_numpy(inputs):
    z, x = inputs
    blk = _random_module(lambda: lookup.LookupViTBlock(C, H, mlp_ratio=2.0, hr_mlp_ratio=0.5,
                                                       infuse=False, rngs=nnx.Rngs(0)), 23)
    assert blk.hr_mlp is None and blk.back_v is None
    z_out, x_out, aux = blk(z, x, return_attention=True)
    rz, _, logits, gather, _ = np_lookup_block(blk, np.asarray(z, np.float64),
                                               np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(z_out), rz, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(x_out), np.asarray(x))  # hr tokens untouched
    assert set(aux) == {"logits", "gather", "plan"}
    np.testing.assert_allclose(np.asarray(aux["gather"]), gather, rtol=1e-4, atol=1e-6)


def _functional(blk):
    graphdef, state = nnx.split(blk)
    return lambda s, z, x: nnx.merge(graphdef, s)(z, x), state


def test_block_jit_vmap_grad_no_retrace(block, inputs, eager):
    z, x = inputs
    f, state = _functional(block)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, z, x):  # one compile for the outputs and the gradients to both token sets
        def loss(z, x):
            oz, ox = f(s, z, x)
            return (oz ** 2).sum() + (ox ** 2).sum(), (oz, ox)
        (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(z, x)
        return outs, grads

    for i in range(3):
        (jz, jx), grads = step(state, z, x)
    np.testing.assert_allclose(np.asarray(jz), np.asarray(eager[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jx), np.asarray(eager[1]), rtol=1e-5, atol=1e-5)
    # gradients: directional derivatives against central differences of the float64 numpy block
    def np_loss(zz, xx):
        oz, ox = np_lookup_block(block, zz, xx)[:2]
        return (oz ** 2).sum() + (ox ** 2).sum()

    z64, x64, eps = np.asarray(z, np.float64), np.asarray(x, np.float64), 1e-4
    for i, (g, base) in enumerate(zip(grads, (z64, x64))):
        v = _rand(30 + i, *base.shape).astype(np.float64)
        shift = [np.zeros_like(z64), np.zeros_like(x64)]
        shift[i] = eps * v
        fd = (np_loss(z64 + shift[0], x64 + shift[1])
              - np_loss(z64 - shift[0], x64 - shift[1])) / (2 * eps)
        np.testing.assert_allclose((np.asarray(g, np.float64) * v).sum(), fd, rtol=1e-3)

    # vmap over an extra leading axis agrees with separate calls (same shapes: no retrace)
    zz, xx = jnp.stack([z, z * 0.5 + 1.0]), jnp.stack([x, -x])
    vz, vx = jax.jit(jax.vmap(f, in_axes=(None, 0, 0)))(state, zz, xx)
    for i in range(2):
        (lz, lx), _ = step(state, zz[i], xx[i])
        np.testing.assert_allclose(np.asarray(vz[i]), np.asarray(lz), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(vx[i]), np.asarray(lx), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(vz[1]), np.asarray(vz[0]))


# --------------------------------------------------------------------------------------------
# init_lookup_tokens
# --------------------------------------------------------------------------------------------

def test_init_lookup_tokens_divisible_and_not():
    x = _rand(40, 2, 36, 3)
    y = np.asarray(lookup.init_lookup_tokens(jnp.asarray(x), (6, 6), (3, 2)))
    ref = x.reshape(2, 3, 2, 2, 3, 3).mean(axis=(2, 4)).reshape(2, 6, 3)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    # non-divisible 5x5 -> 2x2: PyTorch bins [0, 3) and [2, 5) in each dimension
    x = _rand(41, 1, 25, 2)
    y, plan = lookup.init_lookup_tokens(jnp.asarray(x), (5, 5), (2, 2), return_plan=True)
    g = x.reshape(1, 5, 5, 2)
    ref = np.stack([g[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in ((0, 3), (2, 5))
                    for c0, c1 in ((0, 3), (2, 5))], axis=1)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-6, atol=1e-6)
    bins = [(0, 3), (2, 5)]
    want = np.zeros((4, 25))
    for i, (r0, r1) in enumerate(bins):
        for j, (c0, c1) in enumerate(bins):
            cell = np.zeros((5, 5))
            cell[r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
            want[2 * i + j] = cell.reshape(-1)
    np.testing.assert_allclose(lookup.adaptive_pool_matrix((5, 5), (2, 2)), want, atol=1e-7)
    np.testing.assert_allclose(np.asarray(plan.matrix())[0], want, atol=1e-7)
    np.testing.assert_allclose(np.asarray(plan.apply(jnp.asarray(x))), ref, rtol=1e-5,
                               atol=1e-6)
    assert lookup.lookup_grid(49) == (7, 7) and lookup.lookup_grid(1) == (1, 1)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def _raises(exc, fn, *words):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_bad_inputs():
    rngs = None  # construction fails validation before any parameter is made
    x3, l3 = jnp.zeros((2, 5, 4)), jnp.zeros((2, 5, 3))
    _raises(ValueError, lambda: lookup.compress(jnp.zeros((5, 4)), l3), "x", "rank 3", "(5, 4)")
    _raises(ValueError, lambda: lookup.compress(x3, jnp.zeros((2, 6, 3))), "logits", "6", "5")
    _raises(ValueError, lambda: lookup.TokenLearner(4, 0, rngs=rngs), "num_tokens=0", ">= 1")
    _raises(TypeError, lambda: lookup.TokenLearner(4, 2.5, rngs=rngs), "num_tokens", "2.5", "int")
    _raises(TypeError, lambda: lookup.TokenLearner(4, jnp.asarray(3), rngs=rngs), "num_tokens",
            "static")
    _raises(TypeError, lambda: jax.jit(lambda m: lookup.lookup_block_flops(10, m, 8))(3), "m",
            "static")
    tl = nnx.eval_shape(lambda: lookup.TokenLearner(4, 2, rngs=nnx.Rngs(0)))
    _raises(ValueError, lambda: tl(jnp.zeros((2, 5, 3))), "x", "3 channels", "dim=4")
    _raises(ValueError, lambda: lookup.LookupViTBlock(8, 3, rngs=rngs), "num_heads=3", "dim=8")
    _raises(ValueError, lambda: lookup.LookupViTBlock(8, 2, hr_mlp_ratio=0.0, rngs=rngs),
            "hr_mlp_ratio=0.0", "> 0")
    blk = nnx.eval_shape(lambda: lookup.LookupViTBlock(8, 2, rngs=nnx.Rngs(0)))
    _raises(ValueError, lambda: blk(jnp.zeros((2, 4, 8)), jnp.zeros((3, 9, 8))), "hr_tokens",
            "batch size 3")
    _raises(ValueError, lambda: blk(jnp.zeros((2, 4, 8)), jnp.zeros((2, 9, 6))), "hr_tokens",
            "6 channels")
    _raises(ValueError, lambda: blk(jnp.zeros((4, 8)), jnp.zeros((2, 9, 8))), "lookup_tokens",
            "rank 3")
    _raises(ValueError, lambda: lookup.init_lookup_tokens(jnp.zeros((1, 30, 2)), (6, 6), (2, 2)),
            "30 tokens", "(6, 6)", "36")
    _raises(ValueError, lambda: lookup.init_lookup_tokens(jnp.zeros((1, 36, 2)), (6, 6), (7, 2)),
            "m_hw=(7, 2)", "grid_hw=(6, 6)")
    _raises(TypeError, lambda: lookup.init_lookup_tokens(jnp.zeros((1, 36, 2)), (6, 6), 4),
            "m_hw", "pair")
    _raises(ValueError, lambda: lookup.lookup_grid(10), "m=10", "perfect square")
    plan = lookup.compress(x3, l3)[1]
    _raises(ValueError, lambda: plan.apply(jnp.zeros((2, 6, 4))), "x", "6 tokens", "5")
    _raises(ValueError, lambda: plan.unapply(jnp.zeros((2, 4, 4))), "y", "4 tokens", "3")
    _raises(ValueError, lambda: plan.matrix(jnp.ones((2, 4))), "size", "(2, 5)", "(2, 4)")
    pplan = lookup.LookupPlan(weights=plan.weights, prefix=2)
    _raises(ValueError, lambda: pplan.apply(x3), "x", "5 tokens", "7")
    _raises(ValueError, lambda: pplan.invert(jnp.zeros((2, 3, 4))), "y", "3 tokens", "5")
    _raises(ValueError, lambda: pplan.invert(jnp.zeros((2,))), "y", "rank >= 2")
    _raises(TypeError, lambda: lookup.LookupViTBlock(8, 2, infuse=1, rngs=rngs), "infuse")


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

def _xla_flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return cost["flops"]


@pytest.mark.parametrize("infuse", [True, False])
def test_lookup_block_flops_matches_xla(infuse):
    b, n, m, c, heads = 2, 196, 49, 192, 3  # DeiT-Ti width; XLA also counts the elementwise ops
    blk = nnx.eval_shape(lambda: lookup.LookupViTBlock(c, heads, mlp_ratio=4.0, hr_mlp_ratio=1.0,
                                                         infuse=infuse, rngs=nnx.Rngs(0)))
    f, state = _functional(blk)  # abstract state: ShapeDtypeStructs
    xla_flops = _xla_flops(f, state, jax.ShapeDtypeStruct((b, m, c), jnp.float32),
                           jax.ShapeDtypeStruct((b, n, c), jnp.float32))
    ours = lookup.lookup_block_flops(n, m, c, 4.0, 1.0, infuse=infuse, batch=b)
    assert abs(ours - xla_flops) / xla_flops < 0.10, (ours, xla_flops)
    assert lookup.lookup_block_flops(n, m, c, 4.0, 1.0, infuse=infuse) * b == ours


@pytest.mark.parametrize("feature_hidden_dim", [None, 192])
def test_token_learner_flops_matches_xla(feature_hidden_dim):
    b, n, m, c = 2, 196, 8, 192
    tl = nnx.eval_shape(lambda: lookup.TokenLearner(c, m, hidden_dim=64,
                                                    feature_hidden_dim=feature_hidden_dim,
                                                    rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(tl)
    xla_flops = _xla_flops(lambda s, x: nnx.merge(graphdef, s)(x)[0], state,
                           jax.ShapeDtypeStruct((b, n, c), jnp.float32))
    ours = lookup.token_learner_flops(n, c, m, 64, feature_hidden_dim=feature_hidden_dim,
                                      batch=b)
    assert abs(ours - xla_flops) / xla_flops < 0.10, (ours, xla_flops)
