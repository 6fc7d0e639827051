"""The LLM client: one per Spark task, many requests in flight, results in input order.

`LLMClient.run(spec, requests)` sends every request of a batch at once through an asyncio
semaphore-like AIMD limiter and the RPM/TPM budget (leased from the driver's rate coordinator, or
the task's static share of it: udfs/llm/coordinator.py `task_budget`), retries transient failures
with tenacity, parses and validates structured output (one repair call on failure), and returns one
result dict per request (see RESULT_FIELDS). It never raises for a bad row: the row's result carries
`error_class` and `error_message` instead.

The API key is read from the environment variable named by `llm.api_key_env` when the client is
built (inside the task); it is never stored in config, closures or results, and is redacted from
every message the client returns or logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import openai
from openai.types.chat import ChatCompletion
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from udfs.llm.config import LLMConfig, StageLLMConfig
from udfs.llm.coordinator import task_budget
from udfs.llm.limits import AdaptiveLimiter
from udfs.llm.prompts import Prompt, load_prompt
from udfs.llm.structured import parse_output

log = logging.getLogger("glan.llm")

CALL_HEADER = "X-Glan-Call"  # every request names its prompt, so servers and tests can tell calls apart
PLACEHOLDER_KEY = "sk-no-key-required"  # for endpoints without auth (embedded, test server)
REPAIR_CALL = "repair"

# The columns of one result, in the order of LLM_RESULT (udfs/llm_udf.py).
RESULT_FIELDS: tuple[str, ...] = (
    "text",  # the model's output (for a repaired call: the repair's output)
    "parsed",  # the validated JSON value as a JSON string; null for free-text calls and failures
    "error_class",  # null on success; see ERROR_CLASSES
    "error_message",
    "attempts",  # HTTP requests sent for this row, retries and the repair call included
    "repaired",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "latency_s",  # first request sent to result ready, back-off waits included
    "model",  # as reported by the endpoint
    "finish_reason",
    "seed",
    "prompt_name",
    "prompt_version",
    "batch_id",  # the provider's batch that answered (null: online)
    "billing",  # online | batch: the price the row's tokens were paid at
)

ERROR_CLASSES = (
    "rate_limited", "server_error", "timeout", "connection",  # transient, retried until max_attempts
    "bad_request", "auth", "not_found", "http_4xx",  # other 4xx: fail at once
    "truncated",  # finish_reason == "length": never accepted as complete
    "parse_error",  # no valid JSON for the schema, after the repair call
    "empty_output", "prompt_error", "missing_api_key", "internal",
)


# ---------------------------------------------------------------------------------------------
# Secrets


def _common_run(token: str, secret: str, min_len: int) -> bool:
    """True if `token` and `secret` share a substring of at least `min_len` characters."""
    if len(token) < min_len:
        return False
    return any(token[i : i + min_len] in secret for i in range(len(token) - min_len + 1))


_TOKEN = re.compile(r"[^\s'\",;:()\[\]{}<>]+")


def redact(text: str | None, secret: str | None) -> str | None:
    """`text` with the secret removed, including partial echoes such as OpenAI's
    "Incorrect API key provided: sk-CANA*********1234" (any word sharing 6+ characters with the
    key, or a masked word with a run of `*`, is replaced)."""
    if not text or not secret or secret == PLACEHOLDER_KEY:
        return text
    text = text.replace(secret, "[REDACTED]")
    min_len = min(6, len(secret))

    def scrub(match: re.Match[str]) -> str:
        word = match.group(0)
        if "***" in word or _common_run(word, secret, min_len):
            return "[REDACTED]"
        return word

    return _TOKEN.sub(scrub, text)


def is_loopback(url: str | None) -> bool:
    host = urlparse(url or "").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def resolve_api_key(llm: LLMConfig) -> str:
    """The key from the environment; a placeholder for the embedded and loopback endpoints, which
    take no auth. Raises KeyError (naming only the variable) when a real endpoint has none."""
    if llm.endpoint == "embedded":
        return PLACEHOLDER_KEY  # never hand a real key to the local server
    value = os.environ.get(llm.api_key_env)
    if value:
        return value
    if is_loopback(llm.base_url):
        return PLACEHOLDER_KEY
    raise KeyError(f"environment variable {llm.api_key_env} (llm.api_key_env) is not set")


def make_openai_client(llm: LLMConfig, api_key: str, base_url: str | None = None) -> openai.AsyncOpenAI:
    """The openai async client with its own retries off: tenacity alone decides what is retried."""
    common: dict[str, Any] = {
        "api_key": api_key,
        "timeout": llm.timeout_s,
        "max_retries": 0,
        "default_headers": dict(llm.default_headers) or None,
    }
    if llm.endpoint == "azure":
        return openai.AsyncAzureOpenAI(
            azure_endpoint=base_url or llm.base_url,
            azure_deployment=llm.azure_deployment,
            api_version=llm.api_version,
            **common,
        )
    return openai.AsyncOpenAI(base_url=base_url or llm.base_url, **common)


# ---------------------------------------------------------------------------------------------
# Retries


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's `retry-after-ms` / `Retry-After` (seconds or HTTP date) hint, if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None
    return None


def is_retryable(exc: BaseException) -> bool:
    """429, 5xx, timeouts and connection errors; every other 4xx fails at once."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError))


class BackoffWait:
    """Exponential backoff with jitter, but never shorter than the server's Retry-After."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None):
        self.initial_s, self.max_s = initial_s, max_s
        self.rng = rng or random.Random()

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        base = min(self.max_s, self.initial_s * 2 ** (state.attempt_number - 1))
        wait = base / 2 + self.rng.uniform(0, base / 2)  # "equal jitter": spread retries, keep a floor
        hint = retry_after_seconds(exc) if exc is not None else None
        if hint is not None:
            # Honour the hint exactly (plus a little jitter so a burst of 429s does not come back as
            # a burst), but not beyond the configured ceiling.
            wait = min(self.max_s, hint + self.rng.uniform(0, min(0.1 * hint, 0.25)))
        return wait


def error_class_of(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        return status_class(exc.status_code)
    return "internal"


def status_class(code: int | None) -> str:
    """The error class of an HTTP status that is not 200 (None: no status at all)."""
    if code is None:
        return "internal"
    if code == 429:
        return "rate_limited"
    if code >= 500:
        return "server_error"
    return {400: "bad_request", 401: "auth", 403: "auth", 404: "not_found"}.get(code, "http_4xx")


def error_message_of(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"HTTP {status}: {message}" if status else message


# ---------------------------------------------------------------------------------------------
# Calls


@dataclass(frozen=True)
class CallSpec:
    """What one UDF asks: the prompt (for its name and version), the stage's sampling settings and
    the JSON schema of the answer (None: free text)."""

    prompt: Prompt
    stage: StageLLMConfig
    schema: dict[str, Any] | None = None
    repair_prompt: Prompt | None = None  # loaded on the driver with the spec when schema is set

    @property
    def call(self) -> str:
        return self.prompt.name


@dataclass(frozen=True)
class LLMRequest:
    messages: list[dict[str, str]]
    seed: int | None = None  # added to the stage's seed, so samples of one prompt differ


class _CallFailed(Exception):
    def __init__(self, error_class: str, message: str):
        super().__init__(message)
        self.error_class, self.message = error_class, message


@dataclass
class _RowState:
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    model: str | None = None
    finish_reason: str | None = None


@dataclass
class _Completion:
    text: str | None
    finish_reason: str | None


def _response_format(llm: LLMConfig, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    if llm.endpoint == "embedded":
        # llama-cpp-python's server takes the schema on a json_object format and compiles it to a grammar.
        return {"type": "json_object", "schema": schema}
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "output"
    return {"type": "json_schema", "json_schema": {"name": safe, "schema": schema, "strict": False}}


def estimate_prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    """About 4 characters per token, plus a few per message: an estimate for before the endpoint counts."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 8 * len(messages)


def _estimate_tokens(messages: Sequence[dict[str, str]], max_tokens: int) -> int:
    # OpenAI counts max_tokens against the TPM limit up front.
    return estimate_prompt_tokens(messages) + max_tokens


def request_seed(llm: LLMConfig, stage: StageLLMConfig, row_seed: int | None) -> int | None:
    """The seed a request sends: the stage's plus the row's (None: none sent)."""
    if not llm.send_seed or (stage.seed is None and row_seed is None):
        return None
    return (stage.seed or 0) + (row_seed or 0)


def chat_body(llm: LLMConfig, spec: CallSpec, call: str, messages: list[dict[str, str]], seed: int | None,
              temperature: float | None = None) -> dict[str, Any]:
    """The body of one chat completion request, online and in a batch's request file alike."""
    stage = spec.stage
    body: dict[str, Any] = {
        "model": stage.model,
        "messages": messages,
        "temperature": stage.temperature if temperature is None else temperature,
        "top_p": stage.top_p,
        "max_tokens": stage.max_tokens,
    }
    if seed is not None:
        body["seed"] = seed
    if spec.schema is not None and llm.json_schema_mode:
        body["response_format"] = _response_format(llm, call, spec.schema)
    if llm.endpoint == "embedded":
        body["repeat_penalty"] = llm.embedded.repeat_penalty  # llama.cpp's sampling extension
    return body


def _take_completion(response: ChatCompletion, state: _RowState) -> _Completion:
    """The answer of a chat completion, its usage added to the row's."""
    usage = response.usage
    if usage is not None:
        state.prompt_tokens += usage.prompt_tokens or 0
        state.completion_tokens += usage.completion_tokens or 0
        details = getattr(usage, "prompt_tokens_details", None)
        state.cached_tokens += (getattr(details, "cached_tokens", None) or 0) if details else 0
    state.model = response.model or state.model
    choice = response.choices[0] if response.choices else None
    finish = choice.finish_reason if choice is not None else None
    state.finish_reason = finish
    text = choice.message.content if choice is not None and choice.message is not None else None
    return _Completion(text=text, finish_reason=finish)


def _read_completion(body: dict[str, Any], state: _RowState) -> _Completion:
    return _take_completion(ChatCompletion.model_validate(body), state)


@dataclass(frozen=True)
class BatchAnswer:
    """One line of a batch's output file: the provider's HTTP status and chat completion body (or
    its error message), with the seed that was sent and the batch it came from."""

    status_code: int | None
    body: dict[str, Any] | None
    message: str | None
    seed: int | None
    batch_id: str
    latency_s: float


class LLMClient:
    """One per task. Owns an event loop, the openai client and the budget (limiter and rate budgets).

    `coordinator`: the URL of the driver's rate coordinator (udfs/llm/coordinator.py); None, or no
    RPM/TPM budget set: the task's static share of the budgets."""

    def __init__(self, llm: LLMConfig, *, concurrent_tasks: int = 1, base_url: str | None = None,
                 coordinator: str | None = None):
        self.llm = llm
        self.base_url = base_url or llm.base_url
        self.concurrent_tasks = max(1, concurrent_tasks)
        self.budget = task_budget(llm, self.concurrent_tasks, coordinator)
        self._wait = BackoffWait(llm.backoff_initial_s, llm.backoff_max_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._key_error: str | None = None
        self._secret: str | None = None
        try:
            self._secret = resolve_api_key(llm)
        except KeyError as exc:
            self._key_error = str(exc.args[0])

    # -- lifecycle ------------------------------------------------------------------------------

    def _openai(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = make_openai_client(self.llm, self._secret or PLACEHOLDER_KEY, self.base_url)
        return self._client

    @property
    def limiter(self) -> AdaptiveLimiter:
        return self.budget.limiter

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self.budget.aclose())  # leased allowance goes back to the driver
        if self._client is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self._client.close())
        self._client = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
        self._loop = None

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def redact(self, text: str | None) -> str | None:
        return redact(text, self._secret)

    # -- public API -----------------------------------------------------------------------------

    def run(self, spec: CallSpec, requests: Iterable[LLMRequest | BaseException]) -> list[dict[str, Any]]:
        """Results for a batch, in input order. An exception in place of a request (e.g. a prompt
        that failed to render) becomes that row's error result."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self.arun(spec, list(requests)))

    async def arun(self, spec: CallSpec, requests: Sequence[LLMRequest | BaseException]) -> list[dict[str, Any]]:
        started = time.monotonic()
        results = await asyncio.gather(*(self._row(spec, r) for r in requests))
        failures = sum(1 for r in results if r["error_class"])
        log.info(
            "llm call=%s rows=%d failures=%d requests=%d in_flight_limit=%d seconds=%.1f",
            spec.call, len(results), failures, sum(r["attempts"] for r in results),
            self.limiter.allowed, time.monotonic() - started,
        )
        return results

    async def acall(self, spec: CallSpec, request: LLMRequest) -> dict[str, Any]:
        return await self._row(spec, request)

    # -- one row --------------------------------------------------------------------------------

    async def _row(self, spec: CallSpec, request: LLMRequest | BaseException) -> dict[str, Any]:
        state = _RowState()
        started = time.monotonic()
        text = parsed = error_class = error_message = None
        repaired = False
        seed = None
        try:
            if isinstance(request, BaseException):
                raise _CallFailed("prompt_error", f"{type(request).__name__}: {request}")
            if self._key_error:
                raise _CallFailed("missing_api_key", self._key_error)
            seed = self._seed(spec.stage, request.seed)
            completion = await self._complete(spec.call, request.messages, spec, seed, state)
            text = completion.text
            text, parsed, repaired = await self._validated(spec, completion, seed, state)
        except _CallFailed as exc:
            error_class, error_message = exc.error_class, exc.message
        except Exception as exc:  # one bad row must never take its batch down
            error_class = error_class_of(exc)
            error_message = error_message_of(exc)
        return self._result(spec, state, text, parsed, error_class, error_message, repaired,
                            time.monotonic() - started, seed)

    def _result(self, spec: CallSpec, state: _RowState, text: str | None, parsed: str | None,
                error_class: str | None, error_message: str | None, repaired: bool, latency_s: float,
                seed: int | None, batch_id: str | None = None) -> dict[str, Any]:
        return {
            "text": self.redact(text),
            "parsed": parsed,
            "error_class": error_class,
            "error_message": self.redact(error_message),
            "attempts": state.attempts,
            "repaired": repaired,
            "prompt_tokens": state.prompt_tokens,
            "completion_tokens": state.completion_tokens,
            "cached_tokens": state.cached_tokens,
            "latency_s": latency_s,
            "model": state.model,
            "finish_reason": state.finish_reason,
            "seed": seed,
            "prompt_name": spec.prompt.name,
            "prompt_version": spec.prompt.version,
            "batch_id": batch_id,
            # A batch answer repaired online was partly paid at the online price: priced online, whole.
            "billing": "batch" if batch_id is not None and not repaired else "online",
        }

    async def _validated(self, spec: CallSpec, completion: _Completion, seed: int | None,
                         state: _RowState) -> tuple[str | None, str | None, bool]:
        """(text, parsed JSON, repaired) of a complete answer, else _CallFailed: an output cut at
        max_tokens is never complete; a structured one must match its schema, after one repair call."""
        text, parsed, repaired = completion.text, None, False
        if completion.finish_reason == "length":
            raise _CallFailed("truncated", f"output hit max_tokens={spec.stage.max_tokens} (finish_reason=length)")
        if spec.schema is None:
            if not (text or "").strip():
                raise _CallFailed("empty_output", "the model returned no text")
        else:
            value, problem = parse_output(text, spec.schema)
            if problem:
                text, value = await self._repair(spec, text, problem, seed, state)
                repaired = True
            parsed = json.dumps(value, ensure_ascii=False)
        return text, parsed, repaired

    # -- answers that came from a batch ---------------------------------------------------------

    def finish(self, spec: CallSpec, answers: Sequence[BatchAnswer]) -> list[dict[str, Any]]:
        """Results of answers a provider's batch returned, checked exactly as online answers are
        (truncation, empty text, JSON schema with one repair call, sent online), in input order."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._finish_all(spec, answers))

    async def _finish_all(self, spec: CallSpec, answers: Sequence[BatchAnswer]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._finish_one(spec, a) for a in answers)))

    async def _finish_one(self, spec: CallSpec, answer: BatchAnswer) -> dict[str, Any]:
        state = _RowState(attempts=1)
        text = parsed = error_class = error_message = None
        repaired = False
        try:
            if answer.status_code != 200 or answer.body is None:
                raise _CallFailed(status_class(answer.status_code), answer.message or "no answer")
            completion = _read_completion(answer.body, state)
            text = completion.text
            text, parsed, repaired = await self._validated(spec, completion, answer.seed, state)
        except _CallFailed as exc:
            error_class, error_message = exc.error_class, exc.message
        except Exception as exc:  # one bad line must never take its batch down
            error_class, error_message = error_class_of(exc), error_message_of(exc)
        return self._result(spec, state, text, parsed, error_class, error_message, repaired, answer.latency_s,
                            answer.seed, answer.batch_id)

    def _seed(self, stage: StageLLMConfig, row_seed: int | None) -> int | None:
        return request_seed(self.llm, stage, row_seed)

    async def _repair(
        self, spec: CallSpec, broken: str | None, problem: str, seed: int | None, state: _RowState
    ) -> tuple[str | None, Any]:
        prompt = spec.repair_prompt or load_prompt(REPAIR_CALL)
        messages = prompt.render(
            output=broken or "", error=problem, schema=json.dumps(spec.schema, ensure_ascii=False, indent=1)
        )
        try:
            completion = await self._complete(REPAIR_CALL, messages, spec, seed, state, temperature=0.0)
        except Exception as exc:
            raise _CallFailed("parse_error", f"{problem}; repair call failed: {error_message_of(exc)}") from None
        if completion.finish_reason == "length":
            raise _CallFailed("truncated", f"{problem}; repair output hit max_tokens={spec.stage.max_tokens}")
        value, second = parse_output(completion.text, spec.schema)
        if second:
            raise _CallFailed("parse_error", f"{problem}; after repair: {second}")
        return completion.text, value

    async def _complete(
        self,
        call: str,
        messages: list[dict[str, str]],
        spec: CallSpec,
        seed: int | None,
        state: _RowState,
        temperature: float | None = None,
    ) -> _Completion:
        body = chat_body(self.llm, spec, call, messages, seed, temperature)
        estimate = _estimate_tokens(messages, spec.stage.max_tokens)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.llm.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            reraise=True,
        )
        completion = None
        async for attempt in retrying:
            with attempt:
                completion = await self._attempt(call, body, estimate, state)
        assert completion is not None
        return completion

    async def _attempt(self, call: str, body: dict[str, Any], estimate: int, state: _RowState) -> _Completion:
        ticket = await self.budget.acquire(estimate)  # a slot, then the budget
        try:
            state.attempts += 1
            try:
                # The client's generic post (documented for endpoints it has no method for) sends the
                # same request as chat.completions.create, without re-walking every message through
                # the SDK's TypedDict transform: that walk costs more CPU than the rest of the call.
                response = await self._openai().post(
                    "/chat/completions", body=body, cast_to=ChatCompletion, options={"headers": {CALL_HEADER: call}}
                )
            except openai.RateLimitError:
                self.budget.unused(ticket, estimate)
                await self.budget.overloaded(ticket)
                raise
            except Exception:
                self.budget.unused(ticket, estimate)
                raise
            self.budget.succeeded(ticket)
        finally:
            self.budget.release()
        usage = response.usage
        if usage is not None:
            self.budget.settle(ticket, estimate, (usage.prompt_tokens or 0) + (usage.completion_tokens or 0))
        state.model = body["model"]
        return _take_completion(response, state)
