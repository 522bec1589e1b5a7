"""Device meshes, logical axis rules and shardings for parameters, batches and checkpoints.

    mesh = make_mesh(config)                 # config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    rules = rules_from_config(config)        # config.sharding.preset: "dp" | "fsdp" | "fsdp_tp"
    check_batch_size(mesh, global_batch, rules)            # ValueError before anything compiles
    with use_mesh(mesh, rules):                            # jax.set_mesh + the rules
        abstract = jax.eval_shape(init)
        shardings = state_shardings(mesh, abstract, rules)  # pytree of NamedSharding
        state = jax.jit(init, out_shardings=shardings)()    # created already sharded
        step = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh, rules)),
                       out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
        state, metrics = step(state, put_batch(local_batch, mesh, rules))

The mesh has three axes, in this order: `data` (pure data parallelism: replicas), `fsdp`
(data parallelism whose replicas also split the parameters and optimizer state: ZeRO-3 / FSDP)
and `tensor` (tensor / model parallelism: attention heads and the MLP hidden units are split).
Sizes come from the config; one of them may be -1 (all remaining devices). All axes are
`AxisType.Auto`: the annotations below say where arrays live, XLA's sharding propagation does
the rest.

Parameters carry *logical* axis names in their NNX metadata (`out_sharding`, with
`eager_sharding=False` so that building a model needs no mesh), e.g. the qkv kernel is
("embed", "qkv"), the MLP's fc1 kernel ("embed", "mlp"); activations are annotated with
`constrain(x, ("batch", "tokens", "embed"))`. *Rules* map logical names to mesh axes
(MaxText / big_vision style); three presets:

    "dp"       batch -> (data, fsdp); every parameter replicated.
    "fsdp"     batch -> (data, fsdp); embed -> fsdp: every matrix is split over fsdp along its
               embedding axis (the optimizer moments follow their parameters); XLA all-gathers
               a layer's weights where they are used and sums the gradients over the batch.
    "fsdp_tp"  fsdp, plus heads / kv_heads / qkv / mlp -> tensor: the qkv output columns, the attention
               projection's input rows and the MLP hidden units are split over `tensor`
               (Megatron-style), and attention runs per head shard. The fused qkv kernel
               [D, 3D] (timm's layout) is split into contiguous column blocks, which are not
               whole heads of q, k and v: XLA reshuffles q/k/v to heads (collective-permutes).

A mesh axis is used at most once per array: the first logical dimension that claims it gets
it (so an activation ("batch", "tokens", "embed") under "fsdp" is split over data x fsdp on the
batch only). A dimension whose size is not divisible by its mesh axes is left unsplit.

Pallas attention (impl "pallas_tpu" / "pallas_gpu") is wrapped in `jax.shard_map` by
`jax_tokens.attention.sharded.attention` when a mesh is active: every device runs the kernel on its
own examples (and heads, under "fsdp_tp"). Token reduction is per example; `per_example` runs
the selection (ToMe's matching, top-k pruning) in `jax.shard_map` over the batch axes, because
XLA's partitioner would otherwise all-gather the batch for `lax.top_k` / `sort`. The tests
check that the compiled HLO of a data-parallel step has no all-gather or all-to-all.

Multi-host: call `jax_tokens.distributed.maybe_initialize_distributed(config)` first thing;
every process then loads its own part of each global batch (the data module shards by
`jax.process_index()`) and `put_batch` assembles the global array with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

__all__ = [
    "AXES", "LOGICAL_AXES", "PRESETS", "Rules", "logical_axes", "make_mesh", "mesh_shape",
    "axis_rules",
    "rules_from_config", "check_rules", "logical_to_spec", "logical_sharding", "batch_axes",
    "batch_sharding", "replicated", "state_shardings", "abstract_with_shardings",
    "check_batch_size", "put_batch", "use_mesh", "flax_rules", "current_rules", "constrain",
    "per_example", "spec_entry", "split_axes", "mesh_sizes", "rules_dict", "context_mesh",
]

AXES = ("data", "fsdp", "tensor")
"""Mesh axes, in mesh order."""

LOGICAL_AXES = (
    "batch",    # examples (activations, batches)
    "tokens",   # the token axis of activations
    "embed",    # the model width D (residual stream; input of qkv / fc1, output of proj / fc2)
    "mlp",      # the MLP hidden units
    "qkv",      # the fused q|k|v output columns of the attention input projection
    "heads",    # attention heads (activations) / the per-head rows of the output projection
    "classes",  # classifier outputs
    "patch",    # the input channels of the patch projection
    "norm",     # per-channel vectors of LayerNorm / LayerScale
    "kv_heads", # key/value heads of grouped-query attention (decoder k/v projections, KV cache)
    "vocab",    # the vocabulary (token embedding rows, LM head columns)
)
"""Logical axis names the library's modules use (rules may only name these)."""

Rules = tuple  # tuple[tuple[str, str | tuple[str, ...] | None], ...]

_BATCH = ("batch", ("data", "fsdp"))
PRESETS: dict[str, Rules] = {
    "dp": (_BATCH,),
    "fsdp": (_BATCH, ("embed", "fsdp")),
    "fsdp_tp": (_BATCH, ("embed", "fsdp"), ("heads", "tensor"), ("qkv", "tensor"),
                ("mlp", "tensor"), ("kv_heads", "tensor")),
}
"""Preset rules: logical axis -> mesh axes (None or missing: replicated)."""


def logical_axes(*names: str | None) -> dict[str, Any]:
    """NNX variable metadata naming a parameter's logical axes (one name per dimension);
    applied when shardings are built (`eager_sharding=False`: building a model needs no mesh)."""
    return {"out_sharding": tuple(names), "eager_sharding": False}


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------

def _mesh_config(config: Any):
    """The mesh group of a root config (`config.mesh`), or `config` itself."""
    if config is None:
        return {"data": -1}
    mesh_cfg = getattr(config, "mesh", None)
    if mesh_cfg is None and isinstance(config, Mapping) and "mesh" in config:
        mesh_cfg = config["mesh"]
    return config if mesh_cfg is None else mesh_cfg


def _axis_sizes(config: Any) -> dict[str, int]:
    """{"data": a, "fsdp": b, "tensor": c} from a root config (with `.mesh`), a mesh config, a
    mapping or None (missing axes are 1; None is {"data": -1})."""
    mesh_cfg = _mesh_config(config)
    sizes = dict(mesh_cfg.items() if hasattr(mesh_cfg, "items") else mesh_cfg)
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not supported; allowed: {list(AXES)}")
    return {name: sizes.get(name, 1) for name in AXES}


def _describe(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in sizes.items())


def mesh_shape(config: Any, num_devices: int) -> dict[str, int]:
    """The mesh sizes {axis: n} a config asks for on `num_devices` devices (-1 resolved).

    Raises ValueError naming the axis and the sizes if they cannot tile the devices.
    """
    sizes = _axis_sizes(config)
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
            raise ValueError(f"mesh.{name}={n!r} must be a positive int or -1 (all remaining "
                             "devices)")
    free = [name for name, n in sizes.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"mesh {_describe(sizes)}: at most one axis may be -1; got "
                         f"{', '.join(free)}")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    if num_devices % fixed:
        bad = [f"{k}={v}" for k, v in sizes.items() if v not in (-1, 1)]
        raise ValueError(f"mesh {_describe(sizes)} needs a multiple of {fixed} devices "
                         f"({' x '.join(bad)}), but there are {num_devices} devices: "
                         f"{fixed} does not divide {num_devices}")
    shape = {k: (num_devices // fixed if v == -1 else v) for k, v in sizes.items()}
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {_describe(sizes)} uses {math.prod(shape.values())} devices, "
                         f"but there are {num_devices} (set one axis to -1 to use them all)")
    return shape


def make_mesh(config: Any = None, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
    """A `jax.make_mesh` mesh over `devices` (default: all) with axes AXES = (data, fsdp,
    tensor); an axis of size -1 takes the remaining devices, a missing axis has size 1.

    Args:
      config: the root config (reads `config.mesh`), a mapping {"data": n, "fsdp": m,
        "tensor": k}, or None (every device on `data`).
      devices: the devices to use (default jax.devices(), every process's devices).

    Raises ValueError (before anything is compiled) naming the axis and sizes when the sizes
    do not tile the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(tuple(shape.values()), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------

def _as_axes(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{where}={value!r} must be None, a mesh axis name or a tuple of them "
                     f"(mesh axes: {list(AXES)})")


def check_rules(rules: Iterable, mesh: jax.sharding.Mesh | None = None) -> Rules:
    """Validates rules ((logical, mesh_axes), ...) and returns them normalised (mesh axes as
    tuples). ValueError naming the offending logical or mesh axis."""
    if isinstance(rules, Mapping):
        rules = tuple(rules.items())
    out = []
    seen = set()
    mesh_axes = AXES if mesh is None else tuple(mesh.axis_names)
    for item in rules:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"rule {item!r} must be a pair (logical axis, mesh axes)")
        name, value = item
        if name not in LOGICAL_AXES:
            raise ValueError(f"sharding rules name an unknown logical axis {name!r}; logical "
                             f"axes are {list(LOGICAL_AXES)}")
        if name in seen:
            raise ValueError(f"sharding rules map the logical axis {name!r} twice")
        seen.add(name)
        axes = _as_axes(value, f"rule {name!r}")
        for a in axes:
            if a not in mesh_axes:
                raise ValueError(f"sharding rule {name!r} -> {value!r} names the mesh axis "
                                 f"{a!r}, which is not one of the mesh axes {list(mesh_axes)}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"sharding rule {name!r} -> {value!r} repeats a mesh axis")
        out.append((name, axes))
    return tuple(out)


def axis_rules(preset: str = "dp", overrides: Mapping[str, Any] | None = None) -> Rules:
    """The rules of a preset ("dp", "fsdp", "fsdp_tp"), with `overrides` {logical: mesh axes}
    replacing or adding entries (None: replicated). ValueError for an unknown preset, logical
    axis or mesh axis."""
    if preset not in PRESETS:
        raise ValueError(f"sharding preset {preset!r} is not one of {list(PRESETS)}")
    rules = dict(check_rules(PRESETS[preset]))
    for name, value in dict(overrides or {}).items():
        rules[name] = value
    return check_rules(tuple(rules.items()))


def rules_from_config(config: Any) -> Rules:
    """Rules from a root config (its `sharding` group: `preset`, optional `rules`
    {logical: mesh axes}), a sharding group itself, a preset name, a rules tuple, or None.
    A root config without a `sharding` group gets "dp"."""
    if config is None:
        return axis_rules("dp")
    if isinstance(config, str):
        return axis_rules(config)
    if isinstance(config, tuple):
        return check_rules(config)

    def get(node, key):
        if isinstance(node, Mapping) or hasattr(node, "keys"):
            return node[key] if key in node.keys() else None
        return getattr(node, key, None)

    group = get(config, "sharding")
    if group is None:
        if get(config, "preset") is None and get(config, "rules") is None:
            return axis_rules("dp")
        group = config
    overrides = get(group, "rules")
    if overrides is not None and hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    return axis_rules(get(group, "preset") or "dp", overrides)


def rules_dict(rules) -> dict[str, tuple[str, ...]]:
    return dict(check_rules(axis_rules("dp") if rules is None else rules))


def mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def logical_to_spec(names: Sequence[str | None], rules=None, mesh=None,
                    shape: Sequence[int] | None = None) -> P:
    """PartitionSpec for an array whose dimensions have logical `names`.

    Each dimension gets the mesh axes its name maps to, minus axes an earlier dimension took;
    with `mesh`, axes missing from it or of size 1 are dropped; with `shape`, trailing axes
    are dropped until the dimension is divisible (an indivisible dimension is unsplit).
    """
    table = rules_dict(rules)
    sizes = None if mesh is None else mesh_sizes(mesh)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = [a for a in table.get(name, ()) if a not in used] if name is not None else []
        if sizes is not None:
            axes = [a for a in axes if sizes.get(a, 1) > 1]
        if shape is not None and sizes is not None:
            while axes and shape[i] % math.prod(sizes[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def logical_sharding(mesh, names: Sequence[str | None], rules=None,
                     shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with logical dimension `names`."""
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def batch_axes(mesh, rules=None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split the batch."""
    sizes = mesh_sizes(mesh)
    return tuple(a for a in rules_dict(rules).get("batch", ()) if sizes.get(a, 1) > 1)


def batch_sharding(mesh: jax.sharding.Mesh, rules=None) -> NamedSharding:
    """Leading (batch) axis split over the batch axes (data x fsdp), the rest replicated."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]) if axes else P())


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The same array on every device."""
    return NamedSharding(mesh, P())


def check_batch_size(mesh: jax.sharding.Mesh, batch_size: int, rules=None, *,
                     what: str = "batch_size") -> None:
    """ValueError naming the batch axes and sizes if `batch_size` (global) cannot be split
    evenly over them (nor over the processes, each of which loads its own part)."""
    axes = batch_axes(mesh, rules)
    sizes = mesh_sizes(mesh)
    n = math.prod(sizes[a] for a in axes)
    if batch_size % n:
        desc = " x ".join(f"{a}={sizes[a]}" for a in axes)
        raise ValueError(f"{what}={batch_size} is not divisible by the {n} batch shards of the "
                         f"mesh axes {desc} (mesh {_describe(sizes)}); use a multiple of {n}")
    if batch_size % jax.process_count():
        raise ValueError(f"{what}={batch_size} is not divisible by the {jax.process_count()} "
                         "processes, each of which loads its own part of the batch")


def put_batch(batch: Any, mesh: jax.sharding.Mesh, rules=None) -> Any:
    """Places a process-local batch (pytree of NumPy arrays, leading axis = this process's
    rows) as global jax.Arrays split over the batch axes
    (`jax.make_array_from_process_local_data`); ValueError before any compile if the global
    batch does not divide over the batch axes."""
    sharding = batch_sharding(mesh, rules)
    for leaf in jax.tree.leaves(batch):
        check_batch_size(mesh, leaf.shape[0] * jax.process_count(), rules,
                         what="global batch size")
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ----------------------------------------------------------------------------------------------
# Parameters, optimizer state and checkpoints
# ----------------------------------------------------------------------------------------------

def _is_variable(x) -> bool:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    return isinstance(x, nnx.Variable)


def _logical_names(var) -> tuple | None:
    names = var.get_metadata("out_sharding", None) if hasattr(var, "get_metadata") else None
    return tuple(names) if names else None


def state_shardings(mesh: jax.sharding.Mesh, abstract_state: Any, rules=None) -> Any:
    """A pytree of NamedShardings with `abstract_state`'s structure.

    `abstract_state` may hold arrays or ShapeDtypeStructs (from `jax.eval_shape` /
    `nnx.eval_shape`); NNX Variables (parameters, and the optimizer moments, which optax
    creates with their parameter's metadata) are placed by their logical axis names
    (`out_sharding` metadata) and `rules`; everything else (step, RNG, counters, variables
    without names) is replicated. rules=None is "dp": everything replicated.
    """
    table = check_rules(axis_rules("dp") if rules is None else rules, mesh)
    rep = replicated(mesh)

    def place(x):
        if _is_variable(x):
            names = _logical_names(x)
            value = x.get_value()
            shape = getattr(value, "shape", None)
            if names is None or shape is None:
                return x.replace(value=rep) if shape is not None else x
            if len(names) != len(shape):
                raise ValueError(f"a variable of shape {tuple(shape)} has logical axis names "
                                 f"{names} ({len(names)} names for {len(shape)} dimensions)")
            return x.replace(value=NamedSharding(mesh, logical_to_spec(names, table, mesh,
                                                                       shape)))
        return rep

    return jax.tree.map(place, abstract_state, is_leaf=_is_variable)


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs (shape, dtype, sharding) for every array of `state` (arrays or
    ShapeDtypeStructs), placed by the matching NamedSharding of `shardings` (a pytree with the
    same structure, e.g. from `state_shardings` on another mesh). This is the target for
    `ocp.args.StandardRestore(...)`: Orbax then reads a checkpoint written on any mesh
    straight into the new layout."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        state, shardings)


# ----------------------------------------------------------------------------------------------
# Activations: the mesh + rules context, constraints, sharded attention
# ----------------------------------------------------------------------------------------------

_RULES: contextvars.ContextVar = contextvars.ContextVar("jax_tokens_sharding_rules",
                                                        default=None)


def flax_rules(rules=None) -> tuple:
    """The rules in flax's form (`flax.core.spmd.logical_axis_rules`): every logical axis in
    LOGICAL_AXES mapped to None, a mesh axis or a tuple of them (flax keeps a name it has no
    rule for, which is not a mesh axis). Flax applies them without the used-once and
    divisibility adjustments of `logical_to_spec`; `state_shardings` is what the steps use."""
    table = rules_dict(rules)
    return tuple((name, spec_entry(table.get(name, ()))) for name in LOGICAL_AXES)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules=None):
    """`jax.set_mesh(mesh)` plus the logical axis rules, both ours (read by `constrain`,
    `per_example` and `attention` while tracing) and flax's (so that `nnx.eval_shape` and
    `nnx.get_named_sharding` can resolve the parameters' logical names under the mesh).

    Build (and first call) jitted steps inside it; a jitted function keeps the rules it was
    traced with, so make new ones for other rules. Under a bare `jax.set_mesh`, flax cannot
    resolve logical names: `nnx.eval_shape` of the model fails there (`jax.eval_shape` works).
    """
    from flax.core import spmd as flax_spmd  # pylint: disable=import-outside-toplevel
    rules = check_rules(axis_rules("dp") if rules is None else rules, mesh)
    token = _RULES.set(rules)
    try:
        with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(flax_rules(rules)):
            yield mesh
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    """The rules set by `use_mesh` ("dp" when none are)."""
    rules = _RULES.get()
    return axis_rules("dp") if rules is None else rules


def context_mesh():
    """The abstract mesh set by jax.set_mesh (None without one, or inside shard_map)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    if getattr(mesh, "manual_axes", ()):
        return None
    return mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` of `x` by its logical dimension names under the active mesh
    and rules; the identity when no mesh (of more than one device) is active."""
    mesh = context_mesh()
    if mesh is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape "
                         f"{x.shape}")
    spec = logical_to_spec(names, current_rules(), mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def per_example(fn: Callable, *args):
    """`fn(*args)` on each device's own examples: under an active mesh, `jax.shard_map` over
    the batch axes (every input and output leaf must have the batch as its leading axis);
    a plain call without a mesh, or when the batch does not divide.

    Token selection (ToMe's matching, top-k pruning) is per example, but XLA's partitioner
    replicates `lax.top_k` / `sort` operands, all-gathering the batch; running the selection
    per shard keeps every example on its device.
    """
    mesh = context_mesh()
    if mesh is None:
        return fn(*args)
    leaves = jax.tree.leaves(args)
    b = leaves[0].shape[0] if leaves and leaves[0].ndim else None
    if b is None or any(l.ndim == 0 or l.shape[0] != b for l in leaves):
        raise ValueError("per_example: every input must have the batch as its leading axis; "
                         f"got shapes {[tuple(l.shape) for l in leaves]}")
    axes = split_axes(dict(current_rules()).get("batch", ()), b, mesh_sizes(mesh))
    if not axes:
        return fn(*args)
    spec = P(spec_entry(axes))
    # check_vma=False: a reducer's loops (ATC's tree, K-Medoids' iterations) start from
    # constants that do not vary over the mesh; every value here is per example anyway.
    return jax.shard_map(fn, in_specs=tuple(spec for _ in args), out_specs=spec,
                         check_vma=False)(*args)


def split_axes(axes: Sequence[str], n: int, sizes: Mapping[str, int]) -> tuple[str, ...]:
    axes = [a for a in axes if sizes.get(a, 1) > 1]
    while axes and n % math.prod(sizes[a] for a in axes):
        axes.pop()
    return tuple(axes)


def spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes
