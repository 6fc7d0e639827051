"""Tokens and money by stage and model, from the usage every LLM output row records, priced with
`conf/prices.yaml`; and the projection of a full run from the config, before anything is spent
(`glan cost`, `glan cost --estimate`, `glan status`).

Calls are counted where their usage is: the committed rows (`table` = the output table), calls that
failed (`failed_calls`), results a run paid for and spooled but has not committed (`spool`), and
calls that were sent but whose answers never came back because their run or task died (`in flight`,
from the intents in the spool, or once the next run has recorded them, `failed_calls (in flight)`):
possibly paid, with estimated prompt tokens and no completion tokens. `--disciplines` limits every
figure to some disciplines. Usage is counted apart by `billing`, the price its tokens were paid at
(online | batch: the provider's Batch API; null in tables older than batch mode: online).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.config.loader import GlanConfig
from jobs.glan.taxonomy import load_taxonomy
from jobs.pipeline.prices import Price, planned_cost
from jobs.pipeline.slices import selected_disciplines
from jobs.pipeline.spool import IN_FLIGHT, SpoolState, spool_state
from jobs.pipeline.stage import Stage, StageContext, Volume, call_keys, llm_tables, stages
from jobs.storage.delta import get_storage

IN_FLIGHT_NOTE = ("in flight: calls sent when their run or task died, whose answers never came back; possibly "
                  "paid. Their prompt tokens are estimates (about 4 characters a token), completion tokens unknown.")


@dataclass(frozen=True)
class Scope:
    """The disciplines figures are limited to: their ids, and the (stage, row_key) of their calls
    (`failures` and `failed_calls` carry only the key of a call, not its discipline)."""

    ids: list[str]
    calls: DataFrame


def calls_within(frame: DataFrame, scope: Scope | None) -> DataFrame:
    """Rows of `failures` or `failed_calls` (keyed by stage and row_key) of the scope's calls; all
    of them without a scope."""
    return frame if scope is None else frame.join(scope.calls, ["stage", "row_key"], "left_semi")


def discipline_scope(spark, cfg: GlanConfig, names: Sequence[str] | None,
                     declared: Sequence[Stage]) -> Scope | None:
    """`names`, else taxonomy.disciplines; None when neither is set (then every row counts, also rows
    of disciplines no longer in the taxonomy). The call keys are each declared call's rows in the
    slice, derived as the stage derives them."""
    if not (names or cfg.taxonomy.disciplines):
        return None
    ids = [r["discipline_id"] for r in selected_disciplines(spark, cfg, names).select("discipline_id").collect()]
    frames = [call_keys(StageContext(stage.name, spark, cfg, names), stage, todo=False)
              .select(F.lit(stage.name).alias("stage"), "row_key") for stage in declared if stage.calls]
    if not frames:
        return Scope(ids, spark.createDataFrame([], "stage string, row_key string"))
    return Scope(ids, reduce(DataFrame.unionByName, frames))


def usage_by_stage(spark, cfg: GlanConfig, scope: Scope | None = None, spool: SpoolState | None = None,
                   declared: Sequence[Stage] | None = None) -> list[dict[str, Any]]:
    """One row per (stage, table, model, billing): calls and token sums, of every call paid for or
    possibly paid (see the module's doc), limited to `scope` when given. Spooled rows and calls in
    flight count as online (the spool's usage does not say). `spool`: its state, when already
    read; `declared`: the stages (default: every stage in jobs/)."""
    storage = get_storage(spark, cfg)
    rows = []
    for stage, tables in llm_tables(stages() if declared is None else declared).items():
        for name in tables:
            if not storage.exists(name):
                continue
            frame = storage.read(name)
            if scope is not None:
                frame = frame.filter(F.col("discipline_id").isin(scope.ids))
            for r in _usage_sums(frame, "model"):
                rows.append({"stage": stage, "table": name, **r.asDict()})
    if storage.exists("failed_calls"):  # calls that failed were paid for too
        frame = calls_within(storage.read("failed_calls"), scope)
        table = F.when(F.col("error_class") == IN_FLIGHT, "failed_calls (in flight)").otherwise("failed_calls")
        for r in _usage_sums(frame.withColumn("table", table), "stage", "table", "model"):
            rows.append(r.asDict())
    if spool is None:
        spool = spool_state(cfg, None if scope is None else scope.ids)
    rows.extend({**row, "table": {"spooled": "spool", "in flight": "spool (in flight)"}[row["table"]],
                 "billing": row.get("billing") or "online"} for row in spool.usage)
    return rows


def _usage_sums(frame, *by: str) -> list:
    """Calls and token sums by `by` and billing (tables written before batch mode have no `billing`)."""
    billing = F.coalesce(F.col("billing"), F.lit("online")) if "billing" in frame.columns else F.lit("online")
    return frame.withColumn("billing", billing).groupBy(*by, "billing").agg(
        F.count("*").alias("calls"),
        F.coalesce(F.sum("prompt_tokens"), F.lit(0)).alias("prompt_tokens"),
        F.coalesce(F.sum("cached_tokens"), F.lit(0)).alias("cached_tokens"),
        F.coalesce(F.sum("completion_tokens"), F.lit(0)).alias("completion_tokens"),
    ).collect()


def stage_plan(ctx: StageContext, stage: Stage, prices: dict[str, Price],
               assumptions: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls a stage is about to make in its slice, priced at the assumed tokens per call in each
    call's mode (`usd`; see `planned_cost`): each call's rows still to ask, and for a call keyed like
    the one before it, also that one's (their answers become its rows: a subject list to convert, a
    syllabus to extract)."""
    rows, carried, previous_key = [], 0, None
    for call in stage.calls:
        calls = ctx.todo(call).count() + (carried if call.key == previous_key else 0)
        settings = call.llm(ctx.cfg)
        rows.append(planned_cost(call.prompt, settings.model, calls, assumptions, prices,
                                 ctx.cfg.llm.mode_of(settings)))
        carried, previous_key = calls, call.key
    return rows


def volume(cfg: GlanConfig, assumptions: dict[str, Any]) -> Volume:
    """What a full run of the configured slice makes: disciplines, samples, subjects and questions."""
    taxonomy = load_taxonomy(cfg.taxonomy.path())
    if cfg.taxonomy.disciplines:
        taxonomy = taxonomy.select(cfg.taxonomy.disciplines)
    disciplines = len(taxonomy.disciplines())
    samples = cfg.subjects.samples_per_discipline
    subjects = min(int(assumptions.get("unique_subjects_per_discipline", 150)),
                   samples * cfg.subjects.max_subjects_per_sample) * disciplines
    return Volume(disciplines=disciplines, samples_per_discipline=samples, subjects=subjects,
                  questions=subjects * cfg.combinations.per_syllabus(subjects))


def estimate(cfg: GlanConfig, assumptions: dict[str, Any], prices: dict[str, Price],
             declared: Sequence[Stage] | None = None) -> list[dict[str, Any]]:
    """Calls, tokens and money of a full run of the configured slice, before anything is spent:
    each declared call's calls (`LLMCall.volume`) with its model, its mode (`usd` at that mode's
    prices; see `planned_cost`) and the assumed tokens per call."""
    made = volume(cfg, assumptions)
    return [{"stage": stage.name, **planned_cost(call.prompt, call.llm(cfg).model, call.volume(made), assumptions,
                                                  prices, cfg.llm.mode_of(call.llm(cfg)))}
            for stage in (stages() if declared is None else declared) for call in stage.calls]
