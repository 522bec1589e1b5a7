"""The reducer protocol and registry: every registered reducer answers the protocol, plans obey
one contract, and a reducer defined in this file (learned, with no edit anywhere else) trains,
checkpoints, resumes exactly and evaluates through train.py's code path."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_tokens import data as data_lib
from jax_tokens import reducers
from jax_tokens import tokens as tk
from jax_tokens.attention import STATS
from jax_tokens import train as trainer
from jax_tokens.models import VisionTransformer, ViTConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = str(ROOT / "configs" / "fashion_mnist_vit.py")


# ----------------------------------------------------------------------------------------------
# A reducer that lives only in this test file
# ----------------------------------------------------------------------------------------------

class PairGate(nnx.Module):
    """A learned per-channel gate applied to the pooled pairs (so the reducer has parameters)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(jnp.ones((dim,)))


@reducers.register
@dataclasses.dataclass(frozen=True)
class PairPool(reducers.Reducer):
    """At block `layer`, averages adjacent pairs of patch tokens (prefix tokens stay), then
    multiplies them by a learned per-channel gate. N patches -> ceil(N / 2)."""

    method: ClassVar[str] = "pair_pool_test"
    learned: ClassVar[bool] = True
    layer: int = 0

    def schedule(self, layout):
        reducers.check_layers((self.layer,), layout)
        p, n = layout.num_prefix_tokens, layout.num_tokens
        out = p + (n - p + 1) // 2
        return tuple(reducers.LayerSpec(n if l <= self.layer else out,
                                        out if l >= self.layer else n, out - p,
                                        active=l == self.layer)
                     for l in range(layout.depth))

    def make_module(self, layout, spec, *, dtype=None, rngs=None):
        return PairGate(layout.embed_dim, rngs=rngs)

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        p, n = layout.num_prefix_tokens, spec.n_in
        slot = np.concatenate([np.arange(p), p + (np.arange(n - p) // 2)]).astype(np.int32)
        assignment = jnp.broadcast_to(jnp.asarray(slot), x.shape[:2])
        w = tk.assignment_matrix(assignment, spec.n_out)              # [B, M, N]
        new_size = jnp.einsum("bmn,bnc->bmc", w, size)
        y = jnp.einsum("bmn,bnc->bmc", w, x * size) / new_size
        gate = jnp.concatenate([jnp.ones((p, x.shape[-1])),
                                jnp.broadcast_to(module.scale[...], (spec.n_out - p,
                                                                     x.shape[-1]))])
        return y * gate, new_size, _Plan(assignment=assignment, n_in=n, n_out=spec.n_out)


@dataclasses.dataclass(frozen=True)
class _Plan:
    assignment: jax.Array
    n_in: int
    n_out: int


jax.tree_util.register_dataclass(_Plan, data_fields=["assignment"],
                                 meta_fields=["n_in", "n_out"])


TINY = {
    "model.patch_size": 7, "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2,
    "model.mlp_ratio": 2.0, "train.batch_size": 32, "train.total_steps": 12,
    "train.lr": 3e-3, "train.warmup_steps": 2, "train.log_every": 4, "train.progress": False,
    "data.num_threads": 1, "eval.batch_size": 128, "checkpoint.every_steps": 6,
    "checkpoint.keep": 3, "model.reduction.method": "pair_pool_test",
    "model.reduction.layer": 0,
}


def test_a_reducer_defined_here_trains_resumes_and_evaluates(tmp_path):
    assert "pair_pool_test" in reducers.names()
    data_dir = str(tmp_path / "data")
    data_lib.prepare("fashion_mnist", data_dir, max_examples_per_split=256)
    config = trainer.load_config(BASE_CONFIG, {**TINY, "data.data_dir": data_dir})
    cfg = trainer.model_config(config)
    assert cfg.token_counts() == [17, 9, 9]

    workdir = str(tmp_path / "run")
    logs = []
    result = trainer.train(config, workdir, log=logs.append)
    assert result["step"] == 12 and result["top1"] is not None
    assert any("reduction pair_pool_test; tokens per block [17, 9, 9]" in line
               for line in logs), logs
    # The gate is a parameter of the block that owns the reducer, and it was trained.
    cfg_e, graphdef, params, rest = trainer.load_export(os.path.join(workdir, "export"))
    assert cfg_e == trainer.model_config(config, in_chans=1, num_classes=10)
    gate = np.asarray(params["blocks"][0]["reducer"]["scale"][...])
    assert gate.shape == (32,) and not np.allclose(gate, 1.0)
    assert "reducer" not in params["blocks"][1]

    # Interrupted after step 6: drop the last checkpoint and the outputs, rerun, and land on
    # exactly the same parameters.
    ckpts = os.path.join(workdir, "checkpoints")
    assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [6, 12]
    shutil.rmtree(os.path.join(ckpts, "12"))
    shutil.rmtree(os.path.join(workdir, "export"))
    resumed = trainer.train(config, workdir, log=lambda s: None)
    assert resumed["resumed_from"] == 6 and resumed["step"] == 12
    _, _, params2, _ = trainer.load_export(os.path.join(workdir, "export"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["top1"] == pytest.approx(result["top1"], abs=1e-9)

    # Evaluated from the export like eval.py does.
    mesh, rules = trainer.make_mesh_and_rules(config)
    loader = trainer.make_eval_loader(config, data_dir)
    step = jax.jit(trainer.make_eval_step(graphdef))
    acc = trainer.evaluate(step, params2, rest, loader, mesh, rules)
    assert acc["top1"] == pytest.approx(result["top1"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Every registered reducer
# ----------------------------------------------------------------------------------------------

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
             attn_impl="xla")
EXAMPLES = {
    "none": {},
    "tome": dict(r=3),
    "topk": dict(keep_rate=0.5, layers=(1,), score="key_mass", fuse=True),
    "evit": dict(keep_rate=0.5, layers=(1,)),
    "token_learner": dict(layers=(1,), num_tokens=4),
    "tofu": dict(r=2, prune_layers=1),
    "diffrate": dict(prune_kept=(17, 13, 9), merge_kept=(15, 11, 6)),
    "ppt": dict(r=(4, 3), layers=(0, 2), threshold=2e-3),
    "atc": dict(layers=(1,), num_clusters=8, linkage="complete"),
    "pitome": dict(ratio=0.75),
    "kmedoids": dict(layers=(1,), keep_rate=0.5),
    "dpcknn": dict(layers=(1,), keep_rate=0.5, k=3),
    "mctf": dict(r=3),
    "dynamicvit": dict(layers=(1, 2), keep_ratio=(0.5, 0.25)),
    "cropr": dict(rate=3),
    "ats": dict(layers=(1,), num_tokens=8),
    "fastervlm": dict(keep=8, layers=(1,)),
    "visionzip": dict(keep=8, layers=(1,)),
    "divprune": dict(keep=8, layers=(1,)),
    "prumerge": dict(keep=8, layers=(1,), neighbors=4),
}


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_every_registered_reducer_answers_the_protocol(method):
    red = reducers.get(method)(**EXAMPLES[method])
    assert reducers.from_config(red.to_dict()) == red          # the config round trip
    assert hash(red) == hash(reducers.from_config(red.to_dict()))   # a static jit argument
    cfg = ViTConfig(**SMALL, reduction=red)
    layout = cfg.layout()
    specs = red.schedule(layout)
    assert len(specs) == layout.depth and specs[0].n_in == layout.num_tokens
    rejoin = red.rejoin_block(layout)
    for l, (a, b) in enumerate(zip(specs, specs[1:]), start=1):
        if l == rejoin:                                          # set-aside tokens return
            assert b.n_in == layout.num_tokens
        else:
            assert b.n_in == a.n_out                             # counts chain
    for s in specs:
        assert s.active or s.n_out == s.n_in
        if s.active:
            assert set(red.stats(layout, s)) <= set(STATS)
            assert red.flops(layout, s) >= 0
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    logits, aux = jax.jit(lambda m, x: m(x, key=jax.random.key(1)))(model, x)
    assert logits.shape == (2, 5)
    assert aux["tokens"] == cfg.token_counts()
    assert len(aux["plans"]) == sum(s.active for s in specs)
    for plan, spec in zip(aux["plans"], [s for s in specs if s.active]):
        assert (plan.n_in, plan.n_out) == (spec.n_in, spec.n_out)
        a = np.asarray(plan.assignment)
        assert a.shape == (2, spec.n_in) and a.min() >= -1 and a.max() < spec.n_out
    if method != "none":                                           # a warm-up, or a clear no
        try:
            start = red.anneal(layout, 0.0)
        except NotImplementedError as e:
            assert method in str(e)
        else:
            assert cfg.token_counts(start) == [layout.num_tokens] * (layout.depth + 1)
            assert red.anneal(layout, 1.0) == red


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_every_reducer_gives_the_same_result_on_padded_tokens(method):
    """token_multiple=8 (17 tokens carried in 24 rows, the padding masked): the same logits,
    tokens, sizes and plans as the unpadded model, for the evaluation and the training
    reducer; `trace_source` (patch -> token) unchanged."""
    red = reducers.get(method)(**EXAMPLES[method])
    cfg = ViTConfig(**SMALL, reduction=red, trace_source=red.rejoin_block(
        ViTConfig(**SMALL).layout()) is None)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    padded = VisionTransformer(cfg.replace(token_multiple=8), rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

    @jax.jit
    def run(model, padded, images):
        out = {}
        for name, r in (("eval", red), ("train", red.training())):
            for which, m in (("plain", model), ("padded", padded)):
                logits, aux = m(images, key=jax.random.key(1), reduction=r)
                aux = {k: v for k, v in aux.items() if k != "tokens"}
                out[name, which] = (logits, aux)
        return out

    out = run(model, padded, images)
    for name in ("eval", "train"):
        (want, want_aux), (got, got_aux) = out[name, "plain"], out[name, "padded"]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got_aux["size"]), np.asarray(want_aux["size"]),
                                   atol=1e-5)
        assert got_aux["last_hidden_state"].shape == want_aux["last_hidden_state"].shape
        for a, b in zip(jax.tree.leaves(got_aux["plans"]), jax.tree.leaves(want_aux["plans"])):
            assert a.shape == b.shape and a.dtype == b.dtype
            if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
        if "source_index" in want_aux:
            np.testing.assert_array_equal(np.asarray(got_aux["source_index"]),
                                          np.asarray(want_aux["source_index"]))


@pytest.mark.parametrize("method", sorted(set(EXAMPLES) - {"none"}))
def test_plans_follow_one_protocol(method):
    """n_in / n_out / assignment / matrix / apply / invert, with the dense view as the oracle:
    apply(x) == matrix(size) @ x, and invert puts every kept token back exactly."""
    red = reducers.get(method)(**EXAMPLES[method])
    cfg = ViTConfig(**SMALL, reduction=red)
    model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    _, aux = model(images)
    plan = aux["plans"][0]
    assert isinstance(plan, tk.Plan)
    x = jax.random.normal(jax.random.key(2), (2, plan.n_in, 8))
    w = np.asarray(plan.matrix())
    assert w.shape == (2, plan.n_out, plan.n_in)
    np.testing.assert_allclose(np.asarray(plan.apply(x)), np.einsum("bmn,bnc->bmc", w,
                                                                    np.asarray(x)), atol=1e-5)
    y = plan.apply(x)
    back = np.asarray(plan.invert(y))
    a = np.asarray(plan.assignment)
    assert back.shape == x.shape
    for b in range(2):
        for n in range(plan.n_in):
            want = np.asarray(y)[b, a[b, n]] if a[b, n] >= 0 else np.zeros(8)
            np.testing.assert_allclose(back[b, n], want, atol=1e-6)


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="'nope' is not one of the registered reducers"):
        reducers.get("nope")
    with pytest.raises(ValueError, match="reduction.k is not a field of reducer 'tome'; valid "
                                         "fields: method, r, prop_attn, clamp_r"):
        reducers.from_config({"method": "tome", "k": 3})
    with pytest.raises(TypeError, match="frozen dataclass"):
        @reducers.register
        class NotFrozen(reducers.Reducer):     # pylint: disable=unused-variable
            method: ClassVar[str] = "not_frozen_test"
    with pytest.raises(ValueError, match="already registered"):
        @reducers.register
        @dataclasses.dataclass(frozen=True)
        class AnotherToMe(reducers.Reducer):   # pylint: disable=unused-variable
            method: ClassVar[str] = "tome"
    with pytest.raises(ValueError, match=r"reduction.r=-1 is not allowed"):
        reducers.get("tome")(r=-1)
    with pytest.raises(ValueError, match=r"reduction.score='foo' is not one of"):
        reducers.get("topk")(keep_rate=0.5, layers=(1,), score="foo")


def test_a_tokenlearner_checkpoint_from_before_the_registry_names_the_move(tmp_path):
    from jax_tokens import checkpoint as ckpt_lib
    ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", every=1, async_save=False)
    old = {"params": {"lookup": {"norm": {"scale": jnp.ones((4,))}}, "head": jnp.zeros((2,))}}
    ckpt.save(1, old, force=True)
    ckpt.wait()
    new = {"params": {"blocks": {"0": {"reducer": {"norm": {"scale": jax.ShapeDtypeStruct(
        (4,), jnp.float32)}}}}, "head": jax.ShapeDtypeStruct((2,), jnp.float32)}}
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"predates the reducer registry: its TokenLearner parameters are "
                             r"under 'lookup'"):
        ckpt.restore(1, new)
    ckpt.close()


@pytest.mark.parametrize("method", ["fastervlm", "visionzip", "prumerge", "ats"])
def test_missing_statistics_are_named(method):
    """A direct `reduce` call without the attention statistics the reducer asked for."""
    red = reducers.get(method)(**EXAMPLES[method])
    layout = ViTConfig(**SMALL, reduction=red).layout()
    spec = red.schedule(layout)[1]
    x = jnp.ones((2, spec.n_in, 32))
    with pytest.raises(ValueError, match=r"needs the attention statistics .* missing "):
        red.reduce(layout, spec, x, jnp.ones((2, spec.n_in, 1)), {})
