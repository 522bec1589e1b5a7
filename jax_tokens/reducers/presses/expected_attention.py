"""Expected Attention (kvpress's `ExpectedAttentionPress`): score each cached key by the
attention that *future* queries are expected to give it.

    press = ExpectedAttention(compression_ratio=0.5, n_future_positions=512, n_sink=4)

From the prompt's queries before RoPE (`PressRequest(queries="raw")`, [B, T, H, hd]; the
first n_sink tokens left out, as outliers):

    mu     [B, H, hd]       their mean;  Sigma [B, H, hd, hd] their covariance (biased, / N)
    R      [B, hd, hd]      the RoPE rotation averaged over the next n_future_positions
                            positions p = P .. P + F - 1 (P: the prompt's length):
                            R = mean_p (diag(cos_p) + diag-by-column(sin_p) . Pm), with
                            Pm = [[0, -I], [I, 0]] (the rotate-half convention)
    mu <- R mu,  Sigma <- R Sigma R^T
    s      [B, H, T - n_sink]  softmax over the keys (RoPE applied, as cached) of
                            mu . k / sqrt(hd)  (+ k^T Sigma k / (2 hd) with use_covariance)
    s      [B, KVH, .]      averaged over each group of query heads;
                            (s + epsilon) * ||v||_2 with use_vnorm
    sinks                   scored max(s) + 1 (always kept, tied among themselves)

and the top n_kept slots per KV head are kept in descending score order (kvpress keeps
int(T * (1 - compression_ratio))). With left padding, the padding takes no part in the
statistics or the softmax, the sinks are each row's first n_sink real tokens and P is each
row's own length.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["ExpectedAttention", "expected_attention_scores"]


def _average_rotation(next_pos: jax.Array, inv_freq: jax.Array, n_future: int) -> jax.Array:
    """[B, hd, hd]: the mean RoPE rotation over positions next_pos .. next_pos + n_future - 1."""
    p = next_pos[:, None].astype(jnp.float32) + jnp.arange(n_future, dtype=jnp.float32)
    ang = p[..., None] * inv_freq.astype(jnp.float32)                     # [B, F, hd/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    cos, sin = jnp.cos(ang).mean(axis=1), jnp.sin(ang).mean(axis=1)       # [B, hd]
    d = cos.shape[-1]
    half = jnp.eye(d // 2, dtype=jnp.float32)
    zeros = jnp.zeros_like(half)
    rot = jnp.block([[zeros, -half], [half, zeros]])                       # rotate-half
    return jax.vmap(jnp.diag)(cos) + sin[:, None, :] * rot[None]


def expected_attention_scores(queries, keys, values, valid, positions, query_positions,
                              inv_freq, *, n_future: int, n_sink: int, use_covariance: bool,
                              use_vnorm: bool, epsilon: float) -> jax.Array:
    """queries [B, T, H, hd] (before RoPE), keys / values [B, T, KVH, hd], valid / positions
    [B, T, KVH], query_positions [B, T] -> scores [B, KVH, T] (-inf for padding)."""
    b, t, h, d = queries.shape
    kvh = keys.shape[2]
    q = queries.astype(jnp.float32)
    real = valid[..., 0] & (query_positions >= n_sink)                    # [B, T] statistics
    w = real.astype(jnp.float32)[:, :, None, None]
    n = jnp.maximum(w.sum(axis=1), 1.0)                                   # [B, 1, 1]
    mu0 = (q * w).sum(axis=1) / n                                         # [B, H, hd]
    rot = _average_rotation(query_positions[:, -1] + 1, inv_freq, n_future)
    mu = jnp.einsum("bij,bhj->bhi", rot, mu0)
    k = jnp.repeat(jnp.swapaxes(keys.astype(jnp.float32), 1, 2), h // kvh, axis=1)  # [B,H,T,hd]
    s = jnp.einsum("bhd,bhtd->bht", mu, k) / jnp.sqrt(jnp.float32(d))
    if use_covariance:
        c = (q - mu0[:, None]) * w
        cov = jnp.einsum("bthi,bthj->bhij", c, c) / n[..., None]           # [B, H, hd, hd]
        cov = jnp.einsum("bik,bhkl,bjl->bhij", rot, cov, rot)
        s = s + jnp.einsum("bhti,bhij,bhtj->bht", k, cov, k) / d / 2
    keyed = jnp.swapaxes(valid & (positions >= n_sink), 1, 2)            # [B, KVH, T]
    keyed_h = jnp.repeat(keyed, h // kvh, axis=1)
    s = jax.nn.softmax(jnp.where(keyed_h, s, -jnp.inf), axis=-1)
    s = base.group_scores(s, h // kvh, "mean")                            # [B, KVH, T]
    if use_vnorm:
        vn = jnp.sqrt(jnp.sum(jnp.square(values.astype(jnp.float32)), axis=-1))
        s = (s + epsilon) * jnp.swapaxes(vn, 1, 2)
    top = jnp.max(jnp.where(keyed, s, -jnp.inf))
    sink = jnp.swapaxes(valid & (positions < n_sink), 1, 2)
    s = jnp.where(sink, top + 1.0, s)
    return jnp.where(jnp.swapaxes(valid, 1, 2), s, -jnp.inf)


@register
@dataclasses.dataclass(frozen=True)
class ExpectedAttention(base.RatioPress):
    """Fields: compression_ratio (share evicted) or capacity (slots kept),
    n_future_positions, n_sink, use_covariance, use_vnorm, epsilon (see the module
    docstring)."""

    method: ClassVar[str] = "expected_attention"
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        base.check_int("n_future_positions", self.n_future_positions, 1)
        base.check_int("n_sink", self.n_sink, 0)
        if not isinstance(self.epsilon, (int, float)) or self.epsilon < 0:
            raise ValueError(f"press.epsilon={self.epsilon!r} must be a number >= 0")

    def request(self, n_prompt: int) -> base.PressRequest:
        if n_prompt <= self.n_sink:
            raise ValueError(f"press.n_sink={self.n_sink}: the prompt ({n_prompt} tokens) must "
                             "be longer than the sinks")
        return base.PressRequest(queries="raw")

    def plan(self, inputs: base.PressInputs) -> base.KVPlan:
        if inputs.queries is None or inputs.inv_freq is None:
            raise ValueError("expected_attention needs the prefill's queries before RoPE and "
                             "the model's RoPE frequencies (PressInputs.queries, .inv_freq)")
        t = inputs.n_prompt
        s = expected_attention_scores(
            inputs.queries, inputs.keys[:, :t], inputs.values[:, :t], inputs.valid[:, :t],
            inputs.positions[:, :t], inputs.query_positions, inputs.inv_freq,
            n_future=self.n_future_positions, n_sink=self.n_sink,
            use_covariance=self.use_covariance, use_vnorm=self.use_vnorm,
            epsilon=float(self.epsilon))
        return base.topk_plan(s, self.n_kept(t), inputs.keys.shape[1])
