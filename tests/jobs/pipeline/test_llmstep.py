"""The LLM step names a call whose outputs were cut at max_tokens too often, with the setting to
raise: truncated outputs are never kept, so a low cap silently drops the longest ones."""

from __future__ import annotations

import socket
from dataclasses import replace

import pyarrow as pa
import pytest

from jobs.pipeline.llmstep import TRUNCATED, run_llm_step
from jobs.pipeline.results import record_in_flight
from jobs.storage.delta import get_storage
from udfs import llm_udf as llm_udf_module
from tests.jobs.pipeline.test_spool import TEST_CALL, _key, make_cfg, questions  # noqa: F401 - _key is an autouse fixture

pytest_plugins = ["tests.fake_llm_fixture"]


@pytest.mark.slow
def test_a_call_cut_at_max_tokens_too_often_is_named_with_the_setting_to_raise(spark, fake_llm, tmp_path, capsys):
    cfg = make_cfg(tmp_path, fake_llm.url)
    fake_llm.rate_truncated = 1.0
    result = run_llm_step(questions(spark, 4), TEST_CALL, stage="test", cfg=cfg)
    assert (result.failures, result.truncated) == (4, 4)
    limit = cfg.answers.llm.max_tokens
    err = capsys.readouterr().err
    assert f"4 of 4 answer calls (100.0%) were cut at answers.llm.max_tokens={limit}" in err
    assert f"--set answers.llm.max_tokens={2 * limit}" in err
    failed = get_storage(spark, cfg).read("failed_calls")
    assert failed.filter(failed.error_class == TRUNCATED).count() == 4  # on record for glan status


def test_a_share_within_the_setting_says_nothing(spark, fake_llm, tmp_path, capsys):
    cfg = make_cfg(tmp_path, fake_llm.url)
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, max_truncated_share=1.0))
    fake_llm.rate_truncated = 1.0
    run_llm_step(questions(spark, 2), TEST_CALL, stage="test", cfg=cfg)
    assert "were cut at" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_retried_call_draws_with_a_new_seed_recorded_on_its_row(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)  # llm.send_seed is true by default
    todo = questions(spark, 3)
    fake_llm.rate_truncated = 1.0
    run_llm_step(todo, TEST_CALL, stage="test", cfg=cfg)
    first = {r.text: r.body["seed"] for r in fake_llm.requests}
    run_llm_step(todo, TEST_CALL, stage="test", cfg=cfg)  # the next run asks the failed rows again
    rerun = {r.text: r.body["seed"] for r in fake_llm.requests[3:]}
    assert len(first) == len(rerun) == 3
    assert all(rerun[text] != first[text] for text in first)  # each row drew anew
    fake_llm.rate_truncated = 0.0
    run_llm_step(todo, TEST_CALL, stage="test", cfg=cfg)
    third = {r.text: r.body["seed"] for r in fake_llm.requests[6:]}
    assert len(set(third.values()) | set(rerun.values()) | set(first.values())) == 9
    failed = get_storage(spark, cfg).read("failed_calls").collect()
    assert sorted(r["seed"] for r in failed) == sorted([*first.values(), *rerun.values()])  # recorded per call


def test_a_first_call_gets_the_same_seed_on_every_run(spark, fake_llm, tmp_path):
    seeds = []
    for run in ("a", "b"):
        cfg = make_cfg(tmp_path / run, fake_llm.url)
        fake_llm.reset()
        run_llm_step(questions(spark, 2), TEST_CALL, stage="test", cfg=cfg)
        seeds.append(sorted(r.body["seed"] for r in fake_llm.requests))
    assert seeds[0] == seeds[1]


def test_a_call_lost_in_flight_is_asked_again_with_its_first_seed(spark, fake_llm, tmp_path):
    # A kill loses the calls in flight; they are on record (paid, maybe) but no answer was seen, so
    # the resumed run draws them exactly as an uninterrupted run would: the same rows either way.
    todo = questions(spark, 2)
    reference = make_cfg(tmp_path / "reference", fake_llm.url)
    run_llm_step(todo, TEST_CALL, stage="test", cfg=reference)
    first = sorted(r.body["seed"] for r in fake_llm.requests)
    cfg = make_cfg(tmp_path / "killed", fake_llm.url)
    lost = pa.table({"row_key": ["q00", "q01"], "model": ["m", "m"], "prompt_name": ["answer"] * 2,
                     "prompt_version": ["v"] * 2, "prompt_tokens": [10, 10], "_intent": ["i0", "i1"]})
    record_in_flight(spark, lost, "test", cfg.answers.llm, cfg)
    fake_llm.reset()
    run_llm_step(todo, TEST_CALL, stage="test", cfg=cfg)
    assert sorted(r.body["seed"] for r in fake_llm.requests) == first
    assert get_storage(spark, cfg).read("failed_calls").count() == 2  # still on record for glan cost


@pytest.mark.slow
def test_a_step_with_a_budget_leases_it_from_one_coordinator_for_all_its_chunks(spark, fake_llm, tmp_path,
                                                                                  monkeypatch):
    started = []

    class Recorded(llm_udf_module.RateCoordinator):
        def start(self):
            started.append(self)
            return super().start()

    monkeypatch.setattr(llm_udf_module, "RateCoordinator", Recorded)
    cfg = make_cfg(tmp_path, fake_llm.url)
    cfg = replace(cfg, llm=replace(cfg.llm, requests_per_minute=6000),
                  pipeline=replace(cfg.pipeline, commit_every_rows=3))
    result = run_llm_step(questions(spark, 6), TEST_CALL, stage="test", cfg=cfg)
    assert result.rows_written == 6
    (coordinator,) = started  # one for the step, across its chunks
    stats = coordinator.stats()
    assert stats["granted_requests"] - stats.get("returned_requests", 0) == fake_llm.count() == 6
    assert stats["clients"] == 0  # every task said bye
    with pytest.raises(OSError):  # stopped once the step ended
        socket.create_connection(("127.0.0.1", coordinator.port), timeout=1).close()
