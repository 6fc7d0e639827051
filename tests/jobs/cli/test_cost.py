"""`glan cost` and `glan cost --estimate`: the price each row was paid at (billing, mode), and what
batch mode saved against online prices."""

from __future__ import annotations

import json

import pytest

from jobs.cli.cost import main as cost_main
from jobs.config.loader import load_config
from tests.jobs.pipeline.test_costs import USAGE_SETS, write_billed_usage


def sets(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def test_cost_shows_each_rows_billing_and_what_batch_saved(spark, tmp_path, capsys):
    cfg = load_config([], [f"run_root={tmp_path}", *USAGE_SETS])
    write_billed_usage(spark, cfg)
    capsys.readouterr()
    assert cost_main([*sets(f"run_root={tmp_path}", *USAGE_SETS), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    printed = [json.loads(line) for line in out.splitlines()]
    rows = {(r["table"], r["billing"]): r for r in printed if r["stage"] != "TOTAL"}
    assert rows["answers", "batch"]["usd"] == pytest.approx(rows["answers", "batch"]["usd_online"] / 2)
    assert rows["answers", "online"]["usd"] == rows["answers", "online"]["usd_online"]
    assert rows["failed_calls", "batch"]["calls"] == 1
    total = printed[-1]
    assert (total["stage"], total["usd_online"]) == ("TOTAL", 3.75)  # 5 calls at $0.75 online
    assert total["usd"] == pytest.approx(3.75 - 3 * 0.375, abs=0.01)  # 3 of them billed batch, half price
    saved = round(total["usd_online"] - total["usd"], 2)
    assert err.splitlines()[-1] == (f"total ${total['usd']:,.2f} as billed, $3.75 at online prices: batch saved "
                                    f"${saved:,.2f} ({saved / 3.75:.0%}) against online prices")


def test_estimate_shows_each_calls_mode_and_what_batch_would_save(capsys):
    base = ("taxonomy.disciplines=[Mathematics]", "llm.endpoint=openai")
    assert cost_main(["--estimate", *sets(*base)]) == 0
    assert capsys.readouterr().err.splitlines()[-1].endswith("every call at online prices "
                                                              "(usd_batch: the same calls in batch mode)")
    assert cost_main(["--estimate", *sets(*base, "answers.llm.mode=batch"), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    printed = [json.loads(line) for line in out.splitlines()]
    answer = next(r for r in printed if r["call"] == "answer")
    assert (answer["mode"], answer["usd"]) == ("batch", answer["usd_batch"])
    assert {r["mode"] for r in printed if r["stage"] != "TOTAL"} == {"online", "batch"}
    total = printed[-1]
    saved = round(total["usd_online"] - total["usd"], 2)
    assert saved == pytest.approx(answer["usd_online"] - answer["usd_batch"], abs=0.01)
    online = total["usd_online"]
    assert err.splitlines()[-1] == (f"total ${total['usd']:,.2f} in the configured modes, ${online:,.2f} at online "
                                    f"prices: batch would save ${saved:,.2f} ({saved / online:.0%}) against online prices")
