"""Batch mode next to online mode: 20,000 answers through each against the loopback test server
(latency 0, batch processing time 0), side by side in one run.

    .venv/bin/python bench/batch.py [--rows 20000] [--cores 2]

Both sides run the same answers-like call (prompt `answer`, the answers stage's model gpt-4o-mini,
made-up questions) with jobs.pipeline.llmstep.run_llm_step, each into a run root of its own and
against a fresh test server of the same seed, so both get the same answers and tokens and neither
sees the other's prompts as cached. Each side first runs a few hundred other questions untimed, so
that Spark's JVM and Python workers are warm when the timed run starts.

Prints, per 1,000 rows:
- online: the whole step at zero latency (Spark tasks, HTTP, checks, spool, commits);
- batch: the whole step, and our side of it by phase: render (render the request lines, cut and
  write the files, write the ledger down), upload (upload the files, create the batches), poll,
  download, parse (read the result lines, check the answers), commit, and other (the ledger, the
  to-do count, the spool). The test server answering the batch lines (triggered by the bench just
  before each poll) is the provider's work, not ours, and is left out of our side.
- USD of each run root's recorded usage at conf/prices.yaml, priced as `glan cost` prices it
  (jobs.pipeline.costs.usage_by_stage, jobs.pipeline.prices.priced: batch rows at batch prices).

The test server runs in its own process so that its CPU does not share the driver's GIL.
Last line: `batch_cost_ratio=<batch USD / online USD>` (target <= 0.51).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from jobs.config.loader import GlanConfig, load_config  # noqa: E402
from jobs.pipeline import llmstep  # noqa: E402
from jobs.pipeline.batch import Batches  # noqa: E402
from jobs.pipeline.costs import usage_by_stage  # noqa: E402
from jobs.pipeline.llmstep import RESULT, StepResult, run_llm_step, usage_columns  # noqa: E402
from jobs.pipeline.prices import Price, load_prices, priced  # noqa: E402
from jobs.pipeline.stage import LLMCall, Stage  # noqa: E402
from jobs.spark.session import get_spark  # noqa: E402

KEY_ENV = "GLAN_BENCH_KEY"  # the test server takes any key; batch mode wants one set
OUTPUT = "bench_answers"
WARM_ROWS = 200

# The answers stage's call on made-up questions (the todo the bench passes in), into a table of its own.
CALL = LLMCall(
    prompt="answer", settings="answers.llm", rows=lambda ctx: None, inputs=("question",),
    constants=lambda cfg: {"system_prompt": ""}, key="answer_id", output=OUTPUT, output_key="answer_id",
    to_output=lambda ok, llm: ok.select("answer_id", "discipline_id", F.trim(F.col(RESULT)["text"]).alias("answer"),
                                        *usage_columns(llm)),
    volume=lambda v: 0,
)
# Declared only so that usage_by_stage finds the table, as glan cost finds a stage's.
STAGE = Stage(name="bench", reads=(), writes=(OUTPUT,), run=lambda ctx: {}, calls=(CALL,))
# What the bench times inside a batch step: (phase, class, method). Nested: commit_answers holds
# the commit; the rest of it is the check of the answers (the budget's charge is a no-op here).
BATCH_PHASES = (("render", Batches, "submit"), ("upload", Batches, "send"), ("poll", Batches, "poll"),
                ("download", Batches, "download"), ("parse+commit", Batches, "commit_answers"),
                ("commit", llmstep._Step, "commit"))
PHASE_ORDER = ("render", "upload", "poll", "download", "parse", "commit", "other")


def start_server(seed: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "udfs.servers.fake_llm", "--port", "0", "--no-record", "--seed", str(seed),
         "--latency-ms", "0", "--batch-processing-s", "0"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    line = process.stdout.readline()
    if not line.startswith("fake-llm listening on "):
        process.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return process, line.split()[-1]


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(10)


def server_stats(url: str) -> dict[str, Any]:
    """The test server's counters; asking for them also finishes every batch past its processing time."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=600) as response:
        return json.load(response)


def questions(spark: SparkSession, rows: int, prefix: str, partitions: int) -> DataFrame:
    """`rows` made-up questions over ten disciplines, about as long as generated ones."""
    ids = spark.range(0, rows, numPartitions=partitions)
    return ids.select(
        F.concat(F.lit("d"), (F.col("id") % 10).cast("string")).alias("discipline_id"),
        F.concat(F.lit(prefix), F.lpad(F.col("id").cast("string"), 6, "0")).alias("answer_id"),
        F.format_string("Question %d: a river carries sediment at %d kg per second past a dam. Explain, step by "
                        "step, how the sediment budget of the reservoir changes over %d years, and what that "
                        "means for the dam's design.", F.col("id"), F.col("id") % 97 + 3,
                        F.col("id") % 40 + 10).alias("question"),
    )


def make_cfg(root: Path, url: str, mode: str) -> GlanConfig:
    return load_config([], [f"run_root={root}", "storage.backend=embedded", "llm.endpoint=openai",
                            f"llm.base_url={url}", f"llm.api_key_env={KEY_ENV}", f"llm.mode={mode}",
                            "llm.batch.poll_s=0.05"])


class Phases:
    """Seconds spent inside some methods while a step runs, summed by phase."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()

    def _timed(self, phase: str, method: Callable[..., Any], before: Callable[[], None] | None) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
        return timed

    @contextmanager
    def timing(self, url: str) -> Iterator[None]:
        """Time BATCH_PHASES; before each poll, let the test server answer the batches (`server`)."""
        def answer_batches() -> None:
            started = time.perf_counter()
            server_stats(url)
            self.seconds["server"] += time.perf_counter() - started

        originals = [(owner, name, owner.__dict__[name]) for _, owner, name in BATCH_PHASES]
        for phase, owner, name in BATCH_PHASES:
            setattr(owner, name, self._timed(phase, owner.__dict__[name], answer_batches if phase == "poll" else None))
        try:
            yield
        finally:
            for owner, name, method in originals:
                setattr(owner, name, method)

    def ours(self, total_s: float) -> dict[str, float]:
        """Our side's seconds by PHASE_ORDER, from the step's total (the server's time left out)."""
        s = self.seconds
        named = {"render": s["render"], "upload": s["upload"], "poll": s["poll"], "download": s["download"],
                 "parse": s["parse+commit"] - s["commit"], "commit": s["commit"]}
        return {**named, "other": total_s - s["server"] - math.fsum(named.values())}


def run_side(spark: SparkSession, root: Path, mode: str, rows: int, partitions: int, seed: int,
             phases: Phases | None = None) -> tuple[GlanConfig, StepResult, float, dict[str, int]]:
    """Warm up, then time one step of `rows` questions in `mode` against a fresh test server."""
    server, url = start_server(seed)
    try:
        run_llm_step(questions(spark, WARM_ROWS, "warm-", partitions), CALL, stage=STAGE.name,
                     cfg=make_cfg(root / "warm", url, mode))
        cfg = make_cfg(root / "run", url, mode)
        todo = questions(spark, rows, "a-", partitions)
        before = server_stats(url)
        started = time.perf_counter()
        if phases is None:
            result = run_llm_step(todo, CALL, stage=STAGE.name, cfg=cfg)
        else:
            with phases.timing(url):
                result = run_llm_step(todo, CALL, stage=STAGE.name, cfg=cfg)
        seconds = time.perf_counter() - started
        after = server_stats(url)
    finally:
        stop_server(server)
    return cfg, result, seconds, _counted(before, after)


def _counted(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """What the test server counted during the timed step: chat requests, batches, batch lines answered."""
    def figures(stats: dict[str, Any]) -> Counter[str]:
        batch = stats["batch"]
        return Counter(chat=stats["total"], batches=batch["batches"]["created"], lines=batch["lines"]["completed"])
    return dict(figures(after) - figures(before))


def usd(spark: SparkSession, cfg: GlanConfig, prices: dict[str, Price]) -> tuple[float, float]:
    """What a run root's recorded calls cost as glan cost prices them (each at the price of its
    `billing`), and the same calls at online prices: (usd, usd_online)."""
    rows = priced(usage_by_stage(spark, cfg, declared=[STAGE]), prices)
    return math.fsum(r["usd"] or 0.0 for r in rows), math.fsum(r["usd_online"] or 0.0 for r in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--cores", type=int, default=2, help="Spark's local[N]")
    parser.add_argument("--seed", type=int, default=1, help="the test server's seed (both sides)")
    args = parser.parse_args(argv)
    os.environ.setdefault(KEY_ENV, "sk-bench-no-key")

    root = Path(tempfile.mkdtemp(prefix="glan-bench-batch-"))
    spark = get_spark("bench-batch", master=f"local[{args.cores}]", shuffle_partitions=args.cores,
                      run_root=str(root))
    try:
        online_cfg, online, online_s, online_stats = run_side(spark, root / "online", "online", args.rows,
                                                              args.cores, args.seed)
        phases = Phases()
        batch_cfg, batch, batch_s, batch_stats = run_side(spark, root / "batch", "batch", args.rows, args.cores,
                                                          args.seed, phases)
        prices, _ = load_prices()
        online_usd, _ = usd(spark, online_cfg, prices)
        batch_usd, batch_usd_online = usd(spark, batch_cfg, prices)
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)

    per_k = 1000.0 / args.rows
    ours = phases.ours(batch_s)
    ours_s = batch_s - phases.seconds["server"]
    print(f"rows: {args.rows:,} per side; online written {online.rows_written:,}, failures {online.failures:,}, "
          f"{online_stats.get('chat', 0):,} chat requests; batch written {batch.rows_written:,}, failures "
          f"{batch.failures:,}, in flight {batch.in_flight:,}, {batch_stats.get('batches', 0)} batch(es), "
          f"{batch_stats.get('lines', 0):,} lines answered, {batch_stats.get('chat', 0):,} chat requests")
    print(f"online: {online_s:.1f} s = {online_s * per_k:.2f} s per 1,000 rows (whole step, latency 0)")
    print(f"batch:  {batch_s:.1f} s = {batch_s * per_k:.2f} s per 1,000 rows (whole step); the test server "
          f"answering the lines {phases.seconds['server'] * per_k:.2f} s per 1,000 rows (not ours)")
    print(f"batch, our side: {ours_s * per_k:.2f} s per 1,000 rows = "
          + ", ".join(f"{name} {ours[name] * per_k:.2f}" for name in PHASE_ORDER))
    print(f"batch/online seconds: whole step {batch_s / online_s:.2f}, our side {ours_s / online_s:.2f}")
    print(f"usd (gpt-4o-mini, conf/prices.yaml): online run {online_usd:.4f}, batch run {batch_usd:.4f} "
          f"(its calls at online prices {batch_usd_online:.4f})")
    print(f"batch_cost_ratio={batch_usd / online_usd:.3f}" if online_usd else "batch_cost_ratio=nan")


if __name__ == "__main__":
    main()
