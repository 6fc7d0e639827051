"""`glan cost`: tokens and money by stage and model, from the usage every LLM output row records,
priced with `conf/prices.yaml`. `--estimate` projects calls, tokens and money from the config before
anything is spent.

Calls are counted where their usage is: the committed rows (`table` = the output table), calls that
failed (`failed_calls`), results a run paid for and spooled but has not committed (`spool`), and
calls that were sent but whose answers never came back because their run or task died (`in flight`,
from the intents in the spool, or once the next run has recorded them, `failed_calls (in flight)`):
possibly paid, with estimated prompt tokens and no completion tokens. `--disciplines` limits every
figure to some disciplines.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import yaml
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.common.config import GlanConfig, find_conf_file
from jobs.common.errors import ConfigError
from jobs.common.jobargs import add_config_args, config_from_args
from jobs.common.spool import IN_FLIGHT, SpoolState, spool_state
from jobs.common.tables import LLM_TABLES

IN_FLIGHT_NOTE = ("in flight: calls sent when their run or task died, whose answers never came back; possibly "
                  "paid. Their prompt tokens are estimates (about 4 characters a token), completion tokens unknown.")


@dataclass(frozen=True)
class Price:
    input: float
    cached_input: float
    output: float

    def cost(self, prompt: int, cached: int, completion: int) -> float:
        return ((prompt - cached) * self.input + cached * self.cached_input + completion * self.output) / 1e6


def load_prices(path: str = "prices.yaml") -> tuple[dict[str, Price], dict[str, Any]]:
    source = find_conf_file(path)
    data = yaml.safe_load(source.read_text()) or {}
    prices = {}
    for model, values in (data.get("models") or {}).items():
        try:
            prices[model] = Price(float(values["input"]), float(values.get("cached_input", values["input"])),
                                  float(values["output"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{path}: models.{model} needs numbers input, output (and cached_input)") from None
    return prices, data.get("estimate") or {}


def price_for(prices: dict[str, Price], model: str | None) -> Price | None:
    """Exact name first, then the longest configured name the model starts with
    (`gpt-4o-2024-08-06` is priced as `gpt-4o`)."""
    if model is None:
        return None
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name)]
    return prices[max(matches, key=len)] if matches else None


@dataclass(frozen=True)
class Scope:
    """The disciplines figures are limited to: their ids, and the (stage, row_key) of their calls
    (`failures` and `failed_calls` carry only the key of a call, not its discipline)."""

    ids: list[str]
    calls: DataFrame


def discipline_scope(spark, cfg: GlanConfig, names: Sequence[str] | None) -> Scope | None:
    """`names`, else taxonomy.disciplines; None when neither is set (then every row counts, also rows
    of disciplines no longer in the taxonomy)."""
    from jobs.common.llmstage import selected_disciplines, stable_id
    from jobs.common.storage import get_storage
    from jobs.subjects import list_requests

    if not (names or cfg.taxonomy.disciplines):
        return None
    chosen = selected_disciplines(spark, cfg, names)
    ids = [r["discipline_id"] for r in chosen.select("discipline_id").collect()]
    read = get_storage(spark, cfg).read_or_empty

    def mine(name: str) -> DataFrame:
        return read(name).filter(F.col("discipline_id").isin(ids))

    # Each stage's call key, derived as the stage derives it from the rows it reads.
    keys = [
        ("subjects", list_requests(chosen, cfg.subjects.samples_per_discipline).select("list_id")),
        ("syllabus", mine("subjects").select(stable_id("subject_id"))),
        ("questions", mine("concept_combinations").select(stable_id("combination_id", F.lit(0)))),
        ("answers", mine("questions").select("question_id")),
    ]
    calls = reduce(DataFrame.unionByName, [
        frame.select(F.lit(stage).alias("stage"), F.col(frame.columns[0]).cast("string").alias("row_key"))
        for stage, frame in keys])
    return Scope(ids, calls)


def usage_by_stage(spark, cfg: GlanConfig, scope: Scope | None = None,
                   spool: SpoolState | None = None) -> list[dict[str, Any]]:
    """One row per (stage, table, model): calls and token sums, of every call paid for or possibly
    paid (see the module's doc), limited to `scope` when given. `spool`: its state, when already read."""
    from jobs.common.storage import get_storage

    storage = get_storage(spark, cfg)
    rows = []
    for stage, tables in LLM_TABLES.items():
        for name in tables:
            if not storage.exists(name):
                continue
            frame = storage.read(name)
            if scope is not None:
                frame = frame.filter(F.col("discipline_id").isin(scope.ids))
            for r in _usage_sums(frame, "model"):
                rows.append({"stage": stage, "table": name, **r.asDict()})
    if storage.exists("failed_calls"):  # calls that failed were paid for too
        frame = storage.read("failed_calls")
        if scope is not None:
            frame = frame.join(scope.calls, ["stage", "row_key"], "left_semi")
        table = F.when(F.col("error_class") == IN_FLIGHT, "failed_calls (in flight)").otherwise("failed_calls")
        for r in _usage_sums(frame.withColumn("table", table), "stage", "table", "model"):
            rows.append(r.asDict())
    if spool is None:
        spool = spool_state(cfg, None if scope is None else scope.ids)
    rows.extend({**row, "table": {"spooled": "spool", "in flight": "spool (in flight)"}[row["table"]]}
                for row in spool.usage)
    return rows


def _usage_sums(frame, *by: str) -> list:
    return frame.groupBy(*by).agg(
        F.count("*").alias("calls"),
        F.coalesce(F.sum("prompt_tokens"), F.lit(0)).alias("prompt_tokens"),
        F.coalesce(F.sum("cached_tokens"), F.lit(0)).alias("cached_tokens"),
        F.coalesce(F.sum("completion_tokens"), F.lit(0)).alias("completion_tokens"),
    ).collect()


def priced(rows: list[dict[str, Any]], prices: dict[str, Price]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        price = price_for(prices, row["model"])
        cost = price.cost(row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) if price else None
        out.append({**row, "usd": None if cost is None else round(cost, 4)})
    return out


def estimate(cfg: GlanConfig, assumptions: dict[str, Any], prices: dict[str, Price]) -> list[dict[str, Any]]:
    """Calls, tokens and money of a full run of the configured slice, before anything is spent."""
    from jobs.common.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(cfg.taxonomy.path())
    if cfg.taxonomy.disciplines:
        taxonomy = taxonomy.select(cfg.taxonomy.disciplines)
    disciplines = len(taxonomy.disciplines())
    samples = cfg.subjects.samples_per_discipline
    subjects = min(int(assumptions.get("unique_subjects_per_discipline", 150)),
                   samples * cfg.subjects.max_subjects_per_sample) * disciplines
    questions = subjects * cfg.combinations.questions_per_syllabus
    plan = [
        ("subjects", "subjects_list", cfg.subjects.llm.model, disciplines * samples),
        ("subjects", "subjects_convert", cfg.subjects.convert_llm.model, disciplines * samples),
        ("syllabus", "syllabus", cfg.syllabus.llm.model, subjects),
        ("syllabus", "syllabus_extract", cfg.syllabus.extract_llm.model, subjects),
        ("questions", "question", cfg.questions.llm.model, questions),
        ("answers", "answer", cfg.answers.llm.model, questions),
    ]
    tokens = assumptions.get("tokens") or {}
    cached_share = assumptions.get("cached_share") or {}
    rows = []
    for stage, call, model, calls in plan:
        per_call = tokens.get(call) or {"prompt": 0, "completion": 0}
        prompt = calls * int(per_call.get("prompt", 0))
        completion = calls * int(per_call.get("completion", 0))
        cached = int(prompt * float(cached_share.get(call, 0.0)))
        price = price_for(prices, model)
        cost = price.cost(prompt, cached, completion) if price else None
        rows.append({"stage": stage, "call": call, "model": model, "calls": calls, "prompt_tokens": prompt,
                     "cached_tokens": cached, "completion_tokens": completion,
                     "usd": None if cost is None else round(cost, 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from jobs.common.cli import print_rows

    parser = add_config_args(argparse.ArgumentParser(prog="glan cost", description=__doc__.splitlines()[0]))
    parser.add_argument("--estimate", action="store_true", help="project a full run from the config; spends nothing")
    parser.add_argument("--prices", default="prices.yaml", help="price table (default: conf/prices.yaml)")
    parser.add_argument("--disciplines", default=None, metavar="A,B",
                        help="only these disciplines (names, comma-separated; default: taxonomy.disciplines, else all)")
    parser.add_argument("--format", choices=["text", "csv", "json"], default="text")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    prices, assumptions = load_prices(args.prices)
    if args.estimate:
        rows = estimate(cfg, assumptions, prices)
        columns = ["stage", "call", "model", "calls", "prompt_tokens", "cached_tokens", "completion_tokens", "usd"]
    else:
        from jobs.common.cli import _spark_for

        spark = _spark_for(cfg, "glan-cost")
        rows = priced(usage_by_stage(spark, cfg, discipline_scope(spark, cfg, split_names(args.disciplines))), prices)
        columns = ["stage", "table", "model", "calls", "prompt_tokens", "cached_tokens", "completion_tokens", "usd"]
    total = {c: "" for c in columns}
    total.update(stage="TOTAL", calls=sum(r["calls"] for r in rows),
                 prompt_tokens=sum(r["prompt_tokens"] for r in rows),
                 cached_tokens=sum(r["cached_tokens"] for r in rows),
                 completion_tokens=sum(r["completion_tokens"] for r in rows))
    known = [r["usd"] for r in rows if r["usd"] is not None]
    total["usd"] = round(math.fsum(known), 2) if rows else 0.0
    unpriced = sorted({r["model"] for r in rows if r["usd"] is None and r["model"]})
    print_rows(columns, [[r[c] for c in columns] for r in rows + [total]], args.format, max_width=40)
    if unpriced:
        print(f"no price for model(s) {', '.join(unpriced)}: add them to conf/prices.yaml", file=sys.stderr)
    if any("in flight" in str(r.get("table")) for r in rows):
        print(IN_FLIGHT_NOTE, file=sys.stderr)
    return 0


def split_names(text: str | None) -> list[str] | None:
    """`--disciplines "A,B"` as a list of names (None when not given)."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None
