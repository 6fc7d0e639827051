"""What every LLM stage does the same way: cut the work into tasks and commits, call the LLM once
per row, write the answers, and keep the `failures` table true.

A stage declares each call (`jobs.pipeline.stage.LLMCall`: the rows it asks about, the prompt and
the columns the prompt reads, and a function that turns successful rows into output rows) and
`ask`s it; its to-do rows are its rows minus the keys already in its output. The work is
split into chunks of about `pipeline.commit_every_rows` rows; each chunk is one Spark job whose
tasks write their results to the step's spool (`jobs.pipeline.spool`) as soon as their calls are
done; the driver then commits the chunk from the spool to the output table and `failures`. A
killed run loses only the calls in flight: the rerun first commits what the spool holds, then asks
for the rest. Each task batch notes its calls in the spool before sending them, so the calls in
flight at a kill (or in a task attempt Spark retried) go to `failed_calls` as `in_flight`, with
estimated prompt tokens: paid for, maybe, and counted by `glan cost`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.config.loader import GlanConfig
from jobs.pipeline.batch import call_mode, run_batch, settle
from jobs.pipeline.prices import Budget
from jobs.pipeline.progress import Progress
from jobs.pipeline.results import (
    RESULT,
    TRUNCATED,
    is_failure,
    record_failed_usage,
    record_in_flight,
    update_failures,
    usage_columns,
)
from jobs.pipeline.spool import IN_FLIGHT, Spool
from jobs.pipeline.stage import LLMCall, StageContext
from jobs.storage.delta import append_missing, get_storage
from udfs.llm.config import StageLLMConfig
from udfs.llm.prompts import load_prompt
from udfs.llm_udf import LLM_RESULT, concurrent_tasks, llm_udf, rate_coordinator

log = logging.getLogger(__name__)

__all__ = ["RESULT", "TRUNCATED", "StepResult", "ask", "run_llm_step", "usage_columns"]  # stages import these here

_CHUNK = "_chunk"
_ATTEMPT = "_attempt"
_SALT = "_salt"


@dataclass
class StepResult:
    rows_in: int = 0
    rows_written: int = 0
    failures: int = 0
    recovered: int = 0  # calls paid by an interrupted run, committed from its spool
    truncated: int = 0  # failures whose output hit max_tokens
    seconds: float = 0.0
    in_flight: int = 0  # batch mode: requests in the provider's batches when the step ended
    batches: int = 0  # batch mode: those batches

    def figures(self, prefix: str) -> dict[str, int | float]:
        figures = {f"{prefix}_todo": self.rows_in, f"{prefix}_written": self.rows_written,
                   f"{prefix}_failed": self.failures}
        if self.recovered:
            figures[f"{prefix}_recovered"] = self.recovered
        if self.in_flight:
            figures[f"{prefix}_in_flight"] = self.in_flight
        return figures


def plan_partitions(todo: DataFrame, key: str, cfg: GlanConfig) -> DataFrame:
    """Partition by discipline, and split a large discipline over several tasks so that no single
    task holds the run back: salt = hash(key) mod ceil(rows of the largest discipline / rows_per_task)."""
    per_discipline = todo.groupBy("discipline_id").count().collect()
    if not per_discipline:
        return todo
    largest = max(r["count"] for r in per_discipline)
    total = sum(r["count"] for r in per_discipline)
    splits = max(1, math.ceil(largest / cfg.pipeline.rows_per_task))
    tasks = min(cfg.pipeline.max_tasks, max(1, math.ceil(total / cfg.pipeline.rows_per_task)),
                len(per_discipline) * splits)
    salted = todo.withColumn(_SALT, F.pmod(F.xxhash64(key), F.lit(splits)))
    return salted.repartition(tasks, "discipline_id", _SALT).drop(_SALT)


def ask(ctx: StageContext, call: LLMCall) -> StepResult:
    """Run one declared call of a stage: its to-do rows (rows minus output keys), in the stage's slice."""
    return run_llm_step(ctx.todo(call), call, stage=ctx.stage, cfg=ctx.cfg, scope=ctx.chosen, progress=ctx.progress,
                        budget=ctx.budget)


def run_llm_step(todo: DataFrame, call: LLMCall, *, stage: str, cfg: GlanConfig, scope: DataFrame | None = None,
                 progress: Progress | None = None, budget: Budget | None = None) -> StepResult:
    """Call `call.prompt` for every row of `todo` and append the successes to `call.output`.

    Rows whose call failed go to `failures` (stage, key); rows that succeed leave it. `scope` (rows
    with `discipline_id`) is the run's slice of the taxonomy: spooled results of dead runs are
    committed only for those disciplines (None: all). `budget`: every chunk's calls are charged to
    it, and the step stops after a commit once it is spent (BudgetError). In batch mode
    (`llm.mode`, or the call's own) the rows go to the provider's Batch API (jobs.pipeline.batch).
    """
    started = time.monotonic()
    step = _Step(todo.sparkSession, call, stage, cfg, progress or Progress(), StepResult(),
                 T.StructType([*todo.schema.fields, T.StructField(RESULT, LLM_RESULT)]), budget)
    ids = None if scope is None else [row[0] for row in scope.select("discipline_id").distinct().collect()]
    spool = Spool(step.spark, cfg, stage, call.output)
    spool.claim(ids)  # a live run of this step on any of these disciplines stops this one here
    try:
        for orphan in spool.orphans():
            todo = step.recover(spool, orphan, todo, ids)
        step.result.rows_in = step.result.recovered
        if call_mode(step) == "batch":
            run_batch(step, todo, ids)
        else:
            todo = settle(step, todo, ids)  # what an earlier batch-mode run sent is collected, never asked again
            rows = todo.count()
            step.result.rows_in += rows
            if rows:
                step.run_chunks(todo, rows, spool)
    finally:
        spool.close()
    step.result.seconds = time.monotonic() - started
    _warn_truncated(step, cfg)
    return step.result


def _warn_truncated(step: _Step, cfg: GlanConfig) -> None:
    """Name the call, and the max_tokens to raise, when more of its calls than
    pipeline.max_truncated_share were cut at max_tokens: truncated outputs are never kept, so a low
    cap silently drops the longest syllabi and answers from the data."""
    asked, truncated = step.result.rows_in, step.result.truncated  # recovered calls count on both sides
    if not asked or truncated / asked <= cfg.pipeline.max_truncated_share:
        return
    limit = step.llm.max_tokens
    print(f"[{step.stage}] {truncated} of {asked} {step.call.prompt} calls ({truncated / asked:.1%}) were cut at "
          f"{step.call.settings}.max_tokens={limit} (more than pipeline.max_truncated_share="
          f"{cfg.pipeline.max_truncated_share:g}); the next run asks them again; to keep long outputs, raise it, "
          f"e.g. --set {step.call.settings}.max_tokens={limit * 2}", file=sys.stderr, flush=True)


@dataclass
class _Step:
    """One run of one LLM call: what it commits, recovers and calls, and its running figures."""

    spark: SparkSession
    call: LLMCall
    stage: str
    cfg: GlanConfig
    progress: Progress
    result: StepResult
    spooled_schema: T.StructType
    budget: Budget | None = None

    @property
    def llm(self) -> StageLLMConfig:
        return self.call.llm(self.cfg)

    def commit(self, called: DataFrame) -> None:
        """Successes to the output table, failures to `failures`, from rows that hold their results."""
        failed_now = is_failure(F.col(RESULT))
        ok = called.filter(~failed_now)
        failed = called.filter(failed_now).withColumn(RESULT, F.col(RESULT).withField(
            "error_class", F.coalesce(F.col(RESULT)["error_class"], F.lit("empty"))).withField(
            "error_message", F.coalesce(F.col(RESULT)["error_message"], F.lit("the model returned no text"))))
        written = append_missing(self.call.to_output(ok, self.llm), self.call.output, self.call.output_key, self.cfg)
        self.result.rows_written += written.rows_written
        self.progress.rows_written(self.result.rows_written)
        new_failures = update_failures(self.spark, self.stage, self.call.key, called, failed, self.cfg)
        self.result.failures += len(new_failures)
        self.result.truncated += sum(row["error_class"] == TRUNCATED for row in new_failures)
        if new_failures:
            record_failed_usage(failed, self.stage, self.call.key, self.llm, self.cfg)

    def recover(self, spool: Spool, orphan, todo: DataFrame, ids: list[str] | None) -> DataFrame:
        """Finish what a dead run of this step left in its spool; returns the rows still to do.

        A run that is gone paid for these calls and did not commit them: commit the rows of this
        run's disciplines that are still to do (asked with the prompt as it is now), take them off
        the work, and leave the rows of other disciplines for the runs of those."""
        key = self.call.key
        lost = spool.orphan_unanswered(orphan)
        if lost is not None:  # sent when the run died, answers never spooled: on record before the intents go
            record_in_flight(self.spark, lost, self.stage, self.llm, self.cfg)
            log.warning("%s: %d LLM calls were in flight when a run stopped (%s); recorded in failed_calls "
                        "as possibly paid, their rows are asked again", self.stage, lost.num_rows, orphan.uri)
        if not orphan.files:  # it died before any task finished
            spool.keep_only(orphan, None)
            return todo
        spooled = spool.read(orphan.files, self.spooled_schema, key, is_failure(F.col(RESULT)), folder=orphan.uri)
        if ids is not None:
            in_scope = F.col("discipline_id").isin(ids)
            mine, others = spooled.filter(in_scope), spooled.filter(~in_scope)
        else:
            mine, others = spooled, None
        still_todo = mine.join(todo.select(key).distinct(), key, "left_semi")
        current = F.col(RESULT)["prompt_version"] == load_prompt(self.call.prompt).version
        keys = [row[0] for row in still_todo.filter(current).select(key).collect()]
        if keys:
            self.commit(still_todo.filter(current))
        # Rows answered with another version of the prompt are asked again; what they cost stays on record.
        outdated = still_todo.filter(~current).withColumn(RESULT, F.col(RESULT).withField(
            "error_class", F.lit("outdated_prompt")))
        if outdated.limit(1).count():
            record_failed_usage(outdated, self.stage, key, self.llm, self.cfg)
        spool.keep_only(orphan, others)
        self.result.recovered += len(keys)
        log.warning("%s: committed %d LLM results that an interrupted run had paid for (%s)",
                    self.stage, len(keys), orphan.uri)
        if not keys:
            return todo
        done = self.spark.createDataFrame([(k,) for k in keys], T.StructType([todo.schema[key]]))
        return todo.join(F.broadcast(done), key, "left_anti")

    def run_chunks(self, todo: DataFrame, rows: int, spool: Spool) -> None:
        """Call the LLM chunk by chunk; each chunk is spooled by its tasks, then committed."""
        call, cfg, key = self.call, self.cfg, self.call.key
        chunks = max(1, math.ceil(rows / cfg.pipeline.commit_every_rows))
        chunked = self.with_attempts(todo).withColumn(_CHUNK, F.pmod(F.xxhash64(key, F.lit("chunk")), F.lit(chunks)))
        kwargs = {} if call.schema is None else {"schema": call.schema(cfg)}
        self.progress.start_call(call.prompt, chunks, rows)
        with rate_coordinator(self.spark, cfg.llm, self.stage) as coordinator:  # one budget for every chunk
            for index in range(chunks):
                self.progress.chunk(index + 1)
                part = plan_partitions(chunked.filter(F.col(_CHUNK) == index).drop(_CHUNK), key, cfg)
                if call.sort_within:
                    part = part.sortWithinPartitions(*call.sort_within)  # e.g. one subject's questions together
                intents = spool.intents(key)
                ask_llm = llm_udf(call.prompt, cfg.llm, self.llm, concurrent_tasks=concurrent_tasks(part),
                                  base_url=list(cfg.llm.base_urls) or cfg.llm.base_url, intents=intents,
                                  coordinator=coordinator, **kwargs)
                # The LLM is called here and nowhere else: each task notes its calls, then spools their results
                # as they come; both writes below read the spool, and the files go only once both are committed.
                values = call.constants(cfg) if call.constants else {}
                constants = [F.lit(value).alias(name) for name, value in values.items()]
                called = part.withColumn(RESULT, ask_llm(*call.inputs, *constants, seed=self.seed(),
                                                         note=list(dict.fromkeys([key, "discipline_id"]))))
                files = spool.write(called.select(*self.spooled_schema.fieldNames()), intents)
                results = spool.read(files, self.spooled_schema, key, is_failure(F.col(RESULT)))
                self.commit(results)
                self.charge(results)
                retried = spool.unanswered(intents, files)
                if retried is not None:  # task attempts that sent calls and died before spooling; Spark ran them again
                    record_in_flight(self.spark, retried, self.stage, self.llm, cfg)
                spool.remove(files, intents=intents)
                log.info("%s: chunk %d/%d committed (%d rows so far)", self.stage, index + 1, chunks,
                         self.result.rows_written)
                if self.budget is not None:
                    self.budget.check_running(self.stage)  # committed first: the next run asks only for the rest

    def with_attempts(self, todo: DataFrame) -> DataFrame:
        """`todo` with `_attempt`: how often each row was answered and failed before (its rows in
        `failed_calls`). Calls lost in flight at a kill do not count: no answer was seen, so the
        resumed run draws them as the uninterrupted run would have, and a killed run ends with the
        same rows as one never killed."""
        storage = get_storage(self.spark, self.cfg)
        if not storage.exists("failed_calls"):
            return todo.withColumn(_ATTEMPT, F.lit(0).cast("long"))
        failed = storage.read("failed_calls").filter(F.col("stage") == self.stage)
        answered = failed.filter(F.col("error_class") != IN_FLIGHT)
        asked = answered.groupBy("row_key").agg(F.count("*").alias(_ATTEMPT))
        joined = todo.join(F.broadcast(asked), F.col(self.call.key).cast("string") == asked["row_key"], "left")
        return joined.drop("row_key").withColumn(_ATTEMPT, F.coalesce(F.col(_ATTEMPT), F.lit(0)).cast("long"))

    def seed(self) -> Column:
        """Each row's sampling seed, from its key and how often it was asked before: the same on
        every rerun of a first call, and new for each retry, so that a call cut at max_tokens (or
        failed otherwise) is not drawn the same way forever. `call.seed` names a column added to it."""
        seed = F.pmod(F.xxhash64(F.col(self.call.key).cast("string"), F.col(_ATTEMPT)), F.lit(2**31 - 1))
        return seed + F.col(self.call.seed).cast("long") if self.call.seed else seed

    def charge(self, results: DataFrame) -> None:
        """Charge the budget with what a chunk's calls cost (failed ones too: they were paid). Without
        a limit nothing is checked against the total, so the chunk is not summed."""
        if self.budget is None or self.budget.limit_usd is None:
            return
        out = F.col(RESULT)
        for row in results.groupBy(out["model"].alias("model"), out["billing"].alias("billing")).agg(
                F.coalesce(F.sum(out["prompt_tokens"]), F.lit(0)).alias("prompt"),
                F.coalesce(F.sum(out["cached_tokens"]), F.lit(0)).alias("cached"),
                F.coalesce(F.sum(out["completion_tokens"]), F.lit(0)).alias("completion")).collect():
            self.budget.charge(row["model"], row["prompt"], row["cached"], row["completion"], row["billing"])
