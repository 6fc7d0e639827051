"""`glan status` per discipline, and `table_health`: what the Delta log says against the files there are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.config.loader import load_config
from jobs.pipeline.runner import run_pipeline
from jobs.cli.status import main as status_main
from jobs.cli.status import stage_status
from jobs.cli.tables import table_health
from jobs.storage.delta import append_missing, get_storage
from tests.taxonomies import TWO_DISCIPLINES

pytest_plugins = ["tests.fake_llm_fixture"]


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("GLAN_TEST_KEY", "sk-test-key")


@pytest.mark.slow
def test_status_of_some_disciplines_counts_only_their_rows_failures_tokens_and_cost(spark, fake_llm, tmp_path, capsys):
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(TWO_DISCIPLINES)
    sets = [f"run_root={tmp_path / 'run'}", "storage.backend=embedded", f"taxonomy.file={taxonomy}",
            "llm.endpoint=openai", f"llm.base_url={fake_llm.url}", "llm.api_key_env=GLAN_TEST_KEY",
            "llm.max_attempts=1", "subjects.samples_per_discipline=2", "subjects.max_subjects_per_sample=2"]
    cfg = load_config([], sets)
    fake_llm.add_rule(kind="subjects_convert", contains="Logic", empty_lists=True)
    fake_llm.add_rule(kind="repair", text="this is not JSON {{{")  # Logic's two conversions fail, paid
    assert run_pipeline(cfg, stages=["taxonomy", "subjects"]) == 3  # exit 3: calls failed

    every = {r["stage"]: r for r in stage_status(spark, cfg)}
    maths = {r["stage"]: r for r in stage_status(spark, cfg, ["Mathematics"])}
    logic = {r["stage"]: r for r in stage_status(spark, cfg, ["Logic"])}
    assert (every["subjects"]["done"], maths["subjects"]["done"], logic["subjects"]["done"]) == (2, 2, 0)
    assert (every["subjects"]["failures"], maths["subjects"]["failures"], logic["subjects"]["failures"]) == (2, 0, 2)
    assert (maths["subjects"]["to_do"], logic["subjects"]["to_do"]) == (0, 2)
    assert maths["taxonomy"]["done"] == logic["taxonomy"]["done"] == 1
    # Logic's tokens are its lists and its failed conversions and repairs (failed_calls, matched by key).
    assert 0 < maths["subjects"]["tokens"] and 0 < logic["subjects"]["tokens"]
    assert maths["subjects"]["tokens"] + logic["subjects"]["tokens"] == every["subjects"]["tokens"]
    served = fake_llm.stats()["tokens"]
    assert every["subjects"]["tokens"] == served["prompt"] + served["completion"]
    assert maths["subjects"]["usd"] + logic["subjects"]["usd"] == pytest.approx(every["subjects"]["usd"], abs=1e-3)  # rounded per row

    capsys.readouterr()
    assert status_main([*[a for s in sets for a in ("--set", s)], "--disciplines", "Logic", "--format", "json"]) == 0
    printed = {row["stage"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert printed["subjects"]["tokens"] == logic["subjects"]["tokens"]
    assert printed["subjects"]["failures"] == 2
    # taxonomy.disciplines in the config limits it the same way.
    limited = load_config([], [*sets, "taxonomy.disciplines=[Mathematics]"])
    assert {r["stage"]: r for r in stage_status(spark, limited)}["subjects"]["tokens"] == maths["subjects"]["tokens"]


def test_table_health_counts_rows_from_the_log_and_files_that_are_gone(spark, tmp_path):
    cfg = load_config([], [f"run_root={tmp_path / 'run'}", "storage.backend=embedded"])
    for start in (0, 3):
        rows = [(f"id{i}", f"x{i}") for i in range(start, start + 3)]
        append_missing(spark.createDataFrame(rows, "item_id string, text string"), "items", "item_id", cfg)
    storage = get_storage(spark, cfg)
    assert table_health(storage, "items") == (6, 0)
    data = sorted(Path(storage.uri("items")).glob("*.parquet"))
    data[0].unlink()
    assert table_health(storage, "items") == (6, 1)  # the log still counts the rows of the deleted file
