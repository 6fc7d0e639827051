"""`glan cost`: tokens and money by stage and model, from the usage every LLM output row records,
priced with `conf/prices.yaml`. `--estimate` projects calls, tokens and money from the config before
anything is spent. Where calls are counted (committed, failed, spooled, in flight): see
jobs/pipeline/costs.py. `--disciplines` limits every figure to some disciplines.
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
        columns = ["stage", "call", "model", "calls", "prompt_tokens", "cached_tokens", "completion_tokens", "usd",
                   "usd_batch"]
    else:
        spark = spark_for(cfg, "glan-cost")
        scope = discipline_scope(spark, cfg, split_names(args.disciplines), declared)
        rows = priced(usage_by_stage(spark, cfg, scope, declared=declared), prices)
        columns = ["stage", "table", "model", "calls", "prompt_tokens", "cached_tokens", "completion_tokens", "usd"]
    total = {c: "" for c in columns}
    total.update(stage="TOTAL", calls=sum(r["calls"] for r in rows),
                 prompt_tokens=sum(r["prompt_tokens"] for r in rows),
                 cached_tokens=sum(r["cached_tokens"] for r in rows),
                 completion_tokens=sum(r["completion_tokens"] for r in rows))
    known = [r["usd"] for r in rows if r["usd"] is not None]
    total["usd"] = round(math.fsum(known), 2) if rows else 0.0
    if "usd_batch" in columns:
        total["usd_batch"] = _batch_total(rows)
    unpriced = sorted({r["model"] for r in rows if r["usd"] is None and r["model"]})
    print_rows(columns, [[r[c] for c in columns] for r in rows + [total]], args.format, max_width=40)
    if unpriced:
        print(f"no price for model(s) {', '.join(unpriced)}: add them to conf/prices.yaml", file=sys.stderr)
    if any("in flight" in str(r.get("table")) for r in rows):
        print(IN_FLIGHT_NOTE, file=sys.stderr)
    if "usd_batch" in columns and total["usd"]:
        print(f"usd_batch: the same calls at the models' Batch API prices (conf/prices.yaml), where a model has "
              f"them, else online: {total['usd_batch'] / total['usd']:.0%} of the online estimate; the batch mode "
              "that pays them is issue 15's, not built yet", file=sys.stderr)
    return 0


def _batch_total(rows: list[dict]) -> float:
    """The estimate's total with every call at its batch price where there is one, else online."""
    return round(math.fsum((r["usd_batch"] if r["usd_batch"] is not None else r["usd"]) or 0.0 for r in rows), 2)
