"""`glan status`: for each stage, rows done, rows to do, failures, tokens and cost so far.

`spooled` counts calls an interrupted run paid for but did not commit: the next run commits them
without asking again (they are still counted in `to_do`). `running` names the live runs (host:pid)
working on a stage right now."""

from __future__ import annotations

import argparse

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.common.config import GlanConfig
from jobs.common.jobargs import add_config_args, config_from_args
from jobs.common.tables import LLM_TABLES


def _todo(done: DataFrame, wanted: DataFrame, key: str) -> int:
    return wanted.select(key).distinct().join(done.select(key), key, "left_anti").count()


def stage_status(spark, cfg: GlanConfig) -> list[dict]:
    """Rows done and to do per stage, over the disciplines this config selects."""
    from jobs.common.costs import load_prices, priced, usage_by_stage
    from jobs.common.llmstage import selected_disciplines, stable_id
    from jobs.common.spool import spool_by_stage
    from jobs.common.storage import get_storage
    from jobs.subjects import list_requests

    storage = get_storage(spark, cfg)
    read = storage.read_or_empty
    chosen = selected_disciplines(spark, cfg, None)
    ids = chosen.select("discipline_id")

    def mine(name: str) -> DataFrame:
        return read(name).join(ids, "discipline_id", "inner")

    lists = list_requests(chosen, cfg.subjects.samples_per_discipline)
    subjects = mine("subjects")
    syllabi = mine("syllabi")
    combos = mine("concept_combinations")
    questions = mine("questions")
    plan = [
        ("taxonomy", read("taxonomy").count(), 0),
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
        failures = {r["stage"]: r["n"] for r in storage.read("failures").groupBy("stage")
                    .agg(F.count("*").alias("n")).collect()}
    spooled, running = spool_by_stage(cfg)
    prices, _ = load_prices()
    usage = priced(usage_by_stage(spark, cfg), prices)
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


def main(argv: list[str] | None = None) -> int:
    from jobs.common.cli import _spark_for, print_rows

    parser = add_config_args(argparse.ArgumentParser(prog="glan status", description=__doc__.splitlines()[0]))
    parser.add_argument("--format", choices=["text", "csv", "json"], default="text")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rows = stage_status(_spark_for(cfg, "glan-status"), cfg)
    columns = ["stage", "done", "to_do", "spooled", "failures", "tokens", "usd", "running"]
    print_rows(columns, [[r[c] for c in columns] for r in rows], args.format)
    return 0
