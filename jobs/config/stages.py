"""Settings of the GLAN pipeline's LLM stages, with the paper's values as defaults (GLAN.md).

The paper names GPT-4 for taxonomy, subjects, syllabi and questions and GPT-3.5-turbo for answers;
the defaults here are their current equivalents at the paper's own cost estimate (GPT-4o and
GPT-4o-mini). The sampling settings are the paper's: T 1.0 / top_p 0.95 for subjects and syllabi,
T 0.7 / top_p 0.95 for answers. Conversion and extraction calls are deterministic (T 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from udfs.config_checks import at_least, require
from udfs.llm.config import StageLLMConfig

STRONG_MODEL = "gpt-4o"
CHEAP_MODEL = "gpt-4o-mini"


def _strong(temperature: float = 1.0, top_p: float = 0.95, max_tokens: int = 2048) -> StageLLMConfig:
    return StageLLMConfig(model=STRONG_MODEL, temperature=temperature, top_p=top_p, max_tokens=max_tokens)


@dataclass(frozen=True)
class SubjectsConfig:
    """GLAN step 2: `samples_per_discipline` free-text lists, each converted to structured subjects."""

    samples_per_discipline: int = 10
    max_subjects_per_sample: int = 40  # the JSON schema's maxItems (llama.cpp grammars need a bound)
    llm: StageLLMConfig = field(default_factory=lambda: _strong(1.0, 0.95, 4096))
    convert_llm: StageLLMConfig = field(default_factory=lambda: _strong(0.0, 1.0, 4096))

    def __post_init__(self) -> None:
        at_least(self, 1, "samples_per_discipline", "max_subjects_per_sample")


@dataclass(frozen=True)
class SyllabusConfig:
    """GLAN step 3: one syllabus per subject, then its class sessions and key concepts extracted."""

    max_sessions: int = 30  # the paper sees 10-30 sessions per syllabus
    max_concepts_per_session: int = 10  # about 5 in the paper
    llm: StageLLMConfig = field(default_factory=lambda: _strong(1.0, 0.95, 8192))
    extract_llm: StageLLMConfig = field(default_factory=lambda: _strong(0.0, 1.0, 8192))

    def __post_init__(self) -> None:
        at_least(self, 1, "max_sessions", "max_concepts_per_session")


@dataclass(frozen=True)
class QuestionsConfig:
    """GLAN step 4: one homework question per concept combination (the paper does not give its
    sampling settings; the defaults follow its other generation calls)."""

    llm: StageLLMConfig = field(default_factory=lambda: _strong(1.0, 0.95, 1024))


@dataclass(frozen=True)
class AnswersConfig:
    """GLAN step 5: a cheaper model answers each question, T 0.7, top_p 0.95."""

    llm: StageLLMConfig = field(default_factory=lambda: StageLLMConfig(
        model=CHEAP_MODEL, temperature=0.7, top_p=0.95, max_tokens=4096))
    # The paper sends the question alone. A system message here steers every answer (e.g. toward
    # chain of thought), which changes the data away from GLAN's: off (null) by default.
    system_prompt: str | None = None


@dataclass(frozen=True)
class PipelineConfig:
    """How LLM work is cut into Spark tasks and commits."""

    rows_per_task: int = 64  # a discipline with more rows than this is split over several tasks
    max_tasks: int = 512
    commit_every_rows: int = 5000  # rows per commit; tasks spool their results in between
    spool_stale_after_s: float = 900.0  # no heartbeat this long (another host): the spool's run is dead
    # `glan run` exits 3 when more than this share of its LLM calls failed (0: any failed call).
    max_failed_share: float = 0.0
    # The spending guard, in USD at conf/prices.yaml: a stage whose estimate, plus what the run root
    # has spent, would pass it does not start; a running one stops once the spend reaches it. null: none.
    max_usd: float | None = 100.0
    # A stage whose calls were cut at max_tokens more often than this share is named after it runs.
    max_truncated_share: float = 0.02

    def __post_init__(self) -> None:
        at_least(self, 1, "rows_per_task", "max_tasks", "commit_every_rows")
        require(self, "max_failed_share", 0.0 <= self.max_failed_share <= 1.0, "must be between 0 and 1")
        require(self, "max_truncated_share", 0.0 <= self.max_truncated_share <= 1.0, "must be between 0 and 1")
        at_least(self, 0, "max_usd", optional=True)
        at_least(self, 60, "spool_stale_after_s", note=" (heartbeats come every 30 s)")
