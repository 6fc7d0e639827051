"""Batch mode (jobs/pipeline/batch.py) against the test server's Batch API: the same rows as online,
at batch prices, and exact through crashes, faults and races."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from dataclasses import replace

import pytest
from pyspark.sql import functions as F

from jobs.config.loader import load_config
from jobs.pipeline.batch import Batches
from jobs.pipeline.llmstep import RESULT, run_llm_step, usage_columns
from jobs.storage.delta import get_storage
from udfs.llm.batch import BatchAPI
from tests.jobs.pipeline.test_spool import TEST_CALL, _key, questions  # noqa: F401 - _key is an autouse fixture

pytest_plugins = ["tests.fake_llm_fixture"]

REPO = Path(__file__).resolve().parents[3]

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


@pytest.fixture(scope="module")
def online_rows(spark, fake_llm_server, tmp_path_factory) -> set:
    """The rows the online step writes for questions(spark, 6), asked once for the module."""
    cfg = batch_cfg(tmp_path_factory.mktemp("online"), fake_llm_server.url, "llm.mode=online")
    run_llm_step(questions(spark, 6), CALL, stage="test", cfg=cfg)
    fake_llm_server.reset()
    return rows_of(spark, cfg)


def test_a_batch_step_writes_the_rows_the_online_step_writes(spark, fake_llm, tmp_path, online_rows):
    todo = questions(spark, 6)
    cfg = batch_cfg(tmp_path / "batch", fake_llm.url)
    result = run_llm_step(todo, CALL, stage="test", cfg=cfg)
    assert rows_of(spark, cfg) == online_rows
    assert (result.rows_written, result.failures, result.in_flight) == (6, 0, 0)
    assert fake_llm.count() == 0  # not one online request
    stats = fake_llm.stats()["batch"]
    assert stats["batches"]["created"] == 1 and stats["batches"]["completed"] == 1
    [row] = ledger(spark, cfg)
    assert (row["state"], row["status"], row["num_requests"], row["rows_written"]) == ("collected", "completed", 6, 6)
    written = get_storage(spark, cfg).read("b_answers")
    assert written.filter(F.col("billing") == "batch").count() == 6
    assert written.filter(F.col("batch_id") == row["batch_id"]).count() == 6


def lines(fake_llm) -> dict:
    return fake_llm.stats()["batch"]["lines"]


@pytest.mark.slow
def test_a_run_ended_between_submit_and_collect_is_collected_by_the_next_without_sending_anything(
        spark, fake_llm, tmp_path):
    todo = questions(spark, 6)
    fake_llm.batch_processing_s = 600.0
    cfg = batch_cfg(tmp_path, fake_llm.url)  # llm.batch.wait_s is 0: the run submits and ends
    first = run_llm_step(todo, CALL, stage="test", cfg=cfg)
    assert (first.in_flight, first.batches, first.rows_written) == (6, 1, 0)
    assert [r["state"] for r in ledger(spark, cfg)] == ["submitted"]
    again = run_llm_step(todo, CALL, stage="test", cfg=cfg)  # still in flight: nothing new is sent
    assert (again.rows_in, again.in_flight) == (0, 6)
    for batch in fake_llm._batches.values():
        batch.processing_s = 0.0  # the provider is done
    last = run_llm_step(todo, CALL, stage="test", cfg=cfg)
    assert (last.rows_written, last.in_flight) == (6, 0)
    stats = fake_llm.stats()["batch"]
    assert (stats["files_uploaded"], stats["batches"]["created"], stats["lines"]["completed"]) == (1, 1, 6)
    assert len(rows_of(spark, cfg)) == 6
    assert [r["state"] for r in ledger(spark, cfg)] == ["collected"]


def test_a_run_waits_for_its_batches_up_to_wait_s(spark, fake_llm, tmp_path):
    fake_llm.batch_processing_s = 0.5
    cfg = batch_cfg(tmp_path, fake_llm.url, "llm.batch.wait_s=30")
    result = run_llm_step(questions(spark, 4), CALL, stage="test", cfg=cfg)
    assert (result.rows_written, result.in_flight) == (4, 0)


@pytest.mark.slow
def test_expired_and_failed_lines_are_sent_again_once_and_nothing_else_is(spark, fake_llm, tmp_path):
    fake_llm.rate_batch_expired, fake_llm.rate_batch_line_failed = 0.3, 0.2
    cfg = batch_cfg(tmp_path, fake_llm.url, "llm.batch.wait_s=60")  # the resubmission is collected too
    result = run_llm_step(questions(spark, 20), CALL, stage="test", cfg=cfg)
    first, second = ledger(spark, cfg)
    assert (first["round"], second["round"]) == (0, 1)
    unanswered = 20 - first["rows_written"]
    assert 0 < unanswered == first["rows_resubmitted"] == second["num_requests"]  # only those, and all of them
    assert second["rows_resubmitted"] == 0  # max_resubmits=1: no third round
    seen = lines(fake_llm)
    assert seen["completed"] + seen["expired"] + seen["failed"] == 20 + unanswered  # lines sent: 20, then the unanswered
    assert result.rows_written + result.failures == 20
    failures = get_storage(spark, cfg).read("failures").collect()
    assert len(failures) == result.failures == second["num_requests"] - second["rows_written"]
    assert {r["error_class"] for r in failures} <= {"batch_expired", "batch_http_500"}
    assert all(r["error_message"] for r in failures)


@pytest.mark.slow
def test_a_batch_failed_as_a_whole_is_sent_again_once_then_its_rows_fail_with_the_providers_message(
        spark, fake_llm, tmp_path):
    fake_llm.batch_fail_whole = 2
    cfg = batch_cfg(tmp_path, fake_llm.url, "llm.batch.wait_s=60")
    result = run_llm_step(questions(spark, 4), CALL, stage="test", cfg=cfg)
    assert fake_llm.stats()["batch"]["batches"] == {"created": 2, "completed": 0, "expired": 0, "failed": 2,
                                                    "cancelled": 0}
    assert (result.rows_written, result.failures) == (0, 4)
    failures = get_storage(spark, cfg).read("failures").collect()
    assert {r["error_class"] for r in failures} == {"batch_failed"}
    assert all("Enqueued token limit" in r["error_message"] for r in failures)
    fake_llm.batch_fail_whole = 0
    rerun = run_llm_step(questions(spark, 4), CALL, stage="test", cfg=cfg)  # failures are asked again
    assert (rerun.rows_written, rerun.failures) == (4, 0)
    assert not get_storage(spark, cfg).read("failures").count()


@pytest.mark.slow
def test_requests_are_cut_into_files_within_the_limits(spark, fake_llm, tmp_path):
    cfg = batch_cfg(tmp_path, fake_llm.url, "llm.batch.max_requests_per_file=4", "llm.batch.max_bytes_per_file=4096")
    result = run_llm_step(questions(spark, 13), CALL, stage="test", cfg=cfg)
    assert result.rows_written == 13
    rows = ledger(spark, cfg)
    assert len(rows) >= 4 and sum(r["num_requests"] for r in rows) == 13
    uploaded = [content for obj, content in fake_llm._files.values() if obj["purpose"] == "batch"]
    assert len(uploaded) == len(rows)
    assert all(0 < len(c.splitlines()) <= 4 and len(c) <= 4096 for c in uploaded)
    assert sorted(r["num_bytes"] for r in rows) == sorted(len(c) for c in uploaded)
    keys = get_storage(spark, cfg).read("llm_batch_keys")
    assert keys.count() == keys.select("row_key").distinct().count() == 13  # each key in one file


RACING_RUN = """
import sys
from jobs.config.loader import load_config
from jobs.errors import GlanError
from jobs.pipeline.llmstep import run_llm_step
from jobs.spark.session import get_spark
from tests.jobs.pipeline.test_batch import CALL
from tests.jobs.pipeline.test_spool import questions
spark = get_spark("race", master="local[1]", shuffle_partitions=2)
try:
    print("in_flight", run_llm_step(questions(spark, 8), CALL, stage="test", cfg=load_config([], sys.argv[1:])).in_flight)
except GlanError as exc:
    print("stopped", exc)
"""


@pytest.mark.slow
def test_a_key_in_a_live_batch_is_never_sent_again_also_by_a_run_racing_on_the_same_stage(spark, fake_llm, tmp_path):
    fake_llm.batch_processing_s = 600.0
    cfg = batch_cfg(tmp_path, fake_llm.url)
    sets = [f"run_root={tmp_path / 'run'}", "storage.backend=embedded", f"llm.base_url={fake_llm.url}",
            "llm.api_key_env=GLAN_TEST_KEY", "llm.max_attempts=1", "pipeline.rows_per_task=2", "llm.mode=batch"]
    runs = [subprocess.Popen([sys.executable, "-c", RACING_RUN, *sets], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    # One run sent all 8; the other stopped at its claim, or found all 8 in a live batch and sent nothing.
    assert sorted(out.split()[:2] for out, _ in outputs) in ([["in_flight", "0"], ["in_flight", "8"]],
                                                             [["in_flight", "8"], ["stopped", "stage"]])
    assert fake_llm.stats()["batch"]["batches"]["created"] == 1
    run_llm_step(questions(spark, 8), CALL, stage="test", cfg=cfg)  # a third run while the batch is live
    keys = get_storage(spark, cfg).read("llm_batch_keys")
    assert keys.count() == keys.select("row_key").distinct().count() == 8
    assert fake_llm.stats()["batch"]["batches"]["created"] == 1


def test_the_api_key_is_in_no_request_file_ledger_row_or_log_line(spark, fake_llm, tmp_path, monkeypatch, capfd, caplog):
    canary = "sk-canary-5f1e2d3c4b5a69788796a5b4"
    monkeypatch.setenv("GLAN_TEST_KEY", canary)
    caplog.set_level("DEBUG")
    fake_llm.rate_batch_expired = 0.5  # resubmissions and failures too
    cfg = batch_cfg(tmp_path, fake_llm.url, "llm.batch.wait_s=60")
    run_llm_step(questions(spark, 6), CALL, stage="test", cfg=cfg)
    assert get_storage(spark, cfg).read("llm_batches").count() >= 1
    leaked = [path for path in (tmp_path / "run").rglob("*") if path.is_file() and canary[3:15].encode() in path.read_bytes()]
    assert leaked == []
    out, err = capfd.readouterr()
    assert canary[3:15] not in out + err + caplog.text
    assert all(canary[3:15].encode() not in content for _, content in fake_llm._files.values())


class Killed(BaseException):
    """A kill at a commit boundary: not an Exception, so nothing on the way catches it."""


def _kill_after(target, name: str, monkeypatch, *, before: bool) -> None:
    original = getattr(target, name)

    def killed(*args, **kwargs):
        if before:
            raise Killed(name)
        original(*args, **kwargs)
        raise Killed(name)

    monkeypatch.setattr(target, name, killed)


# Each boundary of a batch's life: (object, method, kill before it runs rather than after).
BOUNDARIES = {
    "rendered, not cut": (Batches, "cut", True),
    "keys written down, no ledger row": (Batches, "write_down", True),
    "ledger row pending, nothing uploaded": (BatchAPI, "upload", True),
    "uploaded, no batch": (BatchAPI, "create", True),
    "batch created, not written down": (BatchAPI, "create", False),
    "answers committed, batch not marked collected": (Batches, "resubmit", True),
}


@pytest.mark.slow
@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_a_kill_at_any_boundary_leaves_what_the_next_run_finishes_without_paying_twice(
        spark, fake_llm, tmp_path, monkeypatch, boundary, online_rows):
    todo = questions(spark, 6)
    cfg = batch_cfg(tmp_path / "killed", fake_llm.url)
    with monkeypatch.context() as patch:
        target, name, before = BOUNDARIES[boundary]
        _kill_after(target, name, patch, before=before)
        with pytest.raises(Killed):
            run_llm_step(todo, CALL, stage="test", cfg=cfg)
    result = run_llm_step(todo, CALL, stage="test", cfg=cfg)
    assert rows_of(spark, cfg) == online_rows
    assert result.in_flight == 0
    stats = fake_llm.stats()["batch"]
    assert stats["batches"]["created"] == 1 and stats["lines"]["completed"] == 6  # each request sent and paid once
    assert all(r["state"] == "collected" for r in ledger(spark, cfg) if r["batch_id"])


@pytest.mark.slow
def test_glan_run_in_batch_mode_stops_at_batches_in_flight_and_a_rerun_ends_with_the_online_rows(
        spark, fake_llm, tmp_path):
    from jobs.cli.status import stage_status
    from jobs.pipeline.runner import run_pipeline
    from tests.jobs.pipeline.test_runner import make_cfg

    reference = make_cfg(tmp_path, fake_llm.url, name="online")
    assert run_pipeline(reference) == 0
    fake_llm.reset()
    fake_llm.batch_processing_s = 600.0
    cfg = make_cfg(tmp_path, fake_llm.url, name="batch", **{"llm.mode": "batch"})
    assert run_pipeline(cfg) == 0  # submits the first stage's batch, then ends: nothing after it runs
    status = {r["stage"]: r for r in stage_status(spark, cfg)}
    assert (status["subjects"]["batches"], status["subjects"]["batch_requests"]) == (1, 20)  # 10 lists x 2 disciplines
    assert not get_storage(spark, cfg).exists("syllabi")
    fake_llm.batch_processing_s = 0.0
    for batch in fake_llm._batches.values():
        batch.processing_s = 0.0
    assert run_pipeline(cfg) == 0  # collects, and each later stage's batches end at once
    assert fake_llm.count() == 0  # not one online request
    for name, columns in (("questions", ["question_id", "question"]), ("answers", ["answer_id", "answer"]),
                          ("instructions", ["instruction_id", "question", "answer"])):
        got = {tuple(r) for r in get_storage(spark, cfg).read(name).select(*columns).collect()}
        assert got == {tuple(r) for r in get_storage(spark, reference).read(name).select(*columns).collect()}, name
    answers = get_storage(spark, cfg).read("answers")
    assert answers.filter(F.col("billing") == "batch").count() == answers.count() > 0
    assert not [r for r in ledger(spark, cfg) if r["state"] != "collected"]


@pytest.mark.slow
def test_azure_openai_batch_deployments_take_the_same_step(spark, fake_llm, tmp_path):
    cfg = batch_cfg(tmp_path, fake_llm.url, "llm.endpoint=azure", "llm.api_version=2024-10-21",
                    f"llm.base_url={fake_llm.url.removesuffix('/v1')}",  # the resource's endpoint
                    "llm.azure_deployment=gpt-4o-mini-batch")
    result = run_llm_step(questions(spark, 3), CALL, stage="test", cfg=cfg)
    assert (result.rows_written, result.failures) == (3, 0)
    [(obj, content)] = [f for f in fake_llm._files.values() if f[0]["purpose"] == "batch"]
    lines = [json.loads(line) for line in content.splitlines()]
    assert {(line["url"], line["body"]["model"]) for line in lines} == {("/chat/completions", "gpt-4o-mini-batch")}
    assert fake_llm.stats()["batch"]["batches"]["completed"] == 1


def test_a_collected_batch_leaves_no_files_behind(spark, fake_llm, tmp_path):
    cfg = batch_cfg(tmp_path, fake_llm.url)
    run_llm_step(questions(spark, 3), CALL, stage="test", cfg=cfg)
    [row] = ledger(spark, cfg)
    assert row["state"] == "collected"
    left = [p for p in (tmp_path / "run" / "_batches").rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert left == []


@pytest.mark.slow
def test_a_run_on_a_narrower_slice_leaves_a_wider_runs_batch_alone_and_says_so(spark, fake_llm, tmp_path, capsys):
    fake_llm.batch_processing_s = 600.0
    cfg = batch_cfg(tmp_path, fake_llm.url)
    todo = questions(spark, 4)  # disciplines d0 and d1
    run_llm_step(todo, CALL, stage="test", cfg=cfg)
    only_d0 = spark.createDataFrame([("d0",)], "discipline_id string")
    narrow = run_llm_step(todo.filter("discipline_id = 'd0'"), CALL, stage="test", cfg=cfg, scope=only_d0)
    assert (narrow.rows_in, narrow.in_flight) == (0, 0)  # its rows are in the wide run's batch: not sent again
    assert "also hold other discipline ids (d1); a run over those disciplines" in capsys.readouterr().err
    assert fake_llm.stats()["batch"]["batches"]["created"] == 1
