"""The LLM step names a call whose outputs were cut at max_tokens too often, with the setting to
raise: truncated outputs are never kept, so a low cap silently drops the longest ones."""

from __future__ import annotations

from dataclasses import replace

from jobs.pipeline.llmstep import TRUNCATED, run_llm_step
from jobs.storage.delta import get_storage
from tests.test_spool import TEST_CALL, _key, make_cfg, questions  # noqa: F401 - _key is an autouse fixture

pytest_plugins = ["tests.fake_llm_fixture"]


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
