"""Pallas GPU (Triton lowering) kernels: flash attention with lse, key mass, and the backward.

Every function here works on arrays already in kernel layout, which `pallas.py` prepares:

  q, k, v, out, do:  [B, N_pad, H, D_pad]  (the caller's layout; D padded to a power of two
                     >= 16 with zeros, which changes no logit and no output column)
  kb:                [B, Nk_pad] fp32, the additive per-key bias: log(key_size) for real keys
                     (0 without sizes) and -inf for padded keys.
  bias:              [B|1, H|1, Nq_pad, Nk_pad] general additive bias (optional).
  lse, delta:        [B, H, Nq_pad] fp32.

One program handles one (token block, batch, head) and loops over the other token axis with
`lax.fori_loop`, keeping its accumulators in registers. Key mass and dk/dv run one program per
key block that streams all query blocks, so nothing needs atomics. Triton wants power-of-two
block shapes of at least 16, which the block sizes and D padding guarantee.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_M_INIT = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_MIN_BLOCK = 16


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_blocks(block_q: int, block_k: int) -> None:
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < _MIN_BLOCK or not _is_pow2(b):
            raise ValueError(f"{name}={b} must be a power of two >= {_MIN_BLOCK} for the GPU "
                             "(Triton) kernels")


def default_blocks(nq: int, nk: int) -> tuple[int, int]:
    def pick(n):
        return max(_MIN_BLOCK, min(64, pl.next_power_of_2(n)))
    return pick(nq), pick(nk)


def head_dim_pad(d: int) -> int:
    return max(_MIN_BLOCK, pl.next_power_of_2(d))


def to_layout(x: jax.Array, n_pad: int) -> jax.Array:
    """[B, N, H, D] -> [B, N_pad, H, D_pad] with zero padding."""
    d_pad = head_dim_pad(x.shape[-1])
    return jnp.pad(x, ((0, 0), (0, n_pad - x.shape[1]), (0, 0), (0, d_pad - x.shape[-1])))


def from_layout(x: jax.Array, n: int, d: int) -> jax.Array:
    return x[:, :n, :, :d]


def row_dot(out: jax.Array, dout: jax.Array) -> jax.Array:
    """delta = rowsum(out * dout) as [B, H, N_pad] fp32."""
    return jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))


# ----------------------------------------------------------------------------- helpers


def _num_k_blocks(i, bq, bk, offset, nk_blocks):
    """Causal: how many key blocks (from 0) query block i needs."""
    t = (i + 1) * bq - 1 + offset
    return jnp.minimum(lax.div(jnp.maximum(t + bk, 0), bk), nk_blocks)


def _first_q_block(j, bq, bk, offset, nq_blocks):
    """Causal: the first query block that sees any key of key block j."""
    return jnp.minimum(lax.div(jnp.maximum(j * bk - offset, 0), bq), nq_blocks)


def _logits(q, k, kb, bias, *, scale, causal, q0, k0, offset):
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    s = s + kb[None, :]
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if causal:
        rows = q0 + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(cols <= rows + offset, s, -jnp.inf)
    return s


def _bias_index(bias):
    full_b, full_h = bias.shape[0] > 1, bias.shape[1] > 1
    return lambda b, h: (b if full_b else 0, h if full_h else 0)


def _params(interpret, num_warps):
    return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
                interpret=interpret)


def _warps(d):
    return 4 if d <= 64 else 8


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, scale, causal, offset, bk, nk_blocks, has_bias):
    refs = list(refs)
    bias_ref = refs.pop(4) if has_bias else None
    q_ref, k_ref, v_ref, kb_ref, o_ref, lse_ref = refs
    bq = q_ref.shape[0]
    i = pl.program_id(0)
    q = q_ref[...]

    def body(j, carry):
        acc, m, l = carry
        k0 = pl.multiple_of(j * bk, bk)
        ks = pl.ds(k0, bk)
        s = _logits(q, k_ref[ks, :], kb_ref[ks], None if bias_ref is None else bias_ref[:, ks],
                    scale=scale, causal=causal, q0=i * bq, k0=k0, offset=offset)
        m_next = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        v = v_ref[ks, :]
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
        return acc, m_next, alpha * l + jnp.sum(p, axis=1)

    upper = _num_k_blocks(i, bq, bk, offset, nk_blocks) if causal else nk_blocks
    init = (jnp.zeros(q_ref.shape, jnp.float32), jnp.full((bq,), _M_INIT, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, upper, body, init)
    # A row with no visible key has l == 0: NaN output and lse = -inf, as the XLA oracle.
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def forward(q, k, v, kb, bias, cfg):
    """Returns out [B, Nq_pad, H, D_pad] and lse [B, H, Nq_pad] fp32."""
    b, nqp, h, d = q.shape
    nkp = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    has_bias = bias is not None
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
        pl.BlockSpec((None, nkp, None, d), lambda i, b_, h_: (b_, 0, h_, 0)),
        pl.BlockSpec((None, nkp, None, d), lambda i, b_, h_: (b_, 0, h_, 0)),
        pl.BlockSpec((None, nkp), lambda i, b_, h_: (b_, 0)),
    ]
    args = [q, k, v, kb]
    if has_bias:
        bidx = _bias_index(bias)
        in_specs.append(pl.BlockSpec((None, None, bq, nkp),
                                     lambda i, b_, h_: (*bidx(b_, h_), i, 0)))
        args.append(bias)
    kernel = functools.partial(_fwd_kernel, scale=cfg.scale, causal=cfg.causal,
                               offset=cfg.nk - cfg.nq, bk=bk, nk_blocks=nkp // bk,
                               has_bias=has_bias)
    return pl.pallas_call(
        kernel,
        grid=(nqp // bq, b, h),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, nqp), jnp.float32)],
        name="jax_tokens_flash_fwd_gpu",
        **_params(cfg.interpret, _warps(d)),
    )(*args)


# ----------------------------------------------------------------------------- key mass


def _key_mass_kernel(*refs, scale, causal, offset, nq, bq, nq_blocks, has_bias):
    refs = list(refs)
    bias_ref = refs.pop(3) if has_bias else None
    q_ref, k_ref, kb_ref, lse_ref, km_ref = refs
    bk = k_ref.shape[0]
    j = pl.program_id(0)
    k, kb = k_ref[...], kb_ref[...]

    def body(i, acc):
        q0 = pl.multiple_of(i * bq, bq)
        qs = pl.ds(q0, bq)
        s = _logits(q_ref[qs, :], k, kb, None if bias_ref is None else bias_ref[qs, :],
                    scale=scale, causal=causal, q0=q0, k0=j * bk, offset=offset)
        p = jnp.exp(s - lse_ref[qs][:, None])
        if nq % bq:  # padded query rows must not add mass
            rows = q0 + lax.broadcasted_iota(jnp.int32, p.shape, 0)
            p = jnp.where(rows < nq, p, 0.0)
        return acc + jnp.sum(p, axis=0)

    lower = _first_q_block(j, bq, bk, offset, nq_blocks) if causal else 0
    km_ref[...] = lax.fori_loop(lower, nq_blocks, body, jnp.zeros((bk,), jnp.float32))


def key_mass(q, k, kb, bias, lse, cfg):
    """Attention each key receives, summed over queries: [B, H, Nk_pad] fp32.

    One program per (key block, batch, head) streams the query blocks and keeps the column
    sums of exp(s - lse) in registers; no atomics.
    """
    b, nqp, h, d = q.shape
    nkp = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    has_bias = bias is not None
    in_specs = [
        pl.BlockSpec((None, nqp, None, d), lambda j, b_, h_: (b_, 0, h_, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_, 0)),
        pl.BlockSpec((None, bk), lambda j, b_, h_: (b_, j)),
    ]
    args = [q, k, kb]
    if has_bias:
        bidx = _bias_index(bias)
        in_specs.append(pl.BlockSpec((None, None, nqp, bk),
                                     lambda j, b_, h_: (*bidx(b_, h_), 0, j)))
        args.append(bias)
    in_specs.append(pl.BlockSpec((None, None, nqp), lambda j, b_, h_: (b_, h_, 0)))
    args.append(lse)
    kernel = functools.partial(_key_mass_kernel, scale=cfg.scale, causal=cfg.causal,
                               offset=cfg.nk - cfg.nq, nq=cfg.nq, bq=bq, nq_blocks=nqp // bq,
                               has_bias=has_bias)
    return pl.pallas_call(
        kernel,
        grid=(nkp // bk, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bk), lambda j, b_, h_: (b_, h_, j)),
        out_shape=jax.ShapeDtypeStruct((b, h, nkp), jnp.float32),
        name="jax_tokens_key_mass_gpu",
        **_params(cfg.interpret, _warps(d)),
    )(*args)


# ----------------------------------------------------------------------------- backward


def _dkdv_kernel(*refs, scale, causal, offset, bq, nq_blocks, has_bias):
    refs = list(refs)
    bias_ref = refs.pop(4) if has_bias else None
    q_ref, k_ref, v_ref, kb_ref, lse_ref, delta_ref, do_ref, dk_ref, dv_ref, dkb_ref = refs
    bk = k_ref.shape[0]
    j = pl.program_id(0)
    k, v, kb = k_ref[...], v_ref[...], kb_ref[...]

    def body(i, carry):
        dk, dv, dkb = carry
        q0 = pl.multiple_of(i * bq, bq)
        qs = pl.ds(q0, bq)
        q, do = q_ref[qs, :], do_ref[qs, :]
        s = _logits(q, k, kb, None if bias_ref is None else bias_ref[qs, :],
                    scale=scale, causal=causal, q0=q0, k0=j * bk, offset=offset)
        p = jnp.exp(s - lse_ref[qs][:, None])
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[qs][:, None])
        dv = dv + lax.dot_general(p.astype(do.dtype), do, _TN,
                                  preferred_element_type=jnp.float32)
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, _TN,
                                  preferred_element_type=jnp.float32)
        return dk, dv, dkb + jnp.sum(ds, axis=0)

    lower = _first_q_block(j, bq, bk, offset, nq_blocks) if causal else 0
    init = (jnp.zeros(k_ref.shape, jnp.float32), jnp.zeros(v_ref.shape, jnp.float32),
            jnp.zeros((bk,), jnp.float32))
    dk, dv, dkb = lax.fori_loop(lower, nq_blocks, body, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dkb_ref[...] = dkb


def _dq_kernel(*refs, scale, causal, offset, bk, nk_blocks, has_bias):
    refs = list(refs)
    bias_ref = refs.pop(4) if has_bias else None
    q_ref, k_ref, v_ref, kb_ref, lse_ref, delta_ref, do_ref, dq_ref = refs[:8]
    dbias_ref = refs[8] if has_bias else None
    bq = q_ref.shape[0]
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def body(j, dq):
        k0 = pl.multiple_of(j * bk, bk)
        ks = pl.ds(k0, bk)
        k = k_ref[ks, :]
        s = _logits(q, k, kb_ref[ks], None if bias_ref is None else bias_ref[:, ks],
                    scale=scale, causal=causal, q0=i * bq, k0=k0, offset=offset)
        p = jnp.exp(s - lse)
        dp = lax.dot_general(do, v_ref[ks, :], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        if dbias_ref is not None:
            dbias_ref[:, ks] = ds
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    upper = _num_k_blocks(i, bq, bk, offset, nk_blocks) if causal else nk_blocks
    dq = lax.fori_loop(0, upper, body, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    if dbias_ref is not None and causal:
        def zero(j, carry):
            dbias_ref[:, pl.ds(pl.multiple_of(j * bk, bk), bk)] = jnp.zeros((bq, bk), jnp.float32)
            return carry
        lax.fori_loop(upper, nk_blocks, zero, 0)


def backward(q, k, v, kb, bias, lse, delta, do, cfg):
    """Returns dq, dk, dv (kernel layout), dkb [B, H, Nk_pad] and dbias [B, H, Nq_pad, Nk_pad].

    dkb is the column sum of dS (gradient of the per-key bias, per head); dbias is dS itself,
    written only when a general bias is given (None otherwise).
    """
    b, nqp, h, d = q.shape
    nkp = k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    offset = cfg.nk - cfg.nq
    has_bias = bias is not None
    bidx = _bias_index(bias) if has_bias else None

    # dk, dv: one program per key block, streaming query blocks.
    in_specs = [
        pl.BlockSpec((None, nqp, None, d), lambda j, b_, h_: (b_, 0, h_, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_, 0)),
        pl.BlockSpec((None, bk), lambda j, b_, h_: (b_, j)),
        pl.BlockSpec((None, None, nqp), lambda j, b_, h_: (b_, h_, 0)),
        pl.BlockSpec((None, None, nqp), lambda j, b_, h_: (b_, h_, 0)),
        pl.BlockSpec((None, nqp, None, d), lambda j, b_, h_: (b_, 0, h_, 0)),
    ]
    args = [q, k, v, kb, lse, delta, do]
    if has_bias:
        in_specs.insert(4, pl.BlockSpec((None, None, nqp, bk),
                                        lambda j, b_, h_: (*bidx(b_, h_), 0, j)))
        args.insert(4, bias)
    kernel = functools.partial(_dkdv_kernel, scale=cfg.scale, causal=cfg.causal, offset=offset,
                               bq=bq, nq_blocks=nqp // bq, has_bias=has_bias)
    dk, dv, dkb = pl.pallas_call(
        kernel,
        grid=(nkp // bk, b, h),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_, 0)),
                   pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_, 0)),
                   pl.BlockSpec((None, None, bk), lambda j, b_, h_: (b_, h_, j))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((b, h, nkp), jnp.float32)],
        name="jax_tokens_flash_dkdv_gpu",
        **_params(cfg.interpret, _warps(d)),
    )(*args)

    # dq (and dbias): one program per query block, streaming key blocks.
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
        pl.BlockSpec((None, nkp, None, d), lambda i, b_, h_: (b_, 0, h_, 0)),
        pl.BlockSpec((None, nkp, None, d), lambda i, b_, h_: (b_, 0, h_, 0)),
        pl.BlockSpec((None, nkp), lambda i, b_, h_: (b_, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
        pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
        pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
    ]
    args = [q, k, v, kb, lse, delta, do]
    out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if has_bias:
        in_specs.insert(4, pl.BlockSpec((None, None, bq, nkp),
                                        lambda i, b_, h_: (*bidx(b_, h_), i, 0)))
        args.insert(4, bias)
        out_specs.append(pl.BlockSpec((None, None, bq, nkp), lambda i, b_, h_: (b_, h_, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, nqp, nkp), jnp.float32))
    kernel = functools.partial(_dq_kernel, scale=cfg.scale, causal=cfg.causal, offset=offset,
                               bk=bk, nk_blocks=nkp // bk, has_bias=has_bias)
    res = pl.pallas_call(
        kernel,
        grid=(nqp // bq, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name="jax_tokens_flash_dq_gpu",
        **_params(cfg.interpret, _warps(d)),
    )(*args)
    return res[0], dk, dv, dkb, (res[1] if has_bias else None)
