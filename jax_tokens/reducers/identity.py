"""No reduction [`none`]: every block sees every token. The baseline every other reducer is
measured against."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register


@register
@dataclasses.dataclass(frozen=True)
class NoReduction(base.Reducer):
    """Keeps all N tokens in every block."""

    method: ClassVar[str] = "none"

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        return base.inactive_schedule(layout)

    def anneal(self, layout: base.TokenLayout, fraction: float) -> "NoReduction":
        return self

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        return x, size, None

