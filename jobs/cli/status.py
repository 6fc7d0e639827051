"""`glan status`: for each stage, rows done, rows to do, failures, tokens and cost so far.

`done` counts the rows of the stage's last LLM output (else of the last table it writes); `to_do`
the keys its declared calls still have to ask for (jobs/pipeline/stage.py). `truncated` is the
share of the stage's calls whose output hit max_tokens (they are failures, asked again; a high
share drops long outputs from the data: raise that call's max_tokens). `spooled` counts calls
an interrupted run paid for but did not commit: the next run commits them without asking again
(they are still counted in `to_do`). `running` names the live runs (host:pid) working on a stage
right now. `batches` and `batch_requests` count the provider batches not yet collected (batch
mode) and the requests in them: a rerun collects them. Tokens and cost are those of `glan cost`: committed, failed, spooled and in-flight calls
(the last with estimated prompt tokens). `--disciplines "A,B"` (else taxonomy.disciplines) limits
every figure to those disciplines."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pyspark.sql import functions as F

from jobs.cli.args import add_config_args, config_from_args
from jobs.cli.output import print_rows, spark_for
from jobs.config.loader import GlanConfig
from jobs.pipeline.costs import calls_within, discipline_scope, usage_by_stage
from jobs.pipeline.llmstep import TRUNCATED
from jobs.pipeline.prices import load_prices, priced
from jobs.pipeline.slices import split_names
from jobs.pipeline.spool import spool_state
from jobs.pipeline.stage import Stage, StageContext, call_keys, stages
from jobs.storage.delta import get_storage
from jobs.storage.tables import LLM_BATCHES

COLUMNS = ["stage", "done", "to_do", "spooled", "failures", "truncated", "batches", "batch_requests", "tokens",
           "usd", "running"]


def stage_status(spark, cfg: GlanConfig, disciplines: Sequence[str] | None = None,
                 declared: Sequence[Stage] | None = None) -> list[dict]:
    """Rows done and to do, failures, spooled rows, tokens and cost per stage (`declared`, default
    every stage in jobs/), over `disciplines` (names), else the disciplines this config selects."""
    declared = stages() if declared is None else list(declared)
    storage = get_storage(spark, cfg)
    scope = discipline_scope(spark, cfg, disciplines, declared)
    failures = _count_by_stage(storage, "failures", scope)
    truncated = _count_by_stage(storage, "failed_calls", scope, F.col("error_class") == TRUNCATED)
    spool = spool_state(cfg, None if scope is None else scope.ids)
    batches = _live_batches(storage, scope)
    prices, _ = load_prices()
    usage = priced(usage_by_stage(spark, cfg, scope, spool, declared), prices)
    rows = []
    for stage in declared:
        ctx = StageContext(stage.name, spark, cfg, disciplines)
        todo = call_keys(ctx, stage, todo=True)
        mine_usage = [u for u in usage if u["stage"] == stage.name]
        tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in mine_usage)
        calls = sum(u["calls"] for u in mine_usage)
        cost = sum(u["usd"] or 0.0 for u in mine_usage)
        llm = stage.uses_llm
        rows.append({"stage": stage.name, "done": ctx.mine(stage.done_table).count(),
                     "to_do": todo.count() if todo is not None else 0, "failures": failures.get(stage.name, 0),
                     "truncated": f"{truncated.get(stage.name, 0) / calls:.1%}" if llm and calls else "",
                     "spooled": spool.spooled.get(stage.name, 0) if llm else "",
                     "batches": batches.get(stage.name, (0, 0))[0] if llm else "",
                     "batch_requests": batches.get(stage.name, (0, 0))[1] if llm else "",
                     "running": " ".join(spool.running.get(stage.name, [])),
                     "tokens": tokens if llm else "", "usd": round(cost, 4) if llm else ""})
    return rows


def _live_batches(storage, scope) -> dict[str, tuple[int, int]]:
    """(batches, requests) per stage of the provider batches not yet collected, in the scope."""
    if not storage.exists(LLM_BATCHES.name):
        return {}
    frame = storage.read(LLM_BATCHES.name).filter(F.col("state") != "collected")
    if scope is not None:
        if not scope.ids:
            return {}
        frame = frame.filter(F.arrays_overlap("disciplines", F.array(*[F.lit(i) for i in scope.ids])))
    grouped = frame.groupBy("stage").agg(F.count("*").alias("n"), F.sum("num_requests").alias("r"))
    return {r["stage"]: (r["n"], int(r["r"] or 0)) for r in grouped.collect()}


def _count_by_stage(storage, name: str, scope, where=None) -> dict[str, int]:
    """Rows of `failures` or `failed_calls` per stage, within the scope's calls (and `where`)."""
    if not storage.exists(name):
        return {}
    frame = calls_within(storage.read(name), scope)
    if where is not None:
        frame = frame.filter(where)
    return {r["stage"]: r["n"] for r in frame.groupBy("stage").agg(F.count("*").alias("n")).collect()}


def main(argv: list[str] | None = None) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="glan status", description=__doc__.splitlines()[0]))
    parser.add_argument("--disciplines", default=None, metavar="A,B",
                        help="only these disciplines (names, comma-separated; default: taxonomy.disciplines, else all)")
    parser.add_argument("--format", choices=["text", "csv", "json"], default="text")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rows = stage_status(spark_for(cfg, "glan-status"), cfg, split_names(args.disciplines))
    print_rows(COLUMNS, [[r[c] for c in COLUMNS] for r in rows], args.format)
    return 0
