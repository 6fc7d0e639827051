"""`glan status`: for each stage, rows done, rows to do, failures, tokens and cost so far.

`spooled` counts calls an interrupted run paid for but did not commit: the next run commits them
without asking again (they are still counted in `to_do`). `running` names the live runs (host:pid)
working on a stage right now. Tokens and cost are those of `glan cost`: committed, failed, spooled
and in-flight calls (the last with estimated prompt tokens). `--disciplines "A,B"` (else
taxonomy.disciplines) limits every figure to those disciplines.

`table_health` checks a table's Delta log against its files: the row count the log records, and how
many files the log lists that are gone."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.common.config import GlanConfig
from jobs.common.jobargs import add_config_args, config_from_args
from jobs.common.tables import LLM_TABLES


def _todo(done: DataFrame, wanted: DataFrame, key: str) -> int:
    return wanted.select(key).distinct().join(done.select(key), key, "left_anti").count()


def stage_status(spark, cfg: GlanConfig, disciplines: Sequence[str] | None = None) -> list[dict]:
    """Rows done and to do, failures, spooled rows, tokens and cost per stage, over `disciplines`
    (names), else the disciplines this config selects."""
    from jobs.common.costs import discipline_scope, load_prices, priced, usage_by_stage
    from jobs.common.llmstage import selected_disciplines, stable_id
    from jobs.common.spool import spool_state
    from jobs.common.storage import get_storage
    from jobs.subjects import list_requests

    storage = get_storage(spark, cfg)
    read = storage.read_or_empty
    chosen = selected_disciplines(spark, cfg, disciplines)
    scope = discipline_scope(spark, cfg, disciplines)
    ids = chosen.select("discipline_id")

    def mine(name: str) -> DataFrame:
        return read(name).join(ids, "discipline_id", "inner")

    lists = list_requests(chosen, cfg.subjects.samples_per_discipline)
    subjects = mine("subjects")
    syllabi = mine("syllabi")
    combos = mine("concept_combinations")
    questions = mine("questions")
    plan = [
        ("taxonomy", chosen.count(), 0),
        ("subjects", mine("subject_conversions").count(),
         _todo(mine("subject_conversions"), lists, "list_id")),
        ("syllabus", mine("session_lists").count(),
         _todo(syllabi, subjects.withColumn("syllabus_id", stable_id("subject_id")), "syllabus_id")
         + _todo(mine("session_lists"), syllabi, "syllabus_id")),
        ("combinations", combos.count(), 0),
        ("questions", questions.count(), _todo(questions, combos, "combination_id")),
        ("answers", mine("answers").count(),
         _todo(mine("answers"), questions.withColumn("answer_id", F.col("question_id")), "answer_id")),
    ]
    failures = {}
    if storage.exists("failures"):
        failed = storage.read("failures")
        if scope is not None:
            failed = failed.join(scope.calls, ["stage", "row_key"], "left_semi")
        failures = {r["stage"]: r["n"] for r in failed.groupBy("stage").agg(F.count("*").alias("n")).collect()}
    spool = spool_state(cfg, None if scope is None else scope.ids)
    spooled, running = spool.spooled, spool.running
    prices, _ = load_prices()
    usage = priced(usage_by_stage(spark, cfg, scope, spool), prices)
    rows = []
    for stage, done, todo in plan:
        mine_usage = [u for u in usage if u["stage"] == stage]
        tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in mine_usage)
        cost = sum(u["usd"] or 0.0 for u in mine_usage)
        llm = stage in LLM_TABLES
        rows.append({"stage": stage, "done": done, "to_do": todo, "failures": failures.get(stage, 0),
                     "spooled": spooled.get(stage, 0) if llm else "", "running": " ".join(running.get(stage, [])),
                     "tokens": tokens if llm else "", "usd": round(cost, 4) if llm else ""})
    return rows


def table_health(storage, name: str) -> tuple[int, int]:
    """(rows, missing files) of a table: the rows its Delta log records (add actions' numRecords,
    cheap on any size) and how many data files the log lists that do not exist, which that count
    still includes. One listing of the table's folder (pages of 1000 names on object stores, not a
    request per file), with pyarrow, for either backend."""
    from deltalake import DeltaTable

    from jobs.common.spark import arrow_filesystem

    uri = storage.uri(name)
    actions = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).select(["path", "num_records"]).to_pydict()
    rows = sum(n or 0 for n in actions["num_records"])
    fs, root = arrow_filesystem(uri)
    root = root.rstrip("/")
    there = {info.path[len(root) + 1:] for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if info.type == pafs.FileType.File}
    missing = 0
    for path in actions["path"]:
        if "://" in path:  # an absolute URI (a shallow clone's files)
            other_fs, other = arrow_filesystem(path)
            missing += other_fs.get_file_info(other).type == pafs.FileType.NotFound
        else:
            missing += unquote(path) not in there
    return rows, missing


def main(argv: list[str] | None = None) -> int:
    from jobs.common.cli import _spark_for, print_rows
    from jobs.common.costs import split_names

    parser = add_config_args(argparse.ArgumentParser(prog="glan status", description=__doc__.splitlines()[0]))
    parser.add_argument("--disciplines", default=None, metavar="A,B",
                        help="only these disciplines (names, comma-separated; default: taxonomy.disciplines, else all)")
    parser.add_argument("--format", choices=["text", "csv", "json"], default="text")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rows = stage_status(_spark_for(cfg, "glan-status"), cfg, split_names(args.disciplines))
    columns = ["stage", "done", "to_do", "spooled", "failures", "tokens", "usd", "running"]
    print_rows(columns, [[r[c] for c in columns] for r in rows], args.format)
    return 0
