"""Attention that returns the statistics token reducers need.

`attention(q, k, v, stats=(...))` returns `(out, stats_dict)`. The XLA implementation
materialises the probability matrix and is the oracle for the kernels.
"""

from jax_tokens.attention.api import attention
from jax_tokens.attention.checks import STATS
from jax_tokens.attention.xla import attention_xla

__all__ = ["attention", "attention_xla", "STATS"]
