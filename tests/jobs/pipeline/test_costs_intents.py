"""`glan cost` counts every call the endpoint served: committed, failed, spooled, and the calls in
flight when a run died (possibly paid, from the intents its tasks wrote before sending)."""

from __future__ import annotations

import pytest

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from jobs.pipeline.costs import Scope, usage_by_stage
from jobs.answers import ANSWERS
from jobs.pipeline.llmstep import RESULT, run_llm_step, usage_columns
from jobs.pipeline.spool import INTENTS, _unanswered
from jobs.storage.delta import read_table
from tests.jobs.pipeline.test_spool import _key, answer_inputs, dead_run, make_cfg  # noqa: F401 - _key is an autouse fixture
from udfs.llm_udf import llm_udf

pytest_plugins = ["tests.fake_llm_fixture"]


def questions(spark, n: int):
    rows = [(f"d{i % 2}", f"q{i:02d}", f"What is {i} + {i}?") for i in range(n)]
    return (spark.createDataFrame(rows, "discipline_id string, question_id string, question string")
            .withColumn("answer_id", F.col("question_id")))


def answer_step(todo, cfg):
    """The answers stage's step on made-up questions (lineage columns left empty)."""
    empty = F.lit(None).cast("string")
    call = dataclasses.replace(ANSWERS, to_output=lambda ok, llm: ok.select(
        "answer_id", "question_id", empty.alias("combination_id"), empty.alias("syllabus_id"),
        empty.alias("subject_id"), "discipline_id", F.col(RESULT)["text"].alias("answer"), *usage_columns(llm)))
    return run_llm_step(todo, call, stage="answers", cfg=cfg)


def calls(usage, table=None) -> int:
    return sum(u["calls"] for u in usage if table is None or u["table"] == table)


@pytest.mark.slow
def test_calls_in_flight_when_a_run_died_are_counted_then_recorded_and_paid_again(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    todo = questions(spark, 10)
    spool = dead_run(spark, cfg, stage="answers", output="answers")
    # The dead run: one task spooled the answers of four rows; another sent two calls and died
    # before spooling them (its intents are all that is left of them).
    spooled_log = spool.intents("answer_id")
    ask = llm_udf("answer", cfg.llm, cfg.answers.llm, base_url=cfg.llm.base_url, intents=spooled_log)
    spool.write(todo.filter("question_id < 'q04'").withColumn(
        RESULT, ask(*answer_inputs(), note=["answer_id", "discipline_id"])), spooled_log)
    lost_log = spool.intents("answer_id")
    ask = llm_udf("answer", cfg.llm, cfg.answers.llm, base_url=cfg.llm.base_url, intents=lost_log)
    todo.filter("question_id IN ('q04', 'q05')").select(ask(*answer_inputs(), note=["answer_id", "discipline_id"])).collect()
    assert fake_llm.count() == 6

    usage = usage_by_stage(spark, cfg)
    assert calls(usage) == fake_llm.count()  # 4 spooled + 2 possibly paid
    assert calls(usage, "spool") == 4 and calls(usage, "spool (in flight)") == 2
    in_flight = next(u for u in usage if u["table"] == "spool (in flight)")
    assert in_flight["prompt_tokens"] > 0 and in_flight["completion_tokens"] == 0  # estimated; no answer came back
    d0 = Scope(["d0"], spark.createDataFrame([], "stage string, row_key string"))
    assert calls(usage_by_stage(spark, cfg, d0)) == 3  # q00 q02 spooled, q04 in flight

    result = answer_step(todo, cfg)  # the rerun commits the spool and asks for the rest, q04 q05 again
    assert result.recovered == 4 and fake_llm.count() == 6 + 6
    usage = usage_by_stage(spark, cfg)
    assert calls(usage) == fake_llm.count()  # a call paid again is a new call
    assert calls(usage, "answers") == 10 and calls(usage, "failed_calls (in flight)") == 2
    recorded = read_table(spark, "failed_calls", cfg).collect()
    assert sorted((r["row_key"], r["error_class"], r["completion_tokens"]) for r in recorded) == [
        ("q04", "in_flight", None), ("q05", "in_flight", None)]
    assert not list(Path(spool.base).rglob("*.parquet")) and not Path(spool.uri).exists()  # cleaned up

    assert answer_step(todo.filter("question_id > 'q99'"), cfg).rows_in == 0  # nothing to do, nothing counted twice
    assert calls(usage_by_stage(spark, cfg)) == fake_llm.count()


def test_intents_of_a_task_attempt_without_results_are_unanswered(tmp_path):
    folder = tmp_path / "run"
    (folder / INTENTS / "w").mkdir(parents=True)
    schema = pa.schema([("row_key", pa.string()), ("discipline_id", pa.string()), ("model", pa.string()),
                        ("prompt_name", pa.string()), ("prompt_version", pa.string()), ("prompt_tokens", pa.int64())],
                       metadata={b"glan.key": b"answer_id"})

    def intent(name, keys):
        pq.write_table(pa.Table.from_pylist([{"row_key": k, "prompt_tokens": 5} for k in keys], schema=schema),
                       folder / INTENTS / "w" / name)

    intent("part-00000-w-a0-x1.parquet", ["q1", "q2"])  # the attempt Spark retried: sent, never spooled
    intent("part-00000-w-a1-x2.parquet", ["q1", "q2"])  # the retry, whose results are spooled
    intent("part-00001-w-a0-x3.parquet", ["q3", "q4"])  # a task that spooled one of its two batches
    pq.write_table(pa.table({"answer_id": ["q1", "q2"]}), folder / "part-00000-w-a1-0000.parquet")
    pq.write_table(pa.table({"answer_id": ["q3"]}), folder / "part-00001-w-a0-0000.parquet")
    (folder / INTENTS / "w" / "_part-00002-w-a0-x4.parquet").write_bytes(b"PAR1 cut")  # nothing sent for it
    fs = pafs.LocalFileSystem()
    results = ["part-00000-w-a1-0000.parquet", "part-00001-w-a0-0000.parquet"]
    intents = sorted(f"{INTENTS}/w/{p.name}" for p in (folder / INTENTS / "w").glob("part-*"))
    lost = _unanswered(fs, str(folder), results, intents)
    assert sorted(zip(lost.column("row_key").to_pylist(), lost.column("_intent").to_pylist())) == [
        ("q1", f"{INTENTS}/w/part-00000-w-a0-x1.parquet"), ("q2", f"{INTENTS}/w/part-00000-w-a0-x1.parquet"),
        ("q4", f"{INTENTS}/w/part-00001-w-a0-x3.parquet")]
    # After a job that completed, an attempt with results spooled all of its rows: only a0 of part 0 is read.
    finished = _unanswered(fs, str(folder), results, intents, attempts_finished=True)
    assert sorted(finished.column("row_key").to_pylist()) == ["q1", "q2"]
