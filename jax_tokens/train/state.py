"""Train state, optimizer and the jitted steps (train, forward, eval).

The steps are pure functions of a `TrainState` (step, parameters, optimizer state, RNG) that
`jax.jit` compiles with shardings over the mesh of `jax_tokens.sharding` and that donate the
state. The model is split with `nnx.split` into a graph definition (static), its parameters
(trained) and the rest of its variables (constants such as a sin-cos position table).
A step's `reduction` (a Reducer) is static: one compiled step per budget.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jax_tokens import models
from jax_tokens import reducers
from jax_tokens import sharding as shd

__all__ = ["make_optimizer", "TrainState", "init_model", "make_train_step", "make_forward",
           "make_eval_step", "jit_eval_step"]


_NO_DECAY = ("pos_embed", "cls_token", "dist_token", "reg_token")


def _decay_mask(params):
    """Weight decay on matrices and kernels only (not biases, norms, tokens, positions)."""
    def keep(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return x.ndim >= 2 and not any(n in _NO_DECAY for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config, total_steps: int, steps_per_epoch: int):
    """AdamW with linear warm-up + cosine decay, global-norm clipping. Returns (tx, schedule)."""
    t = config.train
    warmup = t.warmup_steps if t.warmup_steps is not None else \
        int(round(t.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else t.lr, peak_value=t.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=t.min_lr)
    parts = []
    if t.grad_clip and t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*parts), schedule


@struct.dataclass
class TrainState:
    """Everything a train step changes: step, parameters, optimizer state, base RNG key data."""
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _model_init(cfg, seed: int, tx=None):
    """init() -> (params or TrainState, rest) for jax.eval_shape / jax.jit, and a box that
    receives the graphdef while it is traced."""
    box = {}

    def init():
        model = models.create(cfg, rngs=nnx.Rngs(seed))
        box["graphdef"], params, rest = nnx.split(model, nnx.Param, ...)
        if tx is None:
            return params, rest
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed))), rest

    return init, box


def init_model(cfg, seed: int, mesh, rules=None, *, tx=None,
               abstract: bool = False):
    """(graphdef, params, rest, shardings): the model split for the steps (`nnx.split`: the
    parameters and the rest of its variables), created already placed by the mesh and rules
    (`jax.jit(init, out_shardings=...)`, big_vision style), or as ShapeDtypeStructs with their
    shardings (abstract=True, e.g. a restore target).

    With an optimizer `tx`, `params` is a whole TrainState (step, params, optimizer state,
    RNG) instead. `shardings` is the (params-or-state, rest) pair of sharding pytrees.
    """
    init, box = _model_init(cfg, seed, tx)
    shapes = jax.eval_shape(init)
    shardings = shd.state_shardings(mesh, shapes, rules)
    if abstract:
        params, rest = shd.abstract_with_shardings(shapes, shardings)
    else:
        lowered = jax.jit(init, out_shardings=shardings).lower()
        # Runs once: on CPU, LLVM's optimisations cost more compile time than they save.
        options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" \
            else None
        params, rest = lowered.compile(compiler_options=options)()
    return box["graphdef"], params, rest, shardings


def _loss_and_metrics(logits, labels, num_classes: int, label_smoothing: float):
    onehot = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    loss = optax.softmax_cross_entropy(logits, onehot).mean()
    acc = (jnp.argmax(logits, -1) == labels).mean()
    return loss, acc


def make_train_step(graphdef, tx, schedule, *, num_classes: int, reduction: Any = None,
                    label_smoothing: float = 0.0, grad_accum_steps: int = 1) -> Callable:
    """step(state, rest, batch) -> (state, metrics): one optimizer update.

    With grad_accum_steps = k the batch is split into k micro-batches whose gradients are
    averaged in a `lax.scan` (the optimizer sees one update per call, memory is per micro-batch).
    """
    k = int(grad_accum_steps)

    def loss_fn(params, rest, images, labels, key):
        model = nnx.merge(graphdef, params, rest)
        red = reducers.from_config(reduction if reduction is not None
                                   else getattr(model.cfg, "reduction", None))
        train_red = red.training()   # DynamicViT: Gumbel policies; Cropr: its auxiliary heads
        logits, aux = model(images, key=key, reduction=train_red)
        loss, acc = _loss_and_metrics(logits, labels, num_classes, label_smoothing)
        if not hasattr(model.cfg, "layout"):   # models without reducer slots (LookupViT)
            return loss, (acc, {})
        teacher = None
        if train_red.needs_teacher:  # the unreduced model on the same images, no gradient
            teacher = jax.lax.stop_gradient(model(images, reduction=reducers.get("none")()))
        extra, terms = train_red.loss(model.cfg.layout(), logits, aux, labels=labels,
                                      teacher=teacher)
        return loss + extra, (acc, {"task_loss": loss, **terms} if terms else {})

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, rest, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        images, labels = batch["image"], batch["label"]
        if k == 1:
            (loss, (acc, terms)), grads = grad_fn(state.params, rest, images, labels, key)
        else:
            b = images.shape[0]
            # Row i of micro-batch j is batch row i * k + j: every device keeps its own rows.
            split = lambda x: jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
            micro = (split(images), split(labels), jnp.arange(k))

            def body(carry, xs):
                img, lab, j = xs
                (l, (a, t)), g = grad_fn(state.params, rest, img, lab,
                                         jax.random.fold_in(key, j))
                g_sum, l_sum, a_sum, t_sum = carry
                return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, a_sum + a,
                        jax.tree.map(jnp.add, t_sum, t)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            t_shape = jax.eval_shape(grad_fn, state.params, rest, micro[0][0], micro[1][0],
                                     key)[0][1][1]
            t_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t_shape)
            (grads, loss, acc, terms), _ = jax.lax.scan(body, (zeros, 0.0, 0.0, t_zeros), micro)
            grads = jax.tree.map(lambda g: g / k, grads)
            loss, acc = loss / k, acc / k
            terms = jax.tree.map(lambda t: t / k, terms)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step), **terms}   # terms: a reducer's loss parts
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_forward(graphdef, reduction: Any = None) -> Callable:
    """forward(params, rest, images) -> (logits, aux) with a static reduction override."""
    def forward(params, rest, images):
        return nnx.merge(graphdef, params, rest)(images, reduction=reduction)
    return forward


def make_eval_step(graphdef, reduction: Any = None) -> Callable:
    """eval_step(params, rest, batch) -> sums over the valid rows: count, top1, top5, loss."""
    forward = make_forward(graphdef, reduction)

    def step(params, rest, batch):
        logits, _ = forward(params, rest, batch["image"])
        labels, mask = batch["label"], batch["mask"]
        top = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return {"count": mask.sum(), "top1": ((top[:, 0] == labels) & mask).sum(),
                "top5": ((top == labels[:, None]).any(-1) & mask).sum(),
                "loss": jnp.where(mask, loss, 0.0).sum()}

    return step


def jit_eval_step(step: Callable, mesh, params_sharding, rest_sharding, rules=None
                  ) -> Callable:
    return jax.jit(step, in_shardings=(params_sharding, rest_sharding,
                                       shd.batch_sharding(mesh, rules)),
                   out_shardings=shd.replicated(mesh))
