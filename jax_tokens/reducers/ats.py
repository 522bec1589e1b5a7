"""ATS [`ats`]: Adaptive Token Sampling, a parameter-free sampler (Fayyaz et al., ECCV 2022,
"Adaptive Token Sampling for Efficient Vision Transformers"; adaptivetokensampling/ATS,
`libs/models/transformers/ats_block.py`).

At each listed block, after the attention, every patch token gets a significance score, the
class token's attention to it summed over the heads times the L2 norm of its value vector
(concatenated over the heads; the "value_norm" attention statistic). The scores are divided by
their sum, sorted ascending (stable: equal scores keep their input order), accumulated
(`cumsum`) and min-max normalised to a CDF in [0, 1]. K points are spread over its y-axis,

    ys_i = ys_start + (lin_i * (K - 1) - ys_start * i) / (K - 1),   i = 0 .. K - 1,

with `lin` = linspace(0, 1, K) and `ys_start` the smallest positive CDF value, and each picks
the sorted position whose CDF value is nearest (first index on ties), i.e. inverse transform
sampling. Repeated picks collapse: the picks are sorted, a pick equal to the next one becomes a
sentinel, and they are sorted again, so the output holds the distinct picks in ascending
significance order, then empty slots. How many tokens survive is adaptive (1 + the distinct
picks); K is only an upper bound. Prefix tokens (class, distillation, registers) stay in front
and never compete.

Static shapes and validity: `num_tokens` (K) is a Python int at trace time and a block's output
always has p + K slots: [prefix, sampled tokens in ascending significance, empty slots]. An
empty slot is a zero row with size 0; a live token keeps its size. The reducer asks for
proportional attention (`proportional_attention` is True), so every following block adds
log(size) to its attention logits and log(0) = -inf removes the empty slots as keys exactly
(the reference's `softmax_with_policy` does the same up to its eps = 1e-6 terms). No gradient
reaches the sizes (they are gathered constants), so the -inf bias gives no NaN: a masked key's
probability is exactly 0 and so is every cotangent through it. An empty slot entering a later
ATS block scores exactly 0 (its CLS attention is 0, and the score is also masked by size > 0),
and a zero-score token is never picked, as in the reference (policy-0 tokens score 0 there).

Where it runs: the reference samples inside the attention and returns the attention output of
the sampled rows plus the gathered residual, `raw_x[sel] + proj(attn[sel] @ v)`. Here the
reducer runs after the attention ("mid"), on `x + attn_out`, and gathers those rows: the same
values, since every row of the attention output depends only on its own query (up to the
reference's eps terms, about 1e-6 relative: it gives a live key a / (sum + eps) + eps / N). The
reference's
`ATSBlock` also multiplies by the policy after the MLP; here the empty slots pass through the
MLP and may hold nonzero values afterwards. That is harmless: they are masked keys, score 0 and
are never picked or pooled (size 0), so only live tokens are comparable with the reference.

Choices, each checked against the reference's code and its golden outputs:
  * The CDF is `cumsum` as torch computes it on CPU, which accumulates float32 inputs in double
    precision: here a compensated (two-sum, double-float) prefix scan, rounded to float32.
  * `lin` is torch's float32 linspace: i * step below the midpoint, 1 - (K - 1 - i) * step from
    it on (step = float32(1 / (K - 1)), each rounded once), so `ys` is bit-exact for a given CDF.
    Divisions by a per-example value (the score sum, the CDF spread, K - 1) are one IEEE
    division per element as torch's; XLA would otherwise multiply by a reciprocal. Bit parity
    holds on CPU (the golden files' platform); GPU / TPU arithmetic may differ in the last bit.
  * The reference left-pads the normalised CDF with zeros to K entries before the nearest-point
    search; a zero is never nearest (every ys_i >= ys_start > 0), so the padding is left out and
    every sorted position is a candidate. With K below the patch tokens entering a block (which
    the reference never meets: its K is always the model's initial patch count) all of them stay
    candidates.
  * A pick whose normalised CDF is 0 (an empty slot, or the least significant token when the
    example has no zero score) is never chosen by the formula; it is also turned into an empty
    slot explicitly, so that an example whose scores are all 0 (0 / 0 in the reference) keeps
    only its prefix tokens instead of NaN.
  * The reference compares the last sorted pick with a pad value of 1, which would also drop
    pick 1 when only 2 patch tokens enter a block; that quirk is not copied.
  * `drop_tokens` (the reference's flag): the reference compacts every example to the batch's
    largest live count N' (dynamic). Static shapes keep every slot here, which leaves the live
    tokens, their order and their attention unchanged; what compaction changes is the CDF's
    minimum: an example with as many live tokens as N' has no zero-score padding, so its least
    significant live token gets CDF 0 and cannot be picked. With `drop_tokens=True` that rule is
    applied (N' is the largest live count in the batch the reducer sees: under a device mesh,
    each device's own examples, as each GPU's batch in the reference), and the live tokens and
    picks match the reference's drop mode; only the number of trailing empty slots differs.
    This assumes the reference's input was compacted, as its chain always leaves it (the first
    sampling block sees full examples); a hand-made input with more slots than its widest live
    count, such as the golden `ats_sampler_drop_masked`, follows the plain rule (min 0).
  * The reference's own `n_tokens` argument cannot be anything but N (other values crash it);
    K here is the reference's K = n_ref - 1 (its initial patch count) and also bounds the
    output, so `num_tokens=1.0` (every patch slot) reproduces the reference exactly.

Fields: layers (block indices, strictly increasing; default (3,): the paper samples at blocks
3..11 of DeiT-S, `layers=tuple(range(3, 12))`), num_tokens (K: an int >= 2, or a float in
(0, 1], the fraction round(f * n) of the n patch slots entering the block; one value or one per
listed block; default 1.0), drop_tokens (default False: the reference's default).

Shapes: x [B, N, C], sizes [B, N, 1] -> [B, p + K, C], [B, p + K, 1]; plan: `SamplePlan`.
Statistics: "cls_probs" [B, H, N] and "value_norm" [B, N].
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["SamplePlan", "Sampling", "significance", "cumsum_f64", "torch_linspace",
           "normalized_cdf", "create_ys", "unique_picks", "sample", "ATS"]


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------

def significance(cls_probs: jax.Array, value_norm: jax.Array, protected: int = 1) -> jax.Array:
    """ATS's score of each non-prefix token: (sum over heads of the class token's attention)
    times the token's value norm. cls_probs [B, H, N], value_norm [B, N] -> [B, N - protected]
    float32 (not normalised)."""
    cls_probs, value_norm = tk.as_array("cls_probs", cls_probs), tk.as_array("value_norm",
                                                                             value_norm)
    if cls_probs.ndim != 3 or value_norm.shape != (cls_probs.shape[0], cls_probs.shape[2]):
        raise ValueError(f"cls_probs must be [batch, heads, tokens] and value_norm [batch, "
                         f"tokens]; got {cls_probs.shape} and {value_norm.shape}")
    score = cls_probs.astype(jnp.float32).sum(axis=1) * value_norm.astype(jnp.float32)
    return jax.lax.stop_gradient(score[:, protected:])


def _divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b (a finite) with b broadcast to a's shape, one IEEE division per element, as torch
    divides. XLA rewrites a / broadcast(b) into a * broadcast(1 / b), one more rounding; a
    divisor that depends on a (b + 0 * a) behind a barrier is no broadcast, under vmap too."""
    b = jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape)
    a, b = jax.lax.optimization_barrier((a, b + 0 * a))
    return a / b


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _add_double_float(x, y):
    s, e = _two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    hi = s + e
    return hi, e - (hi - s)


@functools.partial(jax.jit, static_argnames="axis")
def cumsum_f64(x: jax.Array, axis: int = -1) -> jax.Array:
    """float32 prefix sums accumulated in (emulated) double precision and rounded to float32,
    as torch's CPU `cumsum` computes them: a log-depth scan over (hi, lo) float32 pairs
    (jitted: called eagerly it is one program, not dozens of dispatches)."""
    x = x.astype(jnp.float32)
    return jax.lax.associative_scan(_add_double_float, (x, jnp.zeros_like(x)), axis=axis)[0]


def torch_linspace(steps: int) -> np.ndarray:
    """torch.linspace(0, 1, steps) in float32 as its CPU kernel computes it: i * step below the
    midpoint, 1 - (steps - 1 - i) * step from it on, each with one rounding (a fused
    multiply-add), step = float32(1 / (steps - 1))."""
    steps = tk.static_int("steps", steps, low=2)
    step = np.float64(np.float32(1.0) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    out = np.where(i < steps // 2, step * i, 1.0 - step * (steps - 1 - i))
    return out.astype(np.float32)


def normalized_cdf(sorted_scores: jax.Array, live_sorted: jax.Array | None = None, *,
                   drop_tokens: bool = False) -> jax.Array:
    """[B, n] ascending scores -> the min-max normalised CDF [B, n] (0 at empty slots).

    The minimum is the CDF's (0 when the example has a zero score); with `drop_tokens` an
    example with as many live tokens as the batch's widest takes its live tokens' minimum (the
    reference's compacted input has no zero padding there). A zero spread divides by 1."""
    sorted_scores = sorted_scores.astype(jnp.float32)
    live_sorted = jnp.ones(sorted_scores.shape, bool) if live_sorted is None else live_sorted
    cdf = cumsum_f64(sorted_scores, axis=1)
    low = jnp.min(cdf, axis=1, keepdims=True)
    if drop_tokens:
        count = live_sorted.sum(axis=1, keepdims=True)
        live_low = jnp.min(jnp.where(live_sorted, cdf, jnp.inf), axis=1, keepdims=True)
        low = jnp.where(count == jnp.max(count), live_low, low)
    high = jnp.max(cdf, axis=1, keepdims=True)
    spread = high - low                  # the reference divides it by 1.0: no change
    return jnp.where(live_sorted, _divide(cdf - low, jnp.where(spread > 0, spread, 1.0)), 0.0)


def create_ys(normalized_cdf: jax.Array, num_samples: int) -> jax.Array:
    """The reference's `create_ys`: [B, n] normalised CDF -> [B, K] sample heights, the formula
    of the module docstring (in this order, for bit parity)."""
    k = tk.static_int("num_samples", num_samples, low=2)
    lin = jnp.asarray(torch_linspace(k))[None]
    start = jnp.min(normalized_cdf + (normalized_cdf == 0).astype(jnp.float32) * 1e8, axis=1,
                    keepdims=True)
    steps = jnp.arange(k, dtype=jnp.float32)[None]
    return start + _divide((lin * jnp.float32(k - 1)) - start * steps, jnp.float32(k - 1))


def unique_picks(picks: jax.Array, sentinel: int) -> jax.Array:
    """The reference's `get_unique_indices`: sort, turn a pick equal to the next one into
    `sentinel`, sort again. [B, K] -> [B, K] int32: the distinct picks ascending, then
    sentinels (the last pick is compared with nothing: see the module docstring)."""
    s = jnp.sort(picks.astype(jnp.int32), axis=1)
    dup = jnp.concatenate([s[:, :-1] == s[:, 1:], jnp.zeros_like(s[:, :1], bool)], axis=1)
    return jnp.sort(jnp.where(dup, jnp.int32(sentinel), s), axis=1)


class Sampling(NamedTuple):
    """Every step of one ATS call (the reference's names), for inspection and tests. Sorted
    arrays run over the n non-prefix token slots, picks over the K samples."""

    sorted_scores: jax.Array    # [B, n] normalised significance, ascending
    sorted_indices: jax.Array   # [B, n] int32 slot of each sorted entry
    normalized_cdf: jax.Array   # [B, n]
    ys: jax.Array               # [B, K]
    picks: jax.Array            # [B, K] int32 sorted position nearest each ys (may repeat)
    unique_indices: jax.Array   # [B, K] int32 distinct picks ascending, then sentinels n
    slots: jax.Array            # [B, K] int32 token slot sampled into each output, -1: empty


def sample(scores: jax.Array, num_samples: int, live: jax.Array | None = None, *,
           drop_tokens: bool = False) -> Sampling:
    """ATS's inverse transform sampling over scores [B, n] (>= 0, e.g. `significance`).

    live: [B, n] bool, False for empty slots (they score 0; default: all live).
    num_samples: K (static int >= 2). drop_tokens: the reference's compaction rule for the
    CDF's minimum (see the module docstring). Returns a `Sampling`; no gradient flows.
    """
    scores = jax.lax.stop_gradient(tk.as_array("scores", scores)).astype(jnp.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must have rank 2 [batch, tokens]; got shape {scores.shape}")
    b, n = scores.shape
    k = tk.static_int("num_samples", num_samples, low=2)
    live = jnp.ones((b, n), bool) if live is None else tk.as_array("live", live).astype(bool)
    scores = jnp.where(live, scores, 0.0)
    total = jnp.sum(scores, axis=1, keepdims=True)
    scores = _divide(scores, jnp.where(total > 0, total, 1.0))
    order = jnp.argsort(scores, axis=1, stable=True).astype(jnp.int32)
    sorted_scores = jnp.take_along_axis(scores, order, axis=1)
    live_sorted = jnp.take_along_axis(live, order, axis=1)
    normalized = normalized_cdf(sorted_scores, live_sorted, drop_tokens=drop_tokens)
    ys = create_ys(normalized, k)
    picks = jnp.argmin(jnp.abs(ys[:, :, None] - normalized[:, None, :]), axis=2)
    picks = picks.astype(jnp.int32)
    usable = jnp.take_along_axis(normalized, picks, axis=1) > 0
    unique = unique_picks(jnp.where(usable, picks, n), n)
    taken = unique < n
    slots = jnp.where(taken, jnp.take_along_axis(order, jnp.minimum(unique, n - 1), axis=1), -1)
    return Sampling(sorted_scores, order, normalized, ys, picks, unique, slots)


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

@struct.dataclass
class SamplePlan:
    """N input tokens -> M = p + K slots: prefix tokens, sampled tokens, empty slots.

    Attributes:
      slots: [B, M] int32 input position copied into each output slot, -1 for an empty slot.
      n_in: input token count N.
    `apply` copies the sampled tokens and writes zeros into empty slots (`matrix` is one-hot
    at the sampled tokens and 0 on empty rows, whatever the sizes); `invert` puts the sampled
    tokens back and zeros elsewhere; `size` gives live slots their token's size and empty
    slots 0.
    """

    slots: jax.Array
    n_in: int = struct.field(pytree_node=False, default=0)

    @property
    def n_out(self) -> int:
        return self.slots.shape[-1]

    @property
    def valid(self) -> jax.Array:
        """[B, M] bool: the slot holds a token (the reference's policy)."""
        return self.slots >= 0

    @property
    def kept(self) -> jax.Array:
        """[B] int32 live slots (prefix included): the reference's policy sum."""
        return self.valid.sum(axis=1).astype(jnp.int32)

    @property
    def assignment(self) -> jax.Array:
        """[B, N] output slot of each input token, -1 when it was not sampled."""
        b, m = self.slots.shape
        out = jnp.full((b, self.n_in), -1, jnp.int32)
        target = jnp.where(self.valid, self.slots, self.n_in)     # empty slots: dropped writes
        slot_ids = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
        return out.at[jnp.arange(b)[:, None], target].set(slot_ids, mode="drop")

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N]: row m is one-hot at the token in slot m, zero for an empty slot."""
        del size
        return jax.nn.one_hot(self.slots, self.n_in, dtype=jnp.float32)   # -1: a zero row

    def apply(self, x: jax.Array) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: the sampled tokens, zeros in empty slots."""
        x = tk.as_array("x", x)
        tk.check_tokens("x", x, rank=getattr(x, "ndim", 3), n=self.n_in,
                        batch=self.slots.shape[0])
        out = tk.gather_tokens(x, jnp.maximum(self.slots, 0))
        mask = self.valid.reshape(self.valid.shape + (1,) * (x.ndim - 2))
        return jnp.where(mask, out, jnp.zeros((), out.dtype))

    def size(self, size: jax.Array) -> jax.Array:
        """[B, N, 1] sizes -> [B, M, 1] (fp32): the token's size, 0 in empty slots."""
        return self.apply(tk.as_array("size", size).astype(jnp.float32))

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: sampled tokens back at their positions, zeros
        elsewhere."""
        return tk.invert_by_assignment(y, self.assignment)


def plan_from_sampling(s: Sampling, n_in: int, protected: int) -> SamplePlan:
    """The plan of a `Sampling` over the tokens after `protected` prefix tokens."""
    b = s.slots.shape[0]
    front = jnp.broadcast_to(jnp.arange(protected, dtype=jnp.int32), (b, protected))
    body = jnp.where(s.slots >= 0, s.slots + protected, -1).astype(jnp.int32)
    return SamplePlan(slots=jnp.concatenate([front, body], axis=1), n_in=n_in)


# --------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------

def _check_count(name: str, value: Any) -> None:
    if tk.is_traced(value) or isinstance(value, jax.Array):
        tk.static_int(name, value)       # the error for a traced / array budget
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be an int >= 2 (sampling slots) or a float in "
                        "(0, 1] (a fraction of the patch slots entering the block)")
    if isinstance(value, numbers.Integral):
        tk.static_int(name, value, low=2)
    else:
        tk.static_float(name, value, low=0.0, high=1.0)


@register
@dataclasses.dataclass(frozen=True)
class ATS(base.Reducer):
    """Adaptive Token Sampling (see the module docstring). Fields: layers, num_tokens (K per
    listed block: an int >= 2 or a fraction of the patch slots entering it), drop_tokens."""

    method: ClassVar[str] = "ats"
    picture: ClassVar[str] = "kept"
    layers: tuple = (3,)
    num_tokens: Any = 1.0
    drop_tokens: bool = False

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for l in self.layers:
            tk.static_int("reduction.layers entry", l, low=0)
        if any(a >= b for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"reduction.layers={list(self.layers)} must be strictly increasing "
                             "block indices")
        counts = self.num_tokens
        if isinstance(counts, (list, tuple)):
            counts = tuple(counts)
            object.__setattr__(self, "num_tokens", counts)
            if len(counts) != len(self.layers):
                raise ValueError(f"reduction.num_tokens has {len(counts)} entries but "
                                 f"reduction.layers has {len(self.layers)}: give one per "
                                 "sampling block, or a single value")
            for l, c in zip(self.layers, counts):
                _check_count(f"reduction.num_tokens (block {l})", c)
        else:
            _check_count("reduction.num_tokens", counts)
        if not isinstance(self.drop_tokens, bool):
            raise TypeError(f"reduction.drop_tokens={self.drop_tokens!r} must be a bool")

    def _counts(self) -> dict[int, Any]:
        counts = self.num_tokens if isinstance(self.num_tokens, tuple) else \
            (self.num_tokens,) * len(self.layers)
        return dict(zip(self.layers, counts))

    @staticmethod
    def _slots(count: Any, n: int) -> int:
        """K from a count (int) or a fraction (float) of the n patch slots entering."""
        return int(count) if isinstance(count, numbers.Integral) else int(round(count * n))

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        base.check_layers(self.layers, layout)
        if self.layers and not layout.class_token:
            raise ValueError(f"reduction 'ats' at blocks {list(self.layers)} scores tokens by "
                             "the class token's attention: the model needs class_token=True")
        counts, p, n = self._counts(), layout.num_prefix_tokens, layout.num_tokens
        specs = []
        for l in range(layout.depth):
            if l not in counts:
                specs.append(base.LayerSpec(n, n))
                continue
            k = self._slots(counts[l], n - p)
            if not 2 <= k <= n - p:
                raise ValueError(f"reduction.num_tokens={counts[l]!r} gives block {l} K={k} "
                                 f"sampling slots, but {n - p} tokens (besides {p} prefix "
                                 f"tokens) enter it (allowed: 2..{n - p})")
            specs.append(base.LayerSpec(n, p + k, k, active=True))
            n = p + k
        return tuple(specs)

    def stats(self, layout, spec):
        return ("cls_probs", "value_norm")

    @property
    def proportional_attention(self) -> bool:
        return True     # log(size): empty slots (size 0) are masked keys

    def flops(self, layout, spec):
        # Value norms, then |ys - cdf| and its argmin over K x n.
        n = spec.n_in - layout.num_prefix_tokens
        return 2 * spec.n_in * layout.embed_dim + 3 * spec.budget * n

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        if not isinstance(self.num_tokens, tuple) and not isinstance(self.num_tokens,
                                                                     numbers.Integral):
            return self.replace(num_tokens=1.0 - (1.0 - self.num_tokens) * fraction)
        specs = self.schedule(layout)
        p, counts = layout.num_prefix_tokens, []
        for l in self.layers:      # K interpolated from every slot entering at fraction 0
            k = specs[l].budget
            full = layout.num_tokens - p
            counts.append(full - int(round((full - k) * fraction)))
        return self.replace(num_tokens=tuple(counts))

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        base.check_stats(self, layout, spec, stats)
        p = layout.num_prefix_tokens
        live = size[:, p:, 0] > 0
        scores = significance(stats["cls_probs"], stats["value_norm"], p)
        s = sample(scores, spec.budget, live, drop_tokens=self.drop_tokens)
        plan = plan_from_sampling(s, spec.n_in, p)
        return plan.apply(x), plan.size(size), plan
