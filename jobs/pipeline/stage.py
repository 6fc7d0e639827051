"""A stage of the pipeline, declared once: its name, the tables it reads and writes, its LLM calls
and how it runs.

Every stage is a module `jobs/<stage>.py` that exports `STAGE`. `glan run`, `glan status`,
`glan cost` (also `--estimate`) and README's stage table all read these declarations, found by
`stages()`; none of them lists the stages again. The order of the stages follows from the tables:
a stage runs after every stage that writes a table it reads. Adding a stage is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from operator import attrgetter

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import jobs
from jobs.config.loader import GlanConfig
from jobs.errors import ConfigError
from jobs.pipeline.prices import Budget
from jobs.pipeline.progress import Progress
from jobs.pipeline.slices import selected_disciplines
from jobs.storage.delta import Storage, get_storage
from jobs.storage.tables import spec_for
from udfs.llm.config import StageLLMConfig

# Tables every LLM call writes through the LLM step, whichever stage it belongs to.
LEDGERS = ("failures", "failed_calls", "llm_batches", "llm_batch_keys")


@dataclass(frozen=True)
class Volume:
    """How much a full run of the configured slice makes, for `glan cost --estimate`."""

    disciplines: int
    samples_per_discipline: int
    subjects: int
    questions: int


@dataclass(frozen=True)
class LLMCall:
    """One LLM call of a stage: which rows it asks about, with which prompt and settings, and where
    the answers go. Its work is `rows` minus the keys already in `output` (DESIGN.md, "Keys")."""

    prompt: str  # prompts/<prompt>.j2
    settings: str  # where its model and sampling settings are in the config, e.g. "subjects.llm"
    rows: Callable[[StageContext], DataFrame]  # every row this call asks about in the run's slice, done or not
    inputs: tuple[str, ...]  # the columns the prompt reads, by name
    key: str  # the call's row key in failures, failed_calls and the spool
    output: str
    output_key: str
    to_output: Callable[[DataFrame, StageLLMConfig], DataFrame]  # successful rows (result in `_out`) -> output rows
    volume: Callable[[Volume], int]  # calls of a full run, for the estimate
    schema: Callable[[GlanConfig], dict | None] | None = None  # None: the prompt's entry in udfs/llm/schemas.py
    seed: str | None = None  # a column added to the seed each row gets from its key and attempt
    sort_within: tuple[str, ...] = ()  # keep rows that share a prompt prefix together in a task
    # Prompt variables from the config, the same for every row (sent as literals, not stored in rows).
    constants: Callable[[GlanConfig], dict[str, str]] | None = None

    def llm(self, cfg: GlanConfig) -> StageLLMConfig:
        """The call's model and sampling settings, from `settings`."""
        return attrgetter(self.settings)(cfg)


@dataclass(frozen=True)
class Stage:
    """A stage: `run` does its work in a context and returns figures for the log."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    run: Callable[[StageContext], dict]
    calls: tuple[LLMCall, ...] = ()
    description: str = ""  # what it does, in a phrase, for README's stage table and `glan stages`
    # Settings it can check before any stage of the run starts (raise ConfigError): a typo found
    # before the LLM stages spend anything, not at the end.
    check: Callable[[GlanConfig], None] | None = None
    module: str = ""  # the entry point, `jobs.<name>`; filled in by stages()

    @property
    def uses_llm(self) -> bool:
        return bool(self.calls)

    @property
    def done_table(self) -> str:
        """The table whose rows `glan status` counts as done: the last call's output, else the
        last table written."""
        return self.calls[-1].output if self.calls else self.writes[-1]

    @property
    def final_table(self) -> str:
        """The table a stage ends with, for the hint printed after a run."""
        return self.writes[-1]


@dataclass
class StageContext:
    """What a stage runs with: its name, the session, the config, the storage, the disciplines
    asked for (names, None: the config's), the progress it reports and the run's spending guard.
    One per stage run, so `chosen` reads the taxonomy as the stages before it left it."""

    stage: str
    spark: SparkSession
    cfg: GlanConfig
    disciplines: Sequence[str] | None = None
    progress: Progress = field(default_factory=Progress)
    budget: Budget | None = None  # the run's spending guard; None: no limit

    @cached_property
    def storage(self) -> Storage:
        return get_storage(self.spark, self.cfg)

    @cached_property
    def chosen(self) -> DataFrame:
        """The `taxonomy` rows of this run's slice."""
        return selected_disciplines(self.spark, self.cfg, self.disciplines)

    def mine(self, name: str) -> DataFrame:
        """Table `name` (empty if absent), limited to the slice's disciplines when it has them."""
        frame = self.storage.read_or_empty(name)
        if "discipline_id" not in frame.columns:
            return frame
        return frame.join(self.chosen.select("discipline_id"), "discipline_id", "left_semi")

    def todo(self, call: LLMCall) -> DataFrame:
        """The rows `call` still has to ask about: its rows minus the keys already in its output."""
        return self.storage.missing_rows(call.rows(self), call.output, call.output_key)


def stages(package=jobs) -> list[Stage]:
    """Every stage of `package` (the modules beside its `__init__` that export STAGE), in the order
    they run."""
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            continue
        name = f"{package.__name__}.{info.name}"
        stage = getattr(importlib.import_module(name), "STAGE", None)
        if isinstance(stage, Stage):
            found.append(_checked(stage, name))
    return ordered(found)


def _checked(stage: Stage, module: str) -> Stage:
    for table in stage.writes + tuple(call.output for call in stage.calls):
        if spec_for(table) is None:
            raise ConfigError(f"{module}: stage {stage.name} writes table {table}, which has no TableSpec "
                              "(register one in jobs/storage/tables.py)")
    return replace(stage, module=module)


def ordered(found: Sequence[Stage]) -> list[Stage]:
    """Stages in run order: each after the stages that write what it reads; ties by name."""
    writers = {table: s.name for s in found for table in s.writes if table not in LEDGERS}
    after = {s.name: {writers[t] for t in s.reads if t in writers and writers[t] != s.name} for s in found}
    by_name = {s.name: s for s in found}
    result: list[Stage] = []
    while after:
        ready = sorted(name for name, needs in after.items() if not needs)
        if not ready:
            raise ConfigError(f"stages {', '.join(sorted(after))} read each other's tables in a cycle")
        result.append(by_name[ready[0]])
        del after[ready[0]]
        for needs in after.values():
            needs.discard(ready[0])
    return result


def select(all_stages: Sequence[Stage], requested: Sequence[str] | None) -> list[Stage]:
    """The requested stages (names), in run order; all when none are named."""
    if not requested:
        return list(all_stages)
    names = [s.name for s in all_stages]
    unknown = [name for name in requested if name not in names]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return [s for s in all_stages if s.name in requested]


def llm_tables(all_stages: Sequence[Stage]) -> dict[str, tuple[str, ...]]:
    """The tables whose rows each record one LLM call, by stage (for `glan cost` and `glan status`)."""
    return {s.name: tuple(dict.fromkeys(call.output for call in s.calls)) for s in all_stages if s.calls}


def call_keys(ctx: StageContext, stage: Stage, *, todo: bool) -> DataFrame | None:
    """The distinct call keys of a stage's calls in the slice, as one string column `row_key`:
    all of them, or (`todo`) only those still to ask. None for a stage without calls."""
    frames = [(ctx.todo(call) if todo else call.rows(ctx)).select(F.col(call.key).cast("string").alias("row_key"))
              for call in stage.calls]
    if not frames:
        return None
    union = frames[0]
    for frame in frames[1:]:
        union = union.unionByName(frame)
    return union.distinct()


def markdown_table(all_stages: Sequence[Stage]) -> str:
    """README's stage table, from the declarations (`glan stages --format markdown`)."""
    lines = ["| stage | entry point | reads | writes | LLM calls (prompt -> table) | what it does |",
             "|---|---|---|---|---|---|"]
    for s in all_stages:
        calls = ", ".join(f"`{c.prompt}` -> `{c.output}`" for c in s.calls) or "none"
        lines.append(f"| {s.name} | `{s.module.replace('.', '/')}.py` | {', '.join(f'`{t}`' for t in s.reads) or '-'} "
                     f"| {', '.join(f'`{t}`' for t in s.writes)} | {calls} | {s.description} |")
    return "\n".join(lines)
