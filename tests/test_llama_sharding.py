"""The decoder on 8 simulated CPU devices: a training step, prefill and generation (also with
KV-cache presses) under the "dp", "fsdp" and "fsdp_tp" rules equal one device.

As in test_sharding.py, the 8-device checks run in one subprocess (this file as a script with
`--worker`, XLA_FLAGS set before JAX is imported), which writes a JSON report that the tests
read.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
TOL = 1e-5
sys.path.insert(0, str(HERE.parent))
from worker_report import MESHES  # noqa: E402  (tests/ is not on sys.path in a worker)
LENGTHS = (16, 9, 12, 16, 5, 14, 16, 11)   # 8 prompts, left-padded to 16 tokens
NEW_TOKENS = 12
CAPACITY = 32


def _worker(report_path: str) -> None:  # pragma: no cover - runs in a subprocess
    sys.path.insert(0, str(ROOT))
    from worker_report import Report, max_diff
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from jax_tokens import distributed
    from jax_tokens import sharding as shd
    from jax_tokens.models import llama
    from jax_tokens.models.llama import generation
    from jax_tokens.reducers import presses

    PRESSES = {"snapkv": presses.get("snapkv")(window=4, capacity=10, kernel_size=3),
               "h2o": presses.get("h2o")(heavy=6, recent=4)}   # prefill / while decoding

    assert len(jax.devices()) == 8, jax.devices()
    report = Report(report_path, devices=len(jax.devices()))
    cfg = llama.LlamaConfig.tiny(num_heads=4, num_kv_heads=2)
    graphdef, host = nnx.split(llama.create(cfg, seed=0))
    host = jax.device_get(host)
    rng = np.random.default_rng(0)
    tokens, mask = llama.pad_prompts([rng.integers(3, cfg.vocab_size, n).tolist()
                                      for n in LENGTHS], pad_id=0, length=16)
    # eps as in test_sharding.py: Adam's g / (|g| + eps) must not blow rounding noise up.
    tx = optax.adamw(1e-3, eps=1e-4, weight_decay=0.05)

    def step(params, opt_state, toks, msk):
        def loss_fn(p):
            return llama.next_token_loss(nnx.merge(graphdef, p), toks, msk)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    def spec(x):
        return str(x.sharding.spec)

    def run(mesh, rules):
        """One training step, prefill (whole and chunked) and greedy generation on `mesh`."""
        out = {}
        with shd.use_mesh(mesh, rules):
            p_sh = shd.state_shardings(mesh, host, rules)
            o_sh = shd.state_shardings(mesh, jax.eval_shape(tx.init, host), rules)
            b_sh = shd.batch_sharding(mesh, rules)
            params = jax.device_put(host, p_sh)
            opt = jax.jit(tx.init, out_shardings=o_sh)(params)
            jitted = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh, b_sh),
                             out_shardings=(p_sh, o_sh, shd.replicated(mesh), p_sh))
            toks, msk = jax.device_put((tokens, mask), b_sh)
            compiled = jitted.lower(params, opt, toks, msk).compile()
            new_params, new_opt, loss, grads = compiled(params, opt, toks, msk)
            out["train"] = dict(loss=loss, grads=grads, params=new_params, opt=new_opt,
                                collectives=distributed.collective_counts(compiled.as_text()),
                                q_spec=spec(params["layers"]["attn"]["q_proj"].get_value()),
                                k_spec=spec(params["layers"]["attn"]["k_proj"].get_value()),
                                embed_spec=spec(params["embed"].get_value()))

            model = llama.shard(nnx.merge(graphdef, host), mesh, rules)
            state, _, _, _ = llama.prefill(model, tokens, mask=mask, capacity=CAPACITY)
            chunked, _, _, _ = llama.prefill(model, tokens, mask=mask, capacity=CAPACITY,
                                             chunk_size=8)
            gen = llama.generate(model, tokens, mask=mask, max_new_tokens=NEW_TOKENS,
                                 capacity=CAPACITY)
            pressed = {name: np.asarray(llama.generate(
                model, tokens, mask=mask, max_new_tokens=NEW_TOKENS, capacity=CAPACITY,
                press=press).tokens) for name, press in PRESSES.items()}
            _, params_now = nnx.split(model)
            lowered = generation._prefill_jit.lower(  # pylint: disable=protected-access
                graphdef, params_now, toks, msk, capacity=CAPACITY, press=None,
                cache_dtype="float32", rules=shd.current_rules())
            out["infer"] = dict(
                logits=state.logits, chunked_logits=chunked.logits, cache_k=state.cache.k,
                tokens=np.asarray(gen.tokens), num_tokens=np.asarray(gen.num_tokens),
                pressed=pressed,
                cache_spec=spec(state.cache.k), cache_valid_spec=spec(state.cache.valid),
                chunked_cache_spec=spec(chunked.cache.k),
                prefill_collectives=distributed.collective_counts(
                    lowered.compile().as_text()))
        return out

    single = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    ref = run(single, shd.axis_rules("dp"))
    for name, (mesh_cfg, preset) in MESHES.items():
        def compare(mesh_cfg=mesh_cfg, preset=preset):
            res = run(shd.make_mesh(mesh_cfg), shd.axis_rules(preset))
            tr, rt = res["train"], ref["train"]
            inf, ri = res["infer"], ref["infer"]
            return {
                "loss": abs(float(tr["loss"]) - float(rt["loss"])),
                "grads": max_diff(tr["grads"], rt["grads"]),
                "params": max_diff(tr["params"], rt["params"]),
                "opt_state": max_diff(tr["opt"], rt["opt"]),
                "train_collectives": tr["collectives"],
                **{k: tr[k] for k in ("q_spec", "k_spec", "embed_spec")},
                "logits": max_diff(inf["logits"], ri["logits"]),
                "chunked_logits": max_diff(inf["chunked_logits"], ri["logits"]),
                "cache": max_diff(inf["cache_k"], ri["cache_k"]),
                "tokens_equal": bool(np.array_equal(inf["tokens"], ri["tokens"])),
                "num_tokens_equal": bool(np.array_equal(inf["num_tokens"], ri["num_tokens"])),
                "pressed_equal": {n: bool(np.array_equal(inf["pressed"][n], ri["pressed"][n]))
                                  for n in PRESSES},
                **{k: inf[k] for k in ("cache_spec", "cache_valid_spec", "chunked_cache_spec",
                                       "prefill_collectives")}}
        report.section(name, compare)
    report["reference_loss"] = float(ref["train"]["loss"])
    report["done"] = True
    report.save()


if __name__ != "__main__":
    import pytest

    from conftest import run_eight_device_worker


    @pytest.fixture(scope="session")
    def report(tmp_path_factory):
        data = run_eight_device_worker(HERE, tmp_path_factory.mktemp("llama_sharding") /
                                       "report.json")
        data["remat_warnings"] = data["stderr"].count("Involuntary full rematerialization")
        return data

    def _mesh(report, name):
        sec = report[name]
        assert "error" not in sec, sec["error"]
        return sec

    def test_worker_ran_on_8_devices(report):
        assert report["devices"] == 8 and report.get("done")
        assert 4.0 < report["reference_loss"] < 7.0   # ~log(256) for a random model

    @pytest.mark.parametrize("mesh", list(MESHES))
    def test_decoder_train_step_equals_one_device(report, mesh):
        r = _mesh(report, mesh)
        assert r["loss"] <= TOL, r
        assert r["grads"] <= TOL and r["params"] <= TOL and r["opt_state"] <= TOL, r

    def test_decoder_parameters_are_split_as_the_rules_say(report):
        dp, fsdp, tp = (_mesh(report, m) for m in MESHES)
        assert dp["q_spec"] == "P()" and dp["k_spec"] == "P()"
        # q_proj [L, D, H, hd]: width over fsdp, heads over tensor; k_proj's KV heads too
        assert fsdp["q_spec"] == "P(None, 'fsdp')"
        assert tp["q_spec"] == "P(None, 'fsdp', 'tensor')"
        assert tp["k_spec"] == "P(None, 'fsdp', 'tensor')"
        assert tp["embed_spec"] == "P(None, 'fsdp')"
        # fsdp gathers parameters in the step; data parallelism only reduces gradients
        assert fsdp["train_collectives"].get("all-gather", 0) > 0
        assert dp["train_collectives"].get("all-gather", 0) == 0
        assert dp["train_collectives"].get("all-reduce", 0) > 0
        # the embedding lookup gathers the table, not the activations (no all-to-all)
        assert fsdp["train_collectives"]["all-to-all"] == tp["train_collectives"]["all-to-all"] == 0

    def test_no_involuntary_rematerialization(report):
        # XLA's SPMD partitioner warns when a sharding change can only be made by
        # replicating a tensor (it did for a lookup into the width-split embedding table)
        assert report["remat_warnings"] == 0

    @pytest.mark.parametrize("mesh", list(MESHES))
    def test_decoder_generation_equals_one_device(report, mesh):
        r = _mesh(report, mesh)
        assert r["logits"] <= TOL and r["chunked_logits"] <= TOL and r["cache"] <= TOL, r
        assert r["tokens_equal"] and r["num_tokens_equal"], r

    @pytest.mark.parametrize("mesh", list(MESHES))
    def test_presses_on_a_mesh_equal_one_device(report, mesh):
        """SnapKV (a prefill plan) and H2O (eviction at every decoding step) on a cache split
        over the batch (and the KV heads under fsdp_tp) generate what one device does."""
        r = _mesh(report, mesh)
        assert r["pressed_equal"] == {"snapkv": True, "h2o": True}, r["pressed_equal"]

    def test_kv_cache_is_split_over_batch_and_kv_heads(report):
        dp, fsdp, tp = (_mesh(report, m) for m in MESHES)
        assert dp["cache_spec"] == "P(None, 'data')"
        assert fsdp["cache_spec"] == "P(None, ('data', 'fsdp'))"
        assert tp["cache_spec"] == "P(None, ('data', 'fsdp'), None, 'tensor')"
        assert tp["cache_valid_spec"] == "P(None, ('data', 'fsdp'), None, 'tensor')"
        assert tp["chunked_cache_spec"] == tp["cache_spec"]

    def test_data_parallel_prefill_moves_nothing(report):
        counts = _mesh(report, "8x1x1")["prefill_collectives"]
        assert sum(counts.values()) == 0, counts


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --worker REPORT.json")
