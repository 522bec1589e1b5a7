"""Command line: ``python -m jax_tokens.data prepare|info --dataset NAME --data_dir DIR``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from jax_tokens.data.prepared import dataset_info, prepare
from jax_tokens.data.specs import DEFAULT_DATA_DIR

DESCRIPTION = ("Input pipelines: TFDS datasets in array_record format, read with Grain, "
               "decoded in NumPy.")
"""The first line of the package docstring (the parser's description)."""


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jax_tokens.data prepare|info --dataset NAME --data_dir DIR`."""
    parser = argparse.ArgumentParser(prog="python -m jax_tokens.data", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare a dataset once (array_record) into --data_dir")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--max_examples_per_split", type=int, default=None)
    p.add_argument("--source_dir", default=None, help="fashion_mnist: folder of *-ubyte.gz files")
    p.add_argument("--manual_dir", default=None)
    p.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("info", help="print what a prepared dataset holds")
    i.add_argument("--dataset", default="fashion_mnist")
    i.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            path = prepare(args.dataset, args.data_dir,
                           max_examples_per_split=args.max_examples_per_split,
                           source_dir=args.source_dir, overwrite=args.overwrite,
                           manual_dir=args.manual_dir)
            print(f"prepared {args.dataset} in {path}")
        summary = dataset_info(args.dataset, args.data_dir)
        print(json.dumps({k: v for k, v in dataclasses.asdict(summary).items() if k != "spec"},
                         indent=2))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
