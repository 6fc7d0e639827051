"""pandas UDFs that call the LLM: one client per task, a whole Arrow batch in flight at once.

    ask = llm_udf("subjects_list", cfg.llm, cfg.subjects.llm, concurrent_tasks=concurrent_tasks(todo))
    out = todo.withColumn("_out", ask("discipline", F.col("n").alias("num_subjects"), seed="sample_index"))
    out.select("discipline_id", F.col("_out.parsed"), F.col("_out.error_class"), ...)

The columns given to the returned function become the template's variables (by column name, so
alias expressions). The result column is an LLM_RESULT struct; a failed row has `error_class` set
and never fails the batch.

With `intents`, each batch first hands what it is about to ask to that function (one dict per row
that will be sent: the `note` columns, model, prompt and an estimate of its prompt tokens), before
any request leaves: a task killed mid-call leaves a trace of the calls it may have paid for.

With an RPM/TPM budget, run the stage inside `rate_coordinator(spark, llm)` and pass its URL as
`coordinator=`: tasks then lease one cluster-wide budget from the driver instead of each keeping
1/concurrent_tasks of it (udfs/llm/coordinator.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pandas as pd
from pyspark import TaskContext
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BooleanType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from udfs.llm.client import RESULT_FIELDS, CallSpec, LLMClient, LLMRequest, estimate_prompt_tokens
from udfs.llm.config import LLMConfig, StageLLMConfig
from udfs.llm.coordinator import RateCoordinator
from udfs.llm.prompts import Prompt, load_prompt
from udfs.llm.schemas import schema_for
from udfs.llm.structured import check_schema

log = logging.getLogger("glan.llm")

LLM_RESULT = StructType([
    StructField("text", StringType()),
    StructField("parsed", StringType()),  # JSON string of the validated value; null for free text
    StructField("error_class", StringType()),  # null on success
    StructField("error_message", StringType()),
    StructField("attempts", IntegerType()),
    StructField("repaired", BooleanType()),
    StructField("prompt_tokens", LongType()),
    StructField("completion_tokens", LongType()),
    StructField("cached_tokens", LongType()),
    StructField("latency_s", DoubleType()),
    StructField("model", StringType()),
    StructField("finish_reason", StringType()),
    StructField("seed", LongType()),
    StructField("prompt_name", StringType()),
    StructField("prompt_version", StringType()),
    StructField("batch_id", StringType()),  # the provider's batch that answered; null online
    StructField("billing", StringType()),  # online | batch: the price its tokens were paid at
])
assert tuple(LLM_RESULT.fieldNames()) == RESULT_FIELDS

SEED_FIELD = "_seed"
NOTE_PREFIX = "_note_"  # columns carried to `intents`, not to the template
FROM_REGISTRY: Any = object()  # schema=: the prompt's entry in udfs/llm/schemas.py


def concurrent_tasks(df: DataFrame) -> int:
    """How many tasks of a stage over `df` run at once: min(partitions, default parallelism).
    The RPM/TPM budgets are divided by this, so give the DataFrame the UDF will run on."""
    partitions = df.rdd.getNumPartitions()
    return max(1, min(partitions, df.sparkSession.sparkContext.defaultParallelism))


@contextmanager
def rate_coordinator(spark: SparkSession, llm: LLMConfig, name: str = "llm") -> Iterator[str | None]:
    """A rate coordinator on the driver for the stages run inside, at an address the executors
    reach (`spark.driver.host`; 127.0.0.1 in local mode), a random port; yields its URL for
    `llm_udf(coordinator=...)`. None when there is no budget to share or `llm.rate_coordinator` is
    off: tasks keep the static split."""
    if not llm.rate_coordinator or not (llm.requests_per_minute or llm.tokens_per_minute):
        yield None
        return
    context = spark.sparkContext
    conf = context.getConf()
    local = context.master.startswith("local")
    host = "127.0.0.1" if local else conf.get("spark.driver.host", "127.0.0.1")
    coordinator = RateCoordinator(
        llm.requests_per_minute, llm.tokens_per_minute, max_in_flight_per_task=llm.max_in_flight_per_task,
        max_tasks=max(1, context.defaultParallelism), lease_block=llm.rate_lease_block,
        host=host if local else conf.get("spark.driver.bindAddress", host),
    ).start()
    url = f"http://{host}:{coordinator.port}"
    log.info("%s: rate coordinator at %s (requests_per_minute=%s tokens_per_minute=%s)", name, url,
             llm.requests_per_minute, llm.tokens_per_minute)
    try:
        yield url
    finally:
        coordinator.stop()
        log.info("%s: rate coordinator stopped: %s", name, coordinator.stats())


def results_frame(results: list[dict[str, Any]]) -> pd.DataFrame:
    """Client results as a pandas frame that Arrow converts to LLM_RESULT without guessing."""
    frame = pd.DataFrame.from_records(results, columns=list(RESULT_FIELDS))
    frame["seed"] = frame["seed"].astype("Int64")  # nullable: no NaN floats in a long column
    for name in ("attempts", "prompt_tokens", "completion_tokens", "cached_tokens"):
        frame[name] = frame[name].astype("int64")
    frame["repaired"] = frame["repaired"].astype(bool)
    frame["latency_s"] = frame["latency_s"].astype("float64")
    return frame


def build_requests(prompt: Prompt, records: list[dict[str, Any]]) -> list[LLMRequest | BaseException]:
    """One request per row; a row whose template fails to render (a missing variable) gets the
    exception in its place, which the client turns into that row's `prompt_error`."""
    requests: list[LLMRequest | BaseException] = []
    for record in records:
        variables = dict(record)
        seed = variables.pop(SEED_FIELD, None)
        try:
            seed = None if seed is None or pd.isna(seed) else int(seed)
            requests.append(LLMRequest(messages=prompt.render(**variables), seed=seed))
        except Exception as exc:  # the row fails, the batch goes on
            requests.append(exc)
    return requests


def take_notes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Remove the `note` columns from each record (they are no template variables) and return them."""
    names = [name for name in (records[0] if records else {}) if name.startswith(NOTE_PREFIX)]
    return [{name[len(NOTE_PREFIX):]: record.pop(name) for name in names} for record in records]


def intents_of(spec: CallSpec, notes: list[dict[str, Any]],
               requests: list[LLMRequest | BaseException]) -> list[dict[str, Any]]:
    """What a batch is about to ask, one dict per request that will be sent (a row whose prompt
    failed to render sends nothing). Prompt tokens are estimated: the endpoint has not counted yet."""
    return [{**note, "model": spec.stage.model, "prompt_name": spec.prompt.name,
             "prompt_version": spec.prompt.version, "prompt_tokens": estimate_prompt_tokens(request.messages)}
            for note, request in zip(notes, requests) if isinstance(request, LLMRequest)]


def _pick(urls: list[str]) -> str | None:
    """This task's endpoint among several: round-robin by partition id."""
    if not urls:
        return None
    context = TaskContext.get()
    return urls[(context.partitionId() if context is not None else 0) % len(urls)]


def call_spec(prompt: str | Prompt, stage: StageLLMConfig, schema: dict[str, Any] | None = FROM_REGISTRY) -> CallSpec:
    """The call a UDF makes: template, settings, schema (default: the prompt's entry in
    udfs/llm/schemas.py), read and checked here, on the driver: a broken schema fails here, not in
    every row."""
    template = prompt if isinstance(prompt, Prompt) else load_prompt(prompt)
    if schema is FROM_REGISTRY:
        schema = schema_for(template.name)
    if schema is not None:
        check_schema(schema, template.name)
    return CallSpec(prompt=template, stage=stage, schema=schema,
                    repair_prompt=load_prompt("repair") if schema is not None else None)


def llm_udf(
    prompt: str | Prompt,
    llm: LLMConfig,
    stage: StageLLMConfig,
    *,
    schema: dict[str, Any] | None = FROM_REGISTRY,
    concurrent_tasks: int = 1,
    base_url: str | Sequence[str] | None = None,
    intents: Callable[[list[dict[str, Any]]], None] | None = None,
    coordinator: str | None = None,
) -> Callable[..., Column]:
    """A function `(*columns, seed=None, note=()) -> Column` that calls the LLM once per row.

    `prompt` is a Prompt or the name of `prompts/<name>.j2`; `schema` defaults to the call's entry
    in udfs/llm/schemas.py (None: free text). Templates and schema are read here, on the driver, and
    shipped in the closure; the API key is not (the client reads it inside the task).
    `base_url` overrides llm.base_url: the embedded endpoint's address, or a list of addresses
    (several embedded servers), one per task by partition id. `intents` (shipped to the tasks, so
    picklable) gets each batch's `intents_of` before its first request is sent, with the columns
    named in `note`. `coordinator`: the URL `rate_coordinator` yielded (None: the static split).
    """
    spec = call_spec(prompt, stage, schema)
    template = spec.prompt
    tasks = max(1, concurrent_tasks)
    urls = [base_url] if isinstance(base_url, str) else list(base_url or [])

    @F.pandas_udf(LLM_RESULT)  # type: ignore[call-overload]
    def call_llm(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        client = LLMClient(llm, concurrent_tasks=tasks, base_url=_pick(urls), coordinator=coordinator)
        try:
            for batch in batches:
                records = batch.to_dict("records")
                notes = take_notes(records)
                requests = build_requests(spec.prompt, records)
                if intents is not None:
                    intents(intents_of(spec, notes, requests))
                yield results_frame(client.run(spec, requests))
        finally:
            client.close()

    def apply(*columns: str | Column, seed: str | Column | None = None, note: Sequence[str] = ()) -> Column:
        if not columns:
            raise ValueError(f"llm_udf({template.name!r}) needs at least one input column")
        fields = [F.col(c) if isinstance(c, str) else c for c in columns]
        if seed is not None:
            fields.append((F.col(seed) if isinstance(seed, str) else seed).cast("long").alias(SEED_FIELD))
        fields.extend(F.col(name).alias(NOTE_PREFIX + name) for name in note)
        return call_llm(F.struct(*fields))

    return apply
