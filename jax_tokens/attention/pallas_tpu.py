"""Pallas TPU (Mosaic) kernels: flash attention with lse, key mass, and the backward pass.

Every function here works on arrays already in kernel layout, which `pallas.py` prepares:

  q, k, v, out, do:  [B, H, N_pad, D]  (heads before tokens: a block is a dense [tokens, D] tile)
  kb:                [B, 1, Nk_pad] fp32, the additive per-key bias: log(key_size) for real keys
                     (0 without sizes) and -inf for padded keys, so key padding costs nothing.
  bias:              [B|1, H|1, Nq_pad, Nk_pad] general additive bias (optional).
  lse, delta:        [B, H, 1, Nq_pad] fp32, lane-dense rows (one number per query, not 128).

Block sizes are multiples of 128 in both token dimensions, so every block's minor dimension is
lane aligned. Per-query statistics are stored as rows [1, block_q] and turned into columns
[block_q, 1] inside the kernel with one small transpose.

Grid order: the dimension that carries an accumulator is last and "arbitrary"; all others are
"parallel". Causal masking skips blocks above the diagonal with `pl.when`, and the index maps
clamp skipped blocks onto a block that is needed anyway, so skipped steps issue no new DMA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
# Initial running maximum: finite, so exp(m_prev - m_next) is never exp(-inf + inf).
_M_INIT = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # contract the last dim of both operands: a @ b.T


def check_blocks(block_q: int, block_k: int) -> None:
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b <= 0 or b % LANES:
            raise ValueError(f"{name}={b} must be a positive multiple of {LANES} for the TPU "
                             "kernels (token blocks are lane dimensions of the logits tile)")


def default_blocks(nq: int, nk: int) -> tuple[int, int]:
    del nq, nk
    return 128, 128


def to_layout(x: jax.Array, n_pad: int) -> jax.Array:
    """[B, N, H, D] -> [B, H, N_pad, D] with zero rows appended."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - x.shape[2]), (0, 0)))


def from_layout(x: jax.Array, n: int, d: int) -> jax.Array:
    """[B, H, N_pad, D] -> [B, N, H, D]."""
    return jnp.swapaxes(x[:, :, :n, :d], 1, 2)


def row_dot(out: jax.Array, dout: jax.Array) -> jax.Array:
    """delta = rowsum(out * dout) as [B, H, N_pad] fp32."""
    return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------- helpers


def _row_to_col(row):
    """[1, n] -> [n, 1] (n a multiple of 128): broadcast to an aligned tile and transpose."""
    n = row.shape[1]
    return jnp.broadcast_to(row, (LANES, n)).T[:, :1]


def _col_to_row(col):
    """[n, 1] -> [1, n]."""
    n = col.shape[0]
    return jnp.broadcast_to(col, (n, LANES)).T[:1, :]


def last_k_block(i, bq, bk, offset, nk_blocks):
    """Causal: the last key block query block i needs (may be < 0 when it needs none)."""
    t = (i + 1) * bq - 1 + offset
    return jnp.minimum(lax.div(jnp.maximum(t + bk, 0), bk) - 1, nk_blocks - 1)


def first_q_block(j, bq, bk, offset, nq_blocks):
    """Causal: the first query block that sees any key of key block j."""
    return jnp.minimum(lax.div(jnp.maximum(j * bk - offset, 0), bq), nq_blocks - 1)


def _key_block_map(cfg, nk_blocks):
    """Key-block index of a (batch, head, query block i, key block j) grid step. Causal: steps
    past the last block query block i needs re-read that block (an unchanged block index, so
    Pallas skips the copy; the kernel skips the step)."""
    offset = cfg.nk - cfg.nq

    def kmap(b_, h_, i, j):
        if cfg.causal:
            last = last_k_block(i, cfg.block_q, cfg.block_k, offset, nk_blocks)
            j = jnp.maximum(jnp.minimum(j, last), 0)
        return j
    return kmap


def _query_block_map(cfg, nq_blocks):
    """Query-block index of a (batch, head, key block j, query block i) grid step. Causal:
    steps before the first query block that sees key block j re-read that block."""
    offset = cfg.nk - cfg.nq

    def qmap(b_, h_, j, i):
        if cfg.causal:
            i = jnp.maximum(i, first_q_block(j, cfg.block_q, cfg.block_k, offset, nq_blocks))
        return i
    return qmap


def _block_needed(i, j, bq, bk, offset):
    """Causal: does query block i see any key of key block j?"""
    return j * bk <= (i + 1) * bq - 1 + offset


def _logits(q, k, kb_row, bias, *, scale, causal, q0, k0, offset):
    """fp32 logits tile [bq, bk] with key bias, general bias and causal mask (-inf)."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    s = s + kb_row
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if causal:
        rows = lax.broadcasted_iota(jnp.int32, s.shape, 0) + q0
        cols = lax.broadcasted_iota(jnp.int32, s.shape, 1) + k0
        s = jnp.where(cols <= rows + offset, s, -jnp.inf)
    return s


def _split(refs, has_bias):
    refs = list(refs)
    return refs, (refs.pop(4) if has_bias else None)


def _spec(block, index_map):
    return pl.BlockSpec(block, index_map)


def _bias_spec(bias, bq, bk, qmap, kmap):
    """BlockSpec for bias [Bb, Hb, Nq_pad, Nk_pad]; broadcast batch/head dims read block 0."""
    full_b, full_h = bias.shape[0] > 1, bias.shape[1] > 1

    def index(*g):
        b, h = g[0], g[1]
        return (b if full_b else 0, h if full_h else 0, qmap(*g), kmap(*g))
    return _spec((None, None, bq, bk), index)


def _params(interpret, *semantics):
    return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
                interpret=interpret)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, scale, causal, offset, nk_blocks, has_bias):
    (q_ref, k_ref, v_ref, kb_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc), bias_ref = _split(
        refs, has_bias)
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _M_INIT, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step():
        s = _logits(q_ref[...], k_ref[...], kb_ref[...],
                    None if bias_ref is None else bias_ref[...],
                    scale=scale, causal=causal, q0=i * bq, k0=j * bk, offset=offset)
        m_prev, l_prev = m_sc[:, :1], l_sc[:, :1]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next)  # masked entries are exp(-inf) = 0
        l_sc[...] = jnp.broadcast_to(alpha * l_prev + jnp.sum(p, axis=1, keepdims=True),
                                     l_sc.shape)
        m_sc[...] = jnp.broadcast_to(m_next, m_sc.shape)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v,
                                                    preferred_element_type=jnp.float32)

    if causal:
        pl.when(_block_needed(i, j, bq, bk, offset))(step)
    else:
        step()

    @pl.when(j == nk_blocks - 1)
    def _finish():
        l, m = l_sc[:, :1], m_sc[:, :1]
        # A row with no visible key has l == 0: NaN output and lse = -inf, as the XLA oracle.
        o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
        lse_ref[...] = _col_to_row(m + jnp.log(l))


def forward(q, k, v, kb, bias, cfg):
    """Flash-attention forward. Returns out [B, H, Nq_pad, D] and lse [B, H, Nq_pad] fp32."""
    b, h, nqp, d = q.shape
    nkp = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq_blocks, nk_blocks = nqp // bq, nkp // bk
    offset = cfg.nk - cfg.nq
    has_bias = bias is not None

    kmap = _key_block_map(cfg, nk_blocks)

    in_specs = [
        _spec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
        _spec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, kmap(b_, h_, i, j), 0)),
        _spec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, kmap(b_, h_, i, j), 0)),
        _spec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, kmap(b_, h_, i, j))),
    ]
    args = [q, k, v, kb[:, None, :]]
    if has_bias:
        in_specs.append(_bias_spec(bias, bq, bk, lambda b_, h_, i, j: i, kmap))
        args.append(bias)
    kernel = functools.partial(_fwd_kernel, scale=cfg.scale, causal=cfg.causal, offset=offset,
                               nk_blocks=nk_blocks, has_bias=has_bias)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, h, nq_blocks, nk_blocks),
        in_specs=in_specs,
        out_specs=[_spec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
                   _spec((None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i))],
        out_shape=[jax.ShapeDtypeStruct((b, h, nqp, d), q.dtype),
                   jax.ShapeDtypeStruct((b, h, 1, nqp), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        name="jax_tokens_flash_fwd_tpu",
        **_params(cfg.interpret, "parallel", "parallel", "parallel", "arbitrary"),
    )(*args)
    return out, lse[:, :, 0, :]


# ----------------------------------------------------------------------------- key mass


def _key_mass_kernel(*refs, scale, causal, offset, nq, nq_blocks, has_bias):
    (q_ref, k_ref, kb_ref, lse_ref, km_ref, acc_sc), bias_ref = _split_km(refs, has_bias)
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step():
        s = _logits(q_ref[...], k_ref[...], kb_ref[...],
                    None if bias_ref is None else bias_ref[...],
                    scale=scale, causal=causal, q0=i * bq, k0=j * bk, offset=offset)
        p = jnp.exp(s - _row_to_col(lse_ref[...]))
        if nq % bq:  # padded query rows must not add mass
            rows = lax.broadcasted_iota(jnp.int32, p.shape, 0) + i * bq
            p = jnp.where(rows < nq, p, 0.0)
        acc_sc[...] += jnp.sum(p, axis=0, keepdims=True)

    if causal:
        pl.when(_block_needed(i, j, bq, bk, offset))(step)
    else:
        step()

    @pl.when(i == nq_blocks - 1)
    def _finish():
        km_ref[...] = acc_sc[...]


def _split_km(refs, has_bias):
    refs = list(refs)
    return refs, (refs.pop(3) if has_bias else None)


def key_mass(q, k, kb, bias, lse, cfg):
    """Attention each key receives, summed over queries: [B, H, Nk_pad] fp32.

    Grid (B, H, key blocks, query blocks): key blocks are "parallel", the query blocks are
    streamed ("arbitrary") and the column sums of exp(s - lse) accumulate in VMEM; no atomics.
    """
    b, h, nqp, d = q.shape
    nkp = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq_blocks, nk_blocks = nqp // bq, nkp // bk
    offset = cfg.nk - cfg.nq
    has_bias = bias is not None

    qmap = _query_block_map(cfg, nq_blocks)

    in_specs = [
        _spec((None, None, bq, d), lambda b_, h_, j, i: (b_, h_, qmap(b_, h_, j, i), 0)),
        _spec((None, None, bk, d), lambda b_, h_, j, i: (b_, h_, j, 0)),
        _spec((None, 1, bk), lambda b_, h_, j, i: (b_, 0, j)),
    ]
    args = [q, k, kb[:, None, :]]
    if has_bias:
        in_specs.append(_bias_spec(bias, bq, bk, qmap, lambda b_, h_, j, i: j))
        args.append(bias)
    in_specs.append(_spec((None, None, 1, bq),
                          lambda b_, h_, j, i: (b_, h_, 0, qmap(b_, h_, j, i))))
    args.append(lse[:, :, None, :])
    kernel = functools.partial(_key_mass_kernel, scale=cfg.scale, causal=cfg.causal,
                               offset=offset, nq=cfg.nq, nq_blocks=nq_blocks, has_bias=has_bias)
    km = pl.pallas_call(
        kernel,
        grid=(b, h, nk_blocks, nq_blocks),
        in_specs=in_specs,
        out_specs=_spec((None, None, 1, bk), lambda b_, h_, j, i: (b_, h_, 0, j)),
        out_shape=jax.ShapeDtypeStruct((b, h, 1, nkp), jnp.float32),
        scratch_shapes=[pltpu.VMEM((1, bk), jnp.float32)],
        name="jax_tokens_key_mass_tpu",
        **_params(cfg.interpret, "parallel", "parallel", "parallel", "arbitrary"),
    )(*args)
    return km[:, :, 0, :]


# ----------------------------------------------------------------------------- backward


def _probs_and_ds(q, k, v, kb, bias, lse_row, delta_row, do, *, scale, causal, q0, k0, offset):
    s = _logits(q, k, kb, bias, scale=scale, causal=causal, q0=q0, k0=k0, offset=offset)
    p = jnp.exp(s - _row_to_col(lse_row))
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _row_to_col(delta_row))
    return p, ds


def _dkdv_kernel(*refs, scale, causal, offset, nq_blocks, has_bias):
    refs = list(refs)
    bias_ref = refs.pop(4) if has_bias else None
    (q_ref, k_ref, v_ref, kb_ref, lse_ref, delta_ref, do_ref, dk_ref, dv_ref, dkb_ref,
     dk_sc, dv_sc, dkb_sc) = refs
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        dkb_sc[...] = jnp.zeros(dkb_sc.shape, jnp.float32)

    def step():
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_ds(q, k_ref[...], v_ref[...], kb_ref[...],
                              None if bias_ref is None else bias_ref[...],
                              lse_ref[...], delta_ref[...], do,
                              scale=scale, causal=causal, q0=i * bq, k0=j * bk, offset=offset)
        dv_sc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk_sc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        dkb_sc[...] += jnp.sum(ds, axis=0, keepdims=True)

    if causal:
        pl.when(_block_needed(i, j, bq, bk, offset))(step)
    else:
        step()

    @pl.when(i == nq_blocks - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)
        dkb_ref[...] = dkb_sc[...]


def _dq_kernel(*refs, scale, causal, offset, nk_blocks, has_bias):
    refs = list(refs)
    bias_ref = refs.pop(4) if has_bias else None
    q_ref, k_ref, v_ref, kb_ref, lse_ref, delta_ref, do_ref, dq_ref = refs[:8]
    dbias_ref = refs[8] if has_bias else None
    dq_sc = refs[-1]
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step():
        k = k_ref[...]
        _, ds = _probs_and_ds(q_ref[...], k, v_ref[...], kb_ref[...],
                              None if bias_ref is None else bias_ref[...],
                              lse_ref[...], delta_ref[...], do_ref[...],
                              scale=scale, causal=causal, q0=i * bq, k0=j * bk, offset=offset)
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)
        if dbias_ref is not None:
            dbias_ref[...] = ds

    if causal:
        needed = _block_needed(i, j, bq, bk, offset)
        pl.when(needed)(step)
        if dbias_ref is not None:
            @pl.when(jnp.logical_not(needed))
            def _zero():
                dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)
    else:
        step()

    @pl.when(j == nk_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def backward(q, k, v, kb, bias, lse, delta, do, cfg):
    """Returns dq, dk, dv (kernel layout), dkb [B, H, Nk_pad] and dbias [B, H, Nq_pad, Nk_pad].

    dkb is the column sum of dS (the gradient of the per-key bias, per head); dbias is dS
    itself, written only when a general bias is given (None otherwise).
    """
    b, h, nqp, d = q.shape
    nkp = k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq_blocks, nk_blocks = nqp // bq, nkp // bk
    offset = cfg.nk - cfg.nq
    has_bias = bias is not None
    lse_r, delta_r = lse[:, :, None, :], delta[:, :, None, :]
    kb3 = kb[:, None, :]

    # dk, dv: grid over key blocks, streaming query blocks.
    qmap = _query_block_map(cfg, nq_blocks)

    in_specs = [
        _spec((None, None, bq, d), lambda b_, h_, j, i: (b_, h_, qmap(b_, h_, j, i), 0)),
        _spec((None, None, bk, d), lambda b_, h_, j, i: (b_, h_, j, 0)),
        _spec((None, None, bk, d), lambda b_, h_, j, i: (b_, h_, j, 0)),
        _spec((None, 1, bk), lambda b_, h_, j, i: (b_, 0, j)),
        _spec((None, None, 1, bq), lambda b_, h_, j, i: (b_, h_, 0, qmap(b_, h_, j, i))),
        _spec((None, None, 1, bq), lambda b_, h_, j, i: (b_, h_, 0, qmap(b_, h_, j, i))),
        _spec((None, None, bq, d), lambda b_, h_, j, i: (b_, h_, qmap(b_, h_, j, i), 0)),
    ]
    args = [q, k, v, kb3, lse_r, delta_r, do]
    if has_bias:
        in_specs.insert(4, _bias_spec(bias, bq, bk, qmap, lambda b_, h_, j, i: j))
        args.insert(4, bias)
    kernel = functools.partial(_dkdv_kernel, scale=cfg.scale, causal=cfg.causal, offset=offset,
                               nq_blocks=nq_blocks, has_bias=has_bias)
    dk, dv, dkb = pl.pallas_call(
        kernel,
        grid=(b, h, nk_blocks, nq_blocks),
        in_specs=in_specs,
        out_specs=[_spec((None, None, bk, d), lambda b_, h_, j, i: (b_, h_, j, 0)),
                   _spec((None, None, bk, d), lambda b_, h_, j, i: (b_, h_, j, 0)),
                   _spec((None, None, 1, bk), lambda b_, h_, j, i: (b_, h_, 0, j))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((b, h, 1, nkp), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32),
                        pltpu.VMEM((1, bk), jnp.float32)],
        name="jax_tokens_flash_dkdv_tpu",
        **_params(cfg.interpret, "parallel", "parallel", "parallel", "arbitrary"),
    )(*args)

    # dq (and dbias): grid over query blocks, streaming key blocks.
    kmap = _key_block_map(cfg, nk_blocks)

    in_specs = [
        _spec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
        _spec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, kmap(b_, h_, i, j), 0)),
        _spec((None, None, bk, d), lambda b_, h_, i, j: (b_, h_, kmap(b_, h_, i, j), 0)),
        _spec((None, 1, bk), lambda b_, h_, i, j: (b_, 0, kmap(b_, h_, i, j))),
        _spec((None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i)),
        _spec((None, None, 1, bq), lambda b_, h_, i, j: (b_, h_, 0, i)),
        _spec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0)),
    ]
    args = [q, k, v, kb3, lse_r, delta_r, do]
    out_specs = [_spec((None, None, bq, d), lambda b_, h_, i, j: (b_, h_, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if has_bias:
        in_specs.insert(4, _bias_spec(bias, bq, bk, lambda b_, h_, i, j: i, kmap))
        args.insert(4, bias)
        out_specs.append(_spec((None, None, bq, bk), lambda b_, h_, i, j: (b_, h_, i, j)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, nqp, nkp), jnp.float32))
    kernel = functools.partial(_dq_kernel, scale=cfg.scale, causal=cfg.causal, offset=offset,
                               nk_blocks=nk_blocks, has_bias=has_bias)
    res = pl.pallas_call(
        kernel,
        grid=(b, h, nq_blocks, nk_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        name="jax_tokens_flash_dq_tpu",
        **_params(cfg.interpret, "parallel", "parallel", "parallel", "arbitrary"),
    )(*args)
    dq = res[0]
    dbias = res[1] if has_bias else None
    return dq, dk, dv, dkb[:, :, 0, :], dbias
