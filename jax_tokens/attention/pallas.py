"""Attention with importance statistics in Pallas kernels (TPU Mosaic and GPU Triton).

`attention_pallas` has the meaning of `attention_xla` without materialising the [Nq, Nk]
probabilities:

  * out and "lse": one flash-attention forward kernel (online softmax over key blocks) with the
    per-key bias log(key_size), the causal mask and an optional general bias applied inside;
  * "key_mass": a second kernel that streams the query blocks for each key block and sums
    exp(logits - lse) down the columns, using the lse the forward saved;
  * "cls_probs": one query row of logits against all keys, exp(logit - lse), in O(Nk * D);
  * "mean_key": `k.mean(axis=2)`, no kernel needed;
  * "value_norm": the norm of each key's values over the heads, from v, no kernel needed;
  * "full_key", "full_cls_probs": one head over the full width, from q and k, no kernel
    needed;
  * gradients: a `jax.custom_vjp` whose backward runs two kernels (dk/dv streaming query
    blocks, dq streaming key blocks). q, k, v, key_size and bias all get their gradients;
    lse, cls_probs and key_mass carry none (the oracle stops them too); mean_key is
    differentiable like the oracle's. The only Nq x Nk array anywhere is the bias gradient,
    written by the dq kernel only when a general bias is given.

Token counts that are not block multiples are padded with zero tokens inside: padded keys get
a -inf per-key bias, padded queries are sliced off (and masked out of "key_mass"), so callers
never see the padding. The TPU layout is [B, H, N, D] (a transpose on the way in and out);
the GPU kernels read the caller's [B, N, H, D] directly, with D zero-padded to a power of two.

The kernels live in `pallas_tpu.py` and `pallas_gpu.py`; this module validates, pads, wires the
custom VJP and computes the statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from jax_tokens.attention import pallas_gpu, pallas_tpu, xla
from jax_tokens.attention.checks import check_inputs

BACKENDS = ("tpu", "gpu")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MODULES = {"tpu": pallas_tpu, "gpu": pallas_gpu}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel parameters (hashable: it is a non-differentiable custom_vjp argument)."""
    backend: str
    scale: float
    causal: bool
    nq: int          # true query count (before padding)
    nk: int          # true key count
    block_q: int
    block_k: int
    interpret: Any   # False, True, or a pltpu.InterpretParams


def resolve_interpret(backend: str, interpret=None):
    """The `interpret` value handed to `pl.pallas_call` for this backend.

    None: interpret exactly when the default JAX backend is not the kernel's backend (so on
      CPU every kernel runs interpreted). The TPU kernels then run in TPU interpret mode
      (`pltpu.InterpretParams()`: simulated VMEM/HBM and DMAs, uninitialised memory filled
      with NaN, out-of-bounds reads raise) and the GPU kernels in Pallas's generic
      interpreter.
    True: Pallas's generic interpreter for either backend (a jitted loop over the grid with
      the kernel body inlined: much faster than TPU interpret mode, but it does not simulate
      TPU memory).
    A `pltpu.InterpretParams` instance is passed through as is (TPU kernels).
    False: compile for the device (also what ahead-of-time lowering for another platform,
      `jit(f).trace(...).lower(lowering_platforms=("tpu",))`, needs).
    """
    if interpret is None:
        if jax.default_backend() == backend:
            return False
        if backend == "tpu":
            return pltpu.InterpretParams()
        return True
    return interpret


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check(q, k, v, backend, bias, key_size, stats, scale, block_q, block_k):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    check_inputs(q, k, v, bias, key_size, stats)
    for name, a in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(a.dtype) not in DTYPES:
            raise TypeError(f"{name} has dtype {a.dtype}; the Pallas kernels take float32 or "
                            "bfloat16")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k need at least one token; got q {q.shape}, k {k.shape}")
    if scale is not None:
        try:
            float(scale)
        except Exception as e:  # a tracer, an array with more than one element, a string
            raise TypeError(f"scale must be a static Python float for the Pallas kernels; got "
                            f"{scale!r}") from e
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk is not None and not isinstance(blk, numbers.Integral):
            raise TypeError(f"{name} must be an int or None; got {blk!r}")


def _query_indices(query_index, nq):
    """(index array [L], squeeze?) for "cls_probs", checked against nq where concrete."""
    if isinstance(query_index, numbers.Integral):
        idx, squeeze = np.asarray([query_index]), True
    else:
        try:
            idx = np.asarray(query_index)
        except Exception:  # a traced index: no range check possible
            idx = jnp.asarray(query_index)
        squeeze = False
        if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
            raise ValueError(f"query_index must be an int or a 1-D sequence of ints; got "
                             f"{query_index!r}")
    if isinstance(idx, np.ndarray) and ((idx < -nq) | (idx >= nq)).any():
        raise ValueError(f"query_index={query_index!r} is out of range for {nq} queries")
    return idx, squeeze


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, kb, bias, cfg):
    return _MODULES[cfg.backend].forward(q, k, v, kb, bias, cfg)


def _flash_fwd(q, k, v, kb, bias, cfg):
    out, lse = _MODULES[cfg.backend].forward(q, k, v, kb, bias, cfg)
    return (out, lse), (q, k, v, kb, bias, out, lse)


def _flash_bwd(cfg, res, cts):
    q, k, v, kb, bias, out, lse = res
    dout, _ = cts  # lse is a statistic: its cotangent is dropped (the oracle stops it too)
    mod = _MODULES[cfg.backend]
    dout = dout.astype(out.dtype)
    delta = mod.row_dot(out, dout)
    dq, dk, dv, dkb, dbias = mod.backward(q, k, v, kb, bias, lse, delta, dout, cfg)
    dkb = jnp.sum(dkb, axis=1)  # per-key bias is shared by the heads
    if bias is not None:
        axes = tuple(a for a in (0, 1) if bias.shape[a] == 1)
        dbias = jnp.sum(dbias, axis=axes, keepdims=True).astype(bias.dtype)
    return dq, dk, dv, dkb, dbias


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- statistics


def _cls_probs(q, k, kb, bias, lse, idx, squeeze, scale, causal):
    """Probability rows of the queries `idx`: [B, H, L, Nk] fp32, O(L * Nk * D), normalised
    by the kernel's lse."""
    pos = jnp.asarray(idx) % q.shape[1]
    extra = kb[:, None, None, :]
    if bias is not None:
        extra = extra + bias.astype(jnp.float32)
    logits = xla.row_logits(q, k, pos, scale, extra=extra, causal=causal)
    probs = jnp.exp(logits - jnp.take(lse, pos, axis=2)[..., None])
    return probs[:, :, 0] if squeeze else probs


def attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str,
                     bias: jax.Array | None = None, key_size: jax.Array | None = None,
                     causal: bool = False, stats: Sequence[str] = (),
                     query_index: int | Sequence[int] = 0, scale: float | None = None,
                     interpret=None, block_q: int | None = None, block_k: int | None = None):
    """Attention plus statistics in Pallas kernels; same meaning as `attention_xla`.

    Args:
      q: [B, Nq, H, D] queries; k, v: [B, Nk, H, D]; one dtype, float32 or bfloat16.
      backend: "tpu" (Mosaic kernels) or "gpu" (Triton kernels).
      bias: optional additive bias broadcastable to [B, H, Nq, Nk] (each dim full or 1). It
        is applied inside the kernels (read block by block, broadcast dims read once) and gets
        a gradient; the backward then writes dS as a [B, H, Nq, Nk] fp32 array, which is the
        one place an Nq x Nk array is materialised, and only when a bias is given.
      key_size: optional [B, Nk] token sizes; log(size) is added to each key's logits inside
        the kernels (proportional attention). It gets its gradient (column sums of dS).
      causal: query i sees keys j <= i + Nk - Nq; fully masked blocks are skipped. With
        Nq > Nk the first Nq - Nk queries see no key and get NaN rows, as in the oracle.
      stats: names from ("lse", "cls_probs", "key_mass", "mean_key", "probs"); see
        `jax_tokens.attention.attention`. Statistics are fp32 (mean_key: k's dtype) and carry
        no gradient, except mean_key, which is `k.mean(axis=2)` and differentiable.
      query_index: row(s) returned by "cls_probs": an int, or a 1-D sequence of ints.
      scale: static logits scale, default D ** -0.5.
      interpret: None = interpret exactly when the default backend is not `backend` (TPU
        kernels in TPU interpret mode, `pltpu.InterpretParams()`; GPU kernels in the generic
        interpreter); True = Pallas's generic interpreter (fast, no TPU memory simulation);
        a `pltpu.InterpretParams` is passed through; False = compile for the device.
      block_q, block_k: token block sizes (TPU: multiples of 128, default 128; GPU: powers of
        two >= 16, default min(64, next power of two of N)). Tokens are padded to them.

    Returns:
      (out [B, Nq, H, D] in q's dtype, dict of the requested statistics).
    """
    stats = tuple(stats)
    _check(q, k, v, backend, bias, key_size, stats, scale, block_q, block_k)
    mod = _MODULES[backend]
    b, nq, h, d = q.shape
    nk = k.shape[1]
    scale = float(d ** -0.5 if scale is None else scale)
    default_q, default_k = mod.default_blocks(nq, nk)
    bq = int(block_q or default_q)
    bk = int(block_k or default_k)
    mod.check_blocks(bq, bk)
    idx, squeeze = _query_indices(query_index, nq) if "cls_probs" in stats else (None, None)
    cfg = KernelConfig(backend=backend, scale=scale, causal=bool(causal), nq=nq, nk=nk,
                       block_q=bq, block_k=bk, interpret=resolve_interpret(backend, interpret))
    nqp, nkp = _round_up(nq, bq), _round_up(nk, bk)

    if key_size is None:
        kb = jnp.zeros((b, nk), jnp.float32)
    else:
        kb = jnp.log(key_size.astype(jnp.float32))
    kb_pad = jnp.pad(kb, ((0, 0), (0, nkp - nk)), constant_values=-jnp.inf)
    bias_pad = None
    if bias is not None:
        full = jnp.broadcast_to(bias, bias.shape[:2] + (nq, nk))
        bias_pad = jnp.pad(full, ((0, 0), (0, 0), (0, nqp - nq), (0, nkp - nk)))

    qp, kp, vp = mod.to_layout(q, nqp), mod.to_layout(k, nkp), mod.to_layout(v, nkp)
    out_p, lse_p = _flash(qp, kp, vp, kb_pad, bias_pad, cfg)
    out = mod.from_layout(out_p, nq, d)
    lse_p = jax.lax.stop_gradient(lse_p)
    lse = lse_p[:, :, :nq]

    result = {}
    for name in stats:
        if name == "lse":
            result["lse"] = lse
        elif name == "key_mass":
            sg = jax.lax.stop_gradient
            km = mod.key_mass(sg(qp), sg(kp), sg(kb_pad),
                              None if bias_pad is None else sg(bias_pad), lse_p, cfg)
            result["key_mass"] = km[:, :, :nk]
        elif name == "cls_probs":
            sg = jax.lax.stop_gradient
            result["cls_probs"] = _cls_probs(
                sg(q), sg(k), sg(kb), None if bias is None else sg(bias), lse, idx, squeeze,
                scale, cfg.causal)
        elif name == "probs":      # N x N by definition: rebuilt from lse outside the kernel
            sg = jax.lax.stop_gradient
            result["probs"] = _cls_probs(
                sg(q), sg(k), sg(kb), None if bias is None else sg(bias), lse,
                np.arange(nq), False, scale, cfg.causal)
        elif name in xla.INPUT_STATS:    # from the q, k, v inputs, outside the kernels
            result.update(xla.input_stats(q, k, v, (name,), key_size=key_size,
                                          causal=cfg.causal, query_index=query_index))
    return out, result
