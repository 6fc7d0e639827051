"""The loopback test server's Batch API, driven by the real `openai` client: files, batches, the
processing time, the injected faults, listing, cancelling and the counters."""

from __future__ import annotations

import itertools
import json
import time

import openai
import pytest

from udfs.servers.fake_llm import FakeLLM

pytest_plugins = ["tests.fake_llm_fixture"]

API_KEY = "sk-batch-test-0123456789abcdef"
SCHEMA = {"type": "object", "properties": {"subjects": {"type": "array", "items": {"type": "string"},
                                                        "minItems": 2, "maxItems": 4}}, "required": ["subjects"]}


def make_client(server: FakeLLM) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=10)


def chat_body(i: int, **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": f"request number {i}"}], **extra}


def submit(client: openai.OpenAI, bodies: dict[str, dict], kind: str = "test"):
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}
             for cid, body in bodies.items()]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("requests.jsonl", content), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"glan_call": kind})


def rows(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    """custom_id -> line of an output or error file ({} for no file)."""
    if file_id is None:
        return {}
    lines = [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    return {line["custom_id"]: line for line in lines}


def online(client: openai.OpenAI, body: dict, kind: str) -> tuple[str, str, int]:
    """(content, finish_reason, completion tokens) of the online answer to `body`."""
    answer = client.chat.completions.create(**body, extra_headers={"X-Glan-Call": kind})
    choice = answer.choices[0]
    return choice.message.content, choice.finish_reason, answer.usage.completion_tokens


BODIES = {
    "free": chat_body(0),
    "schema": chat_body(1, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}),
    "seeded": chat_body(2, seed=11, temperature=0.7),
    "short": chat_body(3, max_tokens=5),
}


@pytest.mark.parametrize("kind", ["test", "subjects_convert"])
def test_batch_output_lines_equal_the_online_answers(fake_llm, kind):
    client = make_client(fake_llm)
    batch = submit(client, BODIES, kind)
    assert batch.status == "validating" and batch.request_counts.total == 0
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 4, 0)
    output = rows(client, done.output_file_id)
    assert sorted(output) == sorted(BODIES)
    for cid, body in BODIES.items():
        line = output[cid]
        assert line["error"] is None and line["response"]["status_code"] == 200
        answer = line["response"]["body"]
        choice = answer["choices"][0]
        batch_answer = (choice["message"]["content"], choice["finish_reason"], answer["usage"]["completion_tokens"])
        assert batch_answer == online(client, body, kind), cid
    assert output["short"]["response"]["body"]["choices"][0]["finish_reason"] == "length"
    if kind == "subjects_convert":  # the kind picks the registry schema, as the header does online
        assert "```json" in output["free"]["response"]["body"]["choices"][0]["message"]["content"]
    assert len({line["id"] for line in output.values()}) == 4


def test_processing_time_is_honoured(fake_llm):
    fake_llm.batch_processing_s = 0.8
    client = make_client(fake_llm)
    started = time.time()
    batch = submit(client, {"a": chat_body(0), "b": chat_body(1)})
    early = client.batches.retrieve(batch.id)
    assert time.time() - started < 0.8  # the check below means something only if this held
    assert early.status == "in_progress" and early.output_file_id is None
    assert early.request_counts.total == 2 and early.request_counts.completed == 0
    time.sleep(0.9)
    late = client.batches.retrieve(batch.id)
    assert late.status == "completed" and late.completed_at is not None
    assert sorted(rows(client, late.output_file_id)) == ["a", "b"]


def expired_and_failed(server: FakeLLM, n: int) -> tuple[set[str], set[str], set[str], object]:
    client = make_client(server)
    batch = client.batches.retrieve(submit(client, {f"r{i}": chat_body(i) for i in range(n)}).id)
    output, errors = rows(client, batch.output_file_id), rows(client, batch.error_file_id)
    expired = {cid for cid, line in errors.items() if line["response"] is None}
    failed = set(errors) - expired
    return set(output), expired, failed, batch


def test_expired_and_failed_lines_land_in_the_error_file(fake_llm):
    fake_llm.rate_batch_expired, fake_llm.rate_batch_line_failed = 0.2, 0.2
    done, expired, failed, batch = expired_and_failed(fake_llm, 100)
    assert batch.status == "expired" and batch.expired_at is not None
    assert 8 <= len(expired) <= 35 and 5 <= len(failed) <= 35, (len(expired), len(failed))
    assert done | expired | failed == {f"r{i}" for i in range(100)} and not done & (expired | failed)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(done), len(expired) + len(failed))
    errors = rows(make_client(fake_llm), batch.error_file_id)
    assert {errors[cid]["error"]["code"] for cid in expired} == {"batch_expired"}
    assert {errors[cid]["response"]["status_code"] for cid in failed} == {500}
    assert all("error" in errors[cid]["response"]["body"] and errors[cid]["error"] is None for cid in failed)
    lines = fake_llm.stats()["batch"]["lines"]
    assert (lines["completed"], lines["expired"], lines["failed"]) == (len(done), len(expired), len(failed))
    with FakeLLM(seed=fake_llm.seed, rate_batch_expired=0.2, rate_batch_line_failed=0.2) as twin:
        assert expired_and_failed(twin, 100)[1:3] == (expired, failed)  # the draws are seeded


def test_resubmitted_lines_are_answered(fake_llm):
    fake_llm.rate_batch_expired = 0.3
    _, expired, _, _ = expired_and_failed(fake_llm, 40)
    assert expired
    fake_llm.rate_batch_expired = 0.0
    client = make_client(fake_llm)
    again = client.batches.retrieve(submit(client, {cid: chat_body(int(cid[1:])) for cid in expired}).id)
    assert again.status == "completed" and set(rows(client, again.output_file_id)) == expired


def test_failed_lines_alone_leave_the_batch_completed(fake_llm):
    fake_llm.rate_batch_line_failed = 0.3
    done, expired, failed, batch = expired_and_failed(fake_llm, 40)
    assert batch.status == "completed" and not expired and failed and done
    assert batch.error_file_id is not None and batch.output_file_id is not None


def test_rules_answer_batch_lines_as_they_answer_online(fake_llm):
    fake_llm.add_rule(contains="POISON", status=400)
    client = make_client(fake_llm)
    bodies = {"ok": chat_body(0), "bad": {"model": "m", "messages": [{"role": "user", "content": "POISON"}]}}
    batch = client.batches.retrieve(submit(client, bodies).id)
    assert set(rows(client, batch.output_file_id)) == {"ok"}
    assert rows(client, batch.error_file_id)["bad"]["response"]["status_code"] == 400


def test_a_whole_batch_fails_then_the_next_one_runs(fake_llm):
    fake_llm.batch_fail_whole = 1
    client = make_client(fake_llm)
    failed = client.batches.retrieve(submit(client, {"a": chat_body(0)}).id)
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.output_file_id is None and failed.error_file_id is None
    assert failed.errors.data[0].code == "token_limit_exceeded" and "m" in failed.errors.data[0].message
    assert client.batches.retrieve(submit(client, {"a": chat_body(0)}).id).status == "completed"
    assert fake_llm.stats()["batch"]["batches"] == {"created": 2, "completed": 1, "expired": 0, "failed": 1,
                                                    "cancelled": 0}


def test_an_input_file_openai_would_refuse_fails_its_batch(fake_llm):
    client = make_client(fake_llm)
    good = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(0)}
    lines = [json.dumps(good), json.dumps(good), "{not json",
             json.dumps({**good, "custom_id": "b", "url": "/v1/embeddings"}),
             json.dumps({**good, "custom_id": "c", "body": chat_body(1, model="other")})]
    uploaded = client.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("duplicate_custom_id", 2), ("invalid_json_line", 3), ("mismatched_endpoint", 4), ("mismatched_model", 5)]


def test_a_stuck_batch_stays_in_progress_until_cancelled(fake_llm):
    fake_llm.batch_stuck = 1
    client = make_client(fake_llm)
    batch = submit(client, {"a": chat_body(0), "b": chat_body(1)})
    time.sleep(0.2)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    assert client.batches.cancel(batch.id).status == "cancelling"
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    errors = rows(client, cancelled.error_file_id)
    assert {cid: line["error"]["code"] for cid, line in errors.items()} == {"a": "batch_cancelled", "b": "batch_cancelled"}
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)
    with pytest.raises(openai.BadRequestError):  # a finished batch cannot be cancelled either
        client.batches.cancel(client.batches.retrieve(submit(client, {"a": chat_body(0)}).id).id)
    stats = fake_llm.stats()["batch"]
    assert stats["batches"]["cancelled"] == 1 and stats["lines"]["cancelled"] == 2 and stats["lines"]["completed"] == 1


def test_list_pages_newest_first(fake_llm):
    client = make_client(fake_llm)
    ids = [submit(client, {"a": chat_body(i)}).id for i in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[:2:-1] and page.has_more
    followed = [b.id for b in itertools.islice(client.batches.list(limit=2), 10)]  # a cursor bug cannot hang
    assert followed == ids[::-1]  # the client follows the cursor
    assert {b.status for b in client.batches.list()} == {"completed"}


def test_files_round_trip_and_refusals(fake_llm):
    client = make_client(fake_llm)
    content = b'{"custom_id": "x"}\n'
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(content), "in.jsonl", "batch")
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).content == content
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-missing")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("in.jsonl", content), purpose="fine-tune")
    fake_llm.batch_max_bytes = 10
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("in.jsonl", content), purpose="batch")
    assert fake_llm.stats()["batch"]["files_uploaded"] == 1


def test_the_api_key_is_kept_nowhere(fake_llm):
    fake_llm.rate_batch_expired = 0.3
    client = make_client(fake_llm)
    batch = client.batches.retrieve(submit(client, {f"r{i}": chat_body(i) for i in range(10)}).id)
    client.batches.list()
    kept = [json.dumps(fake_llm.stats()), repr(fake_llm._batches), repr(fake_llm.requests)]
    kept += [repr(obj) + content.decode() for obj, content in fake_llm._files.values()]
    assert batch.error_file_id and not any(API_KEY in text or API_KEY[3:] in text for text in kept)


def test_the_azure_client_runs_a_batch_on_the_same_routes(fake_llm):
    azure = openai.AzureOpenAI(azure_endpoint=fake_llm.url.removesuffix("/v1"), api_key=API_KEY,
                               api_version="2024-10-21", max_retries=0, timeout=10)
    line = {"custom_id": "a", "method": "POST", "url": "/chat/completions", "body": chat_body(0, model="deployment")}
    uploaded = azure.files.create(file=("in.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
    batch = azure.batches.create(input_file_id=uploaded.id, endpoint="/chat/completions", completion_window="24h")
    done = azure.batches.retrieve(batch.id)
    assert done.status == "completed"
    output = rows(azure, done.output_file_id)["a"]["response"]["body"]
    assert output["choices"][0]["message"]["content"] == online(make_client(fake_llm), chat_body(0), "unknown")[0]
