"""Sharding: meshes, logical axis rules, sharded train steps, Pallas in shard_map, checkpoints
across meshes, bad configs.

The multi-device checks need 8 simulated CPU devices, and XLA_FLAGS must be set before JAX is
imported, so they run in one subprocess (this file run as a script with `--worker`), which
writes a JSON report that the tests below read; the pytest process keeps its single device.
The cheap checks (rules, specs, mesh arithmetic, distributed start-up) run in-process on
abstract meshes.
"""

from __future__ import annotations

import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
TOL = 1e-5
sys.path.insert(0, str(HERE.parent))
from worker_report import MESHES  # noqa: E402  (tests/ is not on sys.path in a worker)
REDUCERS = ("tome", "evit", "lookup")
# The merging family on the data-parallel mesh only (17 tokens, depth 2).
DP_FAMILY = {"mctf": dict(r=2), "pitome": dict(ratio=0.8), "diffrate": dict(
    prune_kept=(17, 15), merge_kept=(15, 12)), "atc": dict(layers=(1,), num_clusters=8),
    "kmedoids": dict(layers=(1,), keep_rate=0.5),
    # DPC-KNN with its learned token weights runs outside the per-device shard_map (a learned
    # reducer's parameters stay out of it) and XLA all-gathers its top-k: measured 4
    # all-gathers. Its parameter-free form is checked here.
    "dpcknn": dict(layers=(1,), keep_rate=0.5, equal_weight=True),
    "tofu": dict(r=2, prune_layers=1), "ppt": dict(r=2, layers=(0, 1)),
    # Pruning and token selection: the learned predictors score outside the per-device
    # shard_map and select inside it; the selectors and ATS select per device.
    "dynamicvit": dict(layers=(1,), keep_ratio=(0.5,)), "cropr": dict(rate=3, llf=False),
    "ats": dict(layers=(1,), num_tokens=8), "fastervlm": dict(keep=8, layers=(1,)),
    "visionzip": dict(keep=8, layers=(1,)), "divprune": dict(keep=8, layers=(1,)),
    "prumerge": dict(keep=8, layers=(1,), neighbors=4)}
# Their training paths on a 3-block model (Cropr with last-layer fusion).
DP_TRAINING = {"dynamicvit": dict(layers=(1, 2), keep_ratio=(0.5, 0.25)),
               "cropr": dict(rate=3, llf=True)}
# Padded token arrays (token_multiple=8) on 8 devices against the unpadded model on one.
DP_PADDED = {"tome": dict(r=2), "kmedoids": dict(layers=(1,), keep_rate=0.5)}


# ================================================================================================
# The worker (runs in a subprocess with 8 CPU devices)
# ================================================================================================

def _worker(report_path: str, workdir: str) -> None:  # pragma: no cover - runs in a subprocess
    sys.path.insert(0, str(ROOT))
    from worker_report import Report, max_diff
    import jax
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx

    from jax_tokens import distributed
    from jax_tokens import sharding as shd
    from jax_tokens.models.vit import ViTConfig, VisionTransformer
    from jax_tokens.reducers.identity import NoReduction
    from jax_tokens.reducers.token_learner import TokenLearner
    from jax_tokens.reducers.tome import ToMe
    from jax_tokens.reducers.topk import TopK

    assert len(jax.devices()) == 8, jax.devices()
    report = Report(report_path, devices=len(jax.devices()))

    reductions = {
        "tome": ToMe(r=2),
        "evit": TopK(keep_rate=0.5, layers=(1,), fuse=True),
        "lookup": TokenLearner(layers=(1,), num_tokens=4),
    }

    def vit_cfg(name, attn_impl="xla", depth=2):
        return ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32,
                         depth=depth, num_heads=2, mlp_ratio=4.0, attn_impl=attn_impl,
                         reduction=reductions[name])

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=(8,)).astype(np.int32)}
    # eps: parameters whose gradient is zero in exact arithmetic (the key part of the qkv bias,
    # TokenLearner's score bias: softmax-invariant) get rounding noise (~1e-9) as gradient,
    # which Adam's g / (|g| + eps) would blow up to +-lr on any two summation orders.
    tx = optax.adamw(1e-3, eps=1e-4, weight_decay=0.05)

    def make_step(graphdef, training=False):
        def loss_fn(params, rest, images, labels):
            model = nnx.merge(graphdef, params, rest)
            if not training:
                logits, _ = model(images)
                return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 10)).mean()
            # A reducer's training path (as train.py runs it): its own reducer, a fixed key,
            # the teacher when it needs one, and its loss terms.
            red = model.cfg.reduction.training()
            logits, aux = model(images, key=jax.random.key(7), reduction=red)
            teacher = jax.lax.stop_gradient(model(images, reduction=NoReduction())) \
                if red.needs_teacher else None
            extra, _ = red.loss(model.cfg.layout(), logits, aux, labels=labels,
                                teacher=teacher)
            return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 10)).mean() + \
                extra

        def step(params, opt_state, rest, b):
            loss, grads = jax.value_and_grad(loss_fn)(params, rest, b["image"], b["label"])
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss, grads
        return step

    class Run:
        """Model + optimizer placed on `mesh` and the compiled step. The parameters are created
        already sharded (`jax.jit(init, out_shardings=...)`), or put there from `host`."""

        def __init__(self, cfg, mesh, rules, host=None, jaxpr=False, training=False):
            self.mesh, self.rules = mesh, rules

            def init():
                _, params, rest = nnx.split(VisionTransformer(cfg, rngs=nnx.Rngs(0)),
                                            nnx.Param, ...)
                return params, rest

            graphdef = nnx.split(nnx.eval_shape(lambda: VisionTransformer(
                cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
            with shd.use_mesh(mesh, rules):
                abstract = jax.eval_shape(init)
                self.p_sh, self.r_sh = shd.state_shardings(mesh, abstract, rules)
                if host is None:
                    self.params, self.rest = jax.jit(
                        init, out_shardings=(self.p_sh, self.r_sh))()
                else:
                    self.params, self.rest = jax.device_put(host, (self.p_sh, self.r_sh))
                self.o_sh = shd.state_shardings(mesh, jax.eval_shape(tx.init, abstract[0]),
                                                rules)
                self.opt = jax.jit(tx.init, out_shardings=self.o_sh)(self.params)
                self.b_sh = shd.batch_sharding(mesh, rules)
                step = jax.jit(make_step(graphdef, training),
                               in_shardings=(self.p_sh, self.o_sh, self.r_sh, self.b_sh),
                               out_shardings=(self.p_sh, self.o_sh, shd.replicated(mesh),
                                              self.p_sh),
                               donate_argnums=(0, 1))
                b = shd.put_batch(batch, mesh, rules)
                if jaxpr:
                    self.jaxpr = str(jax.make_jaxpr(make_step(graphdef))(
                        self.params, self.opt, self.rest, b))
                self.compiled = step.lower(self.params, self.opt, self.rest, b).compile()

        def __call__(self):
            with shd.use_mesh(self.mesh, self.rules):
                b = shd.put_batch(batch, self.mesh, self.rules)
                self.params, self.opt, loss, grads = self.compiled(self.params, self.opt,
                                                                   self.rest, b)
            return loss, grads

    def spec_of(tree, key):
        for p, v in jax.tree_util.tree_leaves_with_path(tree):
            if jax.tree_util.keystr(p) == key:
                return str(v.sharding.spec)
        raise KeyError(key)

    def mesh_for(name):
        cfg, preset = MESHES[name]
        return shd.make_mesh(cfg), shd.axis_rules(preset)

    single = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])

    def section(name):
        return lambda fn: report.section(name, fn)

    # -- 1. one train step on every mesh == one device; HLO collectives -----------------------
    qkv_key = "['blocks'][0]['attn']['qkv']['kernel'].value"
    fc1_key = "['blocks'][0]['mlp']['fc1']['kernel'].value"
    tome_runs, refs = {}, {}

    @section("train_step")
    def _():
        out = {}
        for red in REDUCERS:
            cfg = vit_cfg(red)
            ref = Run(cfg, single, shd.axis_rules("dp"))
            host = jax.device_get((ref.params, ref.rest))
            ref_loss, ref_grads = ref()
            refs[red] = dict(host=host, loss=float(ref_loss), grads=jax.device_get(ref_grads),
                             params=jax.device_get(ref.params))
            res = {}
            for mname in MESHES:
                mesh, rules = mesh_for(mname)
                # created sharded by jit(init, out_shardings) for one; put there elsewhere
                fresh = red == "tome" and mname == "2x2x2"
                run = Run(cfg, mesh, rules, host=None if fresh else host)
                entry = {"init": max_diff(run.params, host[0]),
                         "qkv_spec": spec_of(run.params, qkv_key),
                         "fc1_spec": spec_of(run.params, fc1_key),
                         "mu_qkv_spec": spec_of(run.opt[0].mu, qkv_key),
                         "collectives": distributed.collective_counts(run.compiled.as_text())}
                loss, grads = run()
                entry.update(loss=abs(float(loss) - float(ref_loss)),
                             grads=max_diff(grads, ref_grads),
                             params=max_diff(run.params, ref.params),
                             opt_state=max_diff(run.opt, ref.opt),
                             qkv_spec_after=spec_of(run.params, qkv_key))
                res[mname] = entry
                if red == "tome":
                    tome_runs[mname] = run
            if red == "tome":
                tome_runs["single"] = ref
            out[red] = res
        return out

    def dp_equals_single(reductions, depth, training=False, token_multiple=1):
        """Per reducer: the 8-way data-parallel step against one device (loss, gradients,
        updated parameters) and the step's collectives; the data-parallel model carries its
        tokens in arrays rounded up to `token_multiple`, the one-device model does not."""
        from jax_tokens import reducers
        out = {}
        mesh, rules = mesh_for("8x1x1")
        for name, kw in reductions.items():
            cfg = ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32,
                            depth=depth, num_heads=2, mlp_ratio=4.0, attn_impl="xla",
                            reduction=reducers.get(name)(**kw))
            ref = Run(cfg, single, shd.axis_rules("dp"), training=training)
            host = jax.device_get((ref.params, ref.rest))
            ref_loss, ref_grads = ref()
            run = Run(cfg.replace(token_multiple=token_multiple), mesh, rules, host=host,
                      training=training)
            loss, grads = run()
            out[name] = {"loss": abs(float(loss) - float(ref_loss)),
                         "grads": max_diff(grads, ref_grads),
                         "params": max_diff(run.params, ref.params),
                         "collectives": distributed.collective_counts(run.compiled.as_text())}
        return out

    # -- 1b. the merging family, pruning and selection: the data-parallel step == one device,
    # no activation moves ---------------------------------------------------------------------
    @section("dp_family")
    def _():
        return dp_equals_single(DP_FAMILY, depth=2)

    # -- 1c. the training paths of the learned pruners (DynamicViT's Gumbel policies and
    # distillation, Cropr's auxiliary heads): data parallel == one device -------------------
    @section("dp_training")
    def _():
        return dp_equals_single(DP_TRAINING, depth=3, training=True)

    @section("dp_padded")
    def _():
        return dp_equals_single(DP_PADDED, depth=2, token_multiple=8)

    # -- 2. Pallas attention inside jax.shard_map (interpret mode on CPU) ---------------------
    @section("pallas")
    def _():
        out = {}
        mesh, rules = mesh_for("2x2x2")
        for red in ("tome", "evit"):   # key_size + mean_key; cls_probs (heads split on tensor)
            ref = refs[red]
            run = Run(vit_cfg(red, "pallas_gpu"), mesh, rules, host=ref["host"], jaxpr=True)
            loss, grads = run()
            out[red] = {"impl": "pallas_gpu", "shard_map_in_jaxpr": "shard_map" in run.jaxpr,
                        "pallas_in_jaxpr": "pallas_call" in run.jaxpr,
                        "loss": abs(float(loss) - ref["loss"]),
                        "grads": max_diff(grads, ref["grads"]),
                        "params": max_diff(run.params, ref["params"])}
        return out

    # -- 3. save on one mesh, restore on another, continue == not restarting ------------------
    @section("checkpoint")
    def _():
        a = tome_runs["8x1x1"]                      # after one step on 8-way data parallel
        saved = jax.device_get((a.params, a.opt))
        manager = ocp.CheckpointManager(os.path.join(workdir, "ckpt"))
        manager.save(1, args=ocp.args.StandardSave({"params": a.params, "opt": a.opt}))
        manager.wait_until_finished()
        a()                                         # step 2 without restarting
        out = {}
        for name in ("2x2x2", "2x4x1", "single"):
            b = tome_runs[name]                     # its own state is replaced by the restore
            target = shd.abstract_with_shardings(
                {"params": b.params, "opt": b.opt}, {"params": b.p_sh, "opt": b.o_sh})
            restored = manager.restore(1, args=ocp.args.StandardRestore(target))
            b.params, b.opt = restored["params"], restored["opt"]
            entry = {"restored": max_diff((b.params, b.opt), saved),
                     "qkv_spec": spec_of(b.params, qkv_key),
                     "target_qkv_spec": str(b.p_sh["blocks"][0]["attn"]["qkv"]["kernel"]
                                            .get_value().spec)}
            b()                                     # step 2 after the restart
            entry["continued"] = max_diff((b.params, b.opt), (a.params, a.opt))
            out[name] = entry
        manager.close()
        return out

    # -- 4. bad configs fail before anything compiles ------------------------------------------
    @section("bad_configs")
    def _():
        out = {}
        for name, fn in {
            "mesh_not_dividing": lambda: shd.make_mesh({"data": 3}),
            "mesh_too_big": lambda: shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 4}),
            "free_axis_not_dividing": lambda: shd.make_mesh({"data": -1, "tensor": 3}),
        }.items():
            try:
                fn()
                out[name] = None
            except ValueError as e:
                out[name] = str(e)
        mesh, rules = mesh_for("2x4x1")
        traced = []
        cfg = vit_cfg("tome")
        graphdef = nnx.split(nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0))),
                             nnx.Param, ...)[0]
        step = make_step(graphdef)

        def counting(*args):
            traced.append(1)
            return step(*args)
        jitted = jax.jit(counting)
        bad = {"image": batch["image"][:6], "label": batch["label"][:6]}
        try:
            with shd.use_mesh(mesh, rules):
                jitted(None, None, None, shd.put_batch(bad, mesh, rules))
            out["batch"] = None
        except ValueError as e:
            out["batch"] = str(e)
        out["traced"] = len(traced)
        return out

    # -- 5. flax sees the same rules: nnx.eval_shape under use_mesh ------------------------------
    @section("flax_rules")
    def _():
        mesh, rules = mesh_for("2x2x2")
        with shd.use_mesh(mesh, rules):
            model = nnx.eval_shape(lambda: VisionTransformer(vit_cfg("lookup"),
                                                             rngs=nnx.Rngs(0)))
            params = nnx.state(model, nnx.Param)
            ours = jax.tree.leaves(shd.state_shardings(mesh, params, rules))
            theirs = jax.tree.leaves(nnx.get_named_sharding(params, mesh))
        differ = [i for i, (a, b, v) in enumerate(zip(ours, theirs, jax.tree.leaves(params)))
                  if not a.is_equivalent_to(b, v.ndim)]
        return {"count": len(ours), "differ": len(differ),
                "qkv": str(model.blocks[0].attn.qkv.kernel.get_value().sharding.spec)}

    report["done"] = True
    report.save()


# ================================================================================================
# Tests (pytest process: one CPU device)
# ================================================================================================

if __name__ != "__main__":
    import jax
    import pytest
    from jax.sharding import AbstractMesh, PartitionSpec as P


    from conftest import run_eight_device_worker
    from jax_tokens import distributed
    from jax_tokens import sharding as shd

    @pytest.fixture(scope="session")
    def report(tmp_path_factory):
        tmp = tmp_path_factory.mktemp("sharding")
        return run_eight_device_worker(HERE, tmp / "report.json", tmp)

    def _section(report, name):
        sec = report[name]
        assert "error" not in sec, sec["error"]
        return sec

    # -- in-process: rules, specs, mesh arithmetic ------------------------------------------

    def _abstract(data, fsdp, tensor):
        return AbstractMesh((data, fsdp, tensor), shd.AXES)

    def test_presets_map_logical_axes_to_mesh_axes():
        m = _abstract(2, 2, 2)
        dp, fsdp, tp = (shd.axis_rules(p) for p in ("dp", "fsdp", "fsdp_tp"))
        assert shd.logical_to_spec(("embed", "qkv"), dp, m) == P()
        assert shd.logical_to_spec(("embed", "qkv"), fsdp, m) == P("fsdp")
        assert shd.logical_to_spec(("embed", "qkv"), tp, m) == P("fsdp", "tensor")
        assert shd.logical_to_spec(("mlp", "embed"), tp, m) == P("tensor", "fsdp")
        assert shd.logical_to_spec(("heads", "embed"), tp, m) == P("tensor", "fsdp")
        # an activation: fsdp is taken by the batch, so the embedding stays whole
        assert shd.logical_to_spec(("batch", "tokens", "embed"), tp, m) == P(("data", "fsdp"))
        # a dimension that does not divide stays unsplit; size-1 axes are dropped
        assert shd.logical_to_spec(("embed", "classes"), fsdp, m, shape=(3, 10)) == P()
        assert shd.logical_to_spec(("batch",), fsdp, _abstract(8, 1, 1)) == P("data")

    def test_rules_from_config_and_overrides():
        assert shd.rules_from_config(None) == shd.axis_rules("dp")
        assert shd.rules_from_config({"sharding": {"preset": "fsdp"}}) == shd.axis_rules("fsdp")
        rules = shd.rules_from_config({"preset": "fsdp", "rules": {"classes": "tensor"}})
        assert dict(rules)["classes"] == ("tensor",) and dict(rules)["embed"] == ("fsdp",)
        assert shd.rules_from_config({"mesh": {"data": -1}}) == shd.axis_rules("dp")

    def test_unknown_logical_or_mesh_axis_in_rules_is_named():
        with pytest.raises(ValueError, match=r"unknown logical axis 'embedd'.*embed"):
            shd.axis_rules("fsdp", {"embedd": "fsdp"})
        with pytest.raises(ValueError, match=r"'mlp'.*mesh axis 'model'.*data.*fsdp.*tensor"):
            shd.axis_rules("fsdp_tp", {"mlp": "model"})
        with pytest.raises(ValueError, match=r"preset 'zero3' is not one of"):
            shd.axis_rules("zero3")

    @pytest.mark.parametrize("sizes, match", [
        ({"data": 3}, r"data=3 .*3 does not divide 8"),
        ({"data": 2, "fsdp": 2, "tensor": 4}, r"needs a multiple of 16 devices.*data=2 x fsdp=2 "
                                              r"x tensor=4.*8 devices"),
        ({"data": -1, "tensor": 3}, r"tensor=3.*3 does not divide 8"),
        ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
        ({"data": 0}, r"mesh.data=0 must be a positive int"),
        ({"pipeline": 2}, r"mesh axes \['pipeline'\] are not supported"),
    ])
    def test_bad_mesh_sizes_name_axis_and_sizes(sizes, match):
        with pytest.raises(ValueError, match=match):
            shd.mesh_shape(sizes, 8)

    def test_mesh_shape_resolves_the_free_axis():
        assert shd.mesh_shape({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
        assert shd.mesh_shape(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
        mesh = shd.make_mesh(None)   # the pytest process: one device, old behaviour
        assert mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1}

    def test_batch_not_divisible_names_axes_and_sizes():
        m = _abstract(2, 4, 1)
        shd.check_batch_size(m, 16, shd.axis_rules("fsdp"))
        with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the 8 batch "
                                             r"shards of the mesh axes data=2 x fsdp=4"):
            shd.check_batch_size(m, 12, shd.axis_rules("fsdp"))

    def test_constrain_and_attention_are_plain_without_a_mesh():
        import jax.numpy as jnp
        from jax_tokens.attention import attention
        from jax_tokens.attention.sharded import attention as sharded_attention
        x = jnp.arange(24.0).reshape(2, 3, 4)
        assert shd.constrain(x, ("batch", "tokens", "embed")) is x
        q = jax.random.normal(jax.random.key(0), (2, 5, 2, 4))
        out, st = sharded_attention(q, q, q, stats=("mean_key", "cls_probs"), impl="xla")
        ref, st_ref = attention(q, q, q, stats=("mean_key", "cls_probs"), impl="xla")
        assert (out == ref).all() and (st["cls_probs"] == st_ref["cls_probs"]).all()

    def test_maybe_initialize_distributed(monkeypatch):
        calls = []
        for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                    "JAX_DISTRIBUTED"):
            monkeypatch.delenv(var, raising=False)
        init = lambda **kw: calls.append(kw)  # noqa: E731
        assert not distributed.maybe_initialize_distributed({"distributed": False}, initialize=init)
        assert not distributed.maybe_initialize_distributed(None, initialize=init)
        assert distributed.maybe_initialize_distributed({"distributed": True}, initialize=init)
        assert calls[-1] == {}                          # Cloud TPU: JAX finds everything
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
        monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
        monkeypatch.setenv("JAX_PROCESS_ID", "3")
        assert distributed.maybe_initialize_distributed(None, initialize=init)
        assert calls[-1] == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                             "process_id": 3}
        assert len(calls) == 2

    def test_nnx_eval_shape_works_under_use_mesh():
        from flax import nnx
        from jax_tokens.models.vit import ViTConfig, VisionTransformer
        cfg = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                        num_classes=10)
        mesh = shd.make_mesh(None)
        with shd.use_mesh(mesh, shd.axis_rules("fsdp_tp")):
            model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
        assert model.blocks[0].attn.qkv.kernel.get_value().sharding.mesh.shape == mesh.shape

    def test_collective_counts_parses_hlo():
        text = ("  %all-gather-start = (f32[8]) all-gather-start(f32[2] %p), dimensions={0}\n"
                "  %ag-done = f32[8] all-gather-done(%all-gather-start)\n"
                "  %x = f32[4] all-reduce(f32[4] %y), to_apply=%add\n"
                "  %z = f32[4] all-to-all(f32[4] %y), dimensions={0}\n")
        c = distributed.collective_counts(text)
        assert c["all-gather"] == 1 and c["all-reduce"] == 1 and c["all-to-all"] == 1

    def test_model_parameters_carry_logical_axes():
        from flax import nnx
        from jax_tokens.models.vit import ViTConfig, VisionTransformer
        from jax_tokens.reducers.token_learner import TokenLearner
        cfg = ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                        num_classes=10, reduction=TokenLearner(layers=(0,), num_tokens=4))
        model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
        params = nnx.state(model, nnx.Param)
        missing = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(
            params, is_leaf=lambda x: isinstance(x, nnx.Variable))
            if not v.get_metadata("out_sharding", None)]
        assert not missing, missing
        attn = model.blocks[0].attn
        assert attn.qkv.kernel.get_metadata("out_sharding") == ("embed", "qkv")
        assert attn.proj.kernel.get_metadata("out_sharding") == ("heads", "embed")
        assert model.blocks[0].mlp.fc1.kernel.get_metadata("out_sharding") == ("embed", "mlp")

    # -- 8 devices (the worker's report) ------------------------------------------------------

    def test_worker_ran_on_8_devices(report):
        assert report["devices"] == 8 and report.get("done"), report

    @pytest.mark.parametrize("reducer", REDUCERS)
    def test_train_step_equals_single_device(report, reducer):
        """Loss, gradients, updated parameters and AdamW state on 8x1x1 (dp), 2x4x1 (fsdp) and
        2x2x2 (fsdp_tp) equal one device."""
        res = _section(report, "train_step")[reducer]
        for mesh, e in res.items():
            for what in ("init", "loss", "grads", "params", "opt_state"):
                assert e[what] <= TOL, (mesh, what, e)
        # the parameters (and their AdamW moments) really are split as the preset says
        assert res["8x1x1"]["qkv_spec"] == "P()"
        assert res["2x4x1"]["qkv_spec"] == "P('fsdp',)"
        assert res["2x2x2"]["qkv_spec"] == "P('fsdp', 'tensor')"
        assert res["2x2x2"]["fc1_spec"] == "P('fsdp', 'tensor')"
        for mesh in MESHES:
            assert res[mesh]["mu_qkv_spec"] == res[mesh]["qkv_spec"]
            assert res[mesh]["qkv_spec_after"] == res[mesh]["qkv_spec"]

    @pytest.mark.parametrize("reducer", REDUCERS)
    def test_data_parallel_step_moves_no_activations(report, reducer):
        """The compiled dp step has no all-gather / all-to-all (a reducer that moved tokens
        between devices would need one); the FSDP step all-gathers its parameters, which shows
        the count sees them."""
        res = _section(report, "train_step")[reducer]
        dp = res["8x1x1"]["collectives"]
        assert dp["all-gather"] == 0 and dp["all-to-all"] == 0, dp
        assert dp["all-reduce"] > 0, dp                     # gradients and the loss
        assert res["2x4x1"]["collectives"]["all-gather"] > 0, res["2x4x1"]["collectives"]

    @pytest.mark.parametrize("reducer", sorted(DP_FAMILY))
    def test_merging_family_data_parallel_equals_one_device(report, reducer):
        """Each merging / clustering reducer in the 8-device data-parallel step: loss,
        gradients and updated parameters equal one device, and no all-gather / all-to-all
        (the matching runs on each device's own examples)."""
        e = _section(report, "dp_family")[reducer]
        for what in ("loss", "grads", "params"):
            assert e[what] <= TOL, (what, e)
        c = e["collectives"]
        assert c["all-gather"] == 0 and c["all-to-all"] == 0, c

    @pytest.mark.parametrize("reducer", sorted(DP_TRAINING))
    def test_training_paths_data_parallel_equal_one_device(report, reducer):
        """DynamicViT's and Cropr's training paths (their own losses included) in the
        8-device data-parallel step equal one device, without all-gather / all-to-all."""
        e = _section(report, "dp_training")[reducer]
        for what in ("loss", "grads", "params"):
            assert e[what] <= TOL, (what, e)
        c = e["collectives"]
        assert c["all-gather"] == 0 and c["all-to-all"] == 0, c

    @pytest.mark.parametrize("reducer", sorted(DP_PADDED))
    def test_padded_tokens_data_parallel_equal_unpadded_one_device(report, reducer):
        """token_multiple=8 under an 8-device data-parallel mesh: the step equals the unpadded
        model's on one device, and the matching still runs per device (no all-gather)."""
        e = _section(report, "dp_padded")[reducer]
        for what in ("loss", "grads", "params"):
            assert e[what] <= TOL, (what, e)
        c = e["collectives"]
        assert c["all-gather"] == 0 and c["all-to-all"] == 0, c

    @pytest.mark.parametrize("reducer", ("tome", "evit"))
    def test_pallas_attention_runs_in_shard_map(report, reducer):
        e = _section(report, "pallas")[reducer]
        assert e["shard_map_in_jaxpr"] and e["pallas_in_jaxpr"], e
        for what in ("loss", "grads", "params"):
            assert e[what] <= TOL, (what, e)

    @pytest.mark.parametrize("target", ("2x2x2", "2x4x1", "single"))
    def test_checkpoint_restores_on_another_mesh(report, target):
        """Saved after one step on 8-way data parallel; restored onto another mesh with
        identical values and that mesh's shardings; one more step equals not restarting."""
        e = _section(report, "checkpoint")[target]
        assert e["restored"] == 0.0, e
        assert e["qkv_spec"] == e["target_qkv_spec"], e
        assert e["continued"] <= TOL, e

    def test_nnx_eval_shape_under_use_mesh_agrees_with_state_shardings(report):
        e = _section(report, "flax_rules")
        assert e["count"] > 20 and e["differ"] == 0, e
        assert e["qkv"] == "P('fsdp', 'tensor')", e

    def test_bad_configs_fail_before_compiling(report):
        e = _section(report, "bad_configs")
        assert "data=3" in e["mesh_not_dividing"] and "8 devices" in e["mesh_not_dividing"]
        assert "tensor=4" in e["mesh_too_big"] and "16" in e["mesh_too_big"]
        assert "tensor=3" in e["free_axis_not_dividing"]
        assert "global batch size=6" in e["batch"] and "data=2 x fsdp=4" in e["batch"], e
        assert e["traced"] == 0      # the step was never traced, let alone compiled


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python tests/test_sharding.py --worker REPORT.json WORKDIR")
