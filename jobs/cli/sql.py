"""`glan sql`: a Spark SQL query over every table of the run, registered as views. Only reads: the
statement is parsed by Spark's own parser and every node of its plan must be a query operator."""

from __future__ import annotations

import argparse
from typing import Any

from pyspark.errors import ParseException

from jobs.cli.args import config_from_args
from jobs.cli.guard import one_line
from jobs.cli.output import print_rows, spark_for
from jobs.config.loader import GlanConfig
from jobs.errors import InputError
from jobs.storage.delta import get_storage


def register_views(spark, cfg: GlanConfig) -> list[str]:
    """Every table under the run root becomes a temporary view named after its folder."""
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
    try:
        plan = spark._jsparkSession.sessionState().sqlParser().parsePlan(query)
    except ParseException as exc:
        if ";" in query.strip().rstrip(";"):
            raise InputError(f"glan sql runs one statement at a time ({one_line(exc)})") from None
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
    spark = spark_for(cfg, "glan-sql")
    check_read_only(spark, args.query)
    register_views(spark, cfg)
    result = spark.sql(args.query)
    check_no_reflection(result)
    rows = result.limit(args.limit).collect() if args.limit else result.collect()
    print_rows(result.columns, [list(r) for r in rows], args.format, args.max_width)
    return 0
