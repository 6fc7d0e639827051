"""The spending guard (pipeline.max_usd): a stage whose estimate would pass it never starts, and a
running step stops asking once what it spent reaches it; both counted at the test server."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jobs.errors import EXIT_OVER_BUDGET, BudgetError
from jobs.pipeline.llmstep import run_llm_step
from jobs.pipeline.prices import Budget, Price, load_prices, planned_cost
from jobs.pipeline.runner import run_pipeline
from jobs.storage.delta import get_storage
from tests.jobs.pipeline.test_spool import TEST_CALL, _key, make_cfg, questions  # noqa: F401 - _key is an autouse fixture

pytest_plugins = ["tests.fake_llm_fixture"]


def test_a_stage_over_the_limit_stops_before_its_first_call(spark, fake_llm, tmp_path, capsys):
    cfg = make_cfg(tmp_path, fake_llm.url)
    cfg = replace(cfg, taxonomy=replace(cfg.taxonomy, disciplines=("Mathematics",)),
                  pipeline=replace(cfg.pipeline, max_usd=0.05))
    assert run_pipeline(cfg, stages=["taxonomy"]) == 0
    with pytest.raises(BudgetError, match=r"stage subjects would make 20 LLM call\(s\) estimated at \$0\.\d\d") as err:
        run_pipeline(cfg, stages=["subjects"])
    assert "pipeline.max_usd=0.05" in str(err.value) and "--set pipeline.max_usd=" in str(err.value)
    assert err.value.exit_code == EXIT_OVER_BUDGET
    assert fake_llm.count() == 0  # nothing was asked
    assert not get_storage(spark, cfg).exists("subject_lists")
    assert "[subjects] to ask: 20 call(s) (subjects_list 10, subjects_convert 10)" in capsys.readouterr().err


def test_a_running_step_stops_asking_once_its_spend_reaches_the_limit(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    cfg = replace(cfg, pipeline=replace(cfg.pipeline, commit_every_rows=2))
    model = cfg.answers.llm.model
    # One dollar per output token: the first chunk of two calls passes any limit of a few dollars.
    budget = Budget(3.0, 0.0, {model: Price(0.0, 0.0, 1e6)}, {})
    with pytest.raises(BudgetError, match=r"reached pipeline.max_usd=3"):
        run_llm_step(questions(spark, 10), TEST_CALL, stage="test", cfg=cfg, budget=budget)
    asked = fake_llm.count()
    assert 0 < asked < 10  # the first chunk asked, then the guard
    assert get_storage(spark, cfg).read("t_answers").count() == asked  # and committed, not lost
    assert budget.spent_usd >= 3.0


def test_planned_cost_uses_the_assumed_tokens_and_the_price():
    prices, assumptions = load_prices()
    row = planned_cost("answer", "gpt-4o-mini", 1000, assumptions, prices)
    tokens = assumptions["tokens"]["answer"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (1000 * tokens["prompt"], 1000 * tokens["completion"])
    assert row["usd"] == round((1000 * tokens["prompt"] * 0.15 + 1000 * tokens["completion"] * 0.60) / 1e6, 2)
    assert planned_cost("answer", "no-such-model", 5, assumptions, prices)["usd"] is None
