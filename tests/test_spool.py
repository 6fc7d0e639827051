"""The spool of LLM results: what an interrupted run paid for is committed by the next one, never asked again."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from jobs.common.config import load_config
from jobs.common.errors import GlanError
from jobs.common.llmstage import RESULT, _is_failure, run_llm_step
from jobs.common.spool import Spool
from jobs.common.storage import read_table
from udfs.llm_udf import llm_udf

pytest_plugins = ["tests.fake_llm_fixture"]


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("GLAN_TEST_KEY", "sk-test-key")


def make_cfg(tmp_path: Path, url: str):
    return load_config([], [f"run_root={tmp_path / 'run'}", "storage.backend=embedded", "llm.endpoint=openai",
                            f"llm.base_url={url}", "llm.api_key_env=GLAN_TEST_KEY", "llm.max_attempts=1",
                            "pipeline.rows_per_task=2"])


def questions(spark, n: int):
    rows = [(f"d{i % 2}", f"q{i:02d}", f"What is {i} + {i}?") for i in range(n)]
    return spark.createDataFrame(rows, "discipline_id string, question_id string, question string")


def step(todo, cfg):
    return run_llm_step(
        todo, stage="test", prompt="answer", stage_llm=cfg.answers.llm, inputs=["question"], key="question_id",
        output="t_answers", output_key="answer_id", cfg=cfg,
        to_output=lambda ok: ok.select(F.col("question_id").alias("answer_id"),
                                       F.col(RESULT)["text"].alias("answer"),
                                       F.col(RESULT)["prompt_version"].alias("prompt_version")))


def test_a_rerun_commits_what_the_interrupted_run_spooled_and_asks_only_for_the_rest(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    todo = questions(spark, 10)
    spool = Spool(spark, cfg, "test", "t_answers")
    # An interrupted run: the calls of four rows were made and spooled, nothing was committed.
    ask = llm_udf("answer", cfg.llm, cfg.answers.llm, base_url=cfg.llm.base_url)
    called = todo.filter("question_id < 'q04'").withColumn(RESULT, ask("question"))
    files = spool.write(called)
    assert spool.rows(files) == 4 and fake_llm.count(kind="answer") == 4
    spooled = {r["question_id"]: r[RESULT]["text"] for r in spark.read.parquet(*[f"{spool.uri}/{f}" for f in files]).collect()}
    # One row answered with an older prompt (it is asked again) and a file cut off mid-write.
    stale = pq.read_table(f"{spool.uri}/{files[0]}").slice(0, 1).to_pylist()[0]
    stale.update(question_id="q05", question="What is 5 + 5?")
    stale[RESULT] = {**stale[RESULT], "prompt_version": "old", "text": "stale"}
    pq.write_table(pa.Table.from_pylist([stale], schema=pq.read_schema(f"{spool.uri}/{files[0]}")),
                   f"{spool.uri}/part-99999-old.parquet")
    Path(spool.uri, "_part-00007-cut.parquet").write_bytes(b"PAR1 half a file")

    fake_llm.reset()
    result = step(todo, cfg)
    assert result.recovered == 4
    assert fake_llm.count(kind="answer") == 6  # 10 rows - 4 spooled; the stale one was asked again
    answers = {r["answer_id"]: r for r in read_table(spark, "t_answers", cfg).collect()}
    assert sorted(answers) == [f"q{i:02d}" for i in range(10)]
    assert all(answers[k]["answer"] == text for k, text in spooled.items())  # the very answers paid for
    assert answers["q05"]["answer"] != "stale"
    outdated = read_table(spark, "failed_calls", cfg).collect()  # paid for, so still on record
    assert [(r["row_key"], r["error_class"]) for r in outdated] == [("q05", "outdated_prompt")]
    assert not list(Path(spool.uri).iterdir())  # nothing left behind

    fake_llm.reset()  # as a stage does: the work is the input keys minus the output keys
    done = read_table(spark, "t_answers", cfg).select(F.col("answer_id").alias("question_id"))
    assert step(todo.join(done, "question_id", "left_anti"), cfg).rows_in == 0
    assert fake_llm.count(kind="answer") == 0


def test_a_key_spooled_twice_is_read_once_and_a_success_wins(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    spool = Spool(spark, cfg, "test", "t_answers")
    ask = llm_udf("answer", cfg.llm, cfg.answers.llm, base_url=cfg.llm.base_url)
    fake_llm.add_rule(kind="answer", status=400, times=2)
    failed = spool.write(questions(spark, 2).withColumn(RESULT, ask("question")))  # a first attempt that failed
    ok = spool.write(questions(spark, 2).withColumn(RESULT, ask("question")))     # a retried attempt
    frame = spool.read(failed + ok, questions(spark, 1).withColumn(RESULT, ask("question")).schema,
                       "question_id", _is_failure(F.col(RESULT)))
    rows = frame.collect()
    assert sorted(r["question_id"] for r in rows) == ["q00", "q01"]
    assert all(r[RESULT]["error_class"] is None and r[RESULT]["text"] for r in rows)


def test_spool_files_of_another_shape_are_a_one_line_error(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    spool = Spool(spark, cfg, "test", "t_answers")
    Path(spool.uri).mkdir(parents=True)
    pq.write_table(pa.table({"question_id": ["q00"], "other": [1]}), f"{spool.uri}/part-00000-x.parquet")
    with pytest.raises(GlanError) as err:
        step(questions(spark, 2), cfg)
    message = str(err.value)
    assert "\n" not in message and spool.uri in message and "move the folder away" in message
    assert fake_llm.count(kind="answer") == 0  # nothing asked while the spool is in doubt
