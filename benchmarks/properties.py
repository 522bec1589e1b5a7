"""The long profile of the reducer property tests: N hypothesis cases per registered reducer.

    python benchmarks/properties.py --examples 200          # 200 cases x every reducer

Runs tests/test_properties.py with the "long" hypothesis profile in one pytest process and
prints, per reducer, the cases run, the time and the result (a failing case is printed in
full by hypothesis, with the seed that reproduces it).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases per reducer")
    parser.add_argument("-k", default="test_reducer_properties", help="pytest -k expression")
    args = parser.parse_args(argv)
    log = tempfile.NamedTemporaryFile(suffix=".log", delete=False).name
    env = dict(os.environ, JAX_TOKENS_HYPOTHESIS="long", JAX_TOKENS_PROPERTY_LOG=log,
               JAX_TOKENS_HYPOTHESIS_EXAMPLES=str(args.examples), JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q", "-k", args.k,
         str(ROOT / "tests" / "test_properties.py")],
        cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    print(out[-20000:])
    with open(log) as f:
        counts = collections.Counter(line.strip() for line in f)
    os.unlink(log)
    per = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"\n{sum(counts.values())} cases checked ({per}; hypothesis also counts the cases it "
          f"shrinks), {wall / 60:.1f} min, pytest exit status {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
