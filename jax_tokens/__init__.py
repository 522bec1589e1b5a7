"""jax_tokens: fixed-budget token reduction (merging, pruning, lookup compression) in JAX."""

__version__ = "0.1.0"
