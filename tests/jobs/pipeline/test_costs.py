"""Pricing recorded usage and estimating a run before it starts."""

from __future__ import annotations

import pytest

from jobs.config.loader import load_config
from jobs.pipeline.costs import estimate, usage_by_stage
from jobs.errors import ConfigError
from jobs.pipeline.prices import Price, load_prices, planned_cost, price_for, priced
from jobs.storage.delta import get_storage
from jobs.storage.tables import ANSWERS, FAILED_CALLS


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


def test_estimate_prices_each_call_in_its_configured_mode():
    prices, assumptions = load_prices()
    cfg = load_config([], ["taxonomy.disciplines=[Mathematics]", "llm.endpoint=openai", "answers.llm.mode=batch"])
    rows = {r["call"]: r for r in estimate(cfg, assumptions, prices)}
    assert (rows["answer"]["mode"], rows["question"]["mode"]) == ("batch", "online")
    assert rows["answer"]["usd"] == rows["answer"]["usd_batch"] < rows["answer"]["usd_online"]
    assert rows["question"]["usd"] == rows["question"]["usd_online"] > rows["question"]["usd_batch"]
    everything = load_config([], ["taxonomy.disciplines=[Mathematics]", "llm.endpoint=openai", "llm.mode=batch"])
    assert {r["mode"] for r in estimate(everything, assumptions, prices)} == {"batch"}
    embedded = load_config([], ["taxonomy.disciplines=[Mathematics]", "llm.endpoint=embedded", "llm.mode=batch"])
    assert {r["mode"] for r in estimate(embedded, assumptions, prices)} == {"online"}  # no Batch API there


USAGE_SETS = ["storage.backend=embedded", "llm.endpoint=openai"]


def write_billed_usage(spark, cfg) -> None:
    """Answers billed batch (2), online (1) and before batch mode (null billing, 1), and a failed
    batch call: 1M prompt and 1M completion tokens each, on gpt-4o-mini."""
    usage = {"model": "gpt-4o-mini", "prompt_tokens": 1_000_000, "cached_tokens": 0, "completion_tokens": 1_000_000}

    def frame(spec, rows):
        return spark.createDataFrame([tuple({**usage, **row}.get(f.name) for f in spec.schema.fields) for row in rows],
                                     spec.schema)

    answers = [{"answer_id": f"a{i}", "discipline_id": "d0", "billing": billing, "batch_id": batch}
               for i, (billing, batch) in enumerate([("batch", "b1"), ("batch", "b1"), ("online", None), (None, None)])]
    storage = get_storage(spark, cfg)
    storage.append_missing(frame(ANSWERS, answers), "answers", "answer_id")
    storage.append_missing(frame(FAILED_CALLS, [{"call_id": "c0", "stage": "answers", "row_key": "a9",
                                                 "error_class": "truncated", "billing": "batch"}]),
                           "failed_calls", "call_id")


def test_usage_is_counted_apart_by_the_price_it_was_billed_at(spark, tmp_path):
    cfg = load_config([], [f"run_root={tmp_path}", *USAGE_SETS])
    write_billed_usage(spark, cfg)
    rows = {(u["table"], u["billing"]): u for u in usage_by_stage(spark, cfg)}
    assert {key: u["calls"] for key, u in rows.items()} == {
        ("answers", "batch"): 2, ("answers", "online"): 2, ("failed_calls", "batch"): 1}
    prices, _ = load_prices()
    billed = {(u["table"], u["billing"]): u for u in priced(list(rows.values()), prices)}
    assert billed["answers", "batch"]["usd"] == pytest.approx(2 * (0.075 + 0.30))
    assert billed["answers", "batch"]["usd_online"] == billed["answers", "online"]["usd"] == pytest.approx(2 * 0.75)
