"""Batch mode (jobs/pipeline/batch.py) against the test server's Batch API: the same rows as online,
at batch prices, and exact through crashes, faults and races."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pyspark.sql import functions as F

from jobs.config.loader import load_config
from jobs.pipeline.llmstep import RESULT, run_llm_step, usage_columns
from jobs.storage.delta import get_storage
from tests.jobs.pipeline.test_spool import TEST_CALL, _key, questions  # noqa: F401 - _key is an autouse fixture

pytest_plugins = ["tests.fake_llm_fixture"]

# The answer call of test_spool, with the usage columns every pipeline table carries.
CALL = replace(TEST_CALL, output="b_answers", to_output=lambda ok, llm: ok.select(
    F.col("question_id").alias("answer_id"), F.col(RESULT)["text"].alias("answer"), *usage_columns(llm)))


def batch_cfg(tmp_path, url: str, *settings: str):
    return load_config([], [f"run_root={tmp_path / 'run'}", "storage.backend=embedded", "llm.endpoint=openai",
                            f"llm.base_url={url}", "llm.api_key_env=GLAN_TEST_KEY", "llm.max_attempts=1",
                            "pipeline.rows_per_task=2", "llm.mode=batch", "llm.batch.poll_s=0.05", *settings])


def rows_of(spark, cfg, name="b_answers"):
    return {(r["answer_id"], r["answer"]) for r in get_storage(spark, cfg).read(name).collect()}


def ledger(spark, cfg):
    return [r.asDict() for r in get_storage(spark, cfg).read("llm_batches").orderBy("created_at").collect()]


def test_a_batch_step_writes_the_rows_the_online_step_writes(spark, fake_llm, tmp_path):
    todo = questions(spark, 6)
    online = replace(batch_cfg(tmp_path / "online", fake_llm.url), llm=replace(
        batch_cfg(tmp_path / "online", fake_llm.url).llm, mode="online"))
    run_llm_step(todo, CALL, stage="test", cfg=online)
    fake_llm.reset()
    cfg = batch_cfg(tmp_path / "batch", fake_llm.url)
    result = run_llm_step(todo, CALL, stage="test", cfg=cfg)
    assert rows_of(spark, cfg) == rows_of(spark, online)
    assert (result.rows_written, result.failures, result.in_flight) == (6, 0, 0)
    assert fake_llm.count() == 0  # not one online request
    stats = fake_llm.stats()["batch"]
    assert stats["batches"]["created"] == 1 and stats["batches"]["completed"] == 1
    [row] = ledger(spark, cfg)
    assert (row["state"], row["status"], row["num_requests"], row["rows_written"]) == ("collected", "completed", 6, 6)
    written = get_storage(spark, cfg).read("b_answers")
    assert written.filter(F.col("billing") == "batch").count() == 6
    assert written.filter(F.col("batch_id") == row["batch_id"]).count() == 6
