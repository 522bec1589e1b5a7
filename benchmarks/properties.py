"""The long profile of the property tests: N configurations per registered reducer and press,
each with 8 drawn inputs checked through its one compiled program.

    python benchmarks/properties.py --examples 48 --jobs 2    # 48 x 8 inputs x 28 methods

Runs tests/test_properties.py's `test_reducer_properties` (token counts and widths drawn from
buckets so compiled programs are reused; eager dispatch checked against jit on one
configuration in ten) and tests/test_press_properties.py's `test_press_properties` with the
"long" hypothesis profile (the identity reducer `none` is left out: it has nothing to check),
one pytest process per method, `--jobs` at a time. A hypothesis case is a configuration
(everything static under jit: layout, budget, batch, dtype) and `--inputs` inputs drawn for it
(seeds, ties, token sizes; padding for the presses), each checked on its own: compiling costs
seconds on XLA:CPU, running a tiny input milliseconds. Prints, per method, the result, the time,
the configurations and the inputs checked (FastV / PyramidDrop: schedules only, no inputs),
then the totals. A failing case is printed in full by hypothesis, with the seed that
reproduces it.
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
REDUCER_TEST = "tests/test_properties.py::test_reducer_properties"
PRESS_TEST = "tests/test_press_properties.py::test_press_properties"


def library_methods() -> dict[str, str]:
    """{method: its property test node}: every registered reducer and KV-cache press."""
    from jax_tokens import reducers  # pylint: disable=import-outside-toplevel
    from jax_tokens.reducers import presses  # pylint: disable=import-outside-toplevel
    out = {n: f"{REDUCER_TEST}[{n}]" for n in reducers.names()
           if reducers.get(n).__module__.startswith("jax_tokens.")}
    out.update({n: f"{PRESS_TEST}[{n}]" for n in presses.names()})
    return dict(sorted(out.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=48,
                        help="configurations (hypothesis cases) per method")
    parser.add_argument("--inputs", type=int, default=8,
                        help="inputs drawn and checked per configuration")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="pytest processes (XLA:CPU compiles on one core)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    args = parser.parse_args(argv)
    if min(args.examples, args.inputs, args.jobs) < 1:
        parser.error(f"--examples={args.examples}, --inputs={args.inputs} and "
                     f"--jobs={args.jobs} must be >= 1")
    tests = library_methods()
    methods = args.methods.split(",") if args.methods else [m for m in tests if m != "none"]
    unknown = sorted(set(methods) - set(tests))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; registered reducers and presses: "
                     f"{list(tests)}")
    logs = {m: tempfile.NamedTemporaryFile(suffix=".log", delete=False).name for m in methods}
    queue, running, status = list(methods), {}, 0
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < args.jobs:      # one pytest process per reducer
            m = queue.pop(0)
            env = dict(os.environ, JAX_TOKENS_HYPOTHESIS="long", JAX_TOKENS_PROPERTY_LOG=logs[m],
                       JAX_TOKENS_HYPOTHESIS_EXAMPLES=str(args.examples),
                       JAX_TOKENS_HYPOTHESIS_INPUTS=str(args.inputs), JAX_PLATFORMS="cpu")
            out = tempfile.TemporaryFile("w+")
            running[m] = (subprocess.Popen(
                [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-q",
                 tests[m]], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
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
    configs, inputs = collections.Counter(), collections.Counter()
    for log in logs.values():
        with open(log) as f:
            for line in f:
                method, n = line.split()
                configs[method] += 1
                inputs[method] += int(n)
        os.unlink(log)
    print("| method | configurations | inputs checked |\n|---|---:|---:|")
    for m in methods:
        print(f"| {m} | {configs.get(m, 0)} | {inputs.get(m, 0)} |")
    print(f"\n{sum(inputs.values())} inputs checked in {sum(configs.values())} configurations "
          f"over {len(methods)} reducers and presses (hypothesis also counts the cases it "
          f"shrinks), {wall / 60:.1f} min, {args.jobs} at a time, "
          f"{'all passed' if status == 0 else 'FAILED'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
