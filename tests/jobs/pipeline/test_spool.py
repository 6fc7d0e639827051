"""The spool of LLM results: what an interrupted run paid for is committed by the next one, never asked again."""

from __future__ import annotations

from pathlib import Path

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from jobs.config.loader import load_config
from jobs.errors import GlanError
from jobs.pipeline.llmstep import RESULT, run_llm_step
from jobs.pipeline.results import is_failure
from jobs.pipeline.stage import LLMCall
from jobs.pipeline.spool import Spool, spool_by_stage
from jobs.storage.owners import HEARTBEATS, OWNER, owner_is_dead
from jobs.storage.delta import read_table
from udfs.llm_udf import llm_udf

pytest_plugins = ["tests.fake_llm_fixture"]


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("GLAN_TEST_KEY", "sk-test-key")


def make_cfg(tmp_path: Path, url: str):
    return load_config([], [f"run_root={tmp_path / 'run'}", "storage.backend=embedded", "llm.endpoint=openai",
                            f"llm.base_url={url}", "llm.api_key_env=GLAN_TEST_KEY", "llm.max_attempts=1",
                            "pipeline.rows_per_task=2"])


def answer_inputs() -> list:
    """The answer prompt's variables: the question, and the system prompt (empty by default)."""
    return ["question", F.lit("").alias("system_prompt")]


def questions(spark, n: int):
    rows = [(f"d{i % 2}", f"q{i:02d}", f"What is {i} + {i}?") for i in range(n)]
    return spark.createDataFrame(rows, "discipline_id string, question_id string, question string")


# The answer call on made-up questions, into a table of its own (rows: the todo the tests pass in).
TEST_CALL = LLMCall(
    prompt="answer", settings="answers.llm", rows=lambda ctx: None, inputs=("question",),
    constants=lambda cfg: {"system_prompt": ""},
    key="question_id", output="t_answers", output_key="answer_id", volume=lambda v: 0,
    to_output=lambda ok, llm: ok.select(F.col("question_id").alias("answer_id"),
                                        F.col(RESULT)["text"].alias("answer"),
                                        F.col(RESULT)["prompt_version"].alias("prompt_version")))


def step(todo, cfg, scope=None):
    return run_llm_step(todo, TEST_CALL, stage="test", cfg=cfg, scope=scope)


def exited_pid() -> int:
    """The pid of a process of this host that has exited."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(finished.stdout)


def dead_run(spark, cfg, name="dead-run", stage="test", output="t_answers") -> Spool:
    """The spool of another run that is gone: a process on this host that no longer exists."""
    spool = Spool(spark, cfg, stage, output, run_id=name)
    spool._ensure_open()
    HEARTBEATS.discard(spool.uri)  # its heart stopped
    owner = json.loads(Path(spool.uri, OWNER).read_text())
    Path(spool.uri, OWNER).write_text(json.dumps({**owner, "pid": exited_pid()}))
    return spool


@pytest.mark.slow
def test_a_rerun_commits_what_the_interrupted_run_spooled_and_asks_only_for_the_rest(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    todo = questions(spark, 10)
    spool = dead_run(spark, cfg)
    # An interrupted run: the calls of four rows were made and spooled, nothing was committed.
    ask = llm_udf("answer", cfg.llm, cfg.answers.llm, base_url=cfg.llm.base_url)
    called = todo.filter("question_id < 'q04'").withColumn(RESULT, ask(*answer_inputs()))
    files = spool.write(called)
    assert spool_by_stage(cfg)[0] == {"test": 4} and fake_llm.count(kind="answer") == 4
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
    assert not Path(spool.uri).exists() and not list(Path(spool.base).rglob("*.parquet"))  # nothing left behind

    fake_llm.reset()  # as a stage does: the work is the input keys minus the output keys
    done = read_table(spark, "t_answers", cfg).select(F.col("answer_id").alias("question_id"))
    assert step(todo.join(done, "question_id", "left_anti"), cfg).rows_in == 0
    assert fake_llm.count(kind="answer") == 0


def test_a_key_spooled_twice_is_read_once_and_a_success_wins(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    spool = Spool(spark, cfg, "test", "t_answers")
    ask = llm_udf("answer", cfg.llm, cfg.answers.llm, base_url=cfg.llm.base_url)
    fake_llm.add_rule(kind="answer", status=400, times=2)
    failed = spool.write(questions(spark, 2).withColumn(RESULT, ask(*answer_inputs())))  # a first attempt that failed
    ok = spool.write(questions(spark, 2).withColumn(RESULT, ask(*answer_inputs())))     # a retried attempt
    frame = spool.read(failed + ok, questions(spark, 1).withColumn(RESULT, ask(*answer_inputs())).schema,
                       "question_id", is_failure(F.col(RESULT)))
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


def test_a_live_run_of_other_disciplines_is_left_to_its_work(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    live = Spool(spark, cfg, "test", "t_answers", run_id="live-run")  # this process: alive, heartbeat fresh
    live.claim(["d1"])
    ask = llm_udf("answer", cfg.llm, cfg.answers.llm, base_url=cfg.llm.base_url)
    files = live.write(questions(spark, 2).withColumn(RESULT, ask(*answer_inputs())))  # q00 (d0), q01 (d1)
    fake_llm.reset()
    d0 = spark.createDataFrame([("d0",)], "discipline_id string")
    result = step(questions(spark, 2).filter(F.col("discipline_id") == "d0"), cfg, scope=d0)
    assert result.recovered == 0 and fake_llm.count(kind="answer") == 1  # not taken from a live run
    assert sorted(p.name for p in Path(live.uri).glob("part-*")) == sorted(files)
    live.close()  # its files stay: they are not committed
    assert sorted(p.name for p in Path(live.uri).glob("part-*")) == sorted(files)


def test_a_second_run_of_the_same_disciplines_stops_before_asking(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    live = Spool(spark, cfg, "test", "t_answers", run_id="live-run")
    live.claim(["d0", "d1"])
    d1 = spark.createDataFrame([("d1",)], "discipline_id string")
    with pytest.raises(GlanError) as err:
        step(questions(spark, 4), cfg, scope=d1)
    message = str(err.value)
    assert "\n" not in message and "already running on 1 (d1)" in message and "live-run" in message
    assert fake_llm.count(kind="answer") == 0
    assert [p.name for p in Path(live.base).iterdir()] == ["live-run"]  # the refused run left nothing
    with pytest.raises(GlanError, match=r"already running on 2 \(d0, d1\)"):
        step(questions(spark, 4), cfg)  # no --disciplines: all of them
    assert spool_by_stage(cfg)[1] == {"test": [f"{socket.gethostname()}:{os.getpid()}"]}  # `glan status`
    live.close()
    assert spool_by_stage(cfg)[1] == {}
    assert step(questions(spark, 4), cfg, scope=d1).rows_written == 4  # once it has ended
    assert fake_llm.count(kind="answer") == 4


def test_of_two_runs_that_claim_at_once_the_later_one_stops(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    first = Spool(spark, cfg, "test", "t_answers", run_id="first-run")
    first.owner["started"] -= 60  # it began first, but its folder appears only now:
    later = Spool(spark, cfg, "test", "t_answers", run_id="later-run")
    later.claim(["d0"])  # nobody else yet
    first.claim(["d0"])  # sees the later run's folder and goes on
    with pytest.raises(GlanError, match="first-run"):
        later.claim(["d0"])  # the later run's check, once the first run's folder is there
    assert not Path(later.uri).exists()
    first.close()


@pytest.mark.slow
def test_a_run_of_one_slice_commits_only_its_disciplines_and_leaves_the_rest(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    todo = questions(spark, 6)  # d0: q00 q02 q04; d1: q01 q03 q05
    spool = dead_run(spark, cfg)
    ask = llm_udf("answer", cfg.llm, cfg.answers.llm, base_url=cfg.llm.base_url)
    spool.write(todo.withColumn(RESULT, ask(*answer_inputs())))
    fake_llm.reset()

    def run_slice(discipline):
        scope = spark.createDataFrame([(discipline,)], "discipline_id string")
        done = (read_table(spark, "t_answers", cfg).select(F.col("answer_id").alias("question_id"))
                if Path(cfg.table_uri("t_answers")).exists() else None)
        mine = todo.filter(F.col("discipline_id") == discipline)
        mine = mine.join(done, "question_id", "left_anti") if done is not None else mine
        return step(mine, cfg, scope=scope)

    assert run_slice("d0").recovered == 3
    assert Path(spool.uri).exists()  # d1's rows wait for a run of d1
    assert run_slice("d1").recovered == 3
    assert fake_llm.count(kind="answer") == 0  # six rows, all paid once, by the dead run
    assert sorted(r["answer_id"] for r in read_table(spark, "t_answers", cfg).collect()) == [f"q{i:02d}" for i in range(6)]
    assert not Path(spool.uri).exists()


def test_owner_liveness():
    now = time.time()
    here = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now}
    assert not owner_is_dead(here, 900, now)
    assert owner_is_dead(None, 900, now)                                  # no owner file
    assert owner_is_dead({**here, "heartbeat": now - 901}, 900, now)      # silent too long
    assert owner_is_dead({**here, "pid": exited_pid()}, 900, now)  # same host, process gone
    assert not owner_is_dead({**here, "host": "another-host", "pid": 1}, 900, now)  # cannot see its processes
