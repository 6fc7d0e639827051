"""The LLM client against the loopback test server: retries, failures, repair, order, budgets, secrets."""

from __future__ import annotations

import json
import logging
import time

import pytest

from udfs.llm import schemas
from udfs.llm.client import CALL_HEADER, CallSpec, LLMClient, LLMRequest, redact
from udfs.llm.config import LLMConfig, StageLLMConfig
from udfs.llm.prompts import load_prompt
from tests.support import TEST_PROMPTS, items_schema

pytest_plugins = ["tests.fake_llm_fixture"]

ITEMS_SCHEMA = items_schema(2, 5)
STAGE = StageLLMConfig(model="test-model", temperature=0.7, top_p=0.9, max_tokens=512)
CANARY = "sk-CANARY-7f3a9c2e5b1d8e4f"


def llm_for(server, **overrides) -> LLMConfig:
    settings = dict(base_url=server.url, api_key_env="GLAN_TEST_KEY_UNSET", timeout_s=5.0,
                    max_in_flight_per_task=16, backoff_initial_s=0.01, backoff_max_s=2.0, max_attempts=4)
    settings.update(overrides)
    return LLMConfig(**settings)


def free_spec() -> CallSpec:
    return CallSpec(prompt=load_prompt("echo_topic", TEST_PROMPTS), stage=STAGE)


def json_spec() -> CallSpec:
    return CallSpec(prompt=load_prompt("list_items", TEST_PROMPTS), stage=STAGE, schema=ITEMS_SCHEMA,
                    repair_prompt=load_prompt("repair"))


def requests_for(spec: CallSpec, topics: list[str]) -> list[LLMRequest]:
    return [LLMRequest(spec.prompt.render(topic=t)) for t in topics]


def run(llm: LLMConfig, spec: CallSpec, topics: list[str], **client_kwargs) -> list[dict]:
    with LLMClient(llm, **client_kwargs) as client:
        return client.run(spec, requests_for(spec, topics))


def test_a_free_text_call_returns_text_usage_and_metadata(fake_llm):
    (result,) = run(llm_for(fake_llm), free_spec(), ["tides"])
    assert result["error_class"] is None
    assert len(result["text"].split()) > 30
    assert result["parsed"] is None
    assert result["attempts"] == 1
    assert result["prompt_tokens"] > 0 and result["completion_tokens"] > 0
    assert result["model"] == "test-model" and result["finish_reason"] == "stop"
    assert result["prompt_name"] == "echo_topic" and len(result["prompt_version"]) == 12
    (request,) = fake_llm.requests
    assert request.headers[CALL_HEADER.lower()] == "echo_topic"
    assert request.body["temperature"] == 0.7 and request.body["top_p"] == 0.9
    assert request.body["max_tokens"] == 512
    assert "response_format" not in request.body


def test_json_schema_mode_sends_the_schema_and_validates_the_answer(fake_llm):
    (result,) = run(llm_for(fake_llm), json_spec(), ["rivers"])
    assert result["error_class"] is None
    parsed = json.loads(result["parsed"])
    assert 2 <= len(parsed["items"]) <= 5
    fmt = fake_llm.requests[0].body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == ITEMS_SCHEMA


def test_lenient_mode_parses_fenced_json_from_a_registered_call(fake_llm, monkeypatch):
    monkeypatch.setitem(schemas.SCHEMAS, "list_items", ITEMS_SCHEMA)
    (result,) = run(llm_for(fake_llm, json_schema_mode=False), json_spec(), ["rivers"])
    assert "```json" in result["text"]  # the server answered in prose with a fence
    assert result["error_class"] is None and json.loads(result["parsed"])["items"]
    assert "response_format" not in fake_llm.requests[0].body


def test_retry_after_is_honoured(fake_llm):
    fake_llm.add_rule(contains="slowdown", status=429, headers={"retry-after": "1"}, times=1)
    (result,) = run(llm_for(fake_llm), free_spec(), ["slowdown"])
    assert result["error_class"] is None and result["attempts"] == 2
    first, second = fake_llm.requests
    gap = second.received_at - first.received_at
    assert 0.95 <= gap < 2.0  # backoff alone would have waited ~0.01 s


def test_retry_after_ms_is_honoured(fake_llm):
    fake_llm.add_rule(contains="slowdown", status=429, headers={"retry-after-ms": "400"}, times=1)
    (result,) = run(llm_for(fake_llm), free_spec(), ["slowdown"])
    assert result["attempts"] == 2
    first, second = fake_llm.requests
    assert 0.38 <= second.received_at - first.received_at < 1.5


def test_server_errors_are_retried_then_succeed(fake_llm):
    fake_llm.add_rule(contains="flaky", status=500, times=2)
    (result,) = run(llm_for(fake_llm), free_spec(), ["flaky"])
    assert result["error_class"] is None and result["attempts"] == 3


def test_persistent_server_errors_stop_after_max_attempts(fake_llm):
    fake_llm.add_rule(contains="broken", status=503)
    (result,) = run(llm_for(fake_llm, max_attempts=3), free_spec(), ["broken"])
    assert result["error_class"] == "server_error" and result["attempts"] == 3
    assert "503" in result["error_message"]


def test_a_400_fails_at_once_and_spares_its_neighbours(fake_llm):
    fake_llm.add_rule(contains="POISON", status=400)
    results = run(llm_for(fake_llm), free_spec(), ["a", "POISON", "b"])
    assert [r["error_class"] for r in results] == [None, "bad_request", None]
    assert results[1]["attempts"] == 1
    assert "400" in results[1]["error_message"]
    assert fake_llm.count(status=400) == 1


def test_timeouts_are_retried(fake_llm):
    fake_llm.add_rule(contains="hang", delay_ms=3000, times=1)
    started = time.monotonic()
    (result,) = run(llm_for(fake_llm, timeout_s=0.3), free_spec(), ["hang"])
    assert result["error_class"] is None and result["attempts"] == 2
    assert time.monotonic() - started < 2.5


def test_timeout_on_every_attempt_is_a_timeout_failure(fake_llm):
    fake_llm.rate_timeout, fake_llm.timeout_hold_s = 1.0, 2.0
    (result,) = run(llm_for(fake_llm, timeout_s=0.2, max_attempts=2), free_spec(), ["x"])
    assert result["error_class"] == "timeout" and result["attempts"] == 2


def test_malformed_json_gets_one_repair_call(fake_llm):
    fake_llm.add_rule(kind="list_items", contains="BROKEN", text='Here: {"items": ["a", "b"')
    results = run(llm_for(fake_llm), json_spec(), ["fine", "BROKEN"])
    assert results[0]["error_class"] is None and results[0]["repaired"] is False
    fixed = results[1]
    assert fixed["error_class"] is None and fixed["repaired"] is True
    assert len(json.loads(fixed["parsed"])["items"]) >= 2
    assert fixed["attempts"] == 2
    assert fake_llm.count(kind="repair") == 1
    repair = [r for r in fake_llm.requests if r.kind == "repair"][0]
    assert '{"items": ["a", "b"' in repair.text  # the broken output went to the repair call
    assert repair.body["response_format"]["json_schema"]["schema"] == ITEMS_SCHEMA


def test_output_that_stays_malformed_after_repair_is_a_parse_error(fake_llm):
    fake_llm.add_rule(kind="list_items", text="no json here")
    fake_llm.add_rule(kind="repair", text='{"items": []}')  # valid JSON, but violates minItems
    (result,) = run(llm_for(fake_llm), json_spec(), ["x"])
    assert result["error_class"] == "parse_error"
    assert "minItems" in result["error_message"]
    assert result["parsed"] is None
    assert fake_llm.count(kind="repair") == 1


def test_empty_lists_from_the_model_fail_validation_then_repair(fake_llm):
    fake_llm.add_rule(kind="list_items", empty_lists=True)
    (result,) = run(llm_for(fake_llm), json_spec(), ["x"])
    assert result["repaired"] is True and result["error_class"] is None


def test_truncated_output_is_flagged_and_not_repaired(fake_llm):
    fake_llm.add_rule(kind="list_items", finish_reason="length")
    (result,) = run(llm_for(fake_llm), json_spec(), ["x"])
    assert result["error_class"] == "truncated"
    assert result["parsed"] is None
    assert fake_llm.count(kind="repair") == 0


def test_free_text_hitting_max_tokens_is_truncated(fake_llm):
    spec = CallSpec(prompt=load_prompt("echo_topic", TEST_PROMPTS), stage=StageLLMConfig(model="m", max_tokens=5))
    (result,) = run(llm_for(fake_llm), spec, ["x"])
    assert result["error_class"] == "truncated" and result["finish_reason"] == "length"


def test_order_is_preserved_with_many_in_flight_and_random_latency(fake_llm):
    fake_llm.jitter_ms = 60
    topics = [f"topic-{i:03d}!" for i in range(150)]
    for i, topic in enumerate(topics):
        fake_llm.add_rule(contains=topic, text=f"answer {i}")
    results = run(llm_for(fake_llm, max_in_flight_per_task=64), free_spec(), topics)
    assert [r["text"] for r in results] == [f"answer {i}" for i in range(150)]


def test_requests_per_minute_budget_is_respected_at_the_server(fake_llm):
    # 240 rpm split over 2 concurrent tasks: this task may send 2/s, after a burst of 2.
    started = time.monotonic()
    results = run(llm_for(fake_llm, requests_per_minute=240), free_spec(), [f"t{i}" for i in range(8)],
                  concurrent_tasks=2)
    assert all(r["error_class"] is None for r in results)
    times = sorted(r.received_at for r in fake_llm.requests)
    assert time.monotonic() - started >= 2.8
    rate_after_burst = (len(times) - 2) / (times[-1] - times[0])
    assert rate_after_burst <= 2.2
    assert max(sum(1 for t in times if s <= t < s + 1.0) for s in times) <= 4


def test_aimd_lowers_concurrency_on_429_bursts_and_every_row_completes(fake_llm):
    fake_llm.rate_429, fake_llm.retry_after_s = 0.3, 0.05
    llm = llm_for(fake_llm, max_in_flight_per_task=32, max_attempts=10)
    spec = free_spec()
    with LLMClient(llm) as client:
        results = client.run(spec, requests_for(spec, [f"t{i}" for i in range(200)]))
        assert client.limiter.decreases >= 1
        lowered = client.limiter.allowed
        assert lowered < 32
        fake_llm.rate_429 = 0.0
        client.run(spec, requests_for(spec, [f"u{i}" for i in range(300)]))
        assert client.limiter.allowed > lowered
    assert all(r["error_class"] is None for r in results)
    assert fake_llm.count(status=429) > 0


def test_the_api_key_never_leaks(fake_llm, monkeypatch, caplog):
    monkeypatch.setenv("GLAN_TEST_KEY", CANARY)
    fake_llm.add_rule(contains="AUTH-MASKED", status=401, echo_key="masked")
    fake_llm.add_rule(contains="AUTH-FULL", status=401, echo_key="full")
    fake_llm.add_rule(contains="BAD-REQ", status=400, echo_key="full")
    caplog.set_level(logging.DEBUG)
    results = run(llm_for(fake_llm, api_key_env="GLAN_TEST_KEY"), free_spec(),
                  ["fine", "AUTH-MASKED", "AUTH-FULL", "BAD-REQ"])
    # The key did reach the server, so the echo rules had something to leak.
    assert fake_llm.requests[0].headers["authorization"] == f"Bearer {CANARY}"
    assert [r["error_class"] for r in results] == [None, "auth", "auth", "bad_request"]
    assert results[1]["attempts"] == 1
    dumped = json.dumps(results)
    assert CANARY not in dumped and "CANARY" not in dumped and "8e4f" not in dumped
    assert "Incorrect API key provided" in results[1]["error_message"]
    assert CANARY not in caplog.text and "CANARY" not in caplog.text


def test_missing_key_for_a_remote_endpoint_is_an_error_row_not_a_crash(monkeypatch):
    monkeypatch.delenv("GLAN_TEST_KEY_UNSET", raising=False)
    llm = LLMConfig(base_url="https://llm.example.invalid/v1", api_key_env="GLAN_TEST_KEY_UNSET")
    (result,) = run(llm, free_spec(), ["x"])
    assert result["error_class"] == "missing_api_key"
    assert "GLAN_TEST_KEY_UNSET" in result["error_message"] and result["attempts"] == 0


def test_a_row_that_failed_to_render_is_a_prompt_error(fake_llm):
    spec = free_spec()
    with LLMClient(llm_for(fake_llm)) as client:
        results = client.run(spec, [LLMRequest(spec.prompt.render(topic="a")), KeyError("topic")])
    assert [r["error_class"] for r in results] == [None, "prompt_error"]


def test_seed_is_sent_as_stage_seed_plus_row_seed(fake_llm):
    spec = CallSpec(prompt=load_prompt("echo_topic", TEST_PROMPTS), stage=StageLLMConfig(model="m", seed=100))
    with LLMClient(llm_for(fake_llm)) as client:
        results = client.run(spec, [LLMRequest(spec.prompt.render(topic="a"), seed=i) for i in range(2)])
    assert [r["seed"] for r in results] == [100, 101]
    assert sorted(r.body["seed"] for r in fake_llm.requests) == [100, 101]
    assert results[0]["text"] != results[1]["text"]  # same prompt, different samples


@pytest.mark.parametrize(
    ("message", "leak"),
    [
        (f"Incorrect API key provided: {CANARY}.", CANARY),
        ("Incorrect API key provided: sk-***************8e4f.", "8e4f"),
        ("key sk-CANARY-7f3a9c was rejected", "CANARY-7f3a"),
    ],
)
def test_redact_removes_full_and_partial_keys(message, leak):
    cleaned = redact(message, CANARY)
    assert leak not in cleaned and "[REDACTED]" in cleaned
    assert redact("nothing to hide here", CANARY) == "nothing to hide here"


def test_tokens_per_minute_budget_paces_requests(fake_llm):
    # 2,400 tokens/min = 40/s for this one task; each request reserves about 45 tokens (prompt
    # estimate + max_tokens) and really uses about as many, so 4 requests need about 3 s.
    spec = CallSpec(prompt=load_prompt("echo_topic", TEST_PROMPTS), stage=StageLLMConfig(model="m", max_tokens=20))
    started = time.monotonic()
    run(llm_for(fake_llm, tokens_per_minute=2400), spec, [f"t{i}" for i in range(4)])
    elapsed = time.monotonic() - started
    used = fake_llm.stats()["tokens"]
    assert elapsed >= 2.0
    assert (used["prompt"] + used["completion"]) <= 40 * elapsed + 50  # the budget plus one second's burst


def test_azure_endpoint_uses_the_deployment_path_api_version_and_api_key_header(fake_llm, monkeypatch):
    monkeypatch.setenv("GLAN_TEST_AZURE_KEY", "azure-secret-value-123")
    llm = llm_for(fake_llm, endpoint="azure", base_url=fake_llm.url.removesuffix("/v1"),
                  api_version="2024-06-01", api_key_env="GLAN_TEST_AZURE_KEY")
    (result,) = run(llm, free_spec(), ["x"])
    assert result["error_class"] is None, result
    (request,) = fake_llm.requests
    assert request.path == "/openai/deployments/test-model/chat/completions"
    assert request.headers["api-key"] == "azure-secret-value-123"
