"""Property tests (hypothesis) over every registered reducer: random batch, token count, width,
budget (the smallest and largest legal ones included), protected tokens, dtype, token sizes,
and inputs with duplicates and ties. Invariants:

* shapes are the static ones the schedule promised;
* sizes add up to the input tokens' sizes that were not dropped;
* the output is the dense view applied to the input (`plan.matrix(size) @ x`), and
  `plan.apply(x)` is `plan.matrix() @ x`;
* `plan.invert(plan.apply(x))` gives every kept token (its slot's only member) back exactly;
* no NaN or Inf; `jax.jit` equals eager; the gradient is finite.

A hypothesis case is a configuration (layout, reducer and budget, batch, dtype: everything
static under jit) and `INPUT_DRAWS` inputs drawn for it (seed, ties, token sizes). The
configuration compiles one program holding every jitted check, and each input runs through it
and is checked on its own: compiling costs seconds on XLA:CPU, running a tiny input
milliseconds. CI runs a fast profile (4 configurations per reducer, 2 inputs each, each also
run eagerly). `python benchmarks/properties.py --examples N` runs N configurations per reducer
(the "long" profile: 8 inputs each, token counts and widths from buckets so programs are
reused, the eager comparison on one configuration in ten; its count and result are in
BENCHMARKS.md); `JAX_TOKENS_HYPOTHESIS=long` (with `JAX_TOKENS_HYPOTHESIS_EXAMPLES` and
`JAX_TOKENS_HYPOTHESIS_INPUTS`) selects it here too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st

from conftest import INPUT_DRAWS, PROPERTY_PROFILE as PROFILE, log_property_case
from jax_tokens import reducers
from jax_tokens.attention import attention
from jax_tokens.reducers import pitome as _pitome


# The long profile draws token counts and head widths from buckets (odd and even, the smallest
# legal ones included) so that its thousands of cases reuse compiled programs; the CI profile
# draws any count in [3, 40] and any head width in [1, 8].
TOKEN_BUCKETS = (3, 4, 5, 7, 8, 12, 17, 24, 40)
HEAD_DIM_BUCKETS = (1, 3, 8)


@st.composite
def layouts(draw, min_tokens=3):
    """A one-block model: tokens, prefix tokens (class / distillation / registers), width."""
    class_token = draw(st.booleans())
    prefix = int(class_token) + draw(st.integers(0, 2))
    low = max(min_tokens, prefix + 3)
    heads = draw(st.sampled_from([1, 2]))
    if PROFILE == "long":
        n = draw(st.sampled_from([t for t in TOKEN_BUCKETS if t >= low]))
        dim = heads * draw(st.sampled_from(HEAD_DIM_BUCKETS))
    else:
        n = draw(st.integers(low, 40))
        dim = heads * draw(st.integers(1, 8))
    return reducers.TokenLayout(depth=1, num_tokens=n, num_prefix_tokens=prefix,
                                class_token=class_token,
                                distill_token=class_token and prefix >= 2,
                                embed_dim=dim, num_heads=heads, num_classes=3)


def _prunable(layout):
    return layout.num_tokens - layout.num_prefix_tokens


def _keep_rate(k: int, m: int) -> float:
    """A rate whose ceil(rate * m) is exactly k."""
    return (k - 0.5) / m


# method -> strategy of reducers for a layout. A registered reducer without an entry fails
# test_every_registered_reducer_has_a_strategy: new methods add theirs here.
STRATEGIES = {
    "none": lambda lay: st.just(reducers.get("none")()),
    "tome": lambda lay: st.builds(
        reducers.get("tome"),
        r=st.integers(0, (lay.num_tokens - int(lay.class_token) - int(lay.distill_token)) // 2),
        prop_attn=st.booleans()),
    "topk": lambda lay: st.builds(
        lambda k, **kw: reducers.get("topk")(keep_rate=_keep_rate(k, _prunable(lay)),
                                             layers=(0,), **kw),
        k=st.integers(1, _prunable(lay)),
        score=st.sampled_from(["cls_attn", "key_mass", "l2_norm", "random"]),
        order=st.sampled_from(["score", "position"]), fuse=st.booleans()),
    "evit": lambda lay: st.builds(
        lambda k, fuse: reducers.get("evit")(keep_rate=_keep_rate(k, _prunable(lay)),
                                             layers=(0,), fuse=fuse),
        k=st.integers(1, _prunable(lay)), fuse=st.booleans()),
    "tofu": lambda lay: st.builds(
        reducers.get("tofu"),
        r=st.integers(0, (lay.num_tokens - int(lay.class_token) - int(lay.distill_token)) // 2),
        prune_layers=st.integers(0, 1), norm=st.sampled_from(["max", "wmean"]),
        prop_attn=st.booleans()),
    "diffrate": lambda lay: st.integers(lay.num_prefix_tokens + 1, lay.num_tokens).flatmap(
        lambda p: st.builds(
            lambda m, **kw: reducers.get("diffrate")(prune_kept=(p,), merge_kept=(m,),
                                                     size_update="sum", **kw),
            m=st.integers(lay.num_prefix_tokens + 1, p),
            score=st.sampled_from(["cls_attn", "key_mass"] if lay.class_token else ["key_mass"]),
            prop_attn=st.booleans())),
    "ppt": lambda lay: st.builds(
        lambda r, **kw: reducers.get("ppt")(r=r, layers=(0,), **kw),
        r=st.integers(0, (lay.num_tokens - int(lay.class_token) - int(lay.distill_token)) // 2),
        threshold=st.sampled_from([0.0, 1e-3, float("inf")]), prop_attn=st.booleans(),
        score=st.sampled_from(["cls_attn", "key_mass"] if lay.class_token else ["key_mass"])),
    "atc": lambda lay: st.builds(
        lambda k, **kw: reducers.get("atc")(layers=(0,), num_clusters=k, **kw),
        k=st.integers(1, lay.num_tokens - int(lay.class_token) - int(lay.distill_token)),
        linkage=st.sampled_from(["single", "complete", "average"]),
        prop_attn=st.booleans(), order=st.sampled_from(["reference", "appearance"])),
    "pitome": lambda lay: st.sampled_from(_pitome.VARIANTS).flatmap(lambda v: st.builds(
        reducers.get("pitome"), variant=st.just(v),
        r=st.integers(0, _pitome.max_r(v, lay.num_tokens, lay.num_prefix_tokens)),
        margin=st.floats(0.0, 1.0), alpha=st.sampled_from([0.5, 1.0]),
        prop_attn=st.booleans())),
    "kmedoids": lambda lay: st.builds(
        lambda c, **kw: reducers.get("kmedoids")(layers=(0,), num_clusters=(c,), **kw),
        c=st.integers(1, _prunable(lay)), iterations=st.integers(0, 3),
        equal_weight=st.booleans(),
        init_index=st.one_of(st.none(), st.integers(0, _prunable(lay) - 1))),
    "dpcknn": lambda lay: st.builds(
        lambda c, **kw: reducers.get("dpcknn")(layers=(0,), num_clusters=(c,), **kw),
        c=st.integers(1, _prunable(lay)), k=st.integers(1, _prunable(lay)),
        equal_weight=st.booleans(), noise=st.booleans()),
    "mctf": lambda lay: st.builds(
        reducers.get("mctf"),
        r=st.integers(0, (lay.num_tokens - int(lay.class_token) - int(lay.distill_token)) // 2),
        bidirection=st.booleans(), one_step_ahead=st.sampled_from([0, 1, 2]),
        pooling=st.sampled_from([0, 1, 3]), tau_sim=st.sampled_from([0.0, 1.0, 2.0]),
        tau_info=st.sampled_from([0.0, 20.0]), tau_size=st.sampled_from([0.0, 40.0])),
    "token_learner": lambda lay: st.builds(
        lambda m: reducers.get("token_learner")(layers=(0,), num_tokens=m),
        m=st.integers(1, _prunable(lay) - 1)),
    # ATS scores by the class token's attention: without one it cannot run (inactive here).
    "ats": lambda lay: st.builds(
        lambda k, **kw: reducers.get("ats")(layers=(0,) if lay.class_token else (),
                                            num_tokens=k, **kw),
        k=st.one_of(st.integers(2, _prunable(lay)), st.sampled_from([1.0, 0.5])),
        drop_tokens=st.booleans()),
    "fastervlm": lambda lay: st.builds(
        lambda **kw: reducers.get("fastervlm")(layers=(0,), **kw),
        keep=st.integers(1, _prunable(lay)), place=st.sampled_from(["after", "mid"])),
    "divprune": lambda lay: st.builds(
        lambda **kw: reducers.get("divprune")(layers=(0,), **kw),
        keep=st.integers(1, _prunable(lay))),
    "visionzip": lambda lay: st.integers(1, _prunable(lay)).flatmap(lambda k: st.builds(
        lambda **kw: reducers.get("visionzip")(layers=(0,), keep=k, **kw),
        contextual=st.one_of(st.none(), st.integers(0, k)),
        place=st.sampled_from(["after", "mid"]))),
    "prumerge": lambda lay: st.builds(
        lambda **kw: reducers.get("prumerge")(layers=(0,), **kw),
        keep=st.integers(1, _prunable(lay)), adaptive=st.booleans(),
        neighbors=st.integers(0, _prunable(lay) - 1),
        scope=st.sampled_from(["batch", "image"]), prop_attn=st.booleans()),
    "dynamicvit": lambda lay: st.builds(
        lambda k: reducers.get("dynamicvit")(layers=(0,), keep_ratio=(k + 0.5) / _prunable(lay)),
        k=st.integers(1, _prunable(lay) - 1)),
    "cropr": lambda lay: st.builds(
        lambda rate, **kw: reducers.get("cropr")(layers=(0,), llf=False, rate=rate - 1, **kw),
        rate=st.integers(2, _prunable(lay) - 1), num_queries=st.integers(1, 2),
        pre_attn_norm=st.booleans(), k_proj=st.booleans(),
        num_heads=st.sampled_from([1, lay.num_heads])),
}


# Reducers whose merges are size-weighted whatever prop_attn says: the dense view is
# `plan.matrix(size)` for them.
SIZE_WEIGHTED = {"tome", "tofu", "ppt", "pitome"}


def test_every_registered_reducer_has_a_strategy():
    """Every reducer the library registers (test files may register their own)."""
    library = {n for n in reducers.names() if reducers.get(n).__module__.startswith("jax_tokens.")}
    assert set(STRATEGIES) == library


@st.composite
def cases(draw, method):
    layout = draw(layouts())
    red = draw(STRATEGIES[method](layout))
    spec = red.schedule(layout)[0]
    b = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    inputs = draw(st.lists(st.tuples(st.integers(0, 2 ** 16),                   # seed
                                     st.sampled_from(["none", "duplicate_tokens", "constant"]),
                                     st.booleans()),                            # integer sizes
                           min_size=INPUT_DRAWS, max_size=INPUT_DRAWS))
    return layout, red, spec, b, dtype, tuple(inputs)


def _inputs(layout, b, dtype, seed, ties, integer_sizes):
    """NumPy-drawn inputs (drawing them with jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    n, c = layout.num_tokens, layout.embed_dim
    x = rng.normal(size=(b, n, c)).astype(np.float32)
    if ties == "duplicate_tokens":       # every token repeated: equal similarities and scores
        x = np.repeat(x[:, : (n + 1) // 2], 2, axis=1)[:, :n]
    elif ties == "constant":             # all tokens equal
        x = np.broadcast_to(x[:, :1], x.shape)
    size = (rng.integers(1, 5, size=(b, n, 1)).astype(np.float32) if integer_sizes
            else np.ones((b, n, 1), np.float32))
    qk = rng.normal(size=(b, n, layout.num_heads, layout.head_dim)).astype(np.float32)
    return (jnp.asarray(x, dtype), jnp.asarray(size), jnp.asarray(qk, dtype))


@functools.partial(jax.jit, static_argnames=("names",))
def _attention_stats(qk, v, names):
    return attention(qk, qk, v, stats=names, impl="xla")[1]


def _stats(layout, red, spec, x, qk):
    """The attention statistics the reducer asks for (the XLA oracle; one compile per shape)."""
    v = x.reshape(x.shape[:2] + (layout.num_heads, -1))
    return _attention_stats(qk, v, tuple(red.stats(layout, spec)))


def _reduce(red, layout, spec, x, size, stats, key, module=None):
    return red.reduce(layout, spec, x, size, stats, key=key, module=module)


def _outputs(method, red, layout, spec, x, size, stats, key, module=None):
    """Everything the invariants look at, as one program: the reduction, the dense view
    applied to the input, plan.apply / plan.matrix / plan.invert, and the gradient of the
    output's sum of squares with respect to the input."""
    y, new_size, plan = _reduce(red, layout, spec, x, size, stats, key, module)
    xf = x.astype(jnp.float32)
    w = plan.matrix(size if red.proportional_attention or method in SIZE_WEIGHTED else None)
    expected = jnp.einsum("bmn,bnc->bmc", w, xf, precision="highest")
    if hasattr(plan, "rescale"):   # ToFu's MLERP: a norm rescaling on top of the linear map
        expected = plan.rescale(expected, xf, size)
    applied = plan.apply(xf)
    w1 = plan.matrix()
    grad = jax.grad(lambda x_: jnp.sum(_reduce(red, layout, spec, x_, size, stats, key, module)[0]
                                       .astype(jnp.float32) ** 2))(xf)
    return dict(y=y, size=new_size, plan=plan, expected=expected, applied=applied, w1=w1,
                applied_dense=jnp.einsum("bmn,bnc->bmc", w1, xf, precision="highest"),
                back=plan.invert(applied), grad=grad)


# Reducers and layouts are frozen dataclasses: hashable static arguments, so a case whose
# reducer, layout and shapes were seen before reuses the compiled program (the long profile
# draws shapes from buckets to make that common). A learned reducer's module (a fresh one per
# case) is closed over instead.
_outputs_jit = jax.jit(_outputs, static_argnames=("method", "red", "layout", "spec"))

# The CI profile runs every configuration eagerly too; the long profile one configuration in
# EAGER_EVERY (eager dispatch compiles each operation for each new shape: most of the cost).
EAGER_EVERY = 1 if PROFILE == "ci" else 10


def _check(method, case):
    """One configuration: its program compiled once, every drawn input checked through it."""
    layout, red, spec, b, dtype, inputs = case
    log_property_case(method, len(inputs) if spec.active else 0)
    if not spec.active:
        assert spec.n_out == spec.n_in == layout.num_tokens
        return
    seed0 = inputs[0][0]
    module = red.make_module(layout, spec, rngs=nnx.Rngs(seed0)) if red.learned else None
    if module is None:
        program = functools.partial(_outputs_jit, method, red, layout, spec)
    else:
        program = jax.jit(lambda *a: _outputs(method, red, layout, spec, *a, module))
    eager = seed0 % EAGER_EVERY == 0
    for seed, ties, integer_sizes in inputs:
        x, size, qk = _inputs(layout, b, dtype, seed, ties, integer_sizes)
        args = (x, size, _stats(layout, red, spec, x, qk), jax.random.key(seed + 1))
        _check_input(method, layout, red, spec, b, dtype, args, program(*args),
                     module if eager else False)


def _check_input(method, layout, red, spec, b, dtype, args, out, module):
    """The invariants on one input `args` = (x, size, stats, key) given the program's outputs;
    the eager comparison too unless `module` is False."""
    x, size = args[:2]
    y_dtype = out["y"].dtype
    out = {k: (v if k == "plan" else np.asarray(v.astype(jnp.float32))) for k, v in out.items()}
    y, new_size, plan = out["y"], out["size"], out["plan"]
    c = layout.embed_dim
    # Static shapes as promised.
    assert y.shape == (b, spec.n_out, c) and y_dtype == x.dtype
    assert new_size.shape == (b, spec.n_out, 1)
    assert (plan.n_in, plan.n_out) == (spec.n_in, spec.n_out)
    a = np.asarray(plan.assignment)
    assert a.shape == (b, spec.n_in) and a.min() >= -1 and a.max() < spec.n_out
    # Finite everywhere.
    assert np.isfinite(y).all() and np.isfinite(new_size).all()
    # Sizes add up to the sizes of the tokens that were not dropped.
    kept_size = np.where(a[..., None] >= 0, np.asarray(size), 0.0).sum((1, 2))
    np.testing.assert_allclose(new_size.sum((1, 2)), kept_size, rtol=1e-5)
    # The output is the dense view applied to the input.
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=5e-2, rtol=5e-2)
    np.testing.assert_allclose(y, out["expected"], **tol)
    np.testing.assert_allclose(out["applied"], out["applied_dense"], atol=2e-5, rtol=1e-5)
    # Inverting gives every kept token (alone in its slot, weight 1) back exactly.
    xf, w1 = np.asarray(x.astype(jnp.float32)), out["w1"]
    own = np.take_along_axis(w1, np.maximum(a, 0)[:, None, :], axis=1)[:, 0]   # W[b, a[n], n]
    # (alone: VisionZip's contextual tokens and PruMerge's kept tokens carry weight 1 too, but
    # share their slot with the tokens merged into them)
    alone = np.take_along_axis((w1 != 0).sum(axis=2) == 1, np.maximum(a, 0), axis=1)
    kept = (a >= 0) & (own == 1.0) & alone
    np.testing.assert_array_equal(out["back"][kept], xf[kept])
    # A finite gradient.
    assert np.isfinite(out["grad"]).all()
    # jit == eager.
    if module is not False:
        ye, se, pe = _reduce(red, layout, spec, *args, module)
        np.testing.assert_allclose(np.asarray(ye.astype(jnp.float32)), y, **tol)
        np.testing.assert_allclose(np.asarray(se), new_size, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(pe.assignment), a)


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_reducer_properties(method):
    given(case=cases(method))(lambda case: _check(method, case))()


@pytest.mark.parametrize("method", ["tome", "topk", "evit", "token_learner", "tofu", "diffrate",
                                    "ppt", "atc", "pitome", "mctf"])
def test_smallest_and_largest_budgets(method):
    """The extreme legal budgets, explicitly (hypothesis may or may not draw them)."""
    layout = reducers.TokenLayout(depth=1, num_tokens=11, num_prefix_tokens=1,
                                  class_token=True, embed_dim=4, num_heads=1)
    m = _prunable(layout)
    budgets = {"tome": [dict(r=0), dict(r=5)],
               "topk": [dict(keep_rate=_keep_rate(1, m), layers=(0,)),
                        dict(keep_rate=_keep_rate(m - 1, m), layers=(0,), fuse=True)],
               "evit": [dict(keep_rate=_keep_rate(1, m), layers=(0,)),
                        dict(keep_rate=1.0, layers=(0,))],
               "token_learner": [dict(layers=(0,), num_tokens=1),
                                 dict(layers=(0,), num_tokens=m - 1)],
               "tofu": [dict(r=0), dict(r=5, prune_layers=0), dict(r=5, prune_layers=1)],
               "diffrate": [dict(prune_kept=(2,), merge_kept=(2,), size_update="sum"),
                            dict(prune_kept=(11,), merge_kept=(10,), size_update="sum")],
               "ppt": [dict(r=1, layers=(0,), threshold=0.0),
                       dict(r=5, layers=(0,), threshold=float("inf"))],
               "atc": [dict(layers=(0,), num_clusters=1, linkage="single"),
                       dict(layers=(0,), num_clusters=m - 1, prop_attn=False)],
               "pitome": [dict(r=1, variant="pitome_bsm"), dict(r=5, variant="pitome"),
                          dict(r=5, variant="pitome_bsm"), dict(r=5, variant="bsm")],
               "mctf": [dict(r=0), dict(r=5, pooling=0), dict(r=5, bidirection=False)]}[method]
    for kw in budgets:
        red = reducers.get(method)(**kw)
        spec = red.schedule(layout)[0]
        _check(method, (layout, red, spec, 2, jnp.float32, ((0, "duplicate_tokens", True),)))
