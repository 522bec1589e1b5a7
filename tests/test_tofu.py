"""ToFu (Token Fusion, Kim et al. WACV 2024). There is no official code and no golden file: the
primitives are checked against a plain NumPy transcription of the paper's equations written
here (ToMe's bipartite matching, the prune branch, MLERP), then the reducer in a small ViT under
jit / grad / vmap, without retracing, and its budget errors."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import reducers
from jax_tokens import tokens as tk
from jax_tokens.models import VisionTransformer, ViTConfig
from jax_tokens.reducers import tofu

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")


# ----------------------------------------------------------------------------------------------
# The paper's equations in NumPy (one example at a time, loops, float64)
# ----------------------------------------------------------------------------------------------

def np_match(metric, r, cls, dist):
    """ToMe's matching: A = even, B = odd positions; cosine scores; class token (A row 0) and
    distillation token (B column 0) protected; the r best A tokens are sources."""
    m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    scores = m[0::2] @ m[1::2].T
    if cls:
        scores[0, :] = -np.inf
    if dist:
        scores[:, 0] = -np.inf
    node_max, node_idx = scores.max(1), scores.argmax(1)
    order = np.argsort(-node_max, kind="stable")
    src, unm = order[:r], order[r:]
    if cls:
        unm = np.sort(unm)
    return unm, src, node_idx[src]


def np_arrange(unm_rows, b_rows, dist):
    if dist:
        return unm_rows[:1] + b_rows[:1] + unm_rows[1:] + b_rows[1:]
    return unm_rows + b_rows


def np_tofu(metric, x, size, r, cls, dist, mode, norm):
    """-> (x_out, size_out, assignment) for one example, from the paper's definitions."""
    unm, src, dst = np_match(metric, r, cls, dist)
    pos_a, pos_b = np.arange(len(x))[0::2], np.arange(len(x))[1::2]
    # Output slots, and the input positions of each slot's members.
    groups = np_arrange([[pos_a[i]] for i in unm],
                        [[pos_b[j]] + [pos_a[i] for i, d in zip(src, dst) if d == j]
                         for j in range(len(pos_b))], dist)
    assign = np.full(len(x), -1)
    out_x, out_s = [], []
    for slot, members in enumerate(groups):
        if mode == "prune":        # sources are dropped; the destination is unchanged
            members = members[:1]
        assign[members] = slot
        w = size[members, 0]
        lerp = (w[:, None] * x[members]).sum(0) / w.sum()
        if len(members) > 1:       # MLERP: the LERP rescaled to the members' max norm
            norms = np.linalg.norm(x[members], axis=-1)
            target = norms.max() if norm == "max" else (w * norms).sum() / w.sum()
            lerp = lerp / np.linalg.norm(lerp) * target
        out_x.append(lerp)
        out_s.append([w.sum()])
    return np.array(out_x), np.array(out_s), assign


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _fuse(metric, x, size, r, mode, norm, cls, dist):
    plan = tofu.tofu_matching(metric, r, mode=mode, norm=norm, class_token=cls,
                              distill_token=dist)
    return tofu.fuse(plan, x, size) + (plan.assignment,)


CASES = [  # (tokens, class token, distillation token, r, MLERP norm)
    (17, True, False, 5, "max"),
    (17, True, False, 8, "wmean"),
    (16, False, False, 8, "max"),
    (18, True, True, 6, "max"),
]


@pytest.mark.parametrize("n,cls,dist,r,norm", CASES)
def test_primitives_match_the_papers_equations(n, cls, dist, r, norm):
    rng = np.random.default_rng(n + r)
    b, c = 2, 6
    metric = rng.normal(size=(b, n, 4)).astype(np.float32)
    x = rng.normal(size=(b, n, c)).astype(np.float32) * rng.uniform(0.5, 3, (b, n, 1))
    size = rng.integers(1, 5, (b, n, 1)).astype(np.float32)
    for mode in tofu.MODES:
        y, s, assign = _fuse(metric, x, size, r, mode, norm, cls, dist)
        assert y.shape == (b, n - r, c) and s.shape == (b, n - r, 1)
        many = False
        for i in range(b):
            ey, es, ea = np_tofu(metric[i].astype(np.float64), x[i].astype(np.float64),
                                 size[i].astype(np.float64), r, cls, dist, mode, norm)
            np.testing.assert_array_equal(np.asarray(assign[i]), ea)
            np.testing.assert_allclose(np.asarray(y[i]), ey, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(s[i]), es, rtol=1e-6)
            many |= np.bincount(ea[ea >= 0]).max() > 2
        if mode == "mlerp" and r == (n - int(cls) - int(dist)) // 2:
            assert many  # a destination with several sources: the multi-token MLERP ran


def test_mlerp_of_two_tokens_is_the_papers_formula():
    # x1 = (1, 0), x2 = (0, 2): LERP (0.5, 1) has norm sqrt(1.25); MLERP scales it to norm 2.
    x = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)
    ones = np.ones((1, 2, 1), np.float32)
    y, s, _ = _fuse(x, x, ones, 1, "mlerp", "max", False, False)
    np.testing.assert_allclose(np.asarray(y)[0, 0], np.array([0.5, 1.0]) * 2 / np.sqrt(1.25),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s), [[[2.0]]])
    y, _, _ = _fuse(x, x, ones, 1, "mlerp", "wmean", False, False)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y)[0, 0]), 1.5, rtol=1e-6)
    y, s, a = _fuse(x, x, ones, 1, "prune", "max", False, False)
    np.testing.assert_array_equal(np.asarray(y), [[[0.0, 2.0]]])
    np.testing.assert_array_equal(np.asarray(a), [[-1, 0]])
    np.testing.assert_array_equal(np.asarray(s), [[[1.0]]])


def test_plan_linear_part_and_rescale_hook():
    """reduce == plan.rescale(plan.matrix(size) @ x): the linear part is the dense oracle; the
    norm step is separate. apply/matrix/invert follow the plan protocol."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 13, 5)), jnp.float32)
    size = jnp.asarray(rng.integers(1, 4, (2, 13, 1)), jnp.float32)
    for mode in tofu.MODES:
        plan = tofu.tofu_matching(x, 6, mode=mode, class_token=True)
        assert isinstance(plan, tk.Plan)
        y, s = tofu.fuse(plan, x, size)
        w = np.asarray(plan.matrix(size))
        lin = jnp.asarray(np.einsum("bmn,bnc->bmc", w, np.asarray(x)))
        np.testing.assert_allclose(np.asarray(plan.rescale(lin, x, size)), np.asarray(y),
                                   rtol=1e-5, atol=1e-6)
        # Directions are those of the linear map; sizes are conserved over kept tokens.
        yn = np.asarray(y) / np.linalg.norm(np.asarray(y), axis=-1, keepdims=True)
        ln = np.asarray(lin) / np.linalg.norm(np.asarray(lin), axis=-1, keepdims=True)
        np.testing.assert_allclose(yn, ln, atol=1e-5)
        a = np.asarray(plan.assignment)
        assert (a == -1).sum() == (12 if mode == "prune" else 0)
        np.testing.assert_allclose(np.asarray(s).sum((1, 2)),
                                   np.where(a >= 0, np.asarray(size)[..., 0], 0).sum(1))
        applied = plan.apply(x)
        np.testing.assert_allclose(np.asarray(applied),
                                   np.einsum("bmn,bnc->bmc", np.asarray(plan.matrix()),
                                             np.asarray(x)), atol=1e-5)
        back = np.asarray(plan.invert(applied))
        keep = a >= 0
        want = np.take_along_axis(np.asarray(applied), np.maximum(a, 0)[..., None], 1)
        np.testing.assert_array_equal(back[keep], want[keep])
        assert (back[~keep] == 0).all()


def test_jit_vmap_grad_no_retrace_and_degenerate_inputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 11, 4)), jnp.float32)
    size = jnp.asarray(rng.integers(1, 3, (2, 11, 1)), jnp.float32)
    # All tokens equal, one of them zero: ties everywhere, a zero norm in a merged group.
    flat = jnp.zeros((2, 11, 4)).at[:, :, 0].set(1.0).at[:, 4].set(0.0)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, size):
        plan = tofu.tofu_matching(x, 4, class_token=True)
        return tofu.fuse(plan, x, size)

    outs = [f(x + i * 0.0, size)[0] for i in range(3)]      # traced once
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[2]))

    def loss(xs):
        ys = jax.vmap(f)(xs, jnp.stack([size, size]))[0]
        return jnp.sum(ys ** 2), ys

    (_, vm), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.stack([x, flat]))
    np.testing.assert_allclose(np.asarray(vm[0]), np.asarray(outs[0]), rtol=1e-6, atol=1e-6)
    assert bool(jnp.isfinite(vm).all()) and bool(jnp.isfinite(g).all())
    assert float(jnp.abs(g[0]).sum()) > 0
    # Prune on the degenerate input; bf16 in, bf16 out (fp32 inside).
    y, _ = tofu.fuse(tofu.tofu_matching(flat, 4, mode="prune", class_token=True), flat)
    assert bool(jnp.isfinite(y).all())
    y, s = tofu.fuse(tofu.tofu_matching(x, 4), x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# The reducer
# ----------------------------------------------------------------------------------------------

def test_reducer_in_a_small_vit():
    red = reducers.get("tofu")(r=2, prune_layers=1)
    assert reducers.from_config(red.to_dict()) == red
    cfg = ViTConfig(**SMALL, reduction=red)
    layout = cfg.layout()
    specs = red.schedule(layout)
    assert [s.mode for s in specs] == ["prune", "mlerp", "mlerp"]
    assert cfg.token_counts() == [17, 15, 13, 11]
    assert red.flops(layout, specs[0]) == 2 * 9 * 8 * 16
    assert red.flops(layout, specs[1]) == 2 * 8 * 7 * 16 + 2 * (15 + 13) * 32
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    graphdef, state = nnx.split(model)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, images):
        def loss(s):
            logits, aux = nnx.merge(graphdef, s)(images)
            return logits.sum(), (logits, aux)
        return jax.value_and_grad(loss, has_aux=True)(state)

    for i in range(2):
        (_, (logits, aux)), grads = step(state, images + i)
    assert logits.shape == (2, 5) and aux["tokens"] == [17, 15, 13, 11]
    assert bool(jnp.isfinite(logits).all())
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert [p.mode for p in aux["plans"]] == ["prune", "mlerp", "mlerp"]
    # The prune block drops 2 tokens with their patches; the merging blocks conserve sizes.
    np.testing.assert_allclose(np.asarray(aux["size"]).sum((1, 2)), [15.0, 15.0])
    assert (np.asarray(aux["plans"][0].assignment) == -1).sum() == 4
    # Warm-up: fraction 0 reduces nothing, 1 is the reducer itself.
    assert cfg.token_counts(red.anneal(layout, 0.0)) == [17] * 4
    assert red.anneal(layout, 1.0) == red
    assert red.anneal(layout, 0.5).prune_layers == 1


def test_bad_budgets_name_the_problem():
    tofu_cls = reducers.get("tofu")
    cfg = lambda **kw: ViTConfig(**SMALL, reduction=tofu_cls(**kw))   # noqa: E731
    with pytest.raises(ValueError, match=r"reduction.r asks block 0 to merge r=9 tokens, but "
                                         r"only 17 tokens enter it"):
        cfg(r=9)
    with pytest.raises(ValueError, match=r"reduction.r asks block 2 to merge r=7"):
        cfg(r=[0, 4, 7])
    with pytest.raises(ValueError, match=r"r has 4 entries but the model has 3 layers"):
        cfg(r=[1, 1, 1, 1])
    assert [s.mode for s in cfg(r=1, prune_layers=4).schedule()] == ["prune"] * 3
    with pytest.raises(ValueError, match=r"reduction.prune_layers=-1 is not allowed"):
        tofu_cls(r=1, prune_layers=-1)
    with pytest.raises(TypeError, match=r"reduction.prune_layers must be an int"):
        tofu_cls(r=1, prune_layers=1.5)
    with pytest.raises(ValueError, match=r"reduction.norm='min' is not one of \('max', "
                                         r"'wmean'\)"):
        tofu_cls(r=1, norm="min")
    with pytest.raises(ValueError, match=r"reduction.r=-1 is not allowed"):
        tofu_cls(r=-1)
    with pytest.raises(ValueError, match=r"mode='merge' is not one of"):
        tofu.tofu_matching(jnp.ones((1, 4, 2)), 1, mode="merge")
    layout = ViTConfig(**SMALL).layout()
    with pytest.raises(TypeError, match=r"needs a block spec from ToFu.schedule"):
        tofu_cls(r=1).reduce(layout, reducers.LayerSpec(17, 16, 1, True), jnp.ones((1, 17, 32)),
                             jnp.ones((1, 17, 1)), {"mean_key": jnp.ones((1, 17, 16))})
    # clamp_r clamps as ToMe does.
    assert cfg(r=9, clamp_r=True).token_counts() == [17, 9, 5, 3]
