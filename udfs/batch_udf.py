"""pandas UDFs of batch mode: rendering each row's request line, and checking each answer a batch
returned exactly as the online path checks its answers (udfs/llm_udf.py).

    render = render_udf("answer", cfg.llm, cfg.answers.llm)
    lines = todo.withColumn("_req", render("question", seed="_seed", custom_id="question_id"))
    # _req.line: the JSONL request (null when the template failed: _req.error says why), _req.seed

    finish = finish_udf("answer", cfg.llm, cfg.answers.llm)
    rows.withColumn("_out", finish("status_code", "body", "message", "seed", "batch_id", "latency_s"))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from udfs.llm.batch import batch_model, batch_url, request_line
from udfs.llm.client import BatchAnswer, LLMClient, LLMRequest, chat_body, request_seed
from udfs.llm.config import LLMConfig, StageLLMConfig
from udfs.llm_udf import FROM_REGISTRY, LLM_RESULT, SEED_FIELD, build_requests, call_spec, results_frame

REQUEST = StructType([
    StructField("line", StringType()),  # the request as one JSONL line; null: the prompt did not render
    StructField("seed", LongType()),  # the seed the line sends (null: none)
    StructField("error", StringType()),  # why the prompt did not render
])
_CUSTOM_ID = "_custom_id"


def render_udf(prompt: str, llm: LLMConfig, stage: StageLLMConfig, *,
               schema: dict[str, Any] | None = FROM_REGISTRY) -> Callable[..., Column]:
    """A function `(*columns, seed, custom_id) -> Column` of REQUEST structs: each row's request
    line with the body the online call sends (messages, model, temperature, top_p, max_tokens, seed,
    response_format), and its `custom_id` (the row key)."""
    spec = call_spec(prompt, stage, schema)
    url = batch_url(llm)
    model = batch_model(llm, stage)

    @F.pandas_udf(REQUEST)  # type: ignore[call-overload]
    def render(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            records = batch.to_dict("records")
            ids = [str(record.pop(_CUSTOM_ID)) for record in records]
            lines, seeds, errors = [], [], []
            for custom_id, request in zip(ids, build_requests(spec.prompt, records)):
                if isinstance(request, LLMRequest):
                    seed = request_seed(llm, stage, request.seed)
                    body = {**chat_body(llm, spec, spec.call, request.messages, seed), "model": model}
                    lines.append(request_line(custom_id, url, body))
                    seeds.append(seed)
                    errors.append(None)
                else:
                    lines.append(None)
                    seeds.append(None)
                    errors.append(f"{type(request).__name__}: {request}")
            yield pd.DataFrame({"line": lines, "seed": pd.array(seeds, dtype="Int64"), "error": errors})

    def apply(*columns: str | Column, seed: str | Column, custom_id: str) -> Column:
        fields = [F.col(c) if isinstance(c, str) else c for c in columns]
        fields.append((F.col(seed) if isinstance(seed, str) else seed).cast("long").alias(SEED_FIELD))
        fields.append(F.col(custom_id).cast("string").alias(_CUSTOM_ID))
        return render(F.struct(*fields))

    return apply


def finish_udf(prompt: str, llm: LLMConfig, stage: StageLLMConfig, *,
               schema: dict[str, Any] | None = FROM_REGISTRY) -> Callable[..., Column]:
    """A function `(status_code, body, message, seed, batch_id, latency_s) -> Column` of LLM_RESULT
    structs: each answered line checked as an online answer is (truncation, empty text, schema,
    one repair call, sent online), with the usage the provider reported."""
    spec = call_spec(prompt, stage, schema)

    @F.pandas_udf(LLM_RESULT)  # type: ignore[call-overload]
    def finish(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        client = LLMClient(llm)
        try:
            for batch in batches:
                answers = [BatchAnswer(status_code=None if pd.isna(r["status_code"]) else int(r["status_code"]),
                                       body=None if r["body"] is None else json.loads(r["body"]),
                                       message=r["message"], seed=None if pd.isna(r["seed"]) else int(r["seed"]),
                                       batch_id=r["batch_id"], latency_s=float(r["latency_s"]))
                           for r in batch.to_dict("records")]
                yield results_frame(client.finish(spec, answers))
        finally:
            client.close()

    def apply(status_code: str, body: str, message: str, seed: str, batch_id: str, latency_s: str) -> Column:
        return finish(F.struct(F.col(status_code).cast("int").alias("status_code"), F.col(body).alias("body"),
                               F.col(message).alias("message"), F.col(seed).cast("long").alias("seed"),
                               F.col(batch_id).alias("batch_id"), F.col(latency_s).cast("double").alias("latency_s")))

    return apply
