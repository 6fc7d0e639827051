"""A loopback OpenAI-compatible test server: deterministic answers, recorded requests, faults on demand.

A real HTTP/1.1 server (stdlib asyncio, keep-alive) on 127.0.0.1 speaking

    POST /v1/chat/completions   (also the Azure path /openai/deployments/<d>/chat/completions)
    GET  /v1/models
    POST /v1/files, GET /v1/files/{id}, GET /v1/files/{id}/content          (OpenAI's Files API, purpose=batch)
    POST /v1/batches, GET /v1/batches[/{id}], POST /v1/batches/{id}/cancel  (OpenAI's Batch API)
    GET  /stats                 total chat requests, counts by HTTP status, by call kind, by fault,
                                tokens, `repeated_ok` (successes for messages already answered), and
                                `per_second` (chat requests received in each wall-clock second)

Answers: the call kind is the `X-Glan-Call` header the client sends. With a `response_format`
JSON schema the answer is a valid instance of that schema; without one, a call whose name is in
`udfs.llm.schemas.SCHEMAS` gets its schema's instance as fenced ```json text (the lenient path), and any
other call gets a few paragraphs of free text. Content is seeded by a hash of the messages and the
server seed, made of varied English words, and identical for retries of the same request.

A server-side rate limit like a provider's: with `rate_limit_rpm`, a chat request that finds
rate_limit_rpm * rate_limit_window_s / 60 requests already let through in the trailing
`rate_limit_window_s` seconds is answered 429 at once (fault `rate_limit`, Retry-After until one leaves
the window); requests it refuses do not count against the window.

Faults (429 with Retry-After, 500, held-open timeouts, malformed JSON, truncated output) are drawn
from a hash of (seed, messages, how often these messages were seen), so a run is reproducible
whatever order concurrent requests arrive in, and a retry gets a fresh draw. Tests can also add
rules: `server.add_rule(contains="POISON", status=400)`, `add_rule(kind="x", text="garbage")`.

In-process use runs the server on a background thread:

    server = FakeLLM(latency_ms=20, seed=1); server.start()
    ... LLMConfig(base_url=server.url) ...
    server.count(kind="subjects_list"); server.requests; server.reset(); server.stop()

Batches: a batch is `in_progress` for `batch_processing_s` after its creation, then each line of its
input is answered exactly as the online endpoint answers the same body (the call kind is the batch's
`metadata.glan_call`), successes in the output file, the rest in the error file. Faults: a share of
lines expired (`rate_batch_expired`: the batch ends `expired`) or failed with an error body
(`rate_batch_line_failed`), drawn like the online faults; the next `batch_fail_whole` batches fail as
a whole (`failed`, with `errors`), the next `batch_stuck` batches stay `in_progress` until cancelled.
An input file OpenAI would refuse (bad JSON, duplicate custom_id, mixed models, over
`batch_max_lines`) fails its batch the same way. Files and batches are kept in memory; the
Authorization header is never kept.

CLI (`glan fake-llm` or `python -m udfs.servers.fake_llm`): `--port P --latency-ms N --rate-429 F ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import math
import random
import re
import signal
import struct
import threading
import time
import urllib.parse
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from udfs.llm.schemas import SCHEMAS

log = logging.getLogger("glan.fake_llm")

CALL_HEADER = "x-glan-call"  # lower case: HTTP header names are case-insensitive (see udfs.llm.client)
_CHAT_PATH = re.compile(r"^(/v1)?(/openai/deployments/[^/]+)?/chat/completions$")
_FILES_PATH = re.compile(r"^(?:/v1|/openai)?/files(?:/([^/]+))?(/content)?$")
_BATCHES_PATH = re.compile(r"^(?:/v1|/openai)?/batches(?:/([^/]+))?(/cancel)?$")
Answer = tuple[int, dict[str, str], bytes]  # (HTTP status, extra headers, body)

# ---------------------------------------------------------------------------------------------
# Deterministic English-looking content

_NOUNS = """
theory model system process structure function energy signal network equation method principle
analysis variable pattern element surface layer boundary current pressure density frequency
population market policy contract language grammar narrative history culture society economy
institution organism cell protein enzyme membrane tissue climate river mountain valley ocean
reaction compound molecule crystal circuit algorithm database protocol interface theorem proof
matrix vector integral sequence distribution sample estimate hypothesis experiment observation
evidence argument concept framework strategy resource budget revenue investment instrument melody
rhythm harmony painting sculpture architecture bridge engine turbine sensor material fiber polymer
alloy mineral fossil species habitat ecosystem nutrient vaccine diagnosis therapy symptom patient
teacher student lesson curriculum classroom library archive manuscript poem novel character
dialogue conflict treaty empire revolution election parliament court statute citizen community
neighborhood household income inflation demand supply price trade tariff currency bank loan
credit risk portfolio asset liability audit ledger journal survey interview dataset feature
gradient kernel graph vertex edge tree queue stack compiler kernel thread memory cache processor
satellite orbit planet galaxy telescope spectrum wavelength photon electron nucleus isotope
gene chromosome mutation inheritance trait behavior perception memory emotion motivation attitude
identity ritual belief doctrine ethic virtue justice freedom responsibility duty harbor canal
""".split()

_ADJECTIVES = """
accurate ancient balanced careful central classical complex critical cultural dynamic early
economic efficient elegant empirical essential ethical formal fundamental general global gradual
historical hidden important initial internal linear local logical major minor modern moral
natural nominal numerical objective optimal organic partial physical political practical precise
primary public random rapid rational regional relative reliable robust rural scientific secondary
simple social spatial specific stable standard statistical strategic strong structural subtle
sustainable symbolic technical temporal theoretical thermal typical uniform urban useful various
visual vital
""".split()

_VERBS = """
affects alters balances captures changes compares connects controls defines describes determines
distinguishes drives enables estimates explains expresses extends generates governs identifies
illustrates improves increases influences limits links measures models organizes predicts
preserves produces reduces reflects regulates reveals shapes simplifies supports sustains
transforms
""".split()

_CONNECTORS = ["In practice,", "For example,", "As a result,", "In contrast,", "Historically,",
               "In most cases,", "Moreover,", "At the same time,", "Consequently,", "In general,"]
_PREPOSITIONS = ["within", "across", "through", "under", "beyond", "between", "during", "against"]

_TITLE_KEYS = ("title", "name", "subject", "topic", "concept", "discipline", "keyword", "field", "label")
_QUESTION_KEYS = ("question", "instruction", "prompt", "query", "problem", "task")
_LONG_KEYS = ("answer", "response", "text", "description", "content", "explanation", "summary", "details")


_AN = re.compile(r"\b([Aa]) ([aeiou])")


def _title(rng: random.Random) -> str:
    words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.6 else []
    words += [rng.choice(_NOUNS) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.3:
        words += ["and", rng.choice(_NOUNS)]
    return " ".join(w.capitalize() if w != "and" else w for w in words)


def _sentence(rng: random.Random) -> str:
    a, b, c = rng.choice(_NOUNS), rng.choice(_NOUNS), rng.choice(_NOUNS)
    shape = rng.randrange(4)
    if shape == 0:
        s = f"the {rng.choice(_ADJECTIVES)} {a} {rng.choice(_VERBS)} the {b} {rng.choice(_PREPOSITIONS)} a {rng.choice(_ADJECTIVES)} {c}"
    elif shape == 1:
        s = f"each {a} {rng.choice(_VERBS)} how the {b} and its {c} change over time"
    elif shape == 2:
        s = f"a {rng.choice(_ADJECTIVES)} {a} usually {rng.choice(_VERBS)} the {b} of the {c}"
    else:
        s = f"the {a} {rng.choice(_PREPOSITIONS)} the {b} {rng.choice(_VERBS)} {rng.choice(_ADJECTIVES)} {c} patterns"
    if rng.random() < 0.3:
        s = f"{rng.choice(_CONNECTORS)} {s}"
    s = _AN.sub(r"\1n \2", s)
    return s[0].upper() + s[1:] + "."


def _question(rng: random.Random) -> str:
    a, b = rng.choice(_NOUNS), rng.choice(_NOUNS)
    forms = [f"How does the {rng.choice(_ADJECTIVES)} {a} affect the {b}?",
             f"Explain why a {a} {rng.choice(_VERBS)} the {b} in a {rng.choice(_ADJECTIVES)} setting.",
             f"What is the role of the {a} in the {rng.choice(_ADJECTIVES)} {b}?",
             f"Compare the {a} and the {b}, giving one {rng.choice(_ADJECTIVES)} example of each."]
    return _AN.sub(r"\1n \2", rng.choice(forms))


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def free_text(rng: random.Random) -> str:
    return "\n\n".join(_paragraph(rng, rng.randint(3, 5)) for _ in range(rng.randint(2, 4)))


def _string(rng: random.Random, schema: dict[str, Any], name: str) -> str:
    key = name.lower()
    if any(k in key for k in _QUESTION_KEYS):
        value = _question(rng)
    elif any(k in key for k in _LONG_KEYS):
        value = _paragraph(rng, rng.randint(2, 4))
    elif any(k in key for k in _TITLE_KEYS):
        value = _title(rng)
    else:
        value = _sentence(rng)
    while len(value) < schema.get("minLength", 0):
        value += " " + _sentence(rng)
    if "maxLength" in schema:
        value = value[: schema["maxLength"]]
    return value


def instance(schema: dict[str, Any], rng: random.Random, name: str = "", *, empty_lists: bool = False) -> Any:
    """A value valid for `schema` (the subset in udfs/llm/schemas.py), drawn from `rng`."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "anyOf" in schema:
        return instance(schema["anyOf"][0], rng, name, empty_lists=empty_lists)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties")
        if not props:
            return {"text": _sentence(rng)}
        return {k: instance(v, rng, k, empty_lists=empty_lists) for k, v in props.items()}
    if kind == "array":
        lo = schema.get("minItems", 0)
        hi = schema.get("maxItems")
        if empty_lists:
            count = 0
        else:
            lo_nonempty = max(lo, 1) if hi != 0 else 0
            top = lo_nonempty + 4 if hi is None else min(hi, lo_nonempty + 6)
            count = rng.randint(lo_nonempty, max(lo_nonempty, top))
        item_schema = schema.get("items") or {"type": "string"}
        item_name = name[:-1] if name.endswith("s") else name
        items: list[Any] = []
        for _ in range(count):
            value = instance(item_schema, rng, item_name, empty_lists=empty_lists)
            for _retry in range(3):  # lists of titles read better without repeats
                if value not in items:
                    break
                value = instance(item_schema, rng, item_name, empty_lists=empty_lists)
            items.append(value)
        return items
    if kind == "string":
        return _string(rng, schema, name)
    if kind == "integer":
        lo = int(schema.get("minimum", 1))
        return rng.randint(lo, int(schema.get("maximum", lo + 9)))
    if kind == "number":
        lo = float(schema.get("minimum", 0.0))
        return round(rng.uniform(lo, float(schema.get("maximum", lo + 100.0))), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    return None


# ---------------------------------------------------------------------------------------------
# Rules and records


@dataclass
class Rule:
    """A programmed answer for requests whose text contains `contains` and/or whose call is `kind`.

    `status` != 200 answers an OpenAI-style error (`echo_key`: "masked" or "full" puts the bearer key
    in the message, as OpenAI's 401 does); otherwise `text` (verbatim content), `empty_lists` (schema
    instance with every array empty) or the normal answer, with `finish_reason`. `times` limits how
    many requests the rule answers; `delay_ms` adds latency."""

    contains: str | None = None
    kind: str | None = None
    status: int = 200
    text: str | None = None
    finish_reason: str = "stop"
    empty_lists: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    echo_key: str | None = None
    times: int | None = None
    delay_ms: float = 0.0
    hits: int = 0

    def matches(self, kind: str, text: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.kind is not None and self.kind != kind:
            return False
        return self.contains is None or self.contains in text


@dataclass
class RecordedRequest:
    kind: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0
    fault: str | None = None
    received_at: float = 0.0

    @property
    def text(self) -> str:
        return _messages_text(self.body)


def _messages_text(body: Any) -> str:
    """The text of a chat body's messages, which rules match against."""
    messages = body.get("messages", []) if isinstance(body, dict) else []
    return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


@dataclass(frozen=True)
class _Draw:
    """What one request's answer is drawn from: the hash of its messages and seeds (the content),
    the hash of that and how often it was seen before (the faults: a retry draws afresh), and the
    rule that answers it, if any."""

    canonical: bytes
    content_digest: bytes
    fault_digest: bytes
    seen: int
    rule: Rule | None


def _u(digest: bytes, index: int) -> float:
    """The index-th uniform [0, 1) number of a hash."""
    return struct.unpack_from(">I", digest, 4 * index)[0] / 2**32


def _tokens(text: str) -> int:
    return max(1, round(len(text.split()) * 1.3))


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request's response_format asks for ({} for a bare json_object); None
    without one."""
    response_format = body.get("response_format") or {}
    if response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema") or {}
    if response_format.get("type") == "json_object":
        return response_format.get("schema") or {}
    return None


def _cap_tokens(content: str, finish: str, max_tokens: Any) -> tuple[str, str, int]:
    """(content, finish_reason, completion tokens), content cut at max_tokens as a model stops at
    its limit."""
    tokens = _tokens(content)
    if isinstance(max_tokens, int) and tokens > max_tokens and finish == "stop":
        content = " ".join(content.split(" ")[: max(1, int(max_tokens / 1.3))])
        return content, "length", _tokens(content)
    return content, finish, tokens


# ---------------------------------------------------------------------------------------------
# Batch API: files and batches


_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
_CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
_BATCH_ENDPOINTS = ("/v1/chat/completions", "/chat/completions")  # OpenAI's, and Azure's deployments


@dataclass
class _Batch:
    """A batch: `obj` is the OpenAI batch object as served; the rest is how it will end."""

    obj: dict[str, Any]
    number: int
    lines: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    kind: str
    processing_s: float
    stuck: bool
    started: float = 0.0


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename or None, content)."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if boundary is None:
        return {}
    fields: dict[str, tuple[str | None, bytes]] = {}
    for chunk in raw.split(b"--" + boundary.group(1).encode("latin-1")):
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        disposition = head.decode("latin-1")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name is not None:
            fields[name.group(1)] = (filename.group(1) if filename else None, content.removesuffix(b"\r\n"))
    return fields


def _line_problem(item: Any, endpoint: str, custom_ids: set[str], models: set[str]) -> tuple[str, str] | None:
    """(code, message) when one input line would make OpenAI refuse the whole file, else None."""
    if not isinstance(item, dict):
        return "invalid_request", "A line is not a JSON object."
    for name in ("custom_id", "method", "url", "body"):
        if name not in item:
            return "missing_required_parameter", f"Missing required parameter: '{name}'."
    if not isinstance(item["custom_id"], str) or not item["custom_id"]:
        return "invalid_custom_id", "custom_id must be a non-empty string."
    if item["custom_id"] in custom_ids:
        return "duplicate_custom_id", f"The custom_id '{item['custom_id']}' is not unique in this file."
    if item["method"] != "POST":
        return "invalid_method", f"Only POST is supported, not '{item['method']}'."
    if item["url"] != endpoint:
        return "mismatched_endpoint", f"The url '{item['url']}' does not match the batch endpoint '{endpoint}'."
    body = item["body"]
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return "invalid_request", "body must be a JSON object with messages."
    models.add(str(body.get("model")))
    if len(models) > 1:
        return "mismatched_model", "All requests in a batch input file must use the same model."
    return None


def _parse_batch_input(content: bytes, endpoint: str, max_lines: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(lines, errors): the requests of an input file, and the errors (code, message, line) for which
    OpenAI fails the whole batch at validation."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    custom_ids: set[str] = set()
    models: set[str] = set()
    for number, text in enumerate(content.decode("utf-8", errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except ValueError:
            item, problem = None, ("invalid_json_line", "This line is not parseable as valid JSON.")
        else:
            problem = _line_problem(item, endpoint, custom_ids, models)
        if problem is not None:
            errors.append({"code": problem[0], "message": problem[1], "param": None, "line": number})
            continue
        custom_ids.add(item["custom_id"])
        lines.append(item)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "The input file has no requests.", "param": None, "line": None})
    if len(lines) > max_lines:
        errors.append({"code": "too_many_requests", "param": None, "line": None,
                       "message": f"The input file has {len(lines)} requests; the limit is {max_lines}."})
    return lines, errors


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _line_row(digest: bytes, custom_id: str, status: int | None, body: dict[str, Any] | None,
              error: dict[str, str] | None = None) -> dict[str, Any]:
    """One line of an output or error file; `status` None: the request never ran (error set)."""
    response = None if status is None else {"status_code": status, "request_id": f"req_{digest.hex()[:24]}", "body": body}
    return {"id": f"batch_req_{digest.hex()[24:48]}", "custom_id": custom_id, "response": response, "error": error}


# ---------------------------------------------------------------------------------------------
# The server


def _check_settings(shares: dict[str, float], rate_limit_rpm: int | None, rate_limit_window_s: float) -> None:
    for name, rate in shares.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name}={rate} is outside [0, 1]")
    if shares["rate_429"] + shares["rate_500"] + shares["rate_timeout"] > 1.0:
        raise ValueError("rate_429 + rate_500 + rate_timeout must be <= 1")
    if (rate_limit_rpm is not None and rate_limit_rpm <= 0) or rate_limit_window_s <= 0:
        raise ValueError(f"rate_limit_rpm={rate_limit_rpm} and rate_limit_window_s={rate_limit_window_s} must be > 0")


class FakeLLM:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        rate_429: float = 0.0,
        rate_500: float = 0.0,
        rate_timeout: float = 0.0,
        rate_malformed: float = 0.0,
        rate_truncated: float = 0.0,
        retry_after_s: float = 1.0,
        timeout_hold_s: float = 30.0,
        jitter_ms: float = 0.0,
        seed: int = 0,
        model: str = "fake-llm",
        record: bool = True,
        batch_processing_s: float = 0.0,
        rate_batch_expired: float = 0.0,
        rate_batch_line_failed: float = 0.0,
        batch_fail_whole: int = 0,
        batch_stuck: int = 0,
        batch_max_lines: int = 50_000,
        batch_max_bytes: int = 200 * 2**20,
        rate_limit_rpm: int | None = None,
        rate_limit_window_s: float = 10.0,
    ):
        _check_settings({"rate_429": rate_429, "rate_500": rate_500, "rate_timeout": rate_timeout,
                         "rate_malformed": rate_malformed, "rate_truncated": rate_truncated,
                         "rate_batch_expired": rate_batch_expired, "rate_batch_line_failed": rate_batch_line_failed},
                        rate_limit_rpm, rate_limit_window_s)
        self.host, self.port = host, port
        self.latency_ms, self.jitter_ms = latency_ms, jitter_ms
        self.rate_429, self.rate_500, self.rate_timeout = rate_429, rate_500, rate_timeout
        self.rate_malformed, self.rate_truncated = rate_malformed, rate_truncated
        self.retry_after_s, self.timeout_hold_s = retry_after_s, timeout_hold_s
        self.seed, self.model, self.record = seed, model, record
        self.rate_limit_rpm, self.rate_limit_window_s = rate_limit_rpm, rate_limit_window_s
        # Batch API: the knobs are read when a batch is created (processing time, whole-batch faults)
        # or finished (the per-line shares); fail_whole and stuck count down one per batch created.
        self.batch_processing_s = batch_processing_s
        self.rate_batch_expired, self.rate_batch_line_failed = rate_batch_expired, rate_batch_line_failed
        self.batch_fail_whole, self.batch_stuck = batch_fail_whole, batch_stuck
        self.batch_max_lines, self.batch_max_bytes = batch_max_lines, batch_max_bytes
        self._ids = itertools.count(1)  # file and batch ids: unique for the server's life, reset or not
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, _Batch] = {}
        self._batch_lock = threading.RLock()  # taken before self._lock, never inside it
        self.requests: list[RecordedRequest] = []
        self.rules: list[Rule] = []
        self._seen: Counter[bytes] = Counter()
        self._stats: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self.reset()

    # -- in-process API -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL clients take (`llm.base_url`)."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeLLM:
        ready = threading.Event()
        error: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # surfaced to the caller of start()
                error.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-llm", daemon=True)
        self._thread.start()
        ready.wait(10)
        if error:
            raise error[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget requests, statistics, rules, fault history, files and batches (settings stay)."""
        with self._batch_lock:
            self._files, self._batches = {}, {}
        with self._lock:
            self.requests = []
            self.rules = []
            self._seen = Counter()
            self._answered: set[bytes] = set()
            self._let_through: deque[float] = deque()  # monotonic times of requests the rate limit let through
            self._stats = {"total": 0, "per_second": Counter(), "repeated_ok": 0, "by_status": Counter(), "by_kind": Counter(), "by_fault": Counter(),
                           "prompt_tokens": 0, "completion_tokens": 0,
                           "files_uploaded": 0, "batches": Counter(), "batch_lines": Counter()}

    def add_rule(self, **kwargs: Any) -> Rule:
        rule = Rule(**kwargs)
        with self._lock:
            self.rules.append(rule)
        return rule

    def count(self, kind: str | None = None, status: int | None = None) -> int:
        return sum(1 for r in list(self.requests)
                   if (kind is None or r.kind == kind) and (status is None or r.status == status))

    def stats(self) -> dict[str, Any]:
        """Online: chat requests by status, kind and fault, and tokens. `batch`: files uploaded,
        batches by outcome (created, completed, expired, failed, cancelled), batch lines by outcome
        (completed, expired, failed, cancelled, repeated_ok) and their tokens."""
        self._advance_batches()  # a batch past its processing time is finished before it is counted
        with self._lock:
            s = self._stats
            lines = s["batch_lines"]
            batch = {"files_uploaded": s["files_uploaded"],
                     "batches": {k: s["batches"][k] for k in ("created", "completed", "expired", "failed", "cancelled")},
                     "lines": {k: lines[k] for k in ("completed", "expired", "failed", "cancelled", "repeated_ok")},
                     "tokens": {"prompt": lines["prompt_tokens"], "completion": lines["completion_tokens"]}}
            return {"total": s["total"], "repeated_ok": s["repeated_ok"], "by_status": {str(k): v for k, v in s["by_status"].items()},
                    "by_kind": dict(s["by_kind"]), "by_fault": dict(s["by_fault"]),
                    "tokens": {"prompt": s["prompt_tokens"], "completion": s["completion_tokens"]}, "batch": batch,
                    "per_second": {str(k): v for k, v in sorted(s["per_second"].items())}}

    # -- HTTP -----------------------------------------------------------------------------------

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    break
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split(" ")
                if len(parts) < 2:
                    break
                method, target = parts[0], parts[1]
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                path, _, query = target.partition("?")
                answer = await self._dispatch(method, path, query, headers, body)
                if answer is None:  # a held-open "timeout": drop the connection without a reply
                    break
                status, extra, payload = answer
                reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
                          429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "Error")
                content_type = extra.get("content-type", "application/json")
                head_out = [f"HTTP/1.1 {status} {reason}", f"content-type: {content_type}",
                            f"content-length: {len(payload)}"]
                head_out += [f"{k}: {v}" for k, v in extra.items() if k != "content-type"]
                writer.write(("\r\n".join(head_out) + "\r\n\r\n").encode("latin-1") + payload)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping; ending quietly keeps asyncio from logging each connection
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    async def _dispatch(self, method: str, path: str, query: str, headers: dict[str, str],
                        body: bytes) -> Answer | None:
        if method == "GET" and path in ("/v1/models", "/models"):
            data = {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "glan"}]}
            return 200, {}, json.dumps(data).encode()
        if method == "GET" and path == "/stats":
            return 200, {}, json.dumps(self.stats()).encode()
        if method == "POST" and _CHAT_PATH.match(path):
            return await self._chat(path, headers, body)
        if _FILES_PATH.match(path) or _BATCHES_PATH.match(path):
            return self._batch_api(method, path, query, headers, body)
        return 404, {}, json.dumps({"error": {"message": f"no route {method} {path}"}}).encode()

    # -- chat completions -----------------------------------------------------------------------

    def _finish(self, record: RecordedRequest, status: int, fault: str | None = None,
                prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        record.status, record.fault = status, fault
        with self._lock:
            s = self._stats
            s["by_status"][status] += 1
            if fault:
                s["by_fault"][fault] += 1
            s["prompt_tokens"] += prompt_tokens
            s["completion_tokens"] += completion_tokens

    @staticmethod
    def _error(status: int, message: str, kind: str, extra: dict[str, str] | None = None) -> Answer:
        return status, extra or {}, json.dumps(_error_body(message, kind)).encode()

    async def _chat(self, path: str, headers: dict[str, str], raw: bytes) -> Answer | None:
        """One chat completion: recorded, delayed, then a rule's error, a drawn fault (None: held open
        without a reply) or a completion."""
        record = self._record(path, headers, raw)
        body = record.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._finish(record, 400)
            return self._error(400, "body must be a JSON object with messages", "invalid_request_error")
        limited = self._rate_limited()
        if limited is not None:
            self._finish(record, 429, "rate_limit")
            return self._error(429, "Rate limit reached for requests per minute (fake)", "rate_limit_exceeded",
                               {"retry-after": f"{math.ceil(limited)}", "retry-after-ms": f"{limited * 1000:.0f}"})
        draw = self._draw(body, record.kind, record.text)
        await self._wait(draw)
        if draw.rule is not None and draw.rule.status != 200:
            return self._rule_error(record, draw.rule, headers)
        if draw.rule is None:
            fault = self._drawn_fault(draw.fault_digest)
            if fault == "timeout":
                self._finish(record, 0, "timeout")
                await asyncio.sleep(self.timeout_hold_s)
                return None
            if fault is not None:
                return self._fault_error(record, fault)
        content, finish, fault = self._content(body, record.kind, draw)
        return self._completion(record, body, draw, content, finish, fault)

    def _rate_limited(self) -> float | None:
        """None when the rate limit lets this request through (counted), else the seconds until
        the oldest request it counts leaves the window."""
        if self.rate_limit_rpm is None:
            return None
        now = time.monotonic()
        allowed = max(1, int(self.rate_limit_rpm * self.rate_limit_window_s / 60.0))
        with self._lock:
            while self._let_through and self._let_through[0] <= now - self.rate_limit_window_s:
                self._let_through.popleft()
            if len(self._let_through) >= allowed:
                return max(0.001, self._let_through[0] + self.rate_limit_window_s - now)
            self._let_through.append(now)
        return None

    def _record(self, path: str, headers: dict[str, str], raw: bytes) -> RecordedRequest:
        """The request with its body parsed (None when it is not JSON), counted, and kept when
        `record` is on."""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        kind = headers.get(CALL_HEADER, "unknown")
        record = RecordedRequest(kind=kind, path=path, headers=headers, body=body, received_at=time.time())
        with self._lock:
            self._stats["total"] += 1
            self._stats["by_kind"][kind] += 1
            self._stats["per_second"][int(record.received_at)] += 1
            if self.record:
                self.requests.append(record)
        return record

    def _draw(self, body: dict[str, Any], kind: str, text: str) -> _Draw:
        """The hashes this request's answer is drawn from, and the first rule that matches it (its
        hit counted)."""
        canonical = json.dumps(body["messages"], sort_keys=True).encode()
        content_digest = hashlib.sha256(canonical + f"|{self.seed}|{body.get('seed')}".encode()).digest()
        with self._lock:
            seen = self._seen[content_digest]
            self._seen[content_digest] += 1
            rule = next((r for r in self.rules if r.matches(kind, text)), None)
            if rule is not None:
                rule.hits += 1
        fault_digest = hashlib.sha256(content_digest + seen.to_bytes(4, "big")).digest()
        return _Draw(canonical, content_digest, fault_digest, seen, rule)

    async def _wait(self, draw: _Draw) -> None:
        """The latency: the setting, plus drawn jitter, plus the rule's delay."""
        delay = self.latency_ms
        if self.jitter_ms:
            delay += _u(draw.fault_digest, 5) * self.jitter_ms
        if draw.rule is not None:
            delay += draw.rule.delay_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)

    def _rule_error(self, record: RecordedRequest, rule: Rule, headers: dict[str, str]) -> Answer:
        """A rule's error answer; with `echo_key`, worded as OpenAI's 401 with the bearer key in it."""
        message = f"rule answered {rule.status}"
        if rule.echo_key:
            key = headers.get("authorization", "").removeprefix("Bearer ").strip() or headers.get("api-key", "")
            shown = key if rule.echo_key == "full" else f"{key[:3]}{'*' * max(0, len(key) - 7)}{key[-4:]}"
            message = (f"Incorrect API key provided: {shown}. You can find your API key at "
                       "https://platform.openai.com/account/api-keys.")
        self._finish(record, rule.status, "rule")
        return self._error(rule.status, message, "rule_error", dict(rule.headers))

    def _drawn_fault(self, fault_digest: bytes) -> str | None:
        """"429", "500", "timeout" or None, drawn at the configured rates."""
        draw = _u(fault_digest, 0)
        if draw < self.rate_429:
            return "429"
        if draw < self.rate_429 + self.rate_500:
            return "500"
        if draw < self.rate_429 + self.rate_500 + self.rate_timeout:
            return "timeout"
        return None

    def _fault_error(self, record: RecordedRequest, fault: str) -> Answer:
        """The error answer of a drawn "429" (with Retry-After) or "500"."""
        if fault == "429":
            self._finish(record, 429, "429")
            return self._error(429, "Rate limit reached for requests (fake)", "rate_limit_exceeded",
                               {"retry-after": f"{self.retry_after_s:g}"})
        self._finish(record, 500, "500")
        return self._error(500, "The server had an error processing your request (fake)", "server_error")

    def _content(self, body: dict[str, Any], kind: str, draw: _Draw) -> tuple[str, str, str | None]:
        """(content, finish_reason, fault): the rule's text; else an instance of the requested schema
        as JSON, of the call's registry schema as fenced JSON, or free text; without a rule, perhaps
        made malformed or truncated at the configured rates."""
        rule = draw.rule
        if rule is not None and rule.text is not None:
            return rule.text, rule.finish_reason, None
        schema = _response_schema(body)
        registry_schema = SCHEMAS.get(kind) if schema is None else None
        rng = random.Random(draw.content_digest)
        empty = rule.empty_lists if rule is not None else False
        if schema is not None:
            content = json.dumps(instance(schema, rng, kind, empty_lists=empty), ensure_ascii=False)
        elif registry_schema is not None:
            value = instance(registry_schema, rng, kind, empty_lists=empty)
            content = f"Here is the result:\n\n```json\n{json.dumps(value, indent=2, ensure_ascii=False)}\n```\n"
        else:
            content = free_text(rng)
        if rule is not None:
            return content, rule.finish_reason, None
        if (schema is not None or registry_schema is not None) and _u(draw.fault_digest, 1) < self.rate_malformed:
            cut = max(1, int(len(content) * (0.3 + 0.4 * _u(draw.fault_digest, 2))))
            return content[:cut].replace("```", "") + ' "unterminated', "stop", "malformed"
        if _u(draw.fault_digest, 3) < self.rate_truncated:
            return content[: max(1, len(content) // 2)], "length", "truncated"
        return content, "stop", None

    def _completion(self, record: RecordedRequest, body: dict[str, Any], draw: _Draw, content: str,
                    finish: str, fault: str | None) -> Answer:
        """The 200 answer, counted."""
        payload = self._completion_body(body, draw, content, finish)
        usage = payload["usage"]
        self._finish(record, 200, fault, usage["prompt_tokens"], usage["completion_tokens"])
        with self._lock:
            # A second successful answer to the same messages: a client that retried a success.
            if draw.content_digest in self._answered:
                self._stats["repeated_ok"] += 1
            self._answered.add(draw.content_digest)
        return 200, {}, json.dumps(payload, ensure_ascii=False).encode()

    def _completion_body(self, body: dict[str, Any], draw: _Draw, content: str, finish: str) -> dict[str, Any]:
        """The chat.completion object, online and in a batch's output line alike: content cut at
        max_tokens, usage counted (a repeated prompt as cached)."""
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        content, finish, completion_tokens = _cap_tokens(content, finish, max_tokens)
        prompt_tokens = max(1, len(draw.canonical) // 4)
        cached = prompt_tokens if draw.seen else 0  # a repeat of a prompt (a retry) counts as cached, as OpenAI's cache would
        return {
            "id": f"chatcmpl-{draw.content_digest.hex()[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached}},
        }

    # -- batch API: files -------------------------------------------------------------------------

    def _batch_api(self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes) -> Answer:
        """/v1/files and /v1/batches. No header is kept: the Authorization key is never stored."""
        files = _FILES_PATH.match(path)
        if files is not None:
            file_id, content = files.groups()
            if method == "POST" and file_id is None:
                return self._upload(headers, raw)
            if method == "GET" and file_id is not None:
                return self._file_answer(file_id, content is not None)
        batches = _BATCHES_PATH.match(path)
        if batches is not None:
            batch_id, cancel = batches.groups()
            if method == "POST" and batch_id is None:
                return self._create_batch(raw)
            if method == "GET" and batch_id is None:
                return self._list_batches(query)
            if method == "GET" and cancel is None:
                return self._batch_answer(batch_id)
            if method == "POST" and cancel is not None:
                return self._cancel_batch(batch_id)
        return self._error(404, f"no route {method} {path}", "invalid_request_error")

    def _new_id(self, prefix: str, what: str) -> str:
        return f"{prefix}{hashlib.sha256(f'{self.seed}|{what}|{next(self._ids)}'.encode()).hexdigest()[:24]}"

    def _upload(self, headers: dict[str, str], raw: bytes) -> Answer:
        fields = _multipart(headers.get("content-type", ""), raw)
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", errors="replace")
        if "file" not in fields:
            return self._error(400, "Missing required parameter: 'file'.", "invalid_request_error")
        if purpose != "batch":  # the only purpose this server serves
            return self._error(400, f"purpose '{purpose}' is not supported here; use 'batch'.", "invalid_request_error")
        filename, content = fields["file"]
        if len(content) > self.batch_max_bytes:
            return self._error(400, f"File is {len(content)} bytes; the limit is {self.batch_max_bytes}.",
                               "invalid_request_error")
        obj = self._store_file(filename or "upload.jsonl", content, "batch")
        with self._lock:
            self._stats["files_uploaded"] += 1
        return 200, {}, json.dumps(obj).encode()

    def _store_file(self, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        obj = {"id": self._new_id("file-", "file"), "object": "file", "bytes": len(content),
               "created_at": int(time.time()), "expires_at": None, "filename": filename, "purpose": purpose,
               "status": "processed", "status_details": None}
        with self._batch_lock:
            self._files[obj["id"]] = (obj, content)
        return obj

    def _file_answer(self, file_id: str, content: bool) -> Answer:
        with self._batch_lock:
            stored = self._files.get(file_id)
        if stored is None:
            return self._error(404, f"No such File object: {file_id}", "invalid_request_error")
        if content:
            return 200, {"content-type": "application/octet-stream"}, stored[1]
        return 200, {}, json.dumps(stored[0]).encode()

    # -- batch API: batches -----------------------------------------------------------------------

    def _create_batch(self, raw: bytes) -> Answer:
        """A new batch, `validating`; its input is checked now and the faults to come are drawn now.
        The call kind of its lines (the X-Glan-Call header online) is `metadata.glan_call`."""
        try:
            request = json.loads(raw or b"{}")
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("metadata") or {}, dict):
            return self._error(400, "body must be a JSON object (metadata an object)", "invalid_request_error")
        endpoint, file_id = request.get("endpoint"), request.get("input_file_id")
        if endpoint not in _BATCH_ENDPOINTS:
            return self._error(400, f"endpoint '{endpoint}' is not supported; use /v1/chat/completions.",
                               "invalid_request_error")
        if request.get("completion_window") != "24h":
            return self._error(400, "completion_window must be '24h'.", "invalid_request_error")
        with self._batch_lock:
            stored = self._files.get(file_id)
            if stored is None:
                return self._error(404, f"No such File object: {file_id}", "invalid_request_error")
            lines, errors = _parse_batch_input(stored[1], endpoint, self.batch_max_lines)
            batch = self._new_batch(request, lines, errors)
            self._batches[batch.obj["id"]] = batch
            answer = json.dumps(batch.obj).encode()
        with self._lock:
            self._stats["batches"]["created"] += 1
        return 200, {}, answer

    def _new_batch(self, request: dict[str, Any], lines: list[dict[str, Any]], errors: list[dict[str, Any]]) -> _Batch:
        """The batch object, with the whole-batch faults (fail, stuck) taken from their countdowns."""
        now = time.time()
        model = lines[0]["body"].get("model") if lines else None
        if self.batch_fail_whole > 0 and not errors:
            self.batch_fail_whole -= 1
            errors = [{"code": "token_limit_exceeded", "param": None, "line": None,
                       "message": f"Enqueued token limit reached for {model} in organization org-fake. "
                                  "Please try again once some in_progress batches have been completed."}]
        stuck = self.batch_stuck > 0
        if stuck:
            self.batch_stuck -= 1
        metadata = request.get("metadata") or {}
        obj = {"id": self._new_id("batch_", "batch"), "object": "batch", "endpoint": request["endpoint"],
               "model": model, "errors": None, "input_file_id": request["input_file_id"], "completion_window": "24h",
               "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": int(now),
               "in_progress_at": None, "expires_at": int(now) + 86400, "finalizing_at": None, "completed_at": None,
               "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
               "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata or None}
        return _Batch(obj=obj, number=len(self._batches), lines=lines, errors=errors,
                      kind=str(metadata.get("glan_call", "unknown")), processing_s=self.batch_processing_s,
                      stuck=stuck, started=now)

    def _batch_answer(self, batch_id: str) -> Answer:
        with self._batch_lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                return self._error(404, f"No such Batch object: {batch_id}", "invalid_request_error")
            self._advance(batch, time.time())
            return 200, {}, json.dumps(batch.obj).encode()

    def _list_batches(self, query: str) -> Answer:
        """A cursor page, newest first, as OpenAI lists: `limit` (1-100, default 20) after `after`."""
        params = urllib.parse.parse_qs(query)
        try:
            limit = min(100, max(1, int(params.get("limit", ["20"])[0])))
        except ValueError:
            return self._error(400, "limit must be an integer", "invalid_request_error")
        after = params.get("after", [None])[0]
        self._advance_batches()
        with self._batch_lock:
            ordered = sorted(self._batches.values(), key=lambda b: b.number, reverse=True)
            ids = [b.obj["id"] for b in ordered]
            start = ids.index(after) + 1 if after in ids else 0
            page = [dict(b.obj) for b in ordered[start:start + limit]]
        data = {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(ordered)}
        return 200, {}, json.dumps(data).encode()

    def _cancel_batch(self, batch_id: str) -> Answer:
        """validating or in_progress -> cancelling (cancelled on the next look); a finished batch
        cannot be cancelled."""
        with self._batch_lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                return self._error(404, f"No such Batch object: {batch_id}", "invalid_request_error")
            self._advance(batch, time.time())
            obj = batch.obj
            if obj["status"] in ("validating", "in_progress"):
                obj.update(status="cancelling", cancelling_at=int(time.time()))
            elif obj["status"] != "cancelling":
                return self._error(400, f"Cannot cancel a batch with status '{obj['status']}'.",
                                   "invalid_request_error")
            return 200, {}, json.dumps(obj).encode()

    # -- batch API: processing --------------------------------------------------------------------

    def _advance_batches(self) -> None:
        with self._batch_lock:
            now = time.time()
            for batch in self._batches.values():
                self._advance(batch, now)

    def _advance(self, batch: _Batch, now: float) -> None:
        """Move a batch on as far as `now` allows: validating -> failed or in_progress; in_progress
        -> completed or expired once its processing time is over (never when stuck); cancelling ->
        cancelled."""
        obj = batch.obj
        if obj["status"] == "validating":
            if batch.errors:
                obj.update(status="failed", failed_at=int(now), errors={"object": "list", "data": batch.errors})
                with self._lock:
                    self._stats["batches"]["failed"] += 1
                return
            obj.update(status="in_progress", in_progress_at=int(now))
            obj["request_counts"] = {"total": len(batch.lines), "completed": 0, "failed": 0}
        if obj["status"] == "cancelling":
            rows = [_line_row(hashlib.sha256(f"{obj['id']}|{line['custom_id']}".encode()).digest(), line["custom_id"],
                            None, None, {"code": "batch_cancelled", "message": _CANCELLED_MESSAGE})
                    for line in batch.lines]
            self._end_batch(batch, now, "cancelled", [], rows, Counter(cancelled=len(rows)))
        elif obj["status"] == "in_progress" and not batch.stuck and now >= batch.started + batch.processing_s:
            self._run_batch(batch, now)

    def _run_batch(self, batch: _Batch, now: float) -> None:
        """Answer every line; the batch ends expired when any line expired (its other lines still
        answered, as OpenAI does), else completed."""
        outputs: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        counts: Counter[str] = Counter()
        for line in batch.lines:
            outcome, row = self._batch_line(batch, line, counts)
            counts[outcome] += 1
            (outputs if outcome == "completed" else failures).append(row)
        self._end_batch(batch, now, "expired" if counts["expired"] else "completed", outputs, failures, counts)

    def _batch_line(self, batch: _Batch, line: dict[str, Any], counts: Counter[str]) -> tuple[str, dict[str, Any]]:
        """("completed" | "expired" | "failed", the output or error line). Content, rules and the
        content faults (malformed, truncated) are the online path's; the draws advance with every
        answer, so a resubmitted line draws afresh."""
        body, custom_id = line["body"], line["custom_id"]
        draw = self._draw(body, batch.kind, _messages_text(body))
        digest = draw.fault_digest
        if _u(digest, 6) < self.rate_batch_expired:
            return "expired", _line_row(digest, custom_id, None, None, {"code": "batch_expired", "message": _EXPIRED_MESSAGE})
        if draw.rule is not None and draw.rule.status != 200:
            return "failed", _line_row(digest, custom_id, draw.rule.status,
                                       _error_body(f"rule answered {draw.rule.status}", "rule_error"))
        if _u(digest, 7) < self.rate_batch_line_failed:
            return "failed", _line_row(digest, custom_id, 500,
                                       _error_body("The server had an error processing your request (fake)", "server_error"))
        content, finish, _fault = self._content(body, batch.kind, draw)
        payload = self._completion_body(body, draw, content, finish)
        counts["prompt_tokens"] += payload["usage"]["prompt_tokens"]
        counts["completion_tokens"] += payload["usage"]["completion_tokens"]
        with self._lock:
            if draw.content_digest in self._answered:
                counts["repeated_ok"] += 1
            self._answered.add(draw.content_digest)
        return "completed", _line_row(digest, custom_id, 200, payload)

    def _end_batch(self, batch: _Batch, now: float, status: str, outputs: list[dict[str, Any]],
                   failures: list[dict[str, Any]], counts: Counter[str]) -> None:
        """The batch in its final status, with its output and error files (None when empty), counted."""
        obj = batch.obj
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]
        obj.update(status=status, finalizing_at=int(now), **{stamp: int(now)})
        obj["request_counts"] = {"total": len(batch.lines), "completed": len(outputs), "failed": len(failures)}
        if outputs:
            obj["output_file_id"] = self._store_file(f"{obj['id']}_output.jsonl", _jsonl(outputs), "batch_output")["id"]
        if failures:
            obj["error_file_id"] = self._store_file(f"{obj['id']}_error.jsonl", _jsonl(failures), "batch_output")["id"]
        with self._lock:
            self._stats["batches"][status] += 1
            self._stats["batch_lines"].update(counts)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="extra random latency, up to this")
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--rate-500", type=float, default=0.0)
    parser.add_argument("--rate-timeout", type=float, default=0.0)
    parser.add_argument("--rate-malformed", type=float, default=0.0)
    parser.add_argument("--rate-truncated", type=float, default=0.0)
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds on a 429")
    parser.add_argument("--timeout-hold-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="keep counters only, not every request")
    parser.add_argument("--batch-processing-s", type=float, default=0.0, help="seconds before a batch completes")
    parser.add_argument("--rate-batch-expired", type=float, default=0.0, help="share of batch lines expired")
    parser.add_argument("--rate-batch-line-failed", type=float, default=0.0, help="share of batch lines failed")
    parser.add_argument("--batch-fail-whole", type=int, default=0, help="the next N batches fail as a whole")
    parser.add_argument("--batch-stuck", type=int, default=0, help="the next N batches stay in_progress")
    parser.add_argument("--rate-limit-rpm", type=int, default=None,
                        help="answer 429 beyond this many requests per minute (counted per --rate-limit-window-s)")
    parser.add_argument("--rate-limit-window-s", type=float, default=10.0)


def run(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGINT/SIGTERM. Prints the base URL as its first line."""
    server = FakeLLM(
        host=args.host, port=args.port, latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
        rate_429=args.rate_429, rate_500=args.rate_500, rate_timeout=args.rate_timeout,
        rate_malformed=args.rate_malformed, rate_truncated=args.rate_truncated,
        retry_after_s=args.retry_after, timeout_hold_s=args.timeout_hold_s, seed=args.seed,
        record=not args.no_record, batch_processing_s=args.batch_processing_s,
        rate_batch_expired=args.rate_batch_expired, rate_batch_line_failed=args.rate_batch_line_failed,
        batch_fail_whole=args.batch_fail_whole, batch_stuck=args.batch_stuck,
        rate_limit_rpm=args.rate_limit_rpm, rate_limit_window_s=args.rate_limit_window_s,
    )

    async def serve() -> None:
        await server._open()
        print(f"fake-llm listening on {server.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server._close()

    asyncio.run(serve())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glan fake-llm", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
