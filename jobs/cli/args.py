"""Command-line arguments every job and every `glan` command shares: --conf and --set."""

from __future__ import annotations

import argparse

from jobs.config.loader import GlanConfig, load_config


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="YAML config file; repeatable, later files win (conf/base.yaml is always first)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                        help="override one setting, e.g. --set llm.timeout_s=30; repeatable, applied last")
    return parser


def config_from_args(args: argparse.Namespace) -> GlanConfig:
    return load_config(args.conf, args.sets)
