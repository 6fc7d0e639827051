"""Batch mode (`llm.mode: batch`): a call's to-do rows go to the provider's Batch API at its batch
price, and come back through the same checks and commits as online answers.

Every request is written down in the ledger before it is sent (`llm_batches`: one row per request
file and provider batch; `llm_batch_keys`: the row keys each holds), so that whatever a crash
leaves, the next run, on any machine, finds each batch, and no key that a batch not yet collected
holds is ever sent again, in batch or online:

1. Look: a submission written down but not yet created at the provider is found by its metadata
   (created just before a crash) or created now; every batch is looked at, and each one that has
   ended is collected: its output and error files are read in Spark, answers checked exactly as
   online answers are (udfs/batch_udf.py) and committed to the output table and `failures`, and
   unanswered requests (expired, cancelled, failed, or the whole batch failed) go into the next
   round's submission, up to llm.batch.max_resubmits rounds; then to `failures` with the
   provider's message.
2. Submit: the rows still to do, minus the keys of live submissions, are rendered by Spark tasks
   into request lines, cut into files within the provider's limits (llm.batch.max_requests_per_file,
   max_bytes_per_file), written out, written down (keys, then a `pending` ledger row), uploaded and
   created as batches.
3. Wait: up to llm.batch.wait_s, looking every poll_s and collecting what ends; what is still in
   flight then is reported, and a later run collects it.

Files live under `<run_root>/_batches/<stage>.<output>/`: request files (each ledger row's
`request_uri`: the same JSONL a provider, or vLLM's batch runner, reads) and the results downloaded;
a batch's files are removed once it is collected.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.errors import GlanError
from jobs.pipeline.results import RESULT, update_failures
from jobs.spark.session import arrow_filesystem
from jobs.storage.delta import append_missing, get_storage
from jobs.storage.tables import LLM_BATCH_KEYS, LLM_BATCHES
from udfs.batch_udf import finish_udf, render_udf
from udfs.llm.batch import ENDED, LIVE, SUBMISSION, BatchAPI, BatchAPIError, batch_error, ended_at, since
from udfs.llm_udf import LLM_RESULT

log = logging.getLogger(__name__)

STAGING = "_batches"
PENDING, SUBMITTED, COLLECTED = "pending", "submitted", "collected"
_ROW_SEED = "_row_seed"
_LINE = T.StructType([
    T.StructField("custom_id", T.StringType()),
    T.StructField("response", T.StructType([T.StructField("status_code", T.IntegerType()),
                                            T.StructField("body", T.StringType())])),  # the raw JSON object
    T.StructField("error", T.StructType([T.StructField("code", T.StringType()),
                                         T.StructField("message", T.StringType())])),
])


def call_mode(step: Any) -> str:
    return step.cfg.llm.mode_of(step.llm)


def settle(step: Any, todo: DataFrame, ids: list[str] | None) -> DataFrame:
    """For an online step: collect the batches an earlier batch-mode run of this call left, and
    return `todo` without the keys of those still in flight (they are paid for already)."""
    if not get_storage(step.spark, step.cfg).exists(LLM_BATCHES.name):
        return todo
    batches = Batches(step, todo, ids)
    try:
        if batches.ledger(PENDING, SUBMITTED):
            batches.look()
        return batches.without_live(todo)
    except BatchAPIError as exc:
        raise GlanError(f"stage {step.stage}: batch mode: {exc}") from None
    finally:
        batches.close()


def run_batch(step: Any, todo: DataFrame, ids: list[str] | None) -> None:
    """The step in batch mode: look, submit what is left to do, wait (see the module's doc)."""
    batches = Batches(step, todo, ids)
    try:
        if get_storage(step.spark, step.cfg).exists(LLM_BATCHES.name) and batches.ledger(PENDING, SUBMITTED):
            batches.look()
        fresh = batches.without_live(todo)
        rows = fresh.count()
        step.result.rows_in += rows
        if rows:
            batches.submit(fresh)
            batches.look()
        batches.wait()
    except BatchAPIError as exc:  # the provider refused, after the client's retries: nothing is lost
        raise GlanError(f"stage {step.stage}: batch mode: {exc}; what was sent is in llm_batches, and the next "
                        "run goes on from there") from None
    finally:
        batches.close()


@dataclass
class Batches:
    """One step's batches: its ledger rows in the run's slice, and the provider's API.

    `step` is the LLM step (jobs.pipeline.llmstep._Step: its call, config, figures and commit),
    not imported here since llmstep runs this module."""

    step: Any
    todo: DataFrame
    ids: list[str] | None
    created_here: set[str] = field(default_factory=set)
    collected_here: set[str] = field(default_factory=set)
    _api: BatchAPI | None = None

    @property
    def spark(self):
        return self.step.spark

    @property
    def cfg(self):
        return self.step.cfg

    @property
    def base(self) -> str:
        return f"{self.cfg.table_uri(STAGING).rstrip('/')}/{self.step.stage}.{self.step.call.output}"

    def api(self) -> BatchAPI:
        if self._api is None:
            try:
                self._api = BatchAPI(self.cfg.llm)
            except BatchAPIError as exc:
                raise GlanError(f"stage {self.step.stage}: batch mode: {exc}") from None
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()

    # -- the ledger ------------------------------------------------------------------------------

    def ledger(self, *states: str, scoped: bool = True) -> list[dict[str, Any]]:
        """This call's ledger rows in `states` whose disciplines are all in the run's slice (`scoped`)."""
        storage = get_storage(self.spark, self.cfg)
        if not storage.exists(LLM_BATCHES.name):
            return []
        frame = storage.read(LLM_BATCHES.name).filter(
            (F.col("stage") == self.step.stage) & (F.col("output_table") == self.step.call.output)
            & F.col("state").isin(*states))
        rows = [row.asDict() for row in frame.collect()]
        if scoped and self.ids is not None:
            mine = set(self.ids)
            rows = [r for r in rows if set(r["disciplines"] or []) <= mine]
        return sorted(rows, key=lambda r: r["submission_id"])

    def write_down(self, rows: list[dict[str, Any]], new: bool = False) -> None:
        """Add (`new`) or replace ledger rows, in one commit."""
        if not rows:
            return
        names = LLM_BATCHES.schema.fieldNames()
        frame = self.spark.createDataFrame([tuple(r.get(n) for n in names) for r in rows], LLM_BATCHES.schema)
        if new:
            append_missing(frame, LLM_BATCHES.name, "submission_id", self.cfg)
        else:
            get_storage(self.spark, self.cfg).replace(frame, LLM_BATCHES.name, "submission_id",
                                                      [r["submission_id"] for r in rows])

    def keys_of(self, submission_ids: list[str]) -> DataFrame:
        keys = get_storage(self.spark, self.cfg).read(LLM_BATCH_KEYS.name)
        return keys.filter(F.col("submission_id").isin(submission_ids))

    def without_live(self, todo: DataFrame) -> DataFrame:
        """`todo` minus the keys of this call's submissions not yet collected (any slice's), and of
        those this run collected (their answers are committed, their failures asked by the next run)."""
        storage = get_storage(self.spark, self.cfg)
        if not storage.exists(LLM_BATCHES.name):
            return todo
        handled = (F.col("state") != COLLECTED) | F.col("submission_id").isin(sorted(self.collected_here))
        live = (storage.read(LLM_BATCHES.name)
                .filter((F.col("stage") == self.step.stage) & (F.col("output_table") == self.step.call.output)
                        & handled).select("submission_id"))
        keys = storage.read(LLM_BATCH_KEYS.name).join(live, "submission_id", "left_semi").select("row_key")
        key = self.step.call.key
        return todo.join(keys, F.col(key).cast("string") == keys["row_key"], "left_anti")

    # -- submitting ------------------------------------------------------------------------------

    def render(self, rows: DataFrame, seed: Column) -> DataFrame:
        """`rows` with `_req` (udfs.batch_udf.REQUEST): each row's request line."""
        call, stage_llm = self.step.call, self.step.llm
        kwargs = {} if call.schema is None else {"schema": call.schema(self.cfg)}
        render = render_udf(call.prompt, self.cfg.llm, stage_llm, **kwargs)
        values = call.constants(self.cfg) if call.constants else {}
        constants = [F.lit(value).alias(name) for name, value in values.items()]
        return rows.withColumn(_ROW_SEED, seed.cast("long")).withColumn(
            "_req", render(*call.inputs, *constants, seed=_ROW_SEED, custom_id=call.key))

    def submit(self, fresh: DataFrame) -> None:
        """Render, cut, write out and write down the to-do rows; then create their batches."""
        key, write_id = self.step.call.key, uuid.uuid4().hex[:12]
        scratch = f"{self.base}/{write_id}"
        rendered = self.render(self.step.with_attempts(fresh), self.step.seed())
        (rendered.select(F.col(key).cast("string").alias("row_key"), "discipline_id", _ROW_SEED,
                         rendered["_req"]["line"].alias("line"), rendered["_req"]["error"].alias("error"))
         .write.mode("overwrite").parquet(f"{scratch}/rendered"))
        staged = self.spark.read.parquet(f"{scratch}/rendered")
        self.fail_unrendered(staged.filter(F.col("line").isNull()))
        good = staged.filter(F.col("line").isNotNull()).withColumn(
            "_bytes", F.length(F.encode("line", "utf-8")) + 1)
        files = self.cut(good)
        planned = good.withColumn("submission_id", _submission_id(F.lit(self.step.stage), F.lit(write_id), files))
        planned.select("submission_id", "line").repartition("submission_id").write.mode("overwrite") \
            .partitionBy("submission_id").text(f"{scratch}/requests")
        append_missing(planned.select("submission_id", F.lit(self.step.stage).alias("stage"), "row_key",
                                      "discipline_id", F.col(_ROW_SEED).alias("seed")),
                       LLM_BATCH_KEYS.name, list(LLM_BATCH_KEYS.key), self.cfg)
        rows = [self.new_row(r["submission_id"], 0, r["n"], r["bytes"], r["disciplines"],
                             f"{scratch}/requests/submission_id={r['submission_id']}")
                for r in planned.groupBy("submission_id").agg(
                    F.count("*").alias("n"), F.sum("_bytes").alias("bytes"),
                    F.sort_array(F.collect_set("discipline_id")).alias("disciplines")).collect()]
        self.write_down(rows, new=True)
        _remove(f"{scratch}/rendered")  # the request files hold what is sent from here on
        self.created_here.update(r["submission_id"] for r in rows)
        print(f"[{self.step.stage}] batch: {sum(r['num_requests'] for r in rows):,} {self.step.call.prompt} "
              f"request(s) in {len(rows)} file(s) under {scratch}/requests", file=sys.stderr, flush=True)

    def cut(self, good: DataFrame) -> Column:
        """Each row's file number: the rows hashed into as many files as the provider's limits need,
        more when one came out over a limit."""
        limits = self.cfg.llm.batch
        totals = good.agg(F.count("*").alias("n"), F.coalesce(F.sum("_bytes"), F.lit(0)).alias("bytes"),
                          F.coalesce(F.max("_bytes"), F.lit(0)).alias("longest")).collect()[0]
        if totals["longest"] > limits.max_bytes_per_file:
            raise GlanError(f"stage {self.step.stage}: a {self.step.call.prompt} request is {totals['longest']:,} "
                            f"bytes, over llm.batch.max_bytes_per_file={limits.max_bytes_per_file:,}")
        files = max(1, math.ceil(totals["n"] / (0.9 * limits.max_requests_per_file)),
                    math.ceil(totals["bytes"] / (0.9 * limits.max_bytes_per_file)))
        while True:
            number = F.pmod(F.xxhash64("row_key", F.lit("batch-file")), F.lit(files))
            sizes = good.groupBy(number.alias("f")).agg(F.count("*").alias("n"), F.sum("_bytes").alias("b")).collect()
            if all(r["n"] <= limits.max_requests_per_file and r["b"] <= limits.max_bytes_per_file for r in sizes):
                return number
            files *= 2

    def new_row(self, submission_id: str, round_: int, requests: int, size: int, disciplines: list[str],
                request_uri: str) -> dict[str, Any]:
        return {"submission_id": submission_id, "stage": self.step.stage, "prompt_name": self.step.call.prompt,
                "output_table": self.step.call.output, "model": self.step.llm.model, "round": round_,
                "state": PENDING, "num_requests": requests, "num_bytes": size, "disciplines": disciplines,
                "created_at": _now(), "request_uri": request_uri}

    def fail_unrendered(self, bad: DataFrame) -> None:
        """Rows whose prompt did not render go to `failures` (prompt_error) and are not sent."""
        if not bad.limit(1).count():
            return
        key = self.step.call.key
        failed = self.todo.join(bad.select(F.col("row_key").alias("_rk"), "error"),
                                F.col(key).cast("string") == F.col("_rk")).drop("_rk")
        failed = failed.withColumn(RESULT, _unanswered(F.lit("prompt_error"), F.col("error"), F.lit(None))).drop("error")
        self.step.result.failures += len(update_failures(self.spark, self.step.stage, key, failed, failed, self.cfg))

    def send(self) -> None:
        """Create a batch for every pending submission (found again if an earlier run created it)."""
        pending = self.ledger(PENDING)
        if not pending:
            return
        api, done = self.api(), []
        for row in pending:
            batch = None
            if row["submission_id"] not in self.created_here:  # an earlier run may have created it
                batch = api.find(row["submission_id"], since(row["created_at"].timestamp()))
            if batch is None:
                data = _read_requests(row["request_uri"])
                file_id = api.upload(f"{row['submission_id']}.jsonl", data)
                batch = api.create(file_id, {SUBMISSION: row["submission_id"], "glan_stage": self.step.stage,
                                             "glan_call": self.step.call.prompt})
            done.append({**row, "state": SUBMITTED, "batch_id": batch.id, "input_file_id": batch.input_file_id,
                         "status": batch.status, "submitted_at": _now()})
        self.write_down(done)

    # -- looking and collecting ------------------------------------------------------------------

    def look(self) -> None:
        """Send what is pending, look at every live batch, and collect each one that has ended."""
        self.send()
        for row in self.poll():
            self.collect(row)
        self.send()  # the resubmissions of what was just collected

    def poll(self) -> list[dict[str, Any]]:
        """The provider's view of each submitted batch, written down when it changed; the ended ones."""
        api, changed, ended = self.api(), [], []
        for row in self.ledger(SUBMITTED):
            batch = api.retrieve(row["batch_id"])
            counts = batch.request_counts
            stamp = ended_at(batch)
            new = {**row, "status": batch.status, "num_completed": counts.completed if counts else None,
                   "num_failed": counts.failed if counts else None, "output_file_id": batch.output_file_id,
                   "error_file_id": batch.error_file_id, "error_message": batch_error(batch),
                   "ended_at": datetime.fromtimestamp(stamp, timezone.utc).replace(tzinfo=None) if stamp else None}
            if new != row:
                changed.append(new)
            if batch.status in ENDED:
                ended.append(new)
            elif batch.status not in LIVE:
                log.warning("%s: batch %s has status %r", self.step.stage, batch.id, batch.status)
        self.write_down(changed)
        return ended

    def collect(self, row: dict[str, Any]) -> None:
        """Commit what an ended batch answered; resubmit or fail what it did not."""
        lines = self.download(row)
        keys = self.keys_of([row["submission_id"]]).select("row_key", F.col("seed").alias(_ROW_SEED))
        joined = keys.join(lines, "row_key", "left")
        before = (self.step.result.rows_written, self.step.result.failures)
        self.commit_answers(row, joined.filter(F.col("status_code") == 200))
        unanswered = joined.filter(F.col("status_code").isNull() | (F.col("status_code") != 200))
        resubmitted = 0
        if row["round"] < self.cfg.llm.batch.max_resubmits:
            resubmitted = self.resubmit(row, unanswered)
        else:
            self.fail_unanswered(row, unanswered)
        written, failed = self.step.result.rows_written - before[0], self.step.result.failures - before[1]
        self.write_down([{**row, "state": COLLECTED, "collected_at": _now(), "rows_written": written,
                          "rows_failed": failed, "rows_resubmitted": resubmitted}])
        self.collected_here.add(row["submission_id"])
        for uri in (f"{self.base}/{row['submission_id']}", row["request_uri"]):  # downloads, checks, requests
            _remove(uri)
        _remove_spent_write(row["request_uri"])
        print(f"[{self.step.stage}] batch {row['batch_id']} ({row['status']}): {written:,} answer(s) committed, "
              f"{failed:,} to failures, {resubmitted:,} sent again", file=sys.stderr, flush=True)

    def download(self, row: dict[str, Any]) -> DataFrame:
        """The batch's output and error lines: row_key, status_code, body, message, code."""
        folder = f"{self.base}/{row['submission_id']}/results"
        fs, root = arrow_filesystem(folder)
        fs.create_dir(root, recursive=True)
        uris = []
        for name in ("output_file_id", "error_file_id"):
            if row.get(name):
                path = f"{root}/{name.removesuffix('_file_id')}.jsonl"
                with fs.open_output_stream(path) as out:
                    out.write(self.api().download(row[name]))
                uris.append(f"{folder}/{name.removesuffix('_file_id')}.jsonl")
        schema = "row_key string, status_code int, body string, message string, code string"
        if not uris:
            return self.spark.createDataFrame([], schema)
        parsed = self.spark.read.text(uris).select(F.from_json("value", _LINE).alias("l"))
        return parsed.select(
            F.col("l.custom_id").alias("row_key"), F.col("l.response.status_code").alias("status_code"),
            F.col("l.response.body").alias("body"),
            F.coalesce(F.col("l.error.message"), F.get_json_object("l.response.body", "$.error.message")).alias("message"),
            F.col("l.error.code").alias("code")).filter(F.col("row_key").isNotNull())

    def commit_answers(self, row: dict[str, Any], answered: DataFrame) -> None:
        """Check the answers as online ones are, keep the checked results (a repair call is paid
        once), and commit them with the step's own commit."""
        call, key = self.step.call, self.step.call.key
        checked = f"{self.base}/{row['submission_id']}/checked"
        fs, root = arrow_filesystem(checked)
        if fs.get_file_info(f"{root}/_SUCCESS").type == pafs.FileType.NotFound:
            kwargs = {} if call.schema is None else {"schema": call.schema(self.cfg)}
            finish = finish_udf(call.prompt, self.cfg.llm, self.step.llm, **kwargs)
            latency = _seconds(row.get("submitted_at"), row.get("ended_at"))
            sent_seed = _sent_seed(self.cfg.llm, self.step.llm, F.col(_ROW_SEED))
            inputs = self.todo.join(answered.withColumnRenamed("row_key", "_rk"),
                                    F.col(key).cast("string") == F.col("_rk"))
            inputs = inputs.withColumn("_sent", sent_seed).withColumn("_bid", F.lit(row["batch_id"])).withColumn(
                "_lat", F.lit(latency))
            called = inputs.withColumn(RESULT, finish("status_code", "body", "message", "_sent", "_bid", "_lat"))
            called.select(*self.todo.columns, RESULT).write.mode("overwrite").parquet(checked)
        results = self.spark.read.parquet(checked)
        self.step.commit(results)
        self.step.charge(results)

    def resubmit(self, row: dict[str, Any], unanswered: DataFrame) -> int:
        """Put the unanswered requests in the next round's submission, with the same seeds."""
        key = self.step.call.key
        rows = self.todo.join(unanswered.select(F.col("row_key").alias("_rk"), _ROW_SEED),
                              F.col(key).cast("string") == F.col("_rk")).drop("_rk")
        count = rows.count()
        if not count:
            return 0
        submission_id = _next_id(row["submission_id"], row["round"] + 1)
        folder = f"{self.base}/{submission_id}/requests"
        rendered = self.render(rows, F.col(_ROW_SEED))
        good = rendered.select(F.col(key).cast("string").alias("row_key"), "discipline_id", _ROW_SEED,
                               rendered["_req"]["line"].alias("line")).filter(F.col("line").isNotNull())
        good.select("line").coalesce(1).write.mode("overwrite").text(folder)
        append_missing(good.select(F.lit(submission_id).alias("submission_id"), F.lit(self.step.stage).alias("stage"),
                                   "row_key", "discipline_id", F.col(_ROW_SEED).alias("seed")),
                       LLM_BATCH_KEYS.name, list(LLM_BATCH_KEYS.key), self.cfg)
        totals = good.agg(F.count("*").alias("n"), F.sum(F.length(F.encode("line", "utf-8")) + 1).alias("b"),
                          F.sort_array(F.collect_set("discipline_id")).alias("d")).collect()[0]
        self.write_down([self.new_row(submission_id, row["round"] + 1, totals["n"], totals["b"] or 0,
                                      totals["d"], folder)], new=True)
        self.created_here.add(submission_id)
        return int(totals["n"])

    def fail_unanswered(self, row: dict[str, Any], unanswered: DataFrame) -> None:
        """Requests still unanswered after the last round go to `failures` with the provider's message."""
        key = self.step.call.key
        status = row["status"]
        whole = f"batch {row['batch_id']} {status}" + (f": {row['error_message']}" if row.get("error_message") else "")
        error_class = (F.when(F.col("code").isNotNull(), F.col("code"))
                       .when(F.col("status_code").isNotNull(), F.concat(F.lit("batch_http_"), F.col("status_code")))
                       .otherwise(F.lit(f"batch_{status}")))
        message = F.coalesce(F.col("message"), F.lit(whole))
        failed = self.todo.join(unanswered.select(F.col("row_key").alias("_rk"), "code", "status_code", "message"),
                                F.col(key).cast("string") == F.col("_rk")).drop("_rk")
        failed = failed.withColumn(RESULT, _unanswered(error_class, message, F.lit(row["batch_id"]))) \
            .drop("code", "status_code", "message")
        if failed.limit(1).count():
            new = update_failures(self.spark, self.step.stage, key, failed, failed, self.cfg)
            self.step.result.failures += len(new)

    # -- waiting ---------------------------------------------------------------------------------

    def wait(self) -> None:
        """Look every poll_s until nothing is in flight or llm.batch.wait_s has passed; then report."""
        settings = self.cfg.llm.batch
        deadline = time.monotonic() + settings.wait_s
        live = self.ledger(PENDING, SUBMITTED)
        while live and time.monotonic() < deadline:
            requests = sum(r["num_requests"] or 0 for r in live)
            done = sum(r["num_completed"] or 0 for r in live)
            print(f"[{self.step.stage}] batch: {len(live)} batch(es) in flight, {done:,} of {requests:,} requests "
                  f"answered; waiting up to {max(0.0, deadline - time.monotonic()):,.0f} s more (llm.batch.wait_s)",
                  file=sys.stderr, flush=True)
            time.sleep(min(settings.poll_s, max(0.0, deadline - time.monotonic())))
            self.look()
            live = self.ledger(PENDING, SUBMITTED)
        self.step.result.in_flight = sum(r["num_requests"] or 0 for r in live)
        self.step.result.batches = len(live)
        self.note_other_slices()

    def note_other_slices(self) -> None:
        """Say so when batches of this call hold disciplines outside the run's slice: their keys stay
        out of every run's work until a run whose slice covers them collects them."""
        if self.ids is None:
            return
        mine = set(self.ids)
        others = [r for r in self.ledger(PENDING, SUBMITTED, scoped=False) if not set(r["disciplines"] or []) <= mine]
        if others:
            names = sorted({d for r in others for d in r["disciplines"] or []} - mine)
            print(f"[{self.step.stage}] batch: {len(others)} batch(es) of this call also hold other discipline ids "
                  f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); a run over those disciplines "
                  "(or all) collects them", file=sys.stderr, flush=True)


def _unanswered(error_class: Column, message: Column, batch_id: Column) -> Column:
    """An LLM_RESULT for a request that got no answer: no text, no tokens (nothing was paid)."""
    values = {"error_class": error_class, "error_message": message, "attempts": F.lit(1), "repaired": F.lit(False),
              "prompt_tokens": F.lit(0), "completion_tokens": F.lit(0), "cached_tokens": F.lit(0),
              "batch_id": batch_id, "billing": F.lit("batch")}
    return F.struct(*[values.get(f.name, F.lit(None)).cast(f.dataType).alias(f.name) for f in LLM_RESULT.fields])


def _sent_seed(llm, stage_llm, row_seed: Column) -> Column:
    """The seed a request line sent, from its row seed, as udfs.llm.client.request_seed has it."""
    if not llm.send_seed:
        return F.lit(None).cast("long")
    if stage_llm.seed is None:
        return row_seed
    return F.coalesce(row_seed, F.lit(0)) + F.lit(stage_llm.seed)


def _submission_id(stage: Column, write_id: Column, file_number: Column) -> Column:
    return F.substring(F.sha2(F.concat_ws("|", stage, write_id, file_number.cast("string")), 256), 1, 16)


def _next_id(submission_id: str, round_: int) -> str:
    """The resubmission's id: the same on every run that collects the same batch."""
    return hashlib.sha256(f"{submission_id}|round|{round_}".encode()).hexdigest()[:16]


def _read_requests(uri: str) -> bytes:
    """A submission's request file: the text parts Spark wrote under `uri`, in name order."""
    fs, root = arrow_filesystem(uri)
    parts = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                   if info.base_name.startswith("part-") and info.size)
    if not parts:
        raise GlanError(f"the request file of a pending batch is missing under {uri}; it is written before the "
                        "batch is written down, so it was removed since")
    chunks = []
    for path in parts:
        with fs.open_input_stream(path) as stream:
            chunks.append(stream.read())
    return b"".join(chunks)


def _remove(uri: str | None) -> None:
    """Delete a folder of batch files, if it is there."""
    if not uri:
        return
    fs, root = arrow_filesystem(uri)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)


def _remove_spent_write(request_uri: str | None) -> None:
    """Remove a submission's write folder (`<write id>/requests/submission_id=...`) once none of its
    request files is left in it."""
    if not request_uri or "/requests/submission_id=" not in request_uri:
        return
    folder = request_uri.rsplit("/requests/", 1)[0]
    fs, root = arrow_filesystem(f"{folder}/requests")
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    if not any(e.type == pafs.FileType.Directory for e in entries):
        _remove(folder)


def _seconds(start: datetime | None, end: datetime | None) -> float:
    return max(0.0, (end - start).total_seconds()) if start and end else 0.0


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
