"""Prompt-token dropping inside the model: FastV and PyramidDrop.

    press = FastV(layer=2, ratio=0.5, span=(start, end))        # drop half the span at layer 2
    press = PyramidDrop(layers=(8, 16, 24), keep=0.5, span=(start, end))

Both act during the prefill, on a span of prompt slots (image tokens in a vision-language
model; here any marked slots, e.g. the retrieved context of a question-answering prompt):
the span's tokens are scored by the attention the *last* prompt token pays them, averaged
over the heads, in the layer just before a drop layer K (FastV's `last_layer_attention`:
layer K - 1's attention), and only the top ones continue: the dropped tokens leave the
residual stream (layers K..L-1 run on fewer tokens, so they cost less) and the KV cache of
those layers. The kept tokens keep their order and their positions. The prefix before the
span and everything after it are always kept.

    FastV        one drop at `layer`: keep int(S * (1 - ratio)) of the S span tokens
    PyramidDrop  a drop at each of `layers`: keep int(S_i * keep) of the S_i span tokens
                 left (a geometric schedule: S, S*keep, S*keep^2, ...)

`span` is (start, end) slots of the padded prompt (Python-style: negative values count from
the end, which is where left-padded prompts align); it must end before the last token.
Choices made here where the papers leave them open: counts are rounded down; ties go to
the earlier token (`lax.top_k`); PyramidDrop scores with the last prompt token at every
stage (the paper's "last instruction token").
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_tokens.reducers.presses import base
from jax_tokens.reducers.presses.registry import register

__all__ = ["TokenDrop", "FastV", "PyramidDrop", "select_span"]


def select_span(scores: jax.Array, start: int, end: int, keep: int) -> jax.Array:
    """scores [B, T] (the last token's head-mean attention) -> the kept token indices
    [B, start + keep + (T - end)]: the prefix, the `keep` best span tokens in order, the
    suffix."""
    b, t = scores.shape
    top = jax.lax.top_k(scores[:, start:end], keep)[1] if keep else jnp.zeros((b, 0), int)
    span = jnp.sort(top, axis=-1).astype(jnp.int32) + start
    pre = jnp.broadcast_to(jnp.arange(start, dtype=jnp.int32), (b, start))
    post = jnp.broadcast_to(jnp.arange(end, t, dtype=jnp.int32), (b, t - end))
    return jnp.concatenate([pre, span, post], axis=-1)


@dataclasses.dataclass(frozen=True)
class TokenDrop(base.Press):
    """Base of the presses that drop prompt tokens inside the model (see the module
    docstring); `stages(n_prompt, num_layers)` is their static schedule."""

    drops_tokens: ClassVar[bool] = True
    span: tuple = (0, -1)

    def _check_span(self):
        if (not isinstance(self.span, tuple) or len(self.span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.span)):
            raise ValueError(f"press.span={self.span!r} must be a pair of ints (start, end)")

    def span_slots(self, n_prompt: int) -> tuple[int, int]:
        start, end = (v + n_prompt if v < 0 else v for v in self.span)
        if not 0 <= start < end < n_prompt:
            raise ValueError(f"press.span={self.span} is slots [{start}, {end}) of a "
                             f"{n_prompt}-token prompt: it must be a non-empty range that "
                             "ends before the last token")
        return start, end

    def stages(self, n_prompt: int, num_layers: int) -> tuple[tuple[int, int], ...]:
        """((layer, span tokens kept from that layer on), ...)."""
        raise NotImplementedError

    def plan(self, inputs: base.PressInputs) -> base.KVPlan:
        raise TypeError(f"{self.method} drops prompt tokens inside the model during the "
                        "prefill; it has no cache plan (pass it as press= to generate / "
                        "prefill / continuation_logprobs)")

    def _check_layers(self, layers, num_layers):
        for layer in layers:
            if not 1 <= layer < num_layers:
                raise ValueError(f"{self.method}: drop layer {layer} must lie in [1, "
                                 f"{num_layers}) (layer K is scored by layer K - 1's attention)")


@register
@dataclasses.dataclass(frozen=True)
class FastV(TokenDrop):
    """Fields: layer (K: tokens are dropped before it), ratio (R: the share of the span
    dropped, in [0, 1)), span."""

    method: ClassVar[str] = "fastv"
    layer: int = 2
    ratio: float = 0.5

    def __post_init__(self):
        base.check_int("layer", self.layer, 1)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) \
                or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"press.ratio={self.ratio!r} must be a float in [0, 1)")
        self._check_span()

    def stages(self, n_prompt: int, num_layers: int) -> tuple[tuple[int, int], ...]:
        self._check_layers((self.layer,), num_layers)
        start, end = self.span_slots(n_prompt)
        return ((self.layer, int((end - start) * (1.0 - self.ratio))),)


@register
@dataclasses.dataclass(frozen=True)
class PyramidDrop(TokenDrop):
    """Fields: layers (increasing drop layers), keep (share of the remaining span tokens
    kept at each, in (0, 1]), span."""

    method: ClassVar[str] = "pdrop"
    layers: tuple = (8, 16, 24)
    keep: float = 0.5

    def __post_init__(self):
        if (not isinstance(self.layers, tuple) or not self.layers
                or any(not isinstance(v, int) or isinstance(v, bool) for v in self.layers)
                or list(self.layers) != sorted(set(self.layers))):
            raise ValueError(f"press.layers={self.layers!r} must be a non-empty tuple of "
                             "increasing ints")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) \
                or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"press.keep={self.keep!r} must be a float in (0, 1]")
        self._check_span()

    def stages(self, n_prompt: int, num_layers: int) -> tuple[tuple[int, int], ...]:
        self._check_layers(self.layers, num_layers)
        start, end = self.span_slots(n_prompt)
        out, n = [], end - start
        for layer in self.layers:
            n = int(n * self.keep)
            out.append((layer, n))
        return tuple(out)
