"""Where ToMe's compile time goes: the ViT forward compiled with a ladder of reducers.

Each rung adds one ingredient of ToMe to the unreduced model, with ToMe r's token counts
(197, 181, 165, ... at 224 for r=16):

  none      the unreduced ViT (12 blocks of one shape);
  slice     every block keeps its first n - r tokens (a plain slice): distinct token counts,
            nothing else;
  topk      a top-k of a per-token score and a gather (pruning's ops);
  match     ToMe's bipartite matching (cosine scores, argmax, two top-ks), then the slice;
  tome      ToMe's matching and its size-weighted merge, written out here;
  segment   the same matching, the merge as a segment sum over each token's output slot
            (`plan.assignment`) instead of gathers and a one-hot matmul (item 3's alternative;
            same result up to summation order);
  ToMe      the registered reducer (`ToMe(r, clamp_r=True)`), as the model runs it.

Prints the median compile seconds of --repeats compiles of each (a fresh trace every time, so
that no cache is hit) and the ratio to the unreduced model.

    python benchmarks/compile_time.py                       # ViT-B/16 at 224, r=16, batch 16
    python benchmarks/compile_time.py --model vit_s --r 8 --token-multiple 32
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import ClassVar

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax_tokens import merge  # noqa: E402
from jax_tokens.models import VisionTransformer, ViTConfig  # noqa: E402
from jax_tokens.reducers import base  # noqa: E402
from jax_tokens.reducers.identity import NoReduction  # noqa: E402
from jax_tokens.reducers.tome import ToMe  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Rung(base.Reducer):
    """One rung of the ladder: r tokens fewer per block, by `mode` (see the module docstring).
    Not registered: it lives only in this benchmark."""

    method: ClassVar[str] = "compile_ladder"
    r: int = 16
    mode: str = "slice"

    def schedule(self, layout):
        specs, n = [], layout.num_tokens
        for _ in range(layout.depth):
            r = min(self.r, (n - 1) // 2)
            specs.append(base.LayerSpec(n, n - r, r, active=r > 0))
            n -= r
        return tuple(specs)

    def stats(self, layout, spec):
        return () if self.mode == "slice" else ("mean_key",)

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        n = spec.n_out
        if self.mode == "topk":
            _, idx = jax.lax.top_k(stats["mean_key"].sum(-1), n)
            x = jnp.take_along_axis(x, idx[..., None], axis=1)
            size = jnp.take_along_axis(size, idx[..., None], axis=1)
        elif self.mode == "segment":
            plan = merge.bipartite_soft_matching(stats["mean_key"], spec.budget,
                                                 class_token=True)
            b, t, c = x.shape
            slots = (plan.assignment + n * jnp.arange(b)[:, None]).reshape(-1)
            sums = jax.ops.segment_sum(
                jnp.concatenate([x * size, size], axis=-1).reshape(b * t, c + 1), slots,
                num_segments=b * n).reshape(b, n, c + 1)
            return sums[..., :c] / sums[..., c:], sums[..., c:], plan
        elif self.mode in ("match", "tome"):
            plan = merge.bipartite_soft_matching(stats["mean_key"], spec.budget,
                                                 class_token=True)
            if self.mode == "tome":
                x, size = merge.merge_wavg(plan, x, size)
                return x, size, plan
            x = x[:, :n] + 0 * plan.dst_idx.sum().astype(x.dtype)   # keep the matching alive
            size = size[:, :n]
        else:
            x, size = x[:, :n], size[:, :n]
        return x, size, merge.identity_plan(x.shape[0], n)


def compile_seconds(cfg: ViTConfig, batch: int) -> float:
    model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
    images = jax.ShapeDtypeStruct((batch, cfg.img_size, cfg.img_size, cfg.in_chans),
                                  jnp.float32)
    lowered = fwd.lower(state, images)
    t0 = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b", choices=("vit_s", "vit_b"))
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--token-multiple", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.r < 1 or args.token_multiple < 1:
        ap.error("--repeats, --r and --token-multiple must be >= 1")
    preset = {"vit_s": ViTConfig.vit_small, "vit_b": ViTConfig.vit_base}[args.model]
    ladder = [("none", NoReduction())] + [
        (mode, Rung(r=args.r, mode=mode))
        for mode in ("slice", "topk", "match", "tome", "segment")] + [
        ("ToMe", ToMe(r=args.r, clamp_r=True))]
    print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; jax {jax.__version__}; {args.model} "
          f"at {args.img}, batch {args.batch}, r={args.r}, token multiple "
          f"{args.token_multiple}; median of {args.repeats} compiles\n")
    times = {name: [] for name, _ in ladder}
    for _ in range(args.repeats):          # interleaved, so load changes hit every rung alike
        for name, red in ladder:
            cfg = preset(img_size=args.img, reduction=red, token_multiple=args.token_multiple)
            times[name].append(compile_seconds(cfg, args.batch))
    base_s = statistics.median(times["none"])
    print("| rung | compile s | ratio to unreduced |")
    print("|---|---:|---:|")
    for name, _ in ladder:
        s = statistics.median(times[name])
        print(f"| {name} | {s:.2f} | {s / base_s:.2f}x |")


if __name__ == "__main__":
    main()
