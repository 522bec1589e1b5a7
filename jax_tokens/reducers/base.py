"""The reducer protocol: what one token-reduction method declares, in one place.

A reducer is a frozen dataclass whose fields are its config (`ToMe(r=13, prop_attn=True)`).
It validates its own fields in `__post_init__` (errors name `reduction.<field>`, the value and
what is allowed) and answers every question a model or trainer asks about it:

    spec = reducer.schedule(layout)          # per block: tokens in, tokens out, its budget
    reducer.stats(layout, spec[l])           # attention statistics it needs at block l
    reducer.proportional_attention           # whether sizes enter attention as log(size)
    reducer.flops(layout, spec[l])           # FLOPs of its own work (matching, predictor, ...)
    reducer.anneal(layout, fraction)         # its budget part-way through a warm-up
    reducer.make_module(layout, spec[l], rngs=...)   # learned reducers: their NNX module
    reducer.placement(spec[l])               # where in the block it runs ("mid" for most)
    x, size, plan = reducer.reduce(layout, spec[l], x, size, stats, key=..., module=...)
    reducer.reduce_attention(layout, spec[l], plan, size, stats)   # "before" placement only
    reducer.training()                       # the reducer the train step runs (default: itself)
    reducer.loss(layout, logits, aux, labels=..., teacher=...)   # its own training loss
    reducer.rejoin_block(layout)             # where set-aside tokens come back (Cropr's LLF)

Nothing outside `jax_tokens.reducers` asks which method is in use: it asks the reducer. Every
budget is a Python int (or float turned into an int) at trace time, so `schedule` fixes every
shape before tracing, and a model compiles once per (reducer, batch shape).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

__all__ = ["TokenLayout", "LayerSpec", "Reducer", "inactive_schedule", "check_layers",
           "check_stats"]


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """What a reducer may know about the model it runs in (all static).

    Attributes:
      depth: number of blocks.
      num_tokens: tokens entering block 0 (prefix tokens included).
      num_prefix_tokens: leading tokens that pruning never drops (class, distillation,
        registers); they stay in front.
      class_token / distill_token: whether tokens 0 / 1 are a class / distillation token
        (ToMe protects exactly these two).
      embed_dim, num_heads: the width of the residual stream and the attention heads.
      num_classes: the classifier's classes (0: unknown; reducers with auxiliary heads, such
        as Cropr's, need it).
    """

    depth: int
    num_tokens: int
    num_prefix_tokens: int = 0
    class_token: bool = False
    distill_token: bool = False
    embed_dim: int = 0
    num_heads: int = 1
    num_classes: int = 0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One block's part of a reducer's schedule.

    n_in: tokens entering the block (seen by its attention);
    n_out: tokens after the reducer (seen by the block's MLP and the next block);
    budget: the reducer's own static budget at this block (ToMe: r; top-k: tokens kept;
      TokenLearner: M). Only the reducer that made the spec reads it;
    active: whether the reducer runs at this block.
    """

    n_in: int
    n_out: int
    budget: int = 0
    active: bool = False


def inactive_schedule(layout: TokenLayout, n: int | None = None) -> tuple[LayerSpec, ...]:
    """A schedule that changes nothing."""
    n = layout.num_tokens if n is None else n
    return tuple(LayerSpec(n, n) for _ in range(layout.depth))


def check_stats(reducer: "Reducer", layout: TokenLayout, spec: LayerSpec,
                stats: dict[str, Any]) -> None:
    """ValueError naming the attention statistics a reducer asked for (`reducer.stats`) that
    `stats` lacks, so that a direct `reduce` call without them fails clearly."""
    missing = [name for name in reducer.stats(layout, spec) if name not in stats]
    if missing:
        raise ValueError(f"reducer {reducer.label()!r} needs the attention statistics "
                         f"{tuple(reducer.stats(layout, spec))} at this block; missing "
                         f"{tuple(missing)} (got {tuple(stats)}): pass what "
                         "`attention(..., stats=reducer.stats(layout, spec))` returns")


def check_layers(layers: tuple[int, ...], layout: TokenLayout) -> None:
    """ValueError naming a block index outside the model."""
    for l in layers:
        if not 0 <= l < layout.depth:
            raise ValueError(f"reduction.layers contains {l}, but the model has {layout.depth} "
                             f"blocks (allowed: 0..{layout.depth - 1})")


@dataclasses.dataclass(frozen=True)
class Reducer:
    """Base class of every reducer; subclasses are frozen dataclasses registered by name.

    Class attributes a subclass sets:
      method: the registry name (`model.reduction = dict(method=..., ...)`).
      learned: True when the reducer owns parameters (`make_module` builds them per block).
      needs_key: True when `reduce` needs a PRNG key (the model is called with `key=`).
      picture: how `jax_tokens.visualize` draws its source map: "groups" (merged patches) or
        "kept" (kept / dropped patches).
    """

    method: ClassVar[str] = ""
    learned: ClassVar[bool] = False
    needs_key: ClassVar[bool] = False
    picture: ClassVar[str] = "groups"
    needs_teacher: ClassVar[bool] = False

    # -- the static schedule --------------------------------------------------------------------
    def schedule(self, layout: TokenLayout) -> tuple[LayerSpec, ...]:
        """Per block: tokens in, tokens out, the budget. Raises ValueError naming the block
        whose budget cannot work with the tokens entering it."""
        raise NotImplementedError(f"{type(self).__name__} does not define schedule()")

    # -- what the block computes for it --------------------------------------------------------
    def stats(self, layout: TokenLayout, spec: LayerSpec) -> tuple[str, ...]:
        """Attention statistics (`jax_tokens.attention.STATS`) needed at an active block."""
        return ()

    @property
    def proportional_attention(self) -> bool:
        """Whether token sizes enter the attention logits as log(size) (ToMe's prop_attn)."""
        return False

    def placement(self, spec: LayerSpec) -> str:
        """Where the reducer runs in an active block:

          "mid" (the default): after the attention, before the MLP (ToMe, EViT); `reduce`
            gets the block's attention statistics (`stats`).
          "before": on the block's input, before its attention (MCTF's one-step-ahead
            attention). The block computes the attention probabilities of its input tokens in
            plain XLA (fp32, differentiable) and hands them to `reduce` as stats["probs"] (with
            "key_mass" / "cls_probs" derived from them when `stats` asks; no other statistic
            is available here). Then the attention of the reduced tokens uses the
            [B, H, n_out, n_out] probabilities `reduce_attention` returns, or is computed
            afresh (with the new sizes) when it returns None.
          "after": on the block's output, after the MLP, with this block's statistics (MCTF
            without one-step-ahead).
        """
        return "mid"

    def reduce_attention(self, layout: TokenLayout, spec: LayerSpec, plan: Any,
                         size: jax.Array, stats: dict[str, jax.Array]) -> jax.Array | None:
        """For placement "before": the attention probabilities [B, H, n_out, n_out] of the
        reduced tokens, derived from those of the input tokens (`stats`, as `reduce` got them)
        with the plan `reduce` returned and the input sizes [B, n_in, 1]; None (the default):
        the block computes the attention of the reduced tokens afresh."""
        return None

    def per_example(self, spec: LayerSpec) -> bool:
        """Whether `reduce` may run on each device's own examples under a mesh
        (`jax.shard_map`); False for reducers that own parameters or draw random numbers."""
        return not (self.learned or self.needs_key)

    @property
    def policy_attention(self) -> bool:
        """Whether token sizes are a keep policy (1 kept, 0 dropped, carrying gradients) that
        every block's attention applies multiplicatively, as DynamicViT's softmax_with_policy
        does in training: exp(logits - max) times the policy of each key (a query always
        sees itself), then (a + eps / N) / (sum + eps) with eps = 1e-6. The block computes
        these probabilities in plain XLA (fp32, N x N), so only training-time reducers that
        keep every token (static N) ask for it."""
        return False

    def rejoin_block(self, layout: TokenLayout) -> int | None:
        """The block before which the tokens every active call set aside (`plan.set_aside`)
        come back, concatenated after the kept tokens in pruning order (Token Cropr's "LLF");
        None (the default): dropped tokens are gone."""
        return None

    # -- training -------------------------------------------------------------------------------
    def training(self) -> "Reducer":
        """The reducer the train step runs; evaluation and export run `self`. DynamicViT's
        keeps every token and samples a Gumbel-softmax keep policy; Cropr's also runs its
        auxiliary classifier heads. Both share `self`'s parameters (`make_module`)."""
        return self

    def loss(self, layout: TokenLayout, logits: jax.Array, aux: dict[str, Any], *,
             labels: jax.Array,
             teacher: tuple[jax.Array, dict[str, Any]] | None = None
             ) -> tuple[jax.Array | float, dict[str, jax.Array]]:
        """The reducer's own training loss terms, added to the classification loss: (total,
        {name: term}) from the model's logits and aux (its "plans", "last_hidden_state"), the
        integer labels [B] and, when `needs_teacher`, the unreduced model's (logits, aux) on
        the same images (gradients stopped). Default: none."""
        return 0.0, {}

    # -- costs and warm-up ----------------------------------------------------------------------
    def flops(self, layout: TokenLayout, spec: LayerSpec) -> int:
        """FLOPs per image of the reducer's own work at an active block (2 x multiply-adds;
        the blocks' matmuls on the token counts of the schedule are counted by the model)."""
        return 0

    def anneal(self, layout: TokenLayout, fraction: float) -> "Reducer":
        """The reducer part-way through a budget warm-up: fraction 0 reduces nothing, 1 is
        this reducer. Reducers without a warm-up raise NotImplementedError."""
        raise NotImplementedError(f"reducer {self.method!r} has no budget warm-up")

    # -- parameters ---------------------------------------------------------------------------
    def make_module(self, layout: TokenLayout, spec: LayerSpec, *, dtype=None, rngs=None):
        """The NNX module a learned reducer owns at an active block (None otherwise)."""
        return None

    # -- the reduction itself -------------------------------------------------------------------
    def reduce(self, layout: TokenLayout, spec: LayerSpec, x: jax.Array, size: jax.Array,
               stats: dict[str, jax.Array], *, key: jax.Array | None = None,
               module: Any = None) -> tuple[jax.Array, jax.Array, Any]:
        """[B, n_in, C] tokens, sizes [B, n_in, 1] and the requested statistics ->
        ([B, n_out, C] tokens, [B, n_out, 1] sizes, the plan)."""
        raise NotImplementedError(f"{type(self).__name__} does not define reduce()")

    # -- config helpers ---------------------------------------------------------------------------
    def replace(self, **kw) -> "Reducer":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        """{"method": ..., field: value, ...}: the config form (`reducers.from_config` inverts
        it)."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def label(self) -> str:
        """A short description: the method and the fields that differ from their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            parts.append(f"{f.name}={list(v) if isinstance(v, tuple) else v}")
        return " ".join([self.method] + parts)
