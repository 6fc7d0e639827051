"""The loopback test server: protocol, deterministic valid content, faults, rules, speed, CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx2
import pytest

from udfs.servers.fake_llm import FakeLLM, free_text, instance
from udfs.llm.structured import validate

pytest_plugins = ["tests.fake_llm_fixture"]

SCHEMAS = [
    {"type": "object", "properties": {"subjects": {"type": "array", "items": {"type": "string"},
                                                    "minItems": 3, "maxItems": 6}}, "required": ["subjects"]},
    {"type": "array", "items": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 40},
        "hours": {"type": "integer", "minimum": 1, "maximum": 4},
        "weight": {"type": "number", "minimum": 0.5, "maximum": 1.5},
        "level": {"enum": ["intro", "advanced"]},
        "optional": {"type": ["string", "null"]},
        "is_core": {"type": "boolean"},
    }, "required": ["title", "hours", "level"], "additionalProperties": False}, "minItems": 1, "maxItems": 2},
    {"type": "object", "properties": {"question": {"type": "string", "minLength": 20},
                                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 0}}},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "x"}}}, {"type": "string"}]},
]


def chat(url: str, content: str, *, kind: str = "test", schema: dict | None = None, **body) -> httpx2.Response:
    payload = {"model": "m", "messages": [{"role": "user", "content": content}], **body}
    if schema is not None:
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    return httpx2.post(f"{url}/chat/completions", json=payload, headers={"X-Glan-Call": kind}, timeout=10)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_schema_answers_are_valid_instances(fake_llm, schema):
    for i in range(5):
        response = chat(fake_llm.url, f"request {i}", schema=schema)
        assert response.status_code == 200
        value = json.loads(response.json()["choices"][0]["message"]["content"])
        assert validate(value, schema) == [], value


def test_answers_are_deterministic_and_vary_with_the_messages(fake_llm):
    first = chat(fake_llm.url, "alpha").json()["choices"][0]["message"]["content"]
    again = chat(fake_llm.url, "alpha").json()["choices"][0]["message"]["content"]
    other = chat(fake_llm.url, "beta").json()["choices"][0]["message"]["content"]
    assert first == again and first != other
    other_seed = FakeLLM(seed=fake_llm.seed + 1).start()
    try:
        assert chat(other_seed.url, "alpha").json()["choices"][0]["message"]["content"] != first
    finally:
        other_seed.stop()


def test_free_text_uses_varied_words():
    import random

    words = set()
    for i in range(30):
        words.update(free_text(random.Random(i)).lower().replace(".", "").replace(",", "").split())
    assert len(words) > 250
    paragraphs = free_text(random.Random(0)).split("\n\n")
    assert len(paragraphs) >= 2


def test_instance_respects_array_bounds():
    import random

    schema = {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3}
    sizes = {len(instance(schema, random.Random(i))) for i in range(50)}
    assert sizes == {2, 3}


def test_registered_call_without_response_format_gets_fenced_json(fake_llm, monkeypatch):
    from udfs.llm import schemas

    monkeypatch.setitem(schemas.SCHEMAS, "listing", SCHEMAS[0])
    monkeypatch.setattr("udfs.servers.fake_llm.SCHEMAS", schemas.SCHEMAS)
    text = chat(fake_llm.url, "x", kind="listing").json()["choices"][0]["message"]["content"]
    assert "```json" in text
    body = text.split("```json")[1].split("```")[0]
    assert validate(json.loads(body), SCHEMAS[0]) == []


def test_models_stats_and_records(fake_llm):
    models = httpx2.get(f"{fake_llm.url}/models").json()
    assert models["data"][0]["id"] == "fake-llm"
    fake_llm.add_rule(contains="nope", status=400)
    chat(fake_llm.url, "a", kind="one")
    chat(fake_llm.url, "nope", kind="two")
    stats = httpx2.get(fake_llm.url.removesuffix("/v1") + "/stats").json()
    assert stats["total"] == 2
    assert stats["by_status"] == {"200": 1, "400": 1}
    assert stats["by_kind"] == {"one": 1, "two": 1}
    assert stats["tokens"]["prompt"] > 0 and stats["tokens"]["completion"] > 0
    assert fake_llm.count(kind="one") == 1 and fake_llm.count(status=400) == 1
    assert fake_llm.requests[1].headers["x-glan-call"] == "two"
    fake_llm.reset()
    assert fake_llm.count() == 0 and fake_llm.rules == []


def test_injected_faults_are_reproducible_with_the_seed():
    def statuses(seed: int) -> list[int]:
        with FakeLLM(seed=seed, rate_429=0.2, rate_500=0.2, retry_after_s=3) as server:
            codes = [chat(server.url, f"m{i}").status_code for i in range(40)]
            r429 = next(r for r in server.requests if r.status == 429)
            assert r429.status == 429
            return codes

    a, b, c = statuses(1), statuses(1), statuses(2)
    assert a == b and a != c
    assert 429 in a and 500 in a and 200 in a


def test_429_carries_retry_after(fake_llm):
    fake_llm.rate_429, fake_llm.retry_after_s = 1.0, 3
    response = chat(fake_llm.url, "x")
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_rate_limit_answers_429_beyond_the_window_share_and_counts_per_second(fake_llm):
    fake_llm.rate_limit_rpm, fake_llm.rate_limit_window_s = 30, 1.0  # half a request per second: 1 per window
    codes = [chat(fake_llm.url, f"r{i}").status_code for i in range(3)]
    assert codes == [200, 429, 429]
    limited = chat(fake_llm.url, "r3")
    assert 0 < float(limited.headers["retry-after-ms"]) <= 1000 and limited.headers["retry-after"] == "1"
    time.sleep(float(limited.headers["retry-after-ms"]) / 1000 + 0.05)
    assert chat(fake_llm.url, "r4").status_code == 200  # refused requests did not count
    stats = httpx2.get(fake_llm.url.removesuffix("/v1") + "/stats").json()
    assert stats["by_fault"] == {"rate_limit": 3}
    assert sum(stats["per_second"].values()) == stats["total"] == 5
    seconds = [int(r.received_at) for r in fake_llm.requests]
    assert stats["per_second"] == {str(s): seconds.count(s) for s in sorted(set(seconds))}


def test_malformed_and_truncated_faults(fake_llm):
    fake_llm.rate_malformed = 1.0
    content = chat(fake_llm.url, "x", schema=SCHEMAS[0]).json()["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(content)
    fake_llm.rate_malformed, fake_llm.rate_truncated = 0.0, 1.0
    choice = chat(fake_llm.url, "y").json()["choices"][0]
    assert choice["finish_reason"] == "length"


def test_timeout_fault_holds_then_drops_the_connection(fake_llm):
    fake_llm.rate_timeout, fake_llm.timeout_hold_s = 1.0, 0.5
    with pytest.raises(httpx2.ReadTimeout):
        httpx2.post(f"{fake_llm.url}/chat/completions", json={"messages": []}, timeout=0.2)


def test_rules_match_kind_and_text_and_expire(fake_llm):
    fake_llm.add_rule(kind="k", contains="X", text="programmed", times=1)
    assert chat(fake_llm.url, "has X", kind="other").json()["choices"][0]["message"]["content"] != "programmed"
    assert chat(fake_llm.url, "has X", kind="k").json()["choices"][0]["message"]["content"] == "programmed"
    assert chat(fake_llm.url, "has X", kind="k").json()["choices"][0]["message"]["content"] != "programmed"


def test_max_tokens_truncates_long_answers(fake_llm):
    choice = chat(fake_llm.url, "x", max_tokens=4).json()["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["message"]["content"].split()) <= 4


async def _hammer(url: str, total: int, in_flight: int) -> float:
    limits = httpx2.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx2.AsyncClient(limits=limits, timeout=30) as client:
        sem = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with sem:
                body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
                response = await client.post(f"{url}/chat/completions", json=body)
                assert response.status_code == 200

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(total)))
        return total / (time.monotonic() - started)


def _serve(*args: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "udfs.servers.fake_llm", "--port", "0", "--no-record", *args],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("fake-llm listening on "), line
    return process, line.split()[-1]


def _cpu_seconds(pid: int) -> float:
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's CPU time from /proc")
def test_server_keeps_up_with_64_in_flight_at_200ms_and_400_per_second():
    process, url = _serve("--latency-ms", "200")
    try:
        before = _cpu_seconds(process.pid)
        achieved = asyncio.run(_hammer(url, 640, 64))
        cpu_per_request = (_cpu_seconds(process.pid) - before) / 640
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    # The server's own cost decides whether it can serve 400 req/s; wall-clock rates on a shared
    # 2-core machine mostly measure the test's client. 1 ms of CPU per request is 1,000 req/s a core.
    assert cpu_per_request < 0.001, cpu_per_request
    # 64 in flight at 200 ms allows at most 320 req/s; the client shares a busy machine, hence the slack.
    assert achieved >= 0.5 * 320
