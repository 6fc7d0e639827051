"""The spending guard (pipeline.max_usd): a stage whose estimate would pass it never starts, and a
running step stops asking once what it spent reaches it; both counted at the test server."""

from __future__ import annotations

from dataclasses import replace

import pytest

from jobs.errors import EXIT_OVER_BUDGET, BudgetError
from jobs.pipeline.llmstep import run_llm_step
from jobs.pipeline.prices import Budget, Price, load_prices, planned_cost, priced, spent_usd
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


MINI = Price(0.15, 0.075, 0.60, batch=Price(0.075, 0.075, 0.30))


def usage(billing: str | None, model: str = "gpt-4o-mini") -> dict:
    return {"stage": "answers", "table": "answers", "model": model, "billing": billing, "calls": 10,
            "prompt_tokens": 1_000_000, "cached_tokens": 200_000, "completion_tokens": 1_000_000}


def test_usage_billed_batch_is_priced_at_the_batch_price_and_online_beside_it():
    prices = {"gpt-4o-mini": MINI, "mixtral": Price(0.7, 0.7, 0.7)}
    batch, online, old, no_batch_price = priced(
        [usage("batch"), usage("online"), usage(None), usage("batch", model="mixtral")], prices)
    # 800k uncached + 200k cached (no cache discount in batch) + 1M completion, per million
    assert batch["usd"] == pytest.approx(0.8 * 0.075 + 0.2 * 0.075 + 0.30)
    assert batch["usd_online"] == online["usd"] == online["usd_online"] == pytest.approx(0.8 * 0.15 + 0.2 * 0.075 + 0.6)
    assert (old["billing"], old["usd"]) == ("online", online["usd"])  # null billing: a table older than batch mode
    assert no_batch_price["usd"] == no_batch_price["usd_online"] == pytest.approx(1.4)  # no batch price: online
    assert spent_usd([usage("batch"), usage("online")], prices) == pytest.approx(batch["usd"] + online["usd"])


def test_the_budget_charges_batch_calls_at_the_batch_price():
    budget = Budget(10.0, 1.0, {"gpt-4o-mini": MINI}, {})
    budget.charge("gpt-4o-mini", 1_000_000, 0, 1_000_000, "batch")
    assert budget.spent_usd == pytest.approx(1.0 + 0.075 + 0.30)
    budget.charge("gpt-4o-mini", 1_000_000, 0, 1_000_000)  # online by default
    assert budget.spent_usd == pytest.approx(1.0 + 0.375 + 0.75)
    budget.charge("gpt-4o-mini", 1_000_000, 0, 0, None)  # a result without billing: online
    assert budget.spent_usd == pytest.approx(1.0 + 0.375 + 0.75 + 0.15)


def test_a_planned_call_in_batch_mode_costs_its_batch_price():
    prices, assumptions = load_prices()
    online = planned_cost("answer", "gpt-4o-mini", 1000, assumptions, prices)
    batch = planned_cost("answer", "gpt-4o-mini", 1000, assumptions, prices, "batch")
    assert (online["mode"], batch["mode"]) == ("online", "batch")
    assert online["usd"] == online["usd_online"] == batch["usd_online"]
    assert batch["usd"] == batch["usd_batch"] == online["usd_batch"] < online["usd"]
    mixtral = planned_cost("answer", "mixtral-8x7b", 1000, assumptions, prices, "batch")
    assert mixtral["usd"] == mixtral["usd_online"] and mixtral["usd_batch"] is None  # no Batch API price: online
