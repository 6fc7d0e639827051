"""The LLM pandas UDF in a real Spark job against the loopback test server."""

from __future__ import annotations

import json

import httpx2
import pytest
from pyspark.sql import functions as F

from udfs.llm.config import LLMConfig, StageLLMConfig
from udfs.llm_udf import LLM_RESULT, concurrent_tasks, llm_udf, rate_coordinator
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


# -- one rate budget for the cluster (udfs/llm/coordinator.py) ------------------------------------


def skewed(spark, sizes: list[int]):
    """One partition per entry of `sizes`, holding that many rows: a stage whose first task is long."""
    rows = spark.sparkContext.parallelize(range(len(sizes)), len(sizes)).flatMap(
        lambda part: [(part, i, f"[p{part}-{i}]") for i in range(sizes[part])])
    return spark.createDataFrame(rows, "part INT, row INT, topic STRING")


def ask_skewed(spark, llm: LLMConfig, sizes: list[int], coordinator: str | None) -> list:
    df = skewed(spark, sizes)
    assert concurrent_tasks(df) == 2  # local[2]: the static split gives each task half the budget
    ask = llm_udf(load_prompt("echo_topic", TEST_PROMPTS), llm, StageLLMConfig(model="m"),
                  concurrent_tasks=concurrent_tasks(df), coordinator=coordinator)
    return df.select("part", ask("topic").alias("r")).select("part", "r.error_class").collect()


def test_rate_coordinator_starts_only_for_a_budget_to_share_and_stops_after(spark, fake_llm):
    with rate_coordinator(spark, llm_for(fake_llm)) as url:
        assert url is None  # no budget: nothing to coordinate
    with rate_coordinator(spark, llm_for(fake_llm, requests_per_minute=60, rate_coordinator=False)) as url:
        assert url is None  # the static split, as asked
    with rate_coordinator(spark, llm_for(fake_llm, requests_per_minute=60)) as url:
        assert url.startswith("http://127.0.0.1:")
        assert httpx2.post(f"{url}/lease", json={"client": "t", "requests": 1}).json()["requests"] == 1
    with pytest.raises(httpx2.ConnectError):
        httpx2.post(f"{url}/lease", json={"client": "t", "requests": 1})


@pytest.mark.slow
def test_a_skewed_stage_under_a_cluster_budget_stays_within_it_in_every_10_second_window(spark, fake_llm):
    # 180 requests a minute: 30 per 10 s. The long task holds 84 of 96 rows; under the static split it
    # would keep half the budget once the short ones are done (84 / 1.5 per second: 56 s).
    fake_llm.latency_ms = 50
    llm = llm_for(fake_llm, requests_per_minute=180)
    with rate_coordinator(spark, llm) as url:
        rows = ask_skewed(spark, llm, [84, 4, 4, 4], url)
    assert len(rows) == 96 and all(r["error_class"] is None for r in rows)
    times = sorted(r.received_at for r in fake_llm.requests)
    assert len(times) == 96
    block = min(llm.rate_lease_block, 180 // 60)
    worst = max(sum(1 for t in times if start <= t < start + 10.0) for start in times)
    assert worst <= 30 + block, worst
    assert times[-1] - times[0] < 45.0  # the long task had the whole budget once it ran alone (about 34 s; static: 56 s)


@pytest.mark.slow
def test_with_the_coordinator_down_tasks_keep_the_static_split_and_answer_every_row(spark, fake_llm):
    llm = llm_for(fake_llm, requests_per_minute=600)
    with rate_coordinator(spark, llm) as url:
        pass  # stopped: nothing listens there any more
    rows = ask_skewed(spark, llm, [30, 3, 3, 3], url)
    assert len(rows) == 39 and all(r["error_class"] is None for r in rows)
    times = sorted(r.received_at for r in fake_llm.requests)
    assert len(times) == 39
    assert times[-1] - times[0] >= (30 - 5) / 5.0 * 0.9  # the long task kept its half: 5 a second
