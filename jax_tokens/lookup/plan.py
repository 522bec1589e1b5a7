"""The lookup plan (softmax weights from N input tokens to M output tokens) and `compress`."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from jax_tokens import tokens as tok
from jax_tokens.lookup._common import F32


def _check_per_token(name: str, x, n: int, batch: int) -> None:
    """x must be [batch, n, ...] (rank >= 2: any per-token array)."""
    ndim = getattr(x, "ndim", None)
    if ndim is None:
        raise TypeError(f"{name} must be an array; got {type(x).__name__}")
    if ndim < 2:
        raise ValueError(f"{name} must have shape [batch, tokens, ...] (rank >= 2); got shape "
                         f"{tuple(x.shape)}")
    tok.check_tokens(name, x, rank=ndim, n=n, batch=batch)


@flax.struct.dataclass
class LookupPlan:
    """How M output tokens are formed from N input tokens by softmax weights.

    Attributes:
      weights: [B, M, N] float32; row m holds the weights output token m gives each of the N
        non-prefix input tokens (a softmax over N, so every row sums to 1).
      prefix: static count of leading tokens (class token, registers) that pass through
        unchanged in front of the M output tokens. ``weights`` covers only the tokens after
        them. Default 0: the plan maps exactly the N tokens the weights cover.

    The plan maps ``n_in = prefix + N`` tokens to ``n_out = prefix + M``. It is a pytree (works
    under jit / vmap / grad / scan) and can be applied to any other per-token array
    (positions, sizes, a second stream) and inverted (`invert`).
    """

    weights: jax.Array
    prefix: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def batch(self) -> int:
        return self.weights.shape[0]

    @property
    def n_in(self) -> int:
        """prefix + N, the number of input tokens (static)."""
        return self.prefix + self.weights.shape[-1]

    @property
    def n_out(self) -> int:
        """prefix + M, the number of output tokens (static)."""
        return self.prefix + self.weights.shape[-2]

    @property
    def assignment(self) -> jax.Array:
        """[B, prefix + N] int32: the output slot of each input token.

        Prefix token i goes to slot i; every other token goes to ``prefix +`` the output token
        that weights it the most (ties go to the lowest output index, as ``argmax``). Every
        input token gets a slot (never -1), so `jax_tokens.tokens.invert_by_assignment`
        inverts the plan without a fill value.
        """
        slots = jnp.argmax(self.weights, axis=-2).astype(jnp.int32) + self.prefix
        if not self.prefix:
            return slots
        front = jnp.broadcast_to(jnp.arange(self.prefix, dtype=jnp.int32),
                                 (slots.shape[0], self.prefix))
        return jnp.concatenate([front, slots], axis=1)

    def _weights(self, size: jax.Array | None) -> jax.Array:
        """The [B, M, N] weights block in float32, re-weighted by the sizes when given."""
        w = self.weights.astype(F32)
        if size is None:
            return w
        s = jnp.asarray(size, F32)
        want = (w.shape[0], self.n_in)
        if s.ndim == 3 and s.shape[-1] == 1:  # [B, n_in, 1]
            s = s[..., 0]
        if s.shape != want:
            raise ValueError(f"size must have shape [batch, tokens(, 1)] = {want} (prefix "
                             f"tokens included); got {jnp.shape(size)}")
        w = w * s[:, None, self.prefix:]
        return w / jnp.maximum(w.sum(axis=-1, keepdims=True), jnp.finfo(F32).tiny)

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """The dense [B, prefix + M, prefix + N] linear map, float32.

        An identity block passes the prefix tokens through; the block below and right of it
        is `weights`. With ``size`` [B, prefix + N(, 1)] the weight rows are re-weighted by the
        sizes of the non-prefix tokens and renormalised, which equals adding ``log(size)`` to
        the logits before the softmax (proportional attention): a token that stands for more
        patches counts for more. The prefix rows stay one-hot.
        """
        w = self._weights(size)
        p = self.prefix
        if not p:
            return w
        b, m, n = w.shape
        eye = jnp.broadcast_to(jnp.eye(p, dtype=F32), (b, p, p))
        top = jnp.concatenate([eye, jnp.zeros((b, p, n), F32)], axis=-1)
        bottom = jnp.concatenate([jnp.zeros((b, m, p), F32), w], axis=-1)
        return jnp.concatenate([top, bottom], axis=1)

    def apply(self, x: jax.Array, size: jax.Array | None = None) -> jax.Array:
        """[B, prefix + N, ...] -> [B, prefix + M, ...]: ``y[m] = sum_n W[m, n] x[n]``.

        The prefix tokens pass through; the rest is accumulated in float32 and returned in x's
        dtype (float32 for integer inputs such as positions). ``size`` as in `matrix`. The plan
        applies to any per-token array, not only to the tokens it was computed from.
        """
        _check_per_token("x", x, self.n_in, self.batch)
        w = self._weights(size)
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else F32
        rest = x[:, self.prefix:].astype(dtype)
        y = jnp.einsum("bmn,bn...->bm...", w.astype(dtype), rest,
                       preferred_element_type=F32).astype(dtype)
        if not self.prefix:
            return y
        return jnp.concatenate([x[:, :self.prefix].astype(dtype), y], axis=1)

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, prefix + M, ...] -> [B, prefix + N, ...]: puts output tokens back at the inputs.

        Prefix tokens come back exactly. A softmax plan has no exact inverse for the rest: each
        input token n receives the output token that gives it the largest weight,
        ``y[prefix + argmax_m W[m, n]]`` (see `assignment`), so the result is piecewise constant
        over the input grid: the choice that dense outputs and pictures need (a segmentation of
        the N tokens into M regions). It is a gather, so gradients flow to `y` but not to the
        weights. For a soft read-back use `transpose_plan`.
        """
        _check_per_token("y", y, self.n_out, self.batch)
        return tok.invert_by_assignment(y, self.assignment)

    unapply = invert  # the name this plan used before it had the full protocol

    def transpose_plan(self) -> "LookupPlan":
        """The soft read-back M -> N: ``W^T`` [B, N, M] with every row renormalised to sum to 1.

        ``transpose_plan().apply(y)`` gives each input token the average of the output tokens,
        weighted by how much each one took from it (a single-head version of LookupViT's
        hr-side read-back, up to the softmax: here the weights are renormalised, not
        re-soft-maxed). The prefix passes through both ways.
        """
        wt = jnp.swapaxes(self.weights.astype(F32), -1, -2)
        wt = wt / jnp.maximum(wt.sum(axis=-1, keepdims=True), jnp.finfo(F32).tiny)
        return LookupPlan(weights=wt, prefix=self.prefix)


def compress(x: jax.Array, logits: jax.Array) -> tuple[jax.Array, LookupPlan]:
    """Compresses N tokens into M by M softmax score maps over the tokens.

    Args:
      x: [B, N, C] tokens.
      logits: [B, N, M] one score map over the N tokens per output token (M, the budget, is the
        static last dimension). The softmax is taken over N in float32.

    Returns:
      (y [B, M, C] in x's dtype, LookupPlan with weights [B, M, N]).
    """
    tok.check_tokens("x", x)
    tok.check_tokens("logits", logits, n=x.shape[1], batch=x.shape[0])
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have M >= 1 score maps in its last dimension; got shape "
                         f"{tuple(logits.shape)}")
    weights = jax.nn.softmax(logits.astype(F32), axis=1)  # over N
    plan = LookupPlan(weights=jnp.swapaxes(weights, 1, 2))  # [B, M, N]
    return plan.apply(x), plan
