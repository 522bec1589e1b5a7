"""ATC [`atc`]: agglomerative token clustering (Haurum et al., "Agglomerative Token Clustering",
ECCV 2024; JoakimHaurum/ATC, `ATC_setup/models/atc.py`).

At each listed block, after attention, the tokens (class / distillation token left out) are
clustered bottom-up on the cosine distance `1 - cos` of their head-mean attention keys (the
"mean_key" statistic, as the reference's `k.mean(1)`): the two closest clusters merge until K
remain, cluster distances following the linkage (single: min, complete: max, average: mean,
by Lance-Williams updates). Each cluster becomes one token, the size-weighted mean of its
members (sizes add); the protected tokens stay in front.

The reference calls scikit-learn on the CPU (scipy's `linkage`, then sklearn's `_hc_cut`); here
the same algorithms run on device, per example, with static shapes and no host call:

  * `cosine_distance`: the reference's ops (x / ||x||, x x^T, 1 - s) in fp32;
  * `linkage_tree`: the full tree in scipy's format. Single linkage is scipy's Prim chain
    (`mst_single_linkage`), complete / average its nearest-neighbour chain (`nn_chain`), with
    the same first-index tie rule, then the same stable sort by height and union-find
    relabelling. Cost O(N^2) per example and O(N) sequential steps: Prim is N-1 steps, the
    chain 3(N-1) (`lax.fori_loop`s with static trip counts; each step scans or updates one
    row of the [N, N] matrix), the relabelling N-1;
  * `cut_tree`: the clusters after the first N-K merges, numbered as sklearn's `_hc_cut`
    numbers them (the order of its heap, emulated step by step: order="reference") or by the
    first token of each cluster (order="appearance").

Ties are broken exactly as scipy breaks them; the one difference is precision: scipy works in
float64 on the float32 distances, this code in float32 (single and complete linkage only
compare input distances, so they agree bit for bit on the same distances; average linkage may
order two cluster pairs whose mean distances differ by ~1e-7 differently; its fp32 mean is
clipped to [min, max] of the two merged distances, which float64 never leaves, so that equal
distances stay equal and the chain provably ends in 3(N-1) steps).

Shapes: x [B, N, C] -> [B, p + K, C]; sizes [B, N, 1] -> [B, p + K, 1]; plan:
`jax_tokens.groups.GroupPlan` (groups [B, N]: protected token i -> slot i, the others -> p +
their cluster).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from jax_tokens import groups as grp
from jax_tokens import tokens as tk
from jax_tokens.reducers import base
from jax_tokens.reducers.registry import register

__all__ = ["LINKAGES", "ORDERS", "cosine_distance", "linkage_tree", "cut_tree",
           "agglomerative_clustering", "ATC"]

LINKAGES = ("single", "complete", "average")
ORDERS = ("reference", "appearance")


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------

def cosine_distance(metric: jax.Array) -> jax.Array:
    """[B, N, D] -> [B, N, N] fp32 `1 - cos`, computed as the reference does (divide by the
    norm, matmul, subtract from 1). A zero vector gets distance 1 to everything (the reference
    would produce NaN)."""
    m = tk.as_array("metric", metric).astype(jnp.float32)
    norm = jnp.linalg.norm(m, axis=-1, keepdims=True)
    m = m / jnp.where(norm > 0, norm, 1.0)
    s = jnp.einsum("bnd,bmd->bnm", m, m, precision=lax.Precision.HIGHEST)
    return 1.0 - s


# --------------------------------------------------------------------------------------------
# The tree (one example; `linkage_tree` vmaps)
# --------------------------------------------------------------------------------------------

def _prim_chain(dist):
    """scipy's `mst_single_linkage`: (x, y, height) rows in Prim order, x the last added."""
    n = dist.shape[0]

    def step(k, s):
        merged, dmin, x, za, zb, zh = s
        merged = merged.at[x].set(True)
        dmin = jnp.where(merged, dmin, jnp.minimum(dmin, dist[x]))
        cand = jnp.where(merged, jnp.inf, dmin)
        y = jnp.argmin(cand).astype(jnp.int32)      # first index of the minimum, as scipy
        return merged, dmin, y, za.at[k].set(x), zb.at[k].set(y), zh.at[k].set(cand[y])

    init = (jnp.zeros(n, bool), jnp.full(n, jnp.inf, jnp.float32), jnp.int32(0),
            jnp.zeros(n - 1, jnp.int32), jnp.zeros(n - 1, jnp.int32),
            jnp.zeros(n - 1, jnp.float32))
    return lax.fori_loop(0, n - 1, step, init)[3:]


def _nn_chain(dist, linkage):
    """scipy's `nn_chain`: (x, y, height) rows (x < y are slots; y keeps the new cluster) in
    the order the chain finds them. Each step scans one row: it extends the chain by the
    nearest neighbour of its top (the previous element wins ties) or merges a mutual pair.
    A step count of 3(N-1) always suffices (2(N-1) pushes, N-1 merges): the updates below are
    reducible (never below both merged distances), so the chain never repeats a cluster."""
    n = dist.shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)

    def update(da, db, na, nb):
        if linkage == "complete":
            return jnp.maximum(da, db)
        fa, fb = na.astype(jnp.float32), nb.astype(jnp.float32)
        mean = (fa * da + fb * db) / (fa + fb)       # average: scipy's expression, in fp32,
        return jnp.clip(mean, jnp.minimum(da, db), jnp.maximum(da, db))   # kept reducible

    def step(_, s):
        d, size, chain, clen, k, za, zb, zh = s
        live = k < n - 1
        start = live & (clen == 0)
        chain = chain.at[0].set(jnp.where(start, jnp.argmax(size > 0), chain[0]))
        clen = jnp.where(start, 1, clen)
        x = chain[jnp.maximum(clen - 1, 0)]
        has_prev = clen > 1
        prev = chain[jnp.maximum(clen - 2, 0)]
        row = jnp.where((size > 0) & (idx != x), d[x], jnp.inf)
        cur = jnp.where(has_prev, d[x, prev], jnp.inf)
        amin = jnp.argmin(row).astype(jnp.int32)
        y = jnp.where(row[amin] < cur, amin, prev)
        merge = live & has_prev & (y == prev)
        extend = live & ~merge
        top = jnp.minimum(clen, n - 1)
        chain = chain.at[top].set(jnp.where(extend, y, chain[top]))
        clen = jnp.where(merge, clen - 2, jnp.where(extend, clen + 1, clen))
        a, b = jnp.minimum(x, y), jnp.maximum(x, y)
        na, nb = size[a], size[b]
        new = jnp.where(merge, update(d[a], d[b], na, nb), d[b])
        d = d.at[b].set(new).at[:, b].set(new)
        size = size.at[a].set(jnp.where(merge, 0, na)).at[b].set(jnp.where(merge, na + nb, nb))
        kk = jnp.minimum(k, n - 2)
        za = za.at[kk].set(jnp.where(merge, a, za[kk]))
        zb = zb.at[kk].set(jnp.where(merge, b, zb[kk]))
        zh = zh.at[kk].set(jnp.where(merge, cur, zh[kk]))
        return d, size, chain, clen, k + merge, za, zb, zh

    init = (dist, jnp.ones(n, jnp.int32), jnp.zeros(n, jnp.int32), jnp.int32(0), jnp.int32(0),
            jnp.zeros(n - 1, jnp.int32), jnp.zeros(n - 1, jnp.int32),
            jnp.zeros(n - 1, jnp.float32))
    return lax.fori_loop(0, 3 * (n - 1), step, init)[5:]


def _tree(dist, linkage):
    """One example: [N, N] -> children [N-1, 2] int32, heights [N-1] fp32 (scipy's Z[:, :3])."""
    n = dist.shape[0]
    upper = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]
    dist = jnp.where(upper, dist, dist.T)                       # scipy reads the upper half
    za, zb, zh = _prim_chain(dist) if linkage == "single" else _nn_chain(dist, linkage)
    order = jnp.argsort(zh, stable=True)                        # scipy: mergesort by height
    za, zb, zh = za[order], zb[order], zh[order]

    def relabel(i, s):            # scipy's `label`: rows name slots -> rows name tree nodes
        cid, ch = s
        ra, rb = cid[za[i]], cid[zb[i]]
        ch = ch.at[i].set(jnp.stack([jnp.minimum(ra, rb), jnp.maximum(ra, rb)]))
        return jnp.where((cid == ra) | (cid == rb), n + i, cid), ch

    init = (jnp.arange(n, dtype=jnp.int32), jnp.zeros((n - 1, 2), jnp.int32))
    return lax.fori_loop(0, n - 1, relabel, init)[1], zh


def linkage_tree(dist: jax.Array, linkage: str = "average") -> tuple[jax.Array, jax.Array]:
    """The full agglomerative tree of each example, in scipy's `linkage` format.

    dist [B, N, N] (symmetric; only the off-diagonal entries are read) -> (children
    [B, N-1, 2] int32: row i merges nodes children[i] (ascending; < N are tokens, N + j is row
    j's cluster) into node N + i; heights [B, N-1] fp32, non-decreasing).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r} is not one of {LINKAGES}")
    dist = tk.as_array("dist", dist)
    if dist.ndim != 3 or dist.shape[1] != dist.shape[2] or dist.shape[1] < 2:
        raise ValueError(f"dist must have shape [batch, N, N] with N >= 2; got {dist.shape}")
    return _trees(dist.astype(jnp.float32), linkage)


@functools.partial(jax.jit, static_argnames="linkage")   # eager callers: one compile per shape
def _trees(dist, linkage):
    return jax.vmap(lambda d: _tree(d, linkage))(dist)


def _cut(children, n_clusters, order):
    """One example: children [N-1, 2] -> labels [N] in [0, K)."""
    n, k = children.shape[0] + 1, n_clusters

    def merge(i, cid):
        return jnp.where((cid == children[i, 0]) | (cid == children[i, 1]), n + i, cid)

    cid = lax.fori_loop(0, n - k, merge, jnp.arange(n, dtype=jnp.int32))   # the K clusters
    if order == "appearance":
        first = jnp.argmax(cid[:, None] == cid[None, :], axis=1)           # first member
        rank = jnp.cumsum(first == jnp.arange(n)) - 1
        return rank[first].astype(jnp.int32)

    # sklearn's `_hc_cut`: a heapq min-heap of negated node ids; K-1 times, push the largest
    # node's two children and pop the node. Cluster i is the node at heap position i.
    depth = max(1, k.bit_length())

    def sift_down(h, pos):        # heapq._siftdown(heap, 0, pos)
        item = h[pos]

        def step(_, s):
            h, pos = s
            parent = jnp.maximum(pos - 1, 0) // 2
            move = (pos > 0) & (item < h[parent])
            h = h.at[pos].set(jnp.where(move, h[parent], h[pos]))
            return h, jnp.where(move, parent, pos)

        h, pos = lax.fori_loop(0, depth, step, (h, pos))
        return h.at[pos].set(item)

    def sift_up(h, end):          # heapq._siftup(heap, 0) on a heap of `end` items
        item = h[0]

        def step(_, s):
            h, pos = s
            child = 2 * pos + 1
            right = child + 1
            c = jnp.where((right < end) & ~(h[jnp.minimum(child, k - 1)]
                                            < h[jnp.minimum(right, k - 1)]), right, child)
            go = child < end
            c = jnp.minimum(c, k - 1)
            h = h.at[pos].set(jnp.where(go, h[c], h[pos]))
            return h, jnp.where(go, c, pos)

        h, pos = lax.fori_loop(0, depth, step, (h, jnp.int32(0)))
        return sift_down(h.at[pos].set(item), pos)

    def pop(t, h):                # t + 1 items in the heap
        pair = children[-h[0] - n]
        h = sift_down(h.at[t + 1].set(-pair[0]), t + 1)          # heappush
        return sift_up(h.at[0].set(-pair[1]), t + 2)             # heappushpop (pops the node)

    h = jnp.zeros(k, jnp.int32).at[0].set(-(jnp.max(children[-1]) + 1))
    h = lax.fori_loop(0, k - 1, pop, h)
    return jnp.argmax(cid[:, None] == -h[None, :], axis=1).astype(jnp.int32)


def cut_tree(children: jax.Array, n_clusters: int, order: str = "reference") -> jax.Array:
    """Flat clusters from a tree: children [B, N-1, 2] (`linkage_tree`) -> labels [B, N] int32
    in [0, n_clusters): the clusters after the first N - n_clusters merges, numbered as
    sklearn's `_hc_cut` does (order="reference") or by first member (order="appearance")."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {ORDERS}")
    children = tk.as_array("children", children)
    if children.ndim != 3 or children.shape[-1] != 2:
        raise ValueError(f"children must have shape [batch, N-1, 2]; got {children.shape}")
    n = children.shape[1] + 1
    k = tk.static_int("n_clusters", n_clusters, low=1, high=n)
    return _cuts(children.astype(jnp.int32), k, order)


@functools.partial(jax.jit, static_argnames=("k", "order"))
def _cuts(children, k, order):
    return jax.vmap(lambda c: _cut(c, k, order))(children)


def agglomerative_clustering(metric: jax.Array, num_clusters: int, linkage: str = "average",
                             class_token: bool = False, distill_token: bool = False,
                             order: str = "reference") -> grp.GroupPlan:
    """ATC's clustering (the reference's `agglomerative_clustering`) as a plan.

    metric [B, T, D] -> GroupPlan: groups [B, T] int32, n_out = p + K, where p counts the class
    and distillation tokens (kept as slots 0..p-1, left out of the distances) and K =
    min(num_clusters, T - p), clamped as the reference clamps it. Slot p + j is cluster j
    (`order`: see `cut_tree`). Merge with `groups.merge_groups(plan, x, size)`.
    """
    metric = tk.as_array("metric", metric)
    tk.check_tokens("metric", metric)
    p = int(bool(class_token)) + int(bool(distill_token))
    b, t = metric.shape[:2]
    k = min(tk.static_int("num_clusters", num_clusters, low=1), t - p)
    if k < 1:
        raise ValueError(f"metric has {t} tokens, all protected ({p}): nothing to cluster")
    if t - p == 1:
        labels = jnp.zeros((b, 1), jnp.int32)
    else:
        dist = cosine_distance(lax.stop_gradient(metric[:, p:]))
        labels = cut_tree(linkage_tree(dist, linkage)[0], k, order)
    front = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    return grp.GroupPlan(groups=jnp.concatenate([front, labels + p], axis=1), n_out=p + k)


# --------------------------------------------------------------------------------------------
# The reducer
# --------------------------------------------------------------------------------------------

@register
@dataclasses.dataclass(frozen=True)
class ATC(base.Reducer):
    """Agglomerative token clustering at the listed blocks (see the module docstring).

    Fields:
      layers: block indices, strictly increasing.
      keep_rate: a float in (0, 1]: the i-th listed block keeps int(n0 * keep_rate ** (i + 1))
        clusters, n0 the unprotected input tokens (the reference's single `reduction_ratio`);
      num_clusters: or an int (every listed block) or one int per listed block. Neither:
        nothing is reduced. A count equal to the tokens there leaves the block inactive; a
        larger one is an error naming the block.
      linkage: "single", "complete" or "average" (the reference model's default).
      prop_attn: proportional attention. As in the reference, it also picks the merge weights:
        with it, the size-weighted mean; without, the plain mean of the tokens (the reference
        resets sizes to None each block). The returned sizes always add up.
      order: output order of the clusters: "reference" (sklearn's numbering) or "appearance".
    """

    method: ClassVar[str] = "atc"
    layers: tuple = ()
    keep_rate: Any = None
    num_clusters: Any = None
    linkage: str = "average"
    prop_attn: bool = True
    order: str = "reference"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for l in self.layers:
            tk.static_int("reduction.layers entry", l, low=0)
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(f"reduction.layers={list(self.layers)} must be strictly increasing")
        if self.keep_rate is not None and self.num_clusters is not None:
            raise ValueError(f"reduction.keep_rate={self.keep_rate!r} and reduction.num_clusters"
                             f"={self.num_clusters!r} are both set: give one of them")
        if self.keep_rate is not None:
            tk.static_float("reduction.keep_rate", self.keep_rate, low=0.0, high=1.0)
        counts = self.num_clusters
        if isinstance(counts, (list, tuple)):
            counts = tuple(counts)
            object.__setattr__(self, "num_clusters", counts)
            if len(counts) != len(self.layers):
                raise ValueError(f"reduction.num_clusters has {len(counts)} entries but "
                                 f"reduction.layers has {len(self.layers)}: give one count per "
                                 "clustering block, or a single int")
            for l, c in zip(self.layers, counts):
                tk.static_int(f"reduction.num_clusters (block {l})", c, low=1)
        elif counts is not None:
            tk.static_int("reduction.num_clusters", counts, low=1)
        if self.linkage not in LINKAGES:
            raise ValueError(f"reduction.linkage={self.linkage!r} is not one of {LINKAGES}")
        if self.order not in ORDERS:
            raise ValueError(f"reduction.order={self.order!r} is not one of {ORDERS}")
        if not isinstance(self.prop_attn, bool):
            raise TypeError(f"reduction.prop_attn={self.prop_attn!r} must be a bool")

    @staticmethod
    def _protected(layout) -> int:
        return int(layout.class_token) + int(layout.distill_token)

    def _counts(self, layout) -> dict[int, int]:
        n0 = layout.num_tokens - self._protected(layout)
        if self.keep_rate is not None:
            counts = [int(n0 * self.keep_rate ** (i + 1)) for i in range(len(self.layers))]
        elif isinstance(self.num_clusters, numbers.Integral):
            counts = [int(self.num_clusters)] * len(self.layers)
        elif self.num_clusters is not None:
            counts = list(self.num_clusters)
        else:
            counts = [n0] * len(self.layers)
        return dict(zip(self.layers, counts))

    def schedule(self, layout: base.TokenLayout) -> tuple[base.LayerSpec, ...]:
        base.check_layers(self.layers, layout)
        counts, p, n = self._counts(layout), self._protected(layout), layout.num_tokens
        specs = []
        for l in range(layout.depth):
            if l in counts:
                k = counts[l]
                if k < 1:
                    raise ValueError(
                        f"reduction.keep_rate={self.keep_rate} leaves block {l} with 0 clusters "
                        f"(int({layout.num_tokens - p} x {self.keep_rate} ** "
                        f"{self.layers.index(l) + 1})): at least 1 is needed; raise keep_rate "
                        "or list fewer blocks")
                if k > n - p:
                    raise ValueError(
                        f"reduction asks block {l} for {k} clusters, but only {n - p} tokens "
                        f"can be clustered there ({n} enter it, {p} protected): give at most "
                        f"{n - p} (counts must not grow from block to block)")
                if k < n - p:
                    specs.append(base.LayerSpec(n, p + k, k, active=True))
                    n = p + k
                    continue
            specs.append(base.LayerSpec(n, n))
        return tuple(specs)

    def stats(self, layout, spec):
        return ("mean_key",)

    @property
    def proportional_attention(self) -> bool:
        return self.prop_attn

    def flops(self, layout, spec):
        # Cosine similarities (2 n^2 d) and norms, then the tree, counted as one op per
        # element visited: <= 3(n-1) row scans + (n-1) Lance-Williams row updates (3 ops)
        # + (n-1) relabel passes + (n-K) cut passes. Not counted: the one-hot merge.
        n, d, k = spec.n_in - self._protected(layout), layout.head_dim, spec.budget
        return 2 * n * n * d + 3 * n * d + (3 * (n - 1) + 3 * (n - 1) + (n - 1) + (n - k)) * n

    def anneal(self, layout, fraction):
        if fraction >= 1.0:
            return self
        f = tk.static_float("fraction", fraction, low=0.0, high=1.0, low_open=False)
        if self.keep_rate is not None:
            return self.replace(keep_rate=1.0 - (1.0 - self.keep_rate) * f)
        if self.num_clusters is None:
            return self
        n0 = layout.num_tokens - self._protected(layout)
        counts = self._counts(layout)
        return self.replace(num_clusters=tuple(n0 - int(round((n0 - counts[l]) * f))
                                               for l in self.layers))

    def reduce(self, layout, spec, x, size, stats, *, key=None, module=None):
        plan = agglomerative_clustering(stats["mean_key"], spec.budget, self.linkage,
                                        class_token=layout.class_token,
                                        distill_token=layout.distill_token, order=self.order)
        if self.prop_attn:
            x, size = grp.merge_groups(plan, x, size)
        else:   # the reference's plain mean; the sizes still add up
            x, size = grp.merge_groups(plan, x, None)[0], grp.group_sum(plan, size)
        return x, size, plan
