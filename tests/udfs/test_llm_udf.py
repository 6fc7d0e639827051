"""The LLM pandas UDF in a real Spark job against the loopback test server."""

from __future__ import annotations

import json

from pyspark.sql import functions as F

from udfs.llm.config import LLMConfig, StageLLMConfig
from udfs.llm_udf import LLM_RESULT, concurrent_tasks, llm_udf
from udfs.llm.prompts import load_prompt
from tests.support import TEST_PROMPTS, items_schema

pytest_plugins = ["tests.fake_llm_fixture"]

ITEMS_SCHEMA = items_schema(1, 3)


def llm_for(server, **overrides) -> LLMConfig:
    settings = dict(base_url=server.url, api_key_env="GLAN_TEST_KEY_UNSET", max_in_flight_per_task=8,
                    backoff_initial_s=0.01, max_attempts=3, timeout_s=5.0)
    settings.update(overrides)
    return LLMConfig(**settings)


def test_udf_returns_results_in_order_with_failures_as_error_rows(spark, fake_llm):
    fake_llm.jitter_ms = 30
    n = 40
    for i in range(n):
        fake_llm.add_rule(contains=f"[t{i}]", text=f"answer {i}")
    fake_llm.add_rule(contains="[t7]", status=400)  # listed after, but [t7] has its own text rule first
    fake_llm.rules.insert(0, fake_llm.rules.pop())  # so move the 400 rule to the front
    df = spark.createDataFrame([(i, f"[t{i}]") for i in range(n)], "row_id INT, topic STRING").repartition(2)
    ask = llm_udf(load_prompt("echo_topic", TEST_PROMPTS), llm_for(fake_llm), StageLLMConfig(model="m"),
                  concurrent_tasks=concurrent_tasks(df))
    out = df.withColumn("_out", ask("topic")).select("row_id", "_out.*")
    assert out.schema["attempts"].dataType == LLM_RESULT["attempts"].dataType
    rows = {r["row_id"]: r for r in out.collect()}
    assert len(rows) == n
    for i, row in rows.items():
        if i == 7:
            assert row["error_class"] == "bad_request" and row["attempts"] == 1 and row["text"] is None
        else:
            assert row["text"] == f"answer {i}" and row["error_class"] is None, (i, row)
        assert row["prompt_name"] == "echo_topic"
    assert fake_llm.count() == n


def test_udf_structured_call_with_seed_column_and_schema(spark, fake_llm):
    df = spark.createDataFrame([("rivers", 0), ("rivers", 1), ("lakes", 0)], "topic STRING, sample INT")
    ask = llm_udf(load_prompt("list_items", TEST_PROMPTS), llm_for(fake_llm), StageLLMConfig(model="m", seed=10),
                  schema=ITEMS_SCHEMA)
    rows = df.select("topic", "sample", ask(F.col("topic"), seed="sample").alias("r")).collect()
    seeds = [r["r"]["seed"] for r in rows]
    assert seeds == [10, 11, 10]
    parsed = [json.loads(r["r"]["parsed"]) for r in rows]
    assert all(1 <= len(p["items"]) <= 3 for p in parsed)
    assert parsed[0] != parsed[1]  # two samples of the same prompt differ by seed


def test_concurrent_tasks_is_capped_by_parallelism(spark):
    parallelism = spark.sparkContext.defaultParallelism
    assert concurrent_tasks(spark.range(10).repartition(1)) == 1
    assert concurrent_tasks(spark.range(10).repartition(50)) == min(50, parallelism)


def test_a_missing_template_variable_fails_on_its_rows_only(spark, fake_llm):
    df = spark.createDataFrame([("x",)], "subject STRING")  # the template wants `topic`
    ask = llm_udf(load_prompt("echo_topic", TEST_PROMPTS), llm_for(fake_llm), StageLLMConfig(model="m"))
    (row,) = df.select(ask("subject").alias("r")).collect()
    assert row["r"]["error_class"] == "prompt_error" and "topic" in row["r"]["error_message"]
    assert fake_llm.count() == 0


def test_intents_are_noted_before_any_request_and_notes_never_reach_the_prompt(spark, fake_llm, tmp_path):
    df = spark.createDataFrame([("k1", "d1", "[t1]"), ("k2", "d2", "[t2]")], "key STRING, discipline_id STRING, topic STRING")
    noted = tmp_path / "intents.jsonl"
    path = str(noted)

    def note_intents(rows):  # a local function: shipped to the tasks by value
        import time

        with open(path, "a") as sink:
            for row in rows:
                sink.write(json.dumps({**row, "at": time.time()}) + "\n")

    ask = llm_udf(load_prompt("echo_topic", TEST_PROMPTS), llm_for(fake_llm), StageLLMConfig(model="m"),
                  intents=note_intents)
    rows = df.select(ask("topic", note=["key", "discipline_id"]).alias("r")).collect()
    assert all(r["r"]["error_class"] is None for r in rows)
    intents = [json.loads(line) for line in noted.read_text().splitlines()]
    assert sorted((i["key"], i["discipline_id"], i["model"], i["prompt_name"]) for i in intents) == [
        ("k1", "d1", "m", "echo_topic"), ("k2", "d2", "m", "echo_topic")]
    sent = {r.text: r for r in fake_llm.requests}
    for intent in intents:
        request = next(r for text, r in sent.items() if f"[t{intent['key'][1]}]" in text)
        assert intent["at"] <= request.received_at  # written before the request left
        messages = request.body["messages"]
        assert intent["prompt_tokens"] == sum(len(m["content"]) for m in messages) // 4 + 8 * len(messages)  # estimated
        assert "k1" not in request.text and "d1" not in request.text  # notes are no template variables
