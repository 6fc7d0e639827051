"""The provider's Batch API, through the `openai` package: request files uploaded, batches created,
looked at, found again by their metadata after a crash, and their output read back. OpenAI, Azure
OpenAI's batch deployments and any server with the same `/files` and `/batches` routes.

The key is read from the environment when a `BatchAPI` is built, like the online client's, and is
redacted from every error this module raises. It never reaches a request file: those hold bodies.
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai
from openai.types import Batch

from udfs.llm.client import PLACEHOLDER_KEY, redact, resolve_api_key
from udfs.llm.config import LLMConfig, StageLLMConfig

LIVE = ("validating", "in_progress", "finalizing", "cancelling")  # the provider is still working on it
ENDED = ("completed", "failed", "expired", "cancelled")
SUBMISSION = "glan_submission"  # the batch's metadata key that names our ledger row


class BatchAPIError(RuntimeError):
    """A Files or Batches request that failed after the client's retries (message redacted)."""


def batch_url(llm: LLMConfig) -> str:
    """The endpoint of every line and of the batch: OpenAI's `/v1/chat/completions`; Azure OpenAI's
    batch deployments take `/chat/completions`."""
    return "/chat/completions" if llm.endpoint == "azure" else "/v1/chat/completions"


def batch_model(llm: LLMConfig, stage: StageLLMConfig) -> str:
    """The model a request line names: on Azure, the batch deployment (llm.azure_deployment, else
    the stage's model as the deployment's name)."""
    return (llm.azure_deployment or stage.model) if llm.endpoint == "azure" else stage.model


def request_line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    """One line of a request file (JSONL), without its newline."""
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body},
                      ensure_ascii=False, separators=(",", ":"))


class BatchAPI:
    """A synchronous client for the few control calls of batch mode (the driver makes them). The
    openai package retries 429s, 5xx and connection errors itself, `llm.max_attempts` times."""

    def __init__(self, llm: LLMConfig) -> None:
        self.llm = llm
        try:
            self._secret: str | None = resolve_api_key(llm)
        except KeyError as exc:
            raise BatchAPIError(str(exc.args[0])) from None
        common: dict[str, Any] = {"api_key": self._secret or PLACEHOLDER_KEY, "timeout": llm.timeout_s,
                                  "max_retries": max(0, llm.max_attempts - 1),
                                  "default_headers": dict(llm.default_headers) or None}
        if llm.endpoint == "azure":
            self.client: openai.OpenAI = openai.AzureOpenAI(azure_endpoint=llm.base_url, api_version=llm.api_version,
                                                            **common)
        else:
            self.client = openai.OpenAI(base_url=llm.base_url, **common)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> BatchAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _failed(self, what: str, exc: Exception) -> BatchAPIError:
        status = getattr(exc, "status_code", None)
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        return BatchAPIError(redact(f"{what}: {'HTTP ' + str(status) + ': ' if status else ''}{message}",
                                    self._secret) or what)

    def upload(self, name: str, data: bytes) -> str:
        """The id of a new file (purpose batch) holding `data`."""
        try:
            return self.client.files.create(file=(name, data, "application/jsonl"), purpose="batch").id
        except openai.OpenAIError as exc:
            raise self._failed(f"uploading the request file {name}", exc) from None

    def create(self, file_id: str, metadata: dict[str, str]) -> Batch:
        try:
            return self.client.batches.create(input_file_id=file_id, endpoint=batch_url(self.llm),  # type: ignore[arg-type]
                                              completion_window=self.llm.batch.completion_window,  # type: ignore[arg-type]
                                              metadata=metadata)
        except openai.OpenAIError as exc:
            raise self._failed(f"creating a batch from {file_id}", exc) from None

    def retrieve(self, batch_id: str) -> Batch:
        try:
            return self.client.batches.retrieve(batch_id)
        except openai.OpenAIError as exc:
            raise self._failed(f"looking at batch {batch_id}", exc) from None

    def find(self, submission_id: str, since: float) -> Batch | None:
        """The batch created for our submission, if one was (a run that died between creating it
        and writing its id down): the provider's list, newest first, back to `since` (epoch s)."""
        try:
            for batch in self.client.batches.list(limit=100):
                if (batch.metadata or {}).get(SUBMISSION) == submission_id:
                    return batch
                if batch.created_at < since:
                    return None
        except openai.OpenAIError as exc:
            raise self._failed(f"listing batches to find submission {submission_id}", exc) from None
        return None

    def download(self, file_id: str) -> bytes:
        try:
            return self.client.files.content(file_id).content
        except openai.OpenAIError as exc:
            raise self._failed(f"downloading file {file_id}", exc) from None


def ended_at(batch: Batch) -> int | None:
    """When the batch reached its final status (epoch s), if it has."""
    for name in ("completed_at", "failed_at", "expired_at", "cancelled_at"):
        value = getattr(batch, name, None)
        if value:
            return int(value)
    return None


def batch_error(batch: Batch) -> str | None:
    """The provider's message for a batch that failed as a whole (validation, token limit)."""
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) or []
    messages = [f"{e.code}: {e.message}" if getattr(e, "code", None) else str(e.message) for e in data]
    return "; ".join(messages) or None


def since(created_at_s: float, slack_s: float = 2 * 86400.0) -> float:
    """How far back `find` looks for a submission written down at `created_at_s`: two days more, as
    clocks and time zones differ (a batch lives 24 hours at most)."""
    return min(created_at_s, time.time()) - slack_s
