"""K-Medoids [`kmedoids`]: Token Pooling by k-medoids clustering (Marin et al., WACV 2023,
"Token Pooling in Vision Transformers"; as in JoakimHaurum/TokenReduction `models/kmedoids.py`).

At each listed block the patch tokens (prefix tokens excluded, kept in front) are clustered into
K groups by k-medoids on their Euclidean distances, and each group is replaced by its medoid
token (a copy, no averaging). The start is weighted: the K tokens that receive the most attention
(the "key_mass" statistic summed over heads, i.e. `attn.sum(heads).sum(queries)`), in descending
order, which fixes the cluster ids. With `equal_weight` the start is farthest-point: one start
token (`init_index`, or drawn from the PRNG key as the reference's `np.random.choice`), then K-1
times the token whose *largest* distance to the chosen centers is largest. Each of `iterations`
steps assigns every token to its nearest medoid, then moves every medoid (all from that one
assignment) to the member minimising `w_i * sum_j d(i, j)`, the sum running over all tokens; a
final assignment follows. Sizes: a medoid's size is the sum of its cluster members' sizes (an
empty cluster, possible with duplicate tokens, has size 0).

Also here, for both Token Pooling reducers: `cdist` (torch.cdist's numerics) and `Clustering`
(per-block cluster counts: a keep rate compounded per listed block as the reference, or a list).

Shapes: x [B, N, C] -> [B, p + K, C]; sizes [B, N, 1] -> [B, p + K, 1]; plan: `MedoidPlan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["cdist", "MedoidPlan", "k_medoids_init", "k_medoids", "Clustering", "KMedoids"]

_FILL = 1e6     # the reference's value for the rows outside a cluster in the medoid update


def cdist(x1: jax.Array, x2: jax.Array) -> jax.Array:
    """Euclidean distances [..., P, C] x [..., R, C] -> [..., P, R] in fp32, as torch.cdist
    computes them: exactly (sqrt of the summed squared differences) when P <= 25 and R <= 25,
    else by the matrix-product formula sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0)), whose diagonal is
    not exactly 0. Meant for selection: its gradient is infinite where a distance is 0."""
    x1 = tk.as_array("x1", x1).astype(jnp.float32)
    x2 = tk.as_array("x2", x2).astype(jnp.float32)
    if x1.ndim < 2 or x1.ndim != x2.ndim or x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"cdist takes x1 [..., P, C] and x2 [..., R, C]; got {x1.shape} and "
                         f"{x2.shape}")
    if x1.shape[-2] <= 25 and x2.shape[-2] <= 25:
        diff = x1[..., :, None, :] - x2[..., None, :, :]
        return jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    # Squared norms as a matrix-vector product: a dot is not re-fused like a reduction, so
    # eager and jit give the same bits (the diagonal's rounding noise decides duplicates).
    ones = jnp.ones((x1.shape[-1],), jnp.float32)
    n1 = jnp.einsum("...pc,c->...p", x1 * x1, ones, precision=jax.lax.Precision.HIGHEST)[..., None]
    n2 = jnp.einsum("...rc,c->...r", x2 * x2, ones, precision=jax.lax.Precision.HIGHEST)[..., None]
    a = jnp.concatenate([-2.0 * x1, n1, jnp.ones_like(n1)], axis=-1)
    b = jnp.concatenate([x2, jnp.ones_like(n2), n2], axis=-1)
    sq = jnp.einsum("...pc,...rc->...pr", a, b, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


@struct.dataclass
class MedoidPlan:
    """N input tokens -> M medoids (prefix tokens map to themselves, in front).

    Attributes:
      medoids: [B, M] int32 input position copied into each output token (prefix included).
      groups: [B, N] int32 output slot of each input token (its cluster).
    `apply` copies the medoids (`matrix` is one-hot at them, whatever the sizes); `invert` gives
    every token its cluster's value; `group_size` sums the members' sizes.
    """

    medoids: jax.Array
    groups: jax.Array

    @property
    def n_in(self) -> int:
        return self.groups.shape[-1]

    @property
    def n_out(self) -> int:
        return self.medoids.shape[-1]

    @property
    def assignment(self) -> jax.Array:
        return self.groups

    def matrix(self, size: jax.Array | None = None) -> jax.Array:
        """Dense [B, M, N]: row m is one-hot at medoid m (sizes do not change it)."""
        del size
        return jax.nn.one_hot(self.medoids, self.n_in, dtype=jnp.float32)

    def apply(self, x: jax.Array) -> jax.Array:
        """[B, N, ...] -> [B, M, ...]: the medoids' values."""
        tk.check_tokens("x", x, rank=getattr(x, "ndim", 3), n=self.n_in)
        return tk.gather_tokens(x, self.medoids)

    def invert(self, y: jax.Array) -> jax.Array:
        """[B, M, ...] -> [B, N, ...]: every token gets its cluster's value."""
        return tk.invert_by_assignment(y, self.groups)

    def group_size(self, size: jax.Array) -> jax.Array:
        """[B, N, 1] sizes -> [B, M, 1]: the sum over each cluster's members (fp32)."""
        return tk.reduce_by_assignment(tk.as_array("size", size).astype(jnp.float32),
                                       self.groups, self.n_out, "sum")


def _nearest(dist: jax.Array, centers: jax.Array) -> jax.Array:
    """[B, N] index in [0, K) of each token's nearest center (first on ties)."""
    return jnp.argmin(jnp.take_along_axis(dist, centers[:, None, :], axis=2), axis=-1)


def k_medoids_init(dist: jax.Array, num_clusters: int, weights: jax.Array | None = None,
                   init_index: Any = 0) -> jax.Array:
    """The start [B, K] int32 from distances [B, N, N].

    weights [B, N]: the top-K by weight, descending (`lax.top_k`: lower index first on ties).
    None: farthest-point from `init_index` (an int, or an int32 scalar, e.g. drawn from a key;
    the same for every example), then K-1 times argmax_i max_{chosen c} d(i, c) with chosen
    tokens scored 0 (first index on ties, so a repeat is possible when all scores are 0)."""
    b, n = dist.shape[0], dist.shape[1]
    if weights is not None:
        return jax.lax.top_k(weights.astype(jnp.float32), num_clusters)[1].astype(jnp.int32)
    start = jnp.broadcast_to(jnp.asarray(init_index, jnp.int32), (b,))
    idx = jnp.zeros((b, num_clusters), jnp.int32).at[:, 0].set(start)

    def step(k, carry):
        idx, chosen = carry
        far = jnp.max(jnp.where(chosen[:, None, :], dist, 0.0), axis=-1)
        new = jnp.argmax(jnp.where(chosen, 0.0, far), axis=-1).astype(jnp.int32)
        return idx.at[:, k].set(new), chosen | jax.nn.one_hot(new, n, dtype=jnp.bool_)

    chosen = jax.nn.one_hot(start, n, dtype=jnp.bool_)
    return jax.lax.fori_loop(1, num_clusters, step, (idx, chosen))[0]


def k_medoids(x: jax.Array, num_clusters: int, iterations: int = 3,
              weights: jax.Array | None = None, init_index: Any = None, *,
              protected: int = 0) -> MedoidPlan:
    """Clusters the tokens x[:, protected:] into K medoids (the reference's `k_medoids_fit`).

    x: [B, N, C] (no gradient flows through the clustering); weights: [B, N - protected] token
    weights (the weighted start and the w_i of the update), or None for the farthest-point start
    from `init_index` (required then) with weights 1. Returns a `MedoidPlan` over all N tokens:
    prefix tokens first, then the K medoids in cluster order (`plan.apply(x)` = the reference's
    `centers`; `plan.medoids[:, p:] - p` its `cluster_idx`, `plan.groups[:, p:] - p` its
    `assignment`).
    """
    x = tk.as_array("x", x)
    tk.check_tokens("x", x)
    b, n_all = x.shape[0], x.shape[1]
    p = tk.static_int("protected", protected, low=0, high=n_all - 1)
    n = n_all - p
    k = tk.static_int("num_clusters", num_clusters, low=1, high=n)
    iterations = tk.static_int("iterations", iterations, low=0)
    if weights is None:
        if init_index is None:
            raise ValueError("k_medoids without weights needs init_index (an int in [0, "
                             f"{n}) or a drawn int32 scalar: the farthest-point start)")
        if not tk.is_traced(init_index) and not isinstance(init_index, jax.Array):
            tk.static_int("init_index", init_index, low=0, high=n - 1)
    else:
        weights = tk.as_array("weights", weights)
        if weights.shape != (b, n):
            raise ValueError(f"weights must have shape [{b}, {n}] (one per clustered token); "
                             f"got {weights.shape}")
        weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    dist = cdist(*(jax.lax.stop_gradient(x[:, p:]),) * 2)                  # [B, n, n]
    centers = k_medoids_init(dist, k, weights, init_index)
    w = jnp.ones((b, n), jnp.float32) if weights is None else weights
    # sum_j w_i d(i, j) does not change between iterations; rows outside a cluster sum the fill.
    total = jnp.sum(dist * w[:, :, None], axis=-1)                          # [B, n]
    fill = jnp.sum(jnp.full((n,), _FILL, jnp.float32))
    slots = jnp.arange(k)[None, :, None]

    def update(_, centers):
        member = _nearest(dist, centers)[:, None, :] == slots              # [B, K, n]
        return jnp.argmin(jnp.where(member, total[:, None, :], fill), axis=-1).astype(jnp.int32)

    centers = jax.lax.fori_loop(0, iterations, update, centers)
    groups = _nearest(dist, centers).astype(jnp.int32)
    front = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    return MedoidPlan(medoids=jnp.concatenate([front, centers + p], axis=1),
                      groups=jnp.concatenate([front, groups + p], axis=1))


# --------------------------------------------------------------------------------------------
# Per-block cluster counts (shared with DPC-KNN)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Clustering(base.Reducer):
    """Where and how many clusters. Fields:
      layers: strictly increasing block indices that cluster.
      keep_rate: in (0, 1]: the j-th listed block keeps int(P * keep_rate ** (j + 1)) clusters,
        P = patch tokens at the input (the reference's compounding), or
      num_clusters: one count per listed block (then keep_rate stays 1.0).
    A count equal to the tokens entering a block leaves it untouched (inactive)."""

    layers: tuple = ()
    keep_rate: float = 1.0
    num_clusters: tuple = ()

    def __post_init__(self):
        for name in ("layers", "num_clusters"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for l in self.layers:
            tk.static_int("reduction.layers entry", l, low=0)
        if any(a >= b for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"reduction.layers={list(self.layers)} must be strictly increasing "
                             "block indices")
        tk.static_float("reduction.keep_rate", self.keep_rate, low=0.0, high=1.0)
        if self.num_clusters:
            if self.keep_rate != 1.0:
                raise ValueError(f"reduction.keep_rate={self.keep_rate} and reduction."
                                 f"num_clusters={list(self.num_clusters)} are both given: give "
                                 "one of them")
            if len(self.num_clusters) != len(self.layers):
                raise ValueError(f"reduction.num_clusters has {len(self.num_clusters)} entries "
                                 f"but reduction.layers has {len(self.layers)}: give one count "
                                 "per clustering block")
            for l, c in zip(self.layers, self.num_clusters):
                tk.static_int(f"reduction.num_clusters (block {l})", c, low=1)

    def _counts(self, layout: base.TokenLayout) -> tuple[int, ...]:
        if self.num_clusters:
            return self.num_clusters
        patches = layout.num_tokens - layout.num_prefix_tokens
        return tuple(int(patches * (self.keep_rate ** (j + 1))) for j in range(len(self.layers)))

    def _check_block(self, layer: int, tokens: int, clusters: int) -> None:
        """Method-specific checks of an active block (tokens: clustered tokens entering)."""

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        base.check_layers(self.layers, layout)
        counts = dict(zip(self.layers, self._counts(layout)))
        p, n, specs, prev = layout.num_prefix_tokens, layout.num_tokens, [], None
        for l in range(layout.depth):
            c = counts.get(l)
            if c is None or c == n - p:
                specs.append(base.LayerSpec(n, n))
                continue
            if not 1 <= c <= n - p:
                grew = (f"; counts per block must not grow (the block before kept {prev})"
                        if prev is not None and c > prev else "")
                raise ValueError(f"reduction asks block {l} for {c} clusters, but {n - p} "
                                 f"tokens (besides {p} prefix tokens) enter it (allowed: 1.."
                                 f"{n - p}){grew}")
            self._check_block(l, n - p, c)
            specs.append(base.LayerSpec(n, p + c, c, active=True))
            n, prev = p + c, c
        return tuple(specs)

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        if not self.num_clusters:
            return self.replace(keep_rate=1.0 - (1.0 - self.keep_rate) * fraction)
        patches = layout.num_tokens - layout.num_prefix_tokens
        return self.replace(num_clusters=tuple(patches - int(round((patches - c) * fraction))
                                               for c in self.num_clusters))


@register
@dataclasses.dataclass(frozen=True)
class KMedoids(Clustering):
    """K-Medoids Token Pooling. Fields: layers, keep_rate / num_clusters (see `Clustering`),
    iterations (the reference's cluster_iters, 3), equal_weight (farthest-point start, weights
    1), init_index (the start token with equal_weight; None: drawn from the model's PRNG key)."""

    method: ClassVar[str] = "kmedoids"
    iterations: int = 3
    equal_weight: bool = False
    init_index: int | None = None

    def __post_init__(self):
        super().__post_init__()
        tk.static_int("reduction.iterations", self.iterations, low=0)
        if not isinstance(self.equal_weight, bool):
            raise TypeError(f"reduction.equal_weight={self.equal_weight!r} must be a bool")
        if self.init_index is not None:
            tk.static_int("reduction.init_index", self.init_index, low=0)

    @property
    def needs_key(self) -> bool:
        return self.equal_weight and self.init_index is None

    def _check_block(self, layer, tokens, clusters):
        if self.equal_weight and self.init_index is not None and self.init_index >= tokens:
            raise ValueError(f"reduction.init_index={self.init_index} at block {layer} must be "
                             f"below the {tokens} tokens clustered there")

    def stats(self, layout, spec):
        return () if self.equal_weight else ("key_mass",)

    def flops(self, layout, spec):
        n = spec.n_in - layout.num_prefix_tokens     # distances, then the weighted row sums
        return 2 * n * n * (layout.embed_dim + 1)

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        p, n = layout.num_prefix_tokens, spec.n_in - layout.num_prefix_tokens
        weights, start = None, None
        if not self.equal_weight:
            weights = stats["key_mass"].astype(jnp.float32).sum(axis=1)[:, p:]
        elif self.init_index is not None:
            start = self.init_index
        elif key is None:
            raise ValueError("reduction.equal_weight=True with init_index=None draws the start "
                             "token: call the model with key=jax.random.key(...)")
        else:
            start = jax.random.randint(key, (), 0, n, jnp.int32)
        plan = k_medoids(x, spec.budget, self.iterations, weights, start, protected=p)
        return plan.apply(x), plan.group_size(size), plan
