"""Long-run safety for `train`: one run per workdir, and a clean stop on preemption.

* `WorkdirLock`: `<workdir>/train.lock` (host, pid, start time, command) is created
  atomically when a run starts and removed when it ends; a second run on the same workdir fails
  with `WorkdirInUseError` naming the first. A lock left by a dead process on this host is
  taken over with a warning. Only process 0 of a multi-process run takes it; a remote workdir
  (`gs://...`) gets none (the hosts cannot check each other's pids).
* `StopSignals`: SIGTERM / SIGINT (Cloud TPU and spot-VM preemption, Ctrl-C) set a flag that
  the loop reads between steps, so the step in progress finishes; the loop then saves a
  checkpoint synchronously and raises `Preempted`. Further signals during the save only set the
  flag again, so they cannot interrupt the save half way.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import socket
import sys
import threading
from typing import Callable

__all__ = ["WorkdirLock", "WorkdirInUseError", "StopSignals", "Preempted",
           "PREEMPTED_EXIT_CODE", "TrainingDiverged", "first_nonfinite"]

PREEMPTED_EXIT_CODE = 75
"""train.py's exit status after a preemption (EX_TEMPFAIL: rerun the same command)."""


class WorkdirInUseError(RuntimeError):
    """Another train.py run holds the workdir's lock."""


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        super().__init__(f"preempted at step {step} ({signal.Signals(signum).name}); the "
                         "checkpoint is saved: rerun the same command to resume")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or Inf; nothing after the last finite step was
    saved."""


GUARDED_METRICS = ("loss", "grad_norm")
"""Train-step metrics that must stay finite: a non-finite gradient norm means the update that
follows has poisoned the parameters even when that step's loss was still finite."""


def first_nonfinite(metrics: list[dict], first_step: int):
    """(step, name, value) of the first non-finite guarded metric in `metrics` (host values of
    steps first_step, first_step + 1, ...), or None."""
    for i, m in enumerate(metrics):
        for name in GUARDED_METRICS:
            if name in m and not math.isfinite(float(m[name])):
                return first_step + i, name, float(m[name])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """A context manager holding `<workdir>/train.lock` (see the module docstring)."""

    def __init__(self, workdir: str, *, enabled: bool = True,
                 log: Callable[[str], None] = print):
        self.path = os.path.join(workdir, "train.lock")
        self.enabled = enabled and "://" not in workdir
        self.log = log
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join(sys.argv)}

    def _write_new(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        return True

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled or self._write_new():
            return self
        try:
            with open(self.path) as f:
                held = json.load(f)
            host, pid = held["host"], int(held["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            raise WorkdirInUseError(
                f"{self.path} exists but cannot be read: another train.py run may be using "
                f"this workdir. If none is, delete {self.path}") from None
        if host == self.info["host"] and not _pid_alive(pid):
            self.log(f"warning: taking over the stale lock of pid {pid} on {host} (started "
                     f"{held.get('started')}), which is no longer running")
            tmp = f"{self.path}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.info, f)
            os.replace(tmp, self.path)
            return self
        raise WorkdirInUseError(
            f"the workdir is in use by another train.py run: pid {pid} on host {host}, started "
            f"{held.get('started')} ({held.get('command', '?')}). Wait for it to finish or use "
            f"another --workdir; if that run is gone, delete {self.path}")

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path) as f:
                if json.load(f).get("pid") != self.info["pid"]:
                    return
            os.remove(self.path)
        except (OSError, ValueError):
            pass


class StopSignals:
    """While active (a context manager), SIGTERM and SIGINT set `signum` instead of stopping
    the process. Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:   # pylint: disable=unused-argument
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
