"""`glan cost`: tokens and money by stage and model, from the usage every LLM output row records,
priced with `conf/prices.yaml`. `--estimate` projects calls, tokens and money from the config before
anything is spent. Where calls are counted (committed, failed, spooled, in flight): see
jobs/pipeline/costs.py. `--disciplines` limits every figure to some disciplines. Each row says the
price its calls were paid at (`billing`; `--estimate`: the call's `mode`), online or batch (the
provider's Batch API); `usd_online` prices the same tokens online, and the last line (on stderr)
says what batch saved against that.
"""

from __future__ import annotations

import argparse
import math
import sys

from jobs.cli.args import add_config_args, config_from_args
from jobs.cli.output import print_rows, spark_for
from jobs.pipeline.costs import IN_FLIGHT_NOTE, discipline_scope, estimate, usage_by_stage
from jobs.pipeline.prices import load_prices, priced
from jobs.pipeline.slices import split_names
from jobs.pipeline.stage import stages


def main(argv: list[str] | None = None) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="glan cost", description=__doc__.splitlines()[0]))
    parser.add_argument("--estimate", action="store_true", help="project a full run from the config; spends nothing")
    parser.add_argument("--prices", default="prices.yaml", help="price table (default: conf/prices.yaml)")
    parser.add_argument("--disciplines", default=None, metavar="A,B",
                        help="only these disciplines (names, comma-separated; default: taxonomy.disciplines, else all)")
    parser.add_argument("--format", choices=["text", "csv", "json"], default="text")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    prices, assumptions = load_prices(args.prices)
    declared = stages()
    if args.estimate:
        rows = estimate(cfg, assumptions, prices, declared)
        columns = ["stage", "call", "model", "mode", "calls", "prompt_tokens", "cached_tokens", "completion_tokens",
                   "usd", "usd_online", "usd_batch"]
    else:
        spark = spark_for(cfg, "glan-cost")
        scope = discipline_scope(spark, cfg, split_names(args.disciplines), declared)
        rows = priced(usage_by_stage(spark, cfg, scope, declared=declared), prices)
        columns = ["stage", "table", "model", "billing", "calls", "prompt_tokens", "cached_tokens",
                   "completion_tokens", "usd", "usd_online"]
    total = {c: "" for c in columns}
    total.update(stage="TOTAL", calls=sum(r["calls"] for r in rows),
                 prompt_tokens=sum(r["prompt_tokens"] for r in rows),
                 cached_tokens=sum(r["cached_tokens"] for r in rows),
                 completion_tokens=sum(r["completion_tokens"] for r in rows),
                 usd=_usd_total(rows, "usd"), usd_online=_usd_total(rows, "usd_online"))
    if "usd_batch" in columns:
        total["usd_batch"] = _batch_total(rows)
    unpriced = sorted({r["model"] for r in rows if r["usd"] is None and r["model"]})
    print_rows(columns, [[r[c] for c in columns] for r in rows + [total]], args.format, max_width=40)
    if unpriced:
        print(f"no price for model(s) {', '.join(unpriced)}: add them to conf/prices.yaml", file=sys.stderr)
    if any("in flight" in str(r.get("table")) for r in rows):
        print(IN_FLIGHT_NOTE, file=sys.stderr)
    if "usd_batch" in columns and total["usd_online"]:
        print("usd: each call at its mode's prices (llm.mode, <stage>.llm.mode); usd_batch: every call at its model's "
              f"Batch API prices where it has them, {total['usd_batch'] / total['usd_online']:.0%} of usd_online",
              file=sys.stderr)
    if rows:
        print(_saving_line(total["usd"], total["usd_online"], planned=args.estimate), file=sys.stderr)
    return 0


def _saving_line(usd: float, usd_online: float, planned: bool) -> str:
    """The total, what the same calls cost at online prices, and what batch mode saves of that."""
    saved = round(usd_online - usd, 2)
    if saved <= 0:
        return f"total ${usd:,.2f}, every call {'at' if planned else 'billed at'} online prices" + (
            " (usd_batch: the same calls in batch mode)" if planned else "")
    paid, saving = ("in the configured modes", "would save") if planned else ("as billed", "saved")
    return (f"total ${usd:,.2f} {paid}, ${usd_online:,.2f} at online prices: batch {saving} ${saved:,.2f} "
            f"({saved / usd_online:.0%}) against online prices")


def _usd_total(rows: list[dict], column: str) -> float:
    """The sum of a money column over the rows with a price (a model without one adds nothing)."""
    return round(math.fsum(r[column] for r in rows if r[column] is not None), 2)


def _batch_total(rows: list[dict]) -> float:
    """The estimate's total with every call at its batch price where there is one, else online."""
    return round(math.fsum((r["usd_batch"] if r["usd_batch"] is not None else r["usd_online"]) or 0.0
                           for r in rows), 2)
