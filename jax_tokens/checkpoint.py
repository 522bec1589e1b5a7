"""Orbax checkpoints for training (save, resume exactly) and exports for inference.

    ckpt = Checkpointer(workdir + "/checkpoints", every=500, keep=3)
    step = ckpt.latest_step()                         # None: nothing committed yet
    if step is not None:
        ckpt.check_config(step, config)               # CheckpointMismatchError naming the keys
        state = ckpt.restore(step, abstract_state, data_iterator=loader.iterator)
    ...
    ckpt.save(step, state, data_iterator=loader.iterator, config=config_dict)   # async
    ckpt.wait()

A training checkpoint `<dir>/<step>/` holds three Orbax items: "state" (the TrainState pytree:
step, parameters, optimizer state, RNG), "data" (the Grain iterator state, one JSON file per
process, via `grain.checkpoint.CheckpointSave`) and "config" (the run's config as JSON).

Saves are asynchronous: the arrays are copied to host memory before `save` returns, then
written in a background thread. Orbax writes into a temporary directory and renames it when
every item is written (atomic on local and POSIX file systems), and only then deletes the
checkpoints beyond `keep`: a process killed mid-save, or a save that fails (disk full, I/O
error), leaves the previous checkpoints as they were; temporary directories are removed when
the next `Checkpointer` opens the directory. A failed save raises `CheckpointSaveError` naming
the last good step.

Exports for inference (parameters + model config) are written by `jax_tokens.train.export`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointError", "CheckpointMismatchError", "CheckpointSaveError", "Checkpointer"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or used; the message names it and what to do."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a run with a different config (the message lists the
    differing keys)."""


class CheckpointSaveError(CheckpointError):
    """A save failed; earlier checkpoints are intact (the message names the last good one)."""


def _grain_args():
    import grain  # pylint: disable=import-outside-toplevel
    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree) -> dict[str, tuple]:
    """{"params.blocks.0.attn.qkv.kernel.value": (shape, dtype)} for arrays / metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        out[".".join(_key_name(k) for k in path)] = (
            None if shape is None else tuple(shape), None if dtype is None else str(dtype))
    return out


def _shape_diff(saved: dict, now: dict) -> list[str]:
    diff = []
    for key in sorted(set(saved) | set(now)):
        if key not in now:
            diff.append(f"{key}: in the checkpoint, not in the model")
        elif key not in saved:
            diff.append(f"{key}: in the model, not in the checkpoint")
        elif saved[key] != now[key]:
            (s1, d1), (s2, d2) = saved[key], now[key]
            diff.append(f"{key}: {s1} {d1} vs {s2} {d2}")
    return diff


def read_state_arrays(checkpoint_dir: str | os.PathLike, step: int) -> dict[str, np.ndarray]:
    """The saved train state of `step` as host NumPy arrays {key path: array}, whatever mesh
    or number of processes wrote it (for inspecting and comparing checkpoints; training
    restores with `Checkpointer.restore`)."""
    path = os.path.join(os.fspath(checkpoint_dir), str(step), "state")
    reader = ocp.PyTreeCheckpointer()
    meta = reader.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    tree = reader.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


class Checkpointer:
    """An Orbax CheckpointManager for training state + data iterator + config.

    Args:
      directory: where the step directories go (created if missing).
      every: `should_save(step)` is true every `every` steps (0: never; the caller may still
        force a save, e.g. at the last step).
      keep: how many of the most recent checkpoints to keep.
      async_save: write in a background thread (the default).
    """

    def __init__(self, directory: str | os.PathLike, *, every: int = 1000, keep: int = 3,
                 async_save: bool = True, read_only: bool = False):
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every={every!r} must be an int >= 0 (0: only forced saves)")
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} must be an int >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = every
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save)
        import grain  # pylint: disable=import-outside-toplevel
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)
        except Exception as e:  # pylint: disable=broad-except
            raise CheckpointError(f"cannot open the checkpoint directory {self.directory}: "
                                  f"{type(e).__name__}: {e}") from e
        self._in_flight: int | None = None
        self._last_good = self.latest_step()

    # -- queries ---------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _unreadable(self, step: int, what: str, e: BaseException) -> CheckpointError:
        older = [s for s in self.all_steps() if s < step]
        hint = (f"delete {self.step_dir(step)} to resume from step {older[-1]}" if older
                else "use a new workdir to start from scratch")
        return CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt or "
                               f"unreadable ({what}: {type(e).__name__}: {e}); {hint}")

    # -- config ----------------------------------------------------------------------------------
    def read_config(self, step: int) -> dict:
        """The config the run that wrote `step` had (a plain dict)."""
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore()))
            config = out["config"]
        except Exception as e:  # pylint: disable=broad-except
            raise self._unreadable(step, "its config", e) from e
        if not isinstance(config, Mapping):
            raise self._unreadable(step, "its config", TypeError(f"got {type(config)}"))
        return dict(config)

    def check_config(self, step: int, config, *, ignore=None) -> None:
        """CheckpointMismatchError listing every key (outside `ignore`, default the trainer's
        RUNTIME_KEYS) whose value differs between the checkpoint's config and `config`."""
        from jax_tokens.train.schema import RUNTIME_KEYS, config_diff  # pylint: disable=C0415
        saved = self.read_config(step)
        diff = config_diff(saved, config, RUNTIME_KEYS if ignore is None else ignore)
        if diff:
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} was written with a different "
                f"config, so it cannot be resumed exactly. Differences (checkpoint -> now):\n  "
                + "\n  ".join(diff)
                + "\nRun with the checkpoint's config, or use a new --workdir.")

    # -- save / restore --------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, data_iterator=None, config: Mapping | None = None,
             force: bool = False) -> bool:
        """Starts saving `state` (and the iterator state, config) as `step`; returns whether a
        save was started. Raises CheckpointSaveError if this or an earlier async save failed."""
        if not force and not self.should_save(step):
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            save_cls, _ = _grain_args()
            items["data"] = save_cls(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(dict(config))
        self._settle()
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # pylint: disable=broad-except
            self._manager.reload()
            raise CheckpointSaveError(
                f"saving checkpoint step {step} to {self.directory} failed ({type(e).__name__}: "
                f"{e}); the last good checkpoint is {self._describe_last_good()}") from e
        if started:
            self._in_flight = step
        return bool(started)

    def _describe_last_good(self) -> str:
        steps = self.all_steps()
        return f"step {steps[-1]}" if steps else "none"

    def _settle(self) -> None:
        """Waits for the in-flight save; CheckpointSaveError if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # pylint: disable=broad-except
            self._manager.reload()
            raise CheckpointSaveError(
                f"saving checkpoint step {step} to {self.directory} failed ({type(e).__name__}: "
                f"{e}); the last good checkpoint is {self._describe_last_good()}") from e
        if step is not None and step not in self._manager.all_steps():
            self._manager.reload()
            if step not in self.all_steps():
                raise CheckpointSaveError(
                    f"saving checkpoint step {step} to {self.directory} did not complete; the "
                    f"last good checkpoint is {self._describe_last_good()}")

    def wait(self) -> None:
        """Blocks until the in-flight save is committed (CheckpointSaveError if it failed)."""
        self._settle()

    def restore(self, step: int, abstract_state: Any, *, data_iterator=None) -> Any:
        """The state saved at `step`, placed like `abstract_state` (a pytree of
        ShapeDtypeStructs with shardings; any mesh); restores `data_iterator` in place if given.

        CheckpointMismatchError naming the arrays whose path, shape or dtype differ from the
        target; CheckpointError if the files cannot be read."""
        try:
            meta = self._manager.item_metadata(step)["state"]
            if meta is None:
                raise FileNotFoundError("no 'state' item")
            saved = _shapes(meta)
        except Exception as e:  # pylint: disable=broad-except
            raise self._unreadable(step, "its state metadata", e) from e
        diff = _shape_diff(saved, _shapes(abstract_state))
        if diff:
            legacy = any(".lookup." in d and "in the checkpoint, not in the model" in d
                         for d in diff)
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not fit this model/optimizer "
                f"({len(diff)} differences, checkpoint vs now):\n  " + "\n  ".join(diff[:20])
                + ("\n  ..." if len(diff) > 20 else "")
                + ("\nThis checkpoint predates the reducer registry: its TokenLearner "
                   "parameters are under 'lookup', which now live in 'blocks.<layer>.reducer'. "
                   "Restore it with the jax_tokens version that wrote it and export it, or "
                   "retrain." if legacy else ""))
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_state = None
        if data_iterator is not None:
            data_state = self._data_state_from_other_topology(step)
            if data_state is None:
                _, restore_cls = _grain_args()
                items["data"] = restore_cls(data_iterator)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # pylint: disable=broad-except
            raise self._unreadable(step, "its state", e) from e
        if data_state is not None:
            data_iterator.set_state(data_state)
        return out["state"]

    def _data_state_from_other_topology(self, step: int) -> dict | None:
        """The data iterator state of a checkpoint written by another number of processes
        (None when this process's own file is there).

        Grain writes one `process_<i>-of-<n>.json` per process. The training loaders cut the
        same global batches on every process, so every process's state is the same position
        in one sequence, and any process count can continue from it. States that differ
        (loaders that split the data per process) cannot be mapped: CheckpointError."""
        folder = os.path.join(self.step_dir(step), "data")
        own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, own)):
            return None
        files = sorted(f for f in os.listdir(folder)
                       if f.startswith("process_") and f.endswith(".json"))
        if not files:
            return None
        states = []
        for f in files:
            try:
                with open(os.path.join(folder, f)) as fh:
                    states.append(json.load(fh))
            except (OSError, ValueError) as e:
                raise self._unreadable(step, f"its data iterator state {f}", e) from e
        if any(st != states[0] for st in states[1:]):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} was written by "
                f"{len(files)} processes whose data positions differ ({', '.join(files)}), so "
                f"it cannot continue with {jax.process_count()} process(es): resume it with "
                f"{len(files)} processes")
        return states[0]

    def close(self, *, quiet: bool = False) -> None:
        """Waits for pending saves and releases the manager (quiet: never raises)."""
        try:
            if self._in_flight is not None:
                self._settle()
        except CheckpointSaveError:
            if not quiet:
                raise
        finally:
            try:
                self._manager.close()
            except Exception:  # pylint: disable=broad-except
                if not quiet:
                    raise
