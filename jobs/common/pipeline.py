"""`glan run`: the pipeline's stages in order, each resumable (input keys minus output keys).

A stage is a job module in `jobs/` with `run_stage(spark, cfg, disciplines) -> dict` (figures for
the log) and `main(argv)` (its own spark-submit entry point).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import replace

from jobs.common.config import GlanConfig
from jobs.common.errors import ConfigError

log = logging.getLogger(__name__)

# (stage name, job module), in the order GLAN runs them (DESIGN.md, "Data flow").
STAGES: list[tuple[str, str]] = [
    ("taxonomy", "jobs.taxonomy"),
    ("subjects", "jobs.subjects"),
    ("syllabus", "jobs.syllabus"),
    ("combinations", "jobs.combinations"),
    ("questions", "jobs.questions"),
    ("answers", "jobs.answers"),
    ("decontaminate", "jobs.instructions"),
]

# `glan run` finished every stage, but some LLM calls failed after their retries.
EXIT_FAILED_CALLS = 3

# The table each stage ends with, for the hint printed after a run.
STAGE_TABLE = {"syllabus": "sessions", "combinations": "concept_combinations", "decontaminate": "instructions"}


def stage_names() -> list[str]:
    return [name for name, _ in STAGES]


def select_stages(requested: list[str] | None) -> list[tuple[str, str]]:
    if not requested:
        return list(STAGES)
    unknown = [s for s in requested if s not in stage_names()]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(stage_names())}")
    return [(name, module) for name, module in STAGES if name in requested]


def run_pipeline(cfg: GlanConfig, stages: list[str] | None = None, disciplines: list[str] | None = None) -> int:
    from jobs.common.spark import get_spark

    chosen = select_stages(stages)
    spark = get_spark("glan-run", master=cfg.spark.master, shuffle_partitions=cfg.spark.shuffle_partitions,
                      run_root=cfg.run_root, extra_conf=cfg.spark.conf)
    started = time.monotonic()
    failed: dict[str, int] = {}
    asked = 0
    with ExitStack() as stack:
        cfg = _start_endpoint(stack, cfg, chosen)
        for name, module in chosen:
            t0 = time.monotonic()
            print(f"[{name}] running", file=sys.stderr, flush=True)
            with ProgressLine(spark, name):
                figures = importlib.import_module(module).run_stage(spark, cfg, disciplines) or {}
            summary = ", ".join(f"{k}={v}" for k, v in figures.items())
            print(f"[{name}] done in {time.monotonic() - t0:.1f}s{': ' + summary if summary else ''}",
                  file=sys.stderr, flush=True)
            calls = sum(v for k, v in figures.items() if k.endswith("_failed"))
            asked += sum(v for k, v in figures.items() if k.endswith("_todo"))
            if calls:
                failed[name] = calls
    print(f"pipeline finished in {time.monotonic() - started:.1f}s; tables under {cfg.table_uri('')}",
          file=sys.stderr)
    last = chosen[-1][0] if chosen else "taxonomy"
    print(f"query them with:  glan sql \"SELECT * FROM {STAGE_TABLE.get(last, last)} LIMIT 5\""
          + "".join(f" --conf {s}" for s in cfg.sources if not s.startswith(("conf/base.yaml", "--set"))),
          file=sys.stderr)
    if failed:
        where = ", ".join(f"{stage} {n}" for stage, n in failed.items())
        share = sum(failed.values()) / max(asked, 1)
        over = share > cfg.pipeline.max_failed_share
        print(f"glan: {'error: ' if over else ''}{sum(failed.values())} of {asked} LLM call(s) failed ({where}); they "
              "are in the failures table (glan sql \"SELECT stage, error_class, count(*) FROM failures GROUP BY 1, 2\") "
              "and the next run asks only for them"
              + (f" (exit {EXIT_FAILED_CALLS})" if over else
                 f" (within pipeline.max_failed_share={cfg.pipeline.max_failed_share:g}: exit 0)"), file=sys.stderr)
        if over:
            return EXIT_FAILED_CALLS
    return 0


class ProgressLine:
    """A live line per stage from Spark's status tracker: tasks done of total in the running
    Spark stages, and rows committed of the rows to do in the current LLM call."""

    def __init__(self, spark, stage: str, every_s: float | None = None) -> None:
        self.spark, self.stage = spark, stage
        self.tty = sys.stderr.isatty()
        self.every_s = every_s or (2.0 if self.tty else 15.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def line(self) -> str | None:
        from jobs.common.llmstage import PROGRESS

        tracker = self.spark.sparkContext.statusTracker()
        done = total = 0
        for stage_id in tracker.getActiveStageIds():
            info = tracker.getStageInfo(stage_id)
            if info is not None:
                done += info.numCompletedTasks
                total += info.numTasks
        parts = [f"[{self.stage}]"]
        if PROGRESS.get("call"):
            parts.append(f"{PROGRESS['call']} chunk {PROGRESS['chunk']}/{PROGRESS['chunks']}, "
                         f"rows committed {PROGRESS['rows_written']}/{PROGRESS['rows_in']}")
        if total:
            parts.append(f"tasks {done}/{total}")
        return " ".join(parts) if len(parts) > 1 else None

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                text = self.line()
            except Exception:  # noqa: BLE001 - progress must never break a run
                text = None
            if text:
                print(("\r" + text.ljust(100)) if self.tty else text, end="" if self.tty else "\n",
                      file=sys.stderr, flush=True)

    def __enter__(self) -> ProgressLine:
        from jobs.common.llmstage import PROGRESS

        PROGRESS.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.tty:
            print("\r" + " " * 100 + "\r", end="", file=sys.stderr, flush=True)


def _start_endpoint(stack: ExitStack, cfg: GlanConfig, chosen: list[tuple[str, str]]) -> GlanConfig:
    """For `llm.endpoint: embedded`, start the local llama.cpp server(s) for the whole run; they
    stop when the run ends, also on Ctrl-C or an error."""
    needs_llm = any(getattr(importlib.import_module(m), "USES_LLM", False) for _, m in chosen)
    if not needs_llm or cfg.llm.endpoint != "embedded":
        return cfg
    from udfs.embedded import embedded_endpoint

    endpoint = stack.enter_context(embedded_endpoint(cfg.llm.embedded))
    print(f"embedded endpoint: SmolLM2 on {', '.join(endpoint.base_urls)}", file=sys.stderr, flush=True)
    return replace(cfg, llm=replace(cfg.llm, base_url=endpoint.base_url, base_urls=tuple(endpoint.base_urls)))


def stage_main(name: str, argv: list[str] | None = None) -> int:
    """The spark-submit entry point of one stage: `jobs/<stage>.py --conf ... [--disciplines ...]`."""
    import argparse

    from jobs.common.cli import _run_guarded
    from jobs.common.jobargs import add_config_args, config_from_args

    parser = add_config_args(argparse.ArgumentParser(prog=f"jobs/{name}.py"))
    parser.add_argument("--disciplines", help='limit to these disciplines, e.g. "Mathematics,Physics"')
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        cfg = config_from_args(args)
        disciplines = [d.strip() for d in args.disciplines.split(",") if d.strip()] if args.disciplines else None
        return run_pipeline(cfg, stages=[name], disciplines=disciplines)

    return _run_guarded(run)
