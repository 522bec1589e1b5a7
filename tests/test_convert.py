"""Weight conversion: timm / Hugging Face names, safetensors, position-table resampling."""

import numpy as np
import pytest
from flax import nnx

from jax_tokens.models import convert
from jax_tokens.models.vit import VisionTransformer, ViTConfig

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def _model(seed=0, **kw):
    return VisionTransformer(ViTConfig(**{**TINY, **kw}), rngs=nnx.Rngs(seed))


def _bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), k


# timm layouts: plain ViT, distilled DeiT, registers + LayerScale (DINOv2-style), and a model
# whose position table skips the class token.
VARIANTS = {
    "vit": {},
    "deit_distilled": dict(distill_token=True),
    "registers_layerscale": dict(num_registers=4, layer_scale_init=1e-5),
    "no_embed_class": dict(no_embed_class=True, num_registers=2),
}


@pytest.fixture(scope="module")
def models():
    return {name: _model(i, **kw) for i, (name, kw) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_timm_round_trip_is_bitwise(models, name):
    model = models[name]
    sd = convert.to_timm(model)
    expected = {"dist_token", "head_dist.weight"} if name == "deit_distilled" else set()
    assert expected <= set(sd)
    if name == "registers_layerscale":
        assert sd["reg_token"].shape == (1, 4, 32) and "blocks.1.ls2.gamma" in sd
    # timm layouts: Linear [out, in], patch conv [out, in, kh, kw]
    assert sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 8, 8)
    again = convert.to_timm(convert.from_timm(sd, model.cfg))
    _bitwise_equal(sd, again)


def test_safetensors_round_trip_is_bitwise(models, tmp_path):
    model = models["deit_distilled"]
    path = tmp_path / "deit.safetensors"
    convert.save_safetensors(model, path)
    loaded = convert.load_safetensors(path, model.cfg)
    _bitwise_equal(convert.to_timm(model), convert.to_timm(loaded))
    _bitwise_equal(convert.to_timm(model), convert.read_safetensors(path))


def test_missing_extra_and_bad_shapes_are_listed(models):
    model = models["vit"]
    sd = convert.to_timm(model)
    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.7.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    bad["norm.weight"] = np.zeros((31,), np.float32)
    with pytest.raises(ValueError) as e:
        convert.from_timm(bad, model.cfg)
    msg = str(e.value)
    assert "missing keys" in msg and "blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys" in msg and "blocks.7.attn.qkv.weight" in msg
    assert "shape mismatches" in msg and "norm.weight" in msg and "(31,)" in msg
    with pytest.raises(ValueError, match="norm.weight"):  # shapes are never tolerated
        convert.from_timm(bad, model.cfg, strict=False)
    with pytest.raises(FileNotFoundError):
        convert.read_safetensors("/nonexistent/x.safetensors")


# --------------------------------------------------------------------------------------------
# Hugging Face names
# --------------------------------------------------------------------------------------------

def test_hf_dinov2_names_and_round_trip(models):
    model = models["registers_layerscale"]
    hf = convert.to_hf(model, flavor="dinov2")
    for name in ("embeddings.cls_token", "embeddings.register_tokens",
                 "embeddings.position_embeddings",
                 "embeddings.patch_embeddings.projection.weight",
                 "encoder.layer.1.attention.attention.query.weight",
                 "encoder.layer.1.attention.attention.key.bias",
                 "encoder.layer.1.attention.attention.value.weight",
                 "encoder.layer.1.attention.output.dense.weight",
                 "encoder.layer.0.layer_scale1.lambda1", "encoder.layer.0.layer_scale2.lambda1",
                 "encoder.layer.0.norm1.weight", "encoder.layer.0.norm2.bias",
                 "encoder.layer.0.mlp.fc1.weight", "encoder.layer.0.mlp.fc2.bias",
                 "layernorm.weight", "layernorm.bias"):
        assert name in hf, name
    # q, k, v are the thirds of timm's qkv rows, in that order
    qkv = convert.to_timm(model)["blocks.1.attn.qkv.weight"]
    np.testing.assert_array_equal(hf["encoder.layer.1.attention.attention.key.weight"],
                                  qkv[32:64])
    assert "classifier.weight" not in hf   # Dinov2ForImageClassification's head reads 2 x D
    # HF extras are ignored: mask token (Dinov2Model), and a "dinov2." prefix is stripped
    with_prefix = {"dinov2." + k: v for k, v in hf.items()}
    with_prefix["dinov2.embeddings.mask_token"] = np.zeros((1, 32), np.float32)
    timm_sd, report = convert.hf_to_timm(with_prefix)
    assert report["prefix"] == "dinov2." and report["flavor"] == "dinov2"
    assert report["ignored"] == ["dinov2.embeddings.mask_token"]
    _bitwise_equal({k: v for k, v in convert.to_timm(model).items() if not k.startswith("head")},
                   timm_sd)
    back = convert.from_hf(with_prefix, model.cfg.replace(num_classes=0))
    _bitwise_equal(convert.to_hf(back), hf)


def test_hf_vit_names_with_classifier(models):
    model = models["vit"]
    hf = convert.to_hf(model, flavor="vit", prefix="vit.")
    for name in ("vit.encoder.layer.0.layernorm_before.weight",
                 "vit.encoder.layer.0.layernorm_after.bias",
                 "vit.encoder.layer.0.intermediate.dense.weight",
                 "vit.encoder.layer.0.output.dense.weight",
                 "vit.encoder.layer.0.attention.output.dense.bias",
                 "vit.layernorm.weight", "classifier.weight", "classifier.bias"):
        assert name in hf, name
    hf["vit.pooler.dense.weight"] = np.zeros((32, 32), np.float32)   # ViTModel's pooler
    loaded = convert.from_hf(hf, model.cfg)
    _bitwise_equal(convert.to_timm(model), convert.to_timm(loaded))


def test_hf_errors_name_the_keys(models):
    hf = convert.to_hf(models["registers_layerscale"], flavor="dinov2")
    bad = dict(hf)
    del bad["encoder.layer.1.attention.attention.value.bias"]
    bad["encoder.layer.0.mlp.weights_in.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError) as e:
        convert.hf_to_timm(bad)
    msg = str(e.value)
    assert "encoder.layer.0.mlp.weights_in.weight" in msg and "SwiGLU" in msg
    assert "encoder.layer.1.attention.attention.{value}.bias" in msg
    with pytest.raises(ValueError, match="no classifier"):
        convert.from_hf(hf, models["registers_layerscale"].cfg)   # num_classes=5, no head
    with pytest.raises(ValueError, match="embeddings.cls_token"):
        convert.hf_to_timm({"foo": np.zeros(1)})


def test_hf_config_dinov2_small():
    # Facts of facebook/dinov2-small's config.json.
    hf = dict(model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
              mlp_ratio=4, image_size=518, patch_size=14, layerscale_value=1.0,
              layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False)
    cfg = convert.hf_config(hf, img_size=224)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.grid) == \
        (384, 12, 6, 14, 16)
    assert cfg.layer_scale_init == 1.0 and cfg.ln_eps == 1e-6 and cfg.num_classes == 0
    assert convert.hf_config(hf).img_size == 518
    with pytest.raises(ValueError, match="swiglu"):
        convert.hf_config({**hf, "use_swiglu_ffn": True})
    vit = convert.hf_config(dict(model_type="vit", hidden_size=768, num_hidden_layers=12,
                                 num_attention_heads=12, intermediate_size=3072,
                                 architectures=["ViTForImageClassification"],
                                 id2label={str(i): str(i) for i in range(1000)}))
    assert vit.ln_eps == 1e-12 and vit.num_classes == 1000 and vit.mlp_ratio == 4.0


# --------------------------------------------------------------------------------------------
# Position-table resampling
# --------------------------------------------------------------------------------------------

# torch 2.13 F.interpolate(mode="bicubic", align_corners=False) of a 4 x 4 grid
# g = sin(0.7 * arange(16)).reshape(4, 4) (float32); "dinov2" uses scale_factor=(n + 0.1) / 4.
_G = np.sin(np.arange(16, dtype=np.float64) * 0.7).astype(np.float32).reshape(4, 4)
_TORCH = {
    ("hf", 3): [0.1231651, 0.6460711, 0.5859483, -0.2624997, -0.2579247, -0.0205928,
                0.5836721, 0.0484465, -0.5304981],
    ("timm", 3): [0.1936526, 0.4216865, 0.3336380, -0.1989312, -0.1804264, -0.0266799,
                  0.4075881, 0.1236259, -0.2530022],
    ("dinov2", 3): [0.1082866, 0.6688368, 0.6502025, -0.1820368, -0.3530888, -0.2193799,
                    0.4226040, 0.1315721, -0.2701846],
    ("hf", 6): [-0.0950223, 0.3117496, 0.8583845, 1.1108232, 1.1240423, 1.0127265, 0.2707390,
                0.2037884, 0.0738339, -0.0466762, -0.1839873, -0.2580827, 0.2507446,
                -0.0569642, -0.4985094, -0.7448344, -0.8495848, -0.8301767, -0.6623108,
                -0.4013886, 0.0435043, 0.3915697, 0.7186107, 0.8650671, 0.0053385, 0.1036736,
                0.2313826, 0.2836456, 0.2718447, 0.2346787, 1.0389832, 0.7395210, 0.1852087,
                -0.3005796, -0.8236408, -1.0927492],
    ("timm", 6): [-0.0701778, 0.2988902, 0.8013471, 1.0753078, 1.0659194, 0.9765429,
                  0.2184353, 0.1939946, 0.1365579, 0.0451889, -0.0618180, -0.1306574,
                  0.2595838, -0.0316190, -0.4511489, -0.7372564, -0.8326566, -0.8335461,
                  -0.6326360, -0.3760197, 0.0393292, 0.4297930, 0.7171919, 0.8592073,
                  0.0919545, 0.1451724, 0.2060879, 0.2106295, 0.1578880, 0.1093068,
                  0.9927064, 0.7091683, 0.2170507, -0.3149748, -0.7803844, -1.0400008],
    ("dinov2", 6): [-0.0970519, 0.2994411, 0.8419273, 1.1052929, 1.1375223, 1.0186504,
                    0.2591973, 0.2086802, 0.1035951, -0.0025855, -0.1352700, -0.2140867,
                    0.2831329, -0.0291777, -0.4866021, -0.7548639, -0.8879163, -0.8729632,
                    -0.6356843, -0.4058958, -0.0070636, 0.3160584, 0.6365740, 0.7882575,
                    -0.0917926, 0.0398162, 0.2285663, 0.3335155, 0.3752484, 0.3584706,
                    1.0034488, 0.7249112, 0.2075297, -0.2526697, -0.7625057, -1.0350294],
}


@pytest.mark.parametrize("method,size", sorted(_TORCH))
def test_resample_matches_torch(method, size):
    pos = np.concatenate([np.full((1, 1, 1), 7.0, np.float32), _G.reshape(1, 16, 1)], axis=1)
    out = convert.resample_pos_embed(pos, size, num_prefix_tokens=1, method=method)
    assert out.shape == (1, 1 + size * size, 1) and out.dtype == np.float32
    assert out[0, 0, 0] == 7.0                                    # prefix row kept
    # torch computes coordinates and weights in float32; we use float64 (<= 1e-6 apart here;
    # on the real 37 x 37 DINOv2 table, <= 2.4e-7).
    np.testing.assert_allclose(out[0, 1:, 0], _TORCH[(method, size)], atol=1e-6)


def test_resample_hf_matches_onnxruntime_resize():
    pytest.importorskip("onnx", reason="cross-check with onnxruntime's Resize")
    ort = pytest.importorskip("onnxruntime", reason="cross-check with onnxruntime's Resize")
    from onnx import TensorProto, helper
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(1, 3, 9, 9)).astype(np.float32)
    for size in (4, 13):
        sizes = helper.make_tensor("sizes", TensorProto.INT64, [4], [1, 3, size, size])
        node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic",
                                coordinate_transformation_mode="half_pixel",
                                cubic_coeff_a=-0.75)
        graph = helper.make_graph(
            [node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [sizes])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        ref = sess.run(["y"], {"x": grid})[0][0].transpose(1, 2, 0).reshape(1, size * size, 3)
        pos = grid[0].transpose(1, 2, 0).reshape(1, 81, 3)
        ours = convert.resample_pos_embed(pos, size, num_prefix_tokens=0, method="hf")
        np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2e-6)  # float32 weights there


def test_resample_checks_and_identity():
    pos = np.random.default_rng(1).normal(size=(1, 1 + 25, 4)).astype(np.float32)
    np.testing.assert_array_equal(convert.resample_pos_embed(pos, 5), pos)
    with pytest.raises(ValueError, match="not a square"):
        convert.resample_pos_embed(pos[:, :-1], 3)
    with pytest.raises(ValueError, match="method"):
        convert.resample_pos_embed(pos, 3, method="bilinear")
    rect = convert.resample_pos_embed(pos, (3, 7))
    assert rect.shape == (1, 1 + 21, 4)


def test_from_timm_resamples_pos_embed_on_request(models):
    big = _model(3, img_size=64)                                   # 8 x 8 grid
    sd = convert.to_timm(big)
    small_cfg = big.cfg.replace(img_size=32)                       # 4 x 4 grid
    with pytest.raises(ValueError, match="pos_embed"):
        convert.from_timm(sd, small_cfg)
    model = convert.from_timm(sd, small_cfg, pos_embed_resample="timm")
    want = convert.resample_pos_embed(sd["pos_embed"], 4, method="timm")
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), want)
