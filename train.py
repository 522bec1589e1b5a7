"""Train a ViT with (or without) token reduction.

    python train.py --config configs/fashion_mnist_vit.py --workdir /tmp/fm
    python train.py --config configs/fashion_mnist_tome.py --workdir /tmp/fm_tome \
        --config.model.reduction.r=8 --config.train.epochs=2
    python train.py --config configs/imagenet_deit_s.py:evit --workdir DIR \
        --config.data.data_dir=/path/to/tensorflow_datasets

`--config` is a Python file with get_config() (optionally `file.py:arg`); `--config.a.b=value`
overrides one key (unknown keys are an error listing the valid ones). Running again with the
same --workdir resumes from its latest checkpoint, exactly; a checkpoint written with a
different config is an error naming the differences. On SIGTERM / SIGINT (preemption) the step
in progress finishes, a checkpoint is saved and train.py exits with status 75; rerun the same
command to resume. A second train.py on the same workdir fails, naming the first (train.lock).
Outputs in the workdir: checkpoints/,
metrics.jsonl, tensorboard/, config.json, results.json, export/ (params + config,
model.safetensors with timm names) and compilation_cache/ (JAX's persistent compilation cache:
a rerun or a resume compiles nothing; `--config.train.compilation_cache=DIR` shares one between
runs, `=''` turns it off).
"""

import os
import sys
import time

_T0 = time.perf_counter()

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from jax_tokens.train import schema  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                               "fashion_mnist_vit.py")
_OVERRIDES: dict = {}      # --config.a.b=value flags, taken out of argv before absl parses it
_CONFIG = flags.DEFINE_string("config", _DEFAULT_CONFIG, "Config file (get_config); "
                              "`file.py:arg` passes arg. Override keys with --config.a.b=value.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and exports go; an "
                               "existing checkpoint there is resumed (required).")


def _check_workdir(path: str | None) -> str | None:
    """The problem with --workdir, or None: it must be given and be a directory or one that can
    be created."""
    if not path:
        return "--workdir is required: where checkpoints, logs and the export go"
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--workdir={path} is a file, not a directory"
    if "://" not in path:        # nothing is created here: a bad config must leave no trace
        ancestor = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
            return f"cannot create --workdir={path}: {ancestor} is not a writable directory"
    return None


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags are --config, --workdir and "
              "--config.KEY=VALUE", file=sys.stderr, flush=True)
        return 2
    try:     # an unknown key or a bad value: exit 2, before anything else is imported
        config = schema.load_config(_CONFIG.value, _OVERRIDES)
    except schema.ConfigError as e:
        print(schema.error_line(e), file=sys.stderr, flush=True)
        return 2
    problem = _check_workdir(_WORKDIR.value)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return 2
    from jax_tokens import checkpoint, data, distributed  # pylint: disable=C0415
    from jax_tokens.train import guard, loop  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)   # Orbax logs every save at INFO
    try:
        distributed.maybe_initialize_distributed(config)   # before anything touches a device
        import jax  # pylint: disable=import-outside-toplevel
        lead = jax.process_index() == 0       # one process reports progress (all do errors)
        result = loop.train(config, _WORKDIR.value,
                            log=lambda s: print(s, flush=True) if lead else None)
    except guard.Preempted:       # the checkpoint is saved and the loop said so
        return guard.PREEMPTED_EXIT_CODE
    except (schema.ConfigError, checkpoint.CheckpointError, guard.WorkdirInUseError,
            guard.TrainingDiverged, data.DatasetNotPreparedError) as e:
        print(schema.error_line(e), file=sys.stderr, flush=True)
        return 1
    if not lead:
        return 0
    wall = time.perf_counter() - _T0
    acc = "" if result["top1"] is None else \
        f", test top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}"
    print(f"done: {result['step']} steps{acc}; training {result['train_seconds']:.0f} s "
          f"({result['train_images_per_s']} images/s, first step incl. compile "
          f"{result['compile_seconds']:.0f} s), end to end {wall:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    _argv, _OVERRIDES = schema.split_override_flags(sys.argv)
    app.run(main, argv=_argv)
