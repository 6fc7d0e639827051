"""What an LLM call's results become, online and in batch mode alike: rows of its output table,
of `failures` (the calls to ask again) and of `failed_calls` (the usage of every failed call, paid
for or possibly paid), each written so that committing the same results twice adds nothing."""

from __future__ import annotations

import logging

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.config.loader import GlanConfig
from jobs.pipeline.keys import stable_id
from jobs.pipeline.spool import IN_FLIGHT
from jobs.storage.delta import append_missing, get_storage
from jobs.storage.tables import FAILURES
from udfs.llm.config import StageLLMConfig

log = logging.getLogger(__name__)

RESULT = "_out"  # the column that holds each row's LLM_RESULT (udfs/llm_udf.py)
TRUNCATED = "truncated"  # the error class of a call whose output hit max_tokens (udfs/llm/client.py)


def usage_columns(stage_llm: StageLLMConfig) -> list[Column]:
    """The tables.USAGE_FIELDS of one call, from its result struct and the stage's settings."""
    out = F.col(RESULT)
    return [
        out["model"].alias("model"),
        out["prompt_name"].alias("prompt_name"),
        out["prompt_version"].alias("prompt_version"),
        F.lit(float(stage_llm.temperature)).alias("temperature"),
        F.lit(float(stage_llm.top_p)).alias("top_p"),
        out["prompt_tokens"].alias("prompt_tokens"),
        out["completion_tokens"].alias("completion_tokens"),
        out["cached_tokens"].alias("cached_tokens"),
        out["latency_s"].alias("latency_s"),
        out["attempts"].alias("attempts"),
        F.current_timestamp().alias("created_at"),
        out["seed"].alias("seed"),
        out["batch_id"].alias("batch_id"),
        out["billing"].alias("billing"),
    ]


def is_failure(out: Column) -> Column:
    """A call failed when the client says so, or when a free-text answer is empty: an empty row
    written as a success would never be asked again."""
    empty_text = out["parsed"].isNull() & (F.coalesce(F.length(F.trim(out["text"])), F.lit(0)) == 0)
    return out["error_class"].isNotNull() | empty_text


def record_failed_usage(failed: DataFrame, stage: str, key: str, stage_llm: StageLLMConfig, cfg: GlanConfig) -> None:
    """Append the usage of failed calls to `failed_calls`. The id comes from the call's own result,
    so committing the same spooled rows again (after a kill) adds nothing."""
    out = F.col(RESULT)
    call_id = stable_id(F.lit(stage), F.col(key), out["prompt_version"], out["error_class"],
                        out["error_message"], out["latency_s"], out["prompt_tokens"], out["completion_tokens"])
    append_missing(failed.select(call_id.alias("call_id"), F.lit(stage).alias("stage"),
                                 F.col(key).cast("string").alias("row_key"), out["error_class"].alias("error_class"),
                                 *usage_columns(stage_llm)), "failed_calls", "call_id", cfg)


def record_in_flight(spark, lost: pa.Table, stage: str, stage_llm: StageLLMConfig, cfg: GlanConfig) -> None:
    """Append to `failed_calls` the calls that were sent but whose answers never came back (rows of
    `Spool.unanswered`): possibly paid, prompt tokens estimated, completion tokens unknown (null).
    The id comes from the intent file, so recording the same intents again adds nothing."""
    rows = [(r["row_key"], r["model"], r["prompt_name"], r["prompt_version"], r["prompt_tokens"], r["_intent"])
            for r in lost.to_pylist()]
    frame = spark.createDataFrame(rows, "row_key string, model string, prompt_name string, prompt_version string, "
                                        "prompt_tokens long, _intent string")
    append_missing(frame.select(
        stable_id(F.lit(stage), "row_key", F.lit(IN_FLIGHT), "_intent").alias("call_id"),
        F.lit(stage).alias("stage"), "row_key", F.lit(IN_FLIGHT).alias("error_class"),
        "model", "prompt_name", "prompt_version",
        F.lit(float(stage_llm.temperature)).alias("temperature"), F.lit(float(stage_llm.top_p)).alias("top_p"),
        "prompt_tokens", F.lit(None).cast("long").alias("completion_tokens"),
        F.lit(None).cast("long").alias("cached_tokens"), F.lit(None).cast("double").alias("latency_s"),
        F.lit(1).alias("attempts"), F.current_timestamp().alias("created_at"),
        F.lit(None).cast("long").alias("seed"), F.lit(None).cast("string").alias("batch_id"),
        F.lit("online").alias("billing"),
    ), "failed_calls", "call_id", cfg)


def update_failures(spark, stage: str, key: str, called: DataFrame, failed: DataFrame, cfg: GlanConfig) -> list:
    """Replace this stage's failures for the keys just called: failed ones in, succeeded ones out.
    Only those keys' rows are rewritten, so runs of other slices update theirs at the same time."""
    storage = get_storage(spark, cfg)
    failure_id = stable_id(F.lit(stage), F.col(key))
    new = failed.select(
        failure_id.alias("failure_id"),
        F.lit(stage).alias("stage"),
        F.col(key).cast("string").alias("row_key"),
        F.col(RESULT)["error_class"].alias("error_class"),
        F.col(RESULT)["error_message"].alias("error_message"),
        F.col(RESULT)["attempts"].alias("attempts"),
        F.current_timestamp().alias("failed_at"),
    ).collect()
    ids = called.select(failure_id.alias("failure_id")).distinct()
    if not new and (not storage.exists("failures")
                    or not storage.read("failures").join(F.broadcast(ids), "failure_id", "left_semi").limit(1).count()):
        return []
    storage.replace(spark.createDataFrame([tuple(r) for r in new], FAILURES.schema), "failures", "failure_id",
                    [r[0] for r in ids.collect()])
    for row in new[:5]:
        log.warning("%s: %s failed: %s: %s", stage, row["row_key"], row["error_class"],
                    (row["error_message"] or "")[:200])
    return new
