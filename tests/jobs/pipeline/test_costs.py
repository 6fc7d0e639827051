"""Pricing recorded usage and estimating a run before it starts."""

from __future__ import annotations

import pytest

from jobs.config.loader import load_config
from jobs.pipeline.costs import estimate
from jobs.errors import ConfigError
from jobs.pipeline.prices import Price, load_prices, planned_cost, price_for, priced


def test_cost_of_recorded_usage_uses_input_cached_and_output_prices():
    prices = {"gpt-4o": Price(2.5, 1.25, 10.0), "gpt-4o-mini": Price(0.15, 0.075, 0.6)}
    rows = [{"stage": "questions", "table": "questions", "model": "gpt-4o-2024-08-06", "calls": 10,
             "prompt_tokens": 1_000_000, "cached_tokens": 400_000, "completion_tokens": 100_000},
            {"stage": "answers", "table": "answers", "model": "llama-3", "calls": 1,
             "prompt_tokens": 5, "cached_tokens": 0, "completion_tokens": 5}]
    out = priced(rows, prices)
    # 600k uncached x 2.5 + 400k cached x 1.25 + 100k x 10, per million: the dated name prices as gpt-4o
    assert out[0]["usd"] == pytest.approx(1.5 + 0.5 + 1.0)
    assert out[1]["usd"] is None  # an unknown model is not priced as zero
    assert price_for(prices, "gpt-4o-mini-2024") is prices["gpt-4o-mini"]  # longest prefix wins


def test_estimate_follows_the_config_before_anything_is_spent():
    prices, assumptions = load_prices()
    cfg = load_config([], ["taxonomy.disciplines=[Mathematics, Physics]", "combinations.questions_per_syllabus=100"])
    rows = {r["call"]: r for r in estimate(cfg, assumptions, prices)}
    assert rows["subjects_list"]["calls"] == rows["subjects_convert"]["calls"] == 2 * 10
    subjects = 2 * min(assumptions["unique_subjects_per_discipline"], 10 * cfg.subjects.max_subjects_per_sample)
    assert rows["syllabus"]["calls"] == rows["syllabus_extract"]["calls"] == subjects
    assert rows["question"]["calls"] == rows["answer"]["calls"] == subjects * 100
    assert rows["answer"]["model"] == "gpt-4o-mini" and rows["answer"]["usd"] > 0
    question = assumptions["tokens"]["question"]
    assert rows["question"]["cached_tokens"] == int(subjects * 100 * question["prompt"] * 0.9)


def test_batch_prices_are_read_and_price_the_same_calls(tmp_path):
    prices, assumptions = load_prices()
    assert prices["gpt-4o-mini"].batch == Price(0.075, 0.075, 0.30)
    assert prices["mixtral-8x7b"].batch is None  # no Batch API price: no batch figure, not zero
    row = planned_cost("answer", "gpt-4o-mini", 1000, assumptions, prices)
    assert row["usd_batch"] == pytest.approx(row["usd"] / 2, abs=0.01)  # uncached: exactly half, rounded
    assert planned_cost("answer", "mixtral-8x7b", 1000, assumptions, prices)["usd_batch"] is None
    half = tmp_path / "prices.yaml"
    half.write_text("models:\n  m: {input: 1, output: 2, batch_input: 0.5}\n")
    with pytest.raises(ConfigError, match="batch_input and batch_output together"):
        load_prices(str(half))
