"""Run N real JAX processes on this machine, as a pod slice runs N hosts.

Each process gets `jax.distributed` settings through the environment that
`jax_tokens.distributed.maybe_initialize_distributed` reads (a localhost coordinator, its process
id, a heartbeat timeout), `devices_per_process` CPU devices, and JAX's CPU collectives (gloo)
between processes. It is how the tests check multi-host training, and how to rehearse a pod run
on one machine before a long job:

    python -m jax_tokens.train.launch --processes 2 --devices-per-process 2 -- \\
        train.py --config configs/fashion_mnist_tome.py --workdir /tmp/run2

Every process writes its output to `<log_dir>/process_<i>.log`. The launcher waits for all of
them; when one fails, the others get `grace_s` to fail too (JAX's coordination service stops
them once the lost process misses its heartbeats), and whatever still runs is killed. Nothing is
left running when `launch_local` returns or raises.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping, Sequence

__all__ = ["ProcessResult", "launch_local", "free_port", "describe"]


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int | None       # None: still running at the deadline (then killed)
    seconds: float
    log: str

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(base: Mapping[str, str], i: int, n: int, port: int, devices: int,
         heartbeat_s: int) -> dict[str, str]:
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n),
               JAX_PROCESS_ID=str(i), JAX_HEARTBEAT_TIMEOUT_SECONDS=str(heartbeat_s),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    return env


def launch_local(num_processes: int, argv: Sequence[str], *, log_dir: str,
                 devices_per_process: int = 1, timeout_s: float = 600, grace_s: float = 60,
                 heartbeat_s: int = 10, env: Mapping[str, str] | None = None,
                 port: int | None = None, on_start=None) -> list[ProcessResult]:
    """Starts `python argv...` as processes 0..N-1 of one JAX job; returns their results.

    Args:
      num_processes: N >= 1.
      argv: the command after `python` (a script and its flags, or `-m module ...`).
      log_dir: where process_<i>.log go (created).
      devices_per_process: CPU devices each process sees.
      timeout_s: wall-clock limit for the whole job; processes still running then are killed
        and reported with returncode None.
      grace_s: after the first failure, how long the others get to stop by themselves.
      heartbeat_s: JAX's heartbeat timeout: how fast the survivors notice a lost process.
      env: base environment (default os.environ).
      on_start: optional callback(list of Popen) called once all processes started (tests use
        it to kill one).
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) \
            or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} must be an int >= 1")
    if isinstance(devices_per_process, bool) or not isinstance(devices_per_process, int) \
            or devices_per_process < 1:
        raise ValueError(f"devices_per_process={devices_per_process!r} must be an int >= 1")
    if not argv:
        raise ValueError("argv is empty: give the script (and its flags) each process runs")
    os.makedirs(log_dir, exist_ok=True)
    port = free_port() if port is None else port
    base = os.environ if env is None else env
    procs, logs, files = [], [], []
    t0 = time.monotonic()
    ended: dict[int, float] = {}
    try:
        for i in range(num_processes):
            path = os.path.join(log_dir, f"process_{i}.log")
            f = open(path, "w")
            files.append(f)
            logs.append(path)
            procs.append(subprocess.Popen(
                [sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT,
                env=_env(base, i, num_processes, port, devices_per_process, heartbeat_s),
                start_new_session=True))
        if on_start is not None:
            on_start(procs)
        deadline = t0 + timeout_s
        first_failure = None
        while len(ended) < num_processes:
            now = time.monotonic()
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = now - t0
                    if p.returncode != 0 and first_failure is None:
                        first_failure = now
            if len(ended) == num_processes:
                break
            if now > deadline or (first_failure is not None and now > first_failure + grace_s):
                break
            time.sleep(0.1)
    finally:
        for i, p in enumerate(procs):      # never leave a process behind
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        for f in files:
            f.close()
    return [ProcessResult(i, procs[i].returncode if i in ended else None,
                          ended.get(i, time.monotonic() - t0), logs[i])
            for i in range(num_processes)]


def describe(results: Sequence[ProcessResult]) -> str:
    """One line per process: its exit status and the last line of its log."""
    lines = []
    for r in results:
        text = r.output().strip().splitlines()
        last = text[-1] if text else ""
        if r.returncode is None:
            status = "still running at the deadline (killed)"
        elif r.returncode < 0:
            status = f"killed by signal {-r.returncode}"
        else:
            status = f"exit {r.returncode}"
        lines.append(f"process {r.process_id}: {status} after {r.seconds:.0f} s; {r.log}: {last}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m jax_tokens.train.launch",
        description="Run N local JAX processes of one job (a pod slice on one machine).")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds for the whole job")
    ap.add_argument("--heartbeat", type=int, default=10,
                    help="seconds before the survivors give up on a lost process")
    ap.add_argument("--log-dir", default=None, help="default: ./launch_logs")
    ap.add_argument("command", nargs=argparse.REMAINDER,
                    help="-- then the script and its flags, e.g. -- train.py --config ...")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        results = launch_local(args.processes, cmd, log_dir=args.log_dir or "launch_logs",
                               devices_per_process=args.devices_per_process,
                               timeout_s=args.timeout, heartbeat_s=args.heartbeat)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(results))
    bad = [r for r in results if r.returncode != 0]
    if bad:
        print(f"error: {len(bad)} of {len(results)} processes failed: "
              f"{', '.join(str(r.process_id) for r in bad)} (see their logs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
