"""The long profile of the reducer property tests: N hypothesis cases per registered reducer.

    python benchmarks/properties.py --examples 440 --jobs 2    # 440 cases x every reducer

Runs tests/test_properties.py's `test_reducer_properties` with the "long" hypothesis profile
(token counts and widths drawn from buckets so compiled programs are reused; eager dispatch
checked against jit on one case in ten) in one pytest process per reducer, `--jobs` at a
time, and prints, per reducer, the result, the time and the cases run, then the total. A failing case is printed in full by hypothesis, with the seed that reproduces it.
"""

import argparse
import collections
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEST = "tests/test_properties.py::test_reducer_properties"


def library_reducers() -> list[str]:
    from jax_tokens import reducers  # pylint: disable=import-outside-toplevel
    return sorted(n for n in reducers.names()
                  if reducers.get(n).__module__.startswith("jax_tokens."))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=440, help="cases per reducer")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="pytest processes (XLA:CPU compiles on one core)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    args = parser.parse_args(argv)
    if args.examples < 1 or args.jobs < 1:
        parser.error(f"--examples={args.examples} and --jobs={args.jobs} must be >= 1")
    methods = args.methods.split(",") if args.methods else library_reducers()
    unknown = sorted(set(methods) - set(library_reducers()))
    if unknown:
        parser.error(f"--methods: unknown reducers {unknown}; registered: {library_reducers()}")
    logs = {m: tempfile.NamedTemporaryFile(suffix=".log", delete=False).name for m in methods}
    queue, running, status = list(methods), {}, 0
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < args.jobs:      # one pytest process per reducer
            m = queue.pop(0)
            env = dict(os.environ, JAX_TOKENS_HYPOTHESIS="long", JAX_TOKENS_PROPERTY_LOG=logs[m],
                       JAX_TOKENS_HYPOTHESIS_EXAMPLES=str(args.examples), JAX_PLATFORMS="cpu")
            out = tempfile.TemporaryFile("w+")
            running[m] = (subprocess.Popen(
                [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-q",
                 f"{TEST}[{m}]"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                text=True), out, time.perf_counter())
        time.sleep(0.5)
        for m, (proc, out, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[m]
            out.seek(0)
            text = out.read()
            result = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"{m}: {result} in {time.perf_counter() - started:.0f} s", flush=True)
            if proc.returncode:
                print(text[-20000:], flush=True)
                status = status or proc.returncode
    wall = time.perf_counter() - t0
    counts = collections.Counter()
    for log in logs.values():
        with open(log) as f:
            counts.update(line.strip() for line in f)
        os.unlink(log)
    print("| reducer | cases |\n|---|---:|")
    for m in methods:
        print(f"| {m} | {counts.get(m, 0)} |")
    print(f"\n{sum(counts.values())} cases checked over {len(methods)} reducers (hypothesis also "
          f"counts the cases it shrinks), {wall / 60:.1f} min, {args.jobs} at a time, "
          f"{'all passed' if status == 0 else 'FAILED'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
