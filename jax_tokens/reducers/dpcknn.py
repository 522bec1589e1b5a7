"""DPC-KNN [`dpcknn`]: Token Pooling by density-peak clustering with k-nearest-neighbour density
(Zeng et al., CVPR 2022, "Not All Tokens Are Equal: Human-centric Visual Analysis via Token
Clustering Transformer"; as in JoakimHaurum/TokenReduction `models/dpcknn.py`).

At each listed block the patch tokens (prefix tokens excluded, kept in front) are clustered:
with d = cdist(x, x) / sqrt(C), each token's density is exp(-mean of d^2 over its k nearest
tokens, itself included) (+ 1e-6 x uniform noise, off by default); its parent distance is the
distance to the nearest denser token (the densest gets the largest distance of the example);
the K tokens with the largest density x parent distance are the centers (cluster id = rank),
and every token joins its nearest center (centers their own). Each cluster becomes the weighted
mean sum_i w_i x_i / (sum_i w_i + 1e-6) with w = exp(Linear(x)) (a learned score owned by the
block, as in the reference's model), or w = 1 with `equal_weight`. Sizes are the sums of the
members' sizes; they do not weight the mean (the reference has none).

Shapes: x [B, N, C] -> [B, p + K, C]; sizes [B, N, 1] -> [B, p + K, 1]; plan: `ClusterPlan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jax_tokens import tokens as tk
from jax_tokens.layers import linear_axes
from jax_tokens.reducers.kmedoids import Clustering, cdist
from jax_tokens.reducers.registry import register

__all__ = ["ClusterPlan", "cluster_dpc_knn", "cluster_plan", "merge_tokens", "TokenWeight",
           "DPCKNN"]

EPS = 1e-6      # added to every cluster's weight sum, as the reference's merge_tokens


@struct.dataclass
class ClusterPlan(tk.WeightedGroupPlan):
    """N input tokens -> M clusters, each the weighted mean w_i / (sum w + eps) of its members
    (prefix tokens map to themselves with weight exactly 1): `weights` are the normalised
    weights (`norm_weight`); see `tokens.WeightedGroupPlan`."""


def cluster_dpc_knn(x: jax.Array, num_clusters: int, k: int = 5,
                    noise: Any = None) -> tuple[jax.Array, jax.Array]:
    """Density-peak clustering of x [B, N, C] (no gradient) -> (idx_cluster [B, N] int32 in
    [0, K), index_down [B, K] int32: the centers by descending score; cluster id = rank).

    noise: None (zero, the default), a PRNG key (a uniform draw, as the reference's torch.rand)
    or a [B, N] array of uniform draws; density += noise * 1e-6. Ties: `lax.top_k` (lower index
    first) and argmin (first index) for the nearest center."""
    x = tk.as_array("x", x)
    tk.check_tokens("x", x)
    b, n, c = x.shape
    num_clusters = tk.static_int("num_clusters", num_clusters, low=1, high=n)
    k = tk.static_int("k", k, low=1, high=n)
    d = cdist(*(jax.lax.stop_gradient(x),) * 2) / jnp.float32(c ** 0.5)        # [B, N, N]
    nearest = -jax.lax.top_k(-d, k)[0]                                          # ascending
    density = jnp.exp(-jnp.mean(nearest * nearest, axis=-1))
    if noise is not None:
        if jnp.issubdtype(getattr(noise, "dtype", None), jax.dtypes.prng_key):
            noise = jax.random.uniform(noise, (b, n), jnp.float32)
        noise = tk.as_array("noise", noise)
        if noise.shape != (b, n):
            raise ValueError(f"noise must be a PRNG key or an array of shape [{b}, {n}]; got "
                             f"{noise.shape}")
        density = density + jax.lax.stop_gradient(noise.astype(jnp.float32)) * jnp.float32(1e-6)
    denser = (density[:, None, :] > density[:, :, None]).astype(jnp.float32)   # [i, j]: j > i
    d_max = jnp.max(d, axis=(1, 2))[:, None, None]
    parent = jnp.min(d * denser + d_max * (1.0 - denser), axis=-1)
    index_down = jax.lax.top_k(parent * density, num_clusters)[1].astype(jnp.int32)
    to_center = jnp.take_along_axis(d, index_down[:, :, None], axis=1)         # [B, K, N]
    idx_cluster = jnp.argmin(to_center, axis=1).astype(jnp.int32)
    rows = jnp.arange(b)[:, None]
    ids = jnp.broadcast_to(jnp.arange(num_clusters, dtype=jnp.int32), (b, num_clusters))
    return idx_cluster.at[rows, index_down].set(ids), index_down


def cluster_plan(idx_cluster: jax.Array, num_clusters: int,
                 token_weight: jax.Array | None = None, *, protected: int = 0) -> ClusterPlan:
    """The merge of the reference's merge_tokens as a plan over all p + N tokens.

    idx_cluster: [B, N] cluster of each clustered token; token_weight: [B, N] (or [B, N, 1])
    positive weights, None for ones. Prefix tokens go first, with weight 1."""
    idx_cluster = tk.as_array("idx_cluster", idx_cluster).astype(jnp.int32)
    b, n = idx_cluster.shape
    num_clusters = tk.static_int("num_clusters", num_clusters, low=1)
    p = tk.static_int("protected", protected, low=0)
    w = jnp.ones((b, n), jnp.float32) if token_weight is None else \
        tk.as_array("token_weight", token_weight).astype(jnp.float32).reshape(b, n)
    total = jnp.einsum("bmn,bn->bm", tk.assignment_matrix(idx_cluster, num_clusters), w,
                       precision=jax.lax.Precision.HIGHEST) + EPS
    norm = w / jnp.take_along_axis(total, idx_cluster, axis=1)
    front = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    return ClusterPlan(groups=jnp.concatenate([front, idx_cluster + p], axis=1),
                       weights=jnp.concatenate([jnp.ones((b, p), jnp.float32), norm], axis=1),
                       n_out=p + num_clusters)


def merge_tokens(x: jax.Array, idx_token: jax.Array, agg_weight: jax.Array,
                 idx_cluster: jax.Array, num_clusters: int,
                 token_weight: jax.Array | None = None):
    """The reference's merge_tokens: x [B, N, C] -> (x_merged [B, K, C], idx_token_new [B, N0]
    = idx_cluster[idx_token], agg_weight_new [B, N0, 1] = agg_weight * norm_weight[idx_token])."""
    plan = cluster_plan(idx_cluster, num_clusters, token_weight)
    idx_token = tk.as_array("idx_token", idx_token).astype(jnp.int32)
    new_idx = jnp.take_along_axis(plan.groups, idx_token, axis=1)
    new_w = agg_weight * jnp.take_along_axis(plan.weights, idx_token, axis=1)[..., None]
    return plan.apply(x), new_idx, new_w


class TokenWeight(nnx.Module):
    """The learned token weight exp(Linear(x)) [B, N] (kernel truncated normal 0.02, bias 0:
    timm's init, so weights start near 1)."""

    def __init__(self, dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.score = nnx.Linear(dim, 1, kernel_init=nnx.initializers.truncated_normal(0.02),
                                dtype=dtype, rngs=rngs, **linear_axes("embed", None))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.exp(self.score(x)[..., 0].astype(jnp.float32))


@register
@dataclasses.dataclass(frozen=True)
class DPCKNN(Clustering):
    """DPC-KNN Token Pooling. Fields: layers, keep_rate / num_clusters (see
    `kmedoids.Clustering`), k (neighbours for the density; 5), equal_weight (w = 1, no learned
    score; the default False owns the Linear as the reference's model), noise (add the
    reference's 1e-6 x uniform density noise, drawn from the model's PRNG key; default off)."""

    method: ClassVar[str] = "dpcknn"
    k: int = 5
    equal_weight: bool = False
    noise: bool = False

    def __post_init__(self):
        super().__post_init__()
        tk.static_int("reduction.k", self.k, low=1)
        for name in ("equal_weight", "noise"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"reduction.{name}={getattr(self, name)!r} must be a bool")

    @property
    def learned(self) -> bool:
        return not self.equal_weight

    @property
    def needs_key(self) -> bool:
        return self.noise

    def _check_block(self, layer, tokens, clusters):
        if self.k > tokens:
            raise ValueError(f"reduction.k={self.k} at block {layer} must be at most the "
                             f"{tokens} tokens clustered there")

    def flops(self, layout, spec):
        n, c = spec.n_in - layout.num_prefix_tokens, layout.embed_dim
        return 2 * n * n * c + 2 * n * c * (1 + int(self.learned))   # distances, mean, score

    def make_module(self, layout, spec, *, dtype=None, rngs=None):
        return TokenWeight(layout.embed_dim, dtype=dtype, rngs=rngs) if self.learned else None

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        p = layout.num_prefix_tokens
        if self.noise and key is None:
            raise ValueError("reduction.noise=True draws density noise: call the model with "
                             "key=jax.random.key(...)")
        if self.learned and module is None:
            raise ValueError("the dpcknn reducer with equal_weight=False needs its TokenWeight "
                             "module: build the model with this reduction")
        idx_cluster, _ = cluster_dpc_knn(x[:, p:], spec.budget, self.k,
                                         key if self.noise else None)
        w = module(x[:, p:]) if self.learned else None
        plan = cluster_plan(idx_cluster, spec.budget, w, protected=p)
        return plan.apply(x), plan.group_size(size), plan
