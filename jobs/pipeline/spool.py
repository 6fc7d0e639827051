"""LLM results written down by the task that paid for them, before anything is committed.

Each Arrow batch of LLM results (a task's rows, usually) is written as one Parquet file under
`<run_root>/_spool/<stage>.<output>/<run id>/` the moment its calls are done, by the task itself.
The driver then commits the chunk from those files and deletes them. So:

- a run killed mid-chunk loses only the calls still in flight: the next run of that stage commits
  what the dead run's folder holds before it asks for anything;
- a lost executor or a failed commit never makes Spark recompute (and pay for) finished calls,
  because the results live in storage, not in an executor's cache;
- a task attempt retried by Spark may leave a second file with the same keys; reading dedupes by
  key and prefers a success.

Every run has its own folder with an `_owner.json` (host, pid, heartbeat every 30 s), so runs of
other discipline slices can work on the same run root at once: a run takes over only folders whose
owner is dead (same host and the process is gone, or no heartbeat for
`pipeline.spool_stale_after_s`), and only the rows of its own disciplines. The owner file also
names the run's disciplines: a run of a step stops with a one-line error, before asking anything,
when a live run of that step has claimed any of the same disciplines first.

A file appears under its final name only when complete (written under a `_`-prefixed name and
renamed on local disks; object stores publish an object only when its upload is closed).

Before a task sends a batch of calls it writes one small intent file (`intents/<write id>/`: key,
discipline, model, prompt, estimated prompt tokens per row), named after its task attempt like the
result files. An intent with no spooled result of the same task attempt is a call that was sent, or
about to be, when its task died: possibly paid. `glan cost` and `glan status` count those and the
spooled rows; the next run records them in `failed_calls` (error class `in_flight`) before the files
go, and a run records the intents of task attempts Spark retried the same way, so no paid call is
left out of the ledger. A batch's intent is written once it is complete, before its first request,
so an intent cut off mid-write stands for no call.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark import TaskContext
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from jobs.config.loader import GlanConfig
from jobs.errors import GlanError
from jobs.spark.session import arrow_filesystem
from jobs.storage.owners import HEARTBEATS, owner_is_dead, read_owner, write_owner

log = logging.getLogger(__name__)

SPOOL_DIR = "_spool"
INTENTS = "intents"  # a run folder's subfolder: intents/<write id>/<task attempt>-<uuid>.parquet
IN_FLIGHT = "in_flight"  # failed_calls.error_class of an intent without a result
_INTENT = pa.schema([("row_key", pa.string()), ("discipline_id", pa.string()), ("model", pa.string()),
                     ("prompt_name", pa.string()), ("prompt_version", pa.string()), ("prompt_tokens", pa.int64())])
_KEY_META = b"glan.key"  # the name of the key column, in an intent file's schema metadata
RUN_ID = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"  # this driver process
_FILES = T.StructType([T.StructField("path", T.StringType()), T.StructField("rows", T.LongType())])


def _list(fs: pafs.FileSystem, root: str, kind: pafs.FileType = pafs.FileType.File) -> list[str]:
    selector = pafs.FileSelector(root, allow_not_found=True)
    return sorted(info.base_name for info in fs.get_file_info(selector) if info.type == kind)


def _run_folders(fs: pafs.FileSystem, step_root: str) -> Iterator[tuple[str, str, list[str]]]:
    """(run id, folder, file names) of every run's folder of one step."""
    for run_id in _list(fs, step_root, pafs.FileType.Directory):
        root = f"{step_root}/{run_id}"
        yield run_id, root, _list(fs, root)


def _split(names: list[str]) -> tuple[list[str], list[str]]:
    """The complete spool files among `names`, and those a task was still writing (`_` names)."""
    parquet = [n for n in names if n.endswith(".parquet")]
    return [n for n in parquet if not n.startswith(("_", "."))], [n for n in parquet if n.startswith("_")]


def _publish(fs: pafs.FileSystem, root: str, name: str, table: pa.Table) -> None:
    """Write `table` as `root/name`, visible under that name only once complete."""
    local = isinstance(fs, pafs.LocalFileSystem)
    with fs.open_output_stream(f"{root}/_{name}" if local else f"{root}/{name}") as sink:
        pq.write_table(table, sink, compression="zstd")
    if local:
        fs.move(f"{root}/_{name}", f"{root}/{name}")


def _task_attempt() -> tuple[str, str]:
    """`part-<partition>` and `a<attempt>` of the running Spark task (0, 0 outside one)."""
    ctx = TaskContext.get()
    part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
    return f"part-{part:05d}", f"a{attempt}"


def _attempt_of(name: str) -> str:
    """The task attempt a result or intent file comes from: its name up to the last `-`."""
    return name.rsplit("/", 1)[-1].rsplit("-", 1)[0]


def _writer(uri: str, write_id: str):
    """mapInArrow function: one Parquet file per batch of results, published when complete."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        part, attempt = _task_attempt()
        fs, root = arrow_filesystem(uri)
        for index, batch in enumerate(batches):
            if batch.num_rows == 0:
                continue
            name = f"{part}-{write_id}-{attempt}-{index:04d}.parquet"
            _publish(fs, root, name, pa.Table.from_batches([batch]))
            yield pa.RecordBatch.from_pydict({"path": [name], "rows": [batch.num_rows]},
                                             schema=to_arrow_schema(_FILES))

    return write


@dataclass(frozen=True)
class IntentLog:
    """`llm_udf(intents=...)` for one spool write: each task batch notes the calls it is about to send
    in one file, named after its task attempt like the result files (shipped to the tasks)."""

    uri: str  # <run folder>/intents/<write id>
    write_id: str
    key: str

    def __call__(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        part, attempt = _task_attempt()

        def text(value: Any) -> str | None:
            return value if isinstance(value, str) else None  # pandas gives NaN for a null string

        table = pa.Table.from_pylist(
            [{"row_key": str(r[self.key]), "discipline_id": text(r.get("discipline_id")), "model": r["model"],
              "prompt_name": r["prompt_name"], "prompt_version": r["prompt_version"],
              "prompt_tokens": int(r["prompt_tokens"])} for r in rows],
            schema=_INTENT.with_metadata({_KEY_META: self.key.encode()}))
        fs, root = arrow_filesystem(self.uri)
        _publish(fs, root, f"{part}-{self.write_id}-{attempt}-{uuid.uuid4().hex[:8]}.parquet", table)


def _intent_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """A run folder's complete intent files, as `intents/<write id>/<name>`."""
    selector = pafs.FileSelector(f"{folder}/{INTENTS}", allow_not_found=True, recursive=True)
    found = [info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]
    names = [path[len(folder) + 1:] for path in found if path.endswith(".parquet")]
    return sorted(n for n in names if not n.rsplit("/", 1)[-1].startswith(("_", ".")))


def _unanswered(fs: pafs.FileSystem, folder: str, results: Sequence[str], intents: Sequence[str],
                *, attempts_finished: bool = False) -> pa.Table | None:
    """The intent rows no result file of the same task attempt holds: calls sent (or about to be)
    whose answers were never spooled, with the intent file's path in `_intent`.

    `attempts_finished`: every task attempt that spooled anything spooled all its rows (a job that
    completed), so only the intents of attempts without results are read."""
    by_attempt: dict[str, list[str]] = {}
    for name in results:
        by_attempt.setdefault(_attempt_of(name), []).append(name)
    lost = []
    for path in intents:
        answered = by_attempt.get(_attempt_of(path))
        if answered and attempts_finished:
            continue
        try:
            table = pq.read_table(fs.open_input_file(f"{folder}/{path}"))
        except (OSError, pa.ArrowInvalid):  # gone since the listing, or unreadable: nothing was sent for it
            continue
        if answered:
            key = (table.schema.metadata or {}).get(_KEY_META, b"").decode()
            keys = set()
            for name in answered:
                try:
                    keys.update(str(k) for k in pq.read_table(fs.open_input_file(f"{folder}/{name}"),
                                                              columns=[key]).column(0).to_pylist())
                except (OSError, pa.ArrowInvalid, KeyError):
                    continue
            table = table.filter(pa.array([k not in keys for k in table.column("row_key").to_pylist()], pa.bool_()))
        if table.num_rows:
            lost.append(table.replace_schema_metadata(None).append_column(
                "_intent", pa.array([path] * table.num_rows, pa.string())))
    return pa.concat_tables(lost) if lost else None


def _shared(mine: list[str] | None, theirs: list[str] | None) -> str:
    """The disciplines two runs have in common, in words ('' when none); None stands for all."""
    if mine is None and theirs is None:
        return "all"
    common = set(theirs) if mine is None else set(mine) if theirs is None else set(mine) & set(theirs)
    if not common:
        return ""
    names = sorted(common)
    return f"{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


@dataclass
class Orphan:
    """The folder of a dead run: its complete files, the ones it was still writing, and its intents."""

    uri: str
    files: list[str]
    partial: list[str]
    intents: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------


class Spool:
    """This run's spool folder for one LLM step (`stage` writing `output`), and the step's orphans."""

    def __init__(self, spark: SparkSession, cfg: GlanConfig, stage: str, output: str, run_id: str = RUN_ID) -> None:
        self.spark = spark
        self.stale_after_s = float(cfg.pipeline.spool_stale_after_s)
        self.base = f"{cfg.table_uri(SPOOL_DIR).rstrip('/')}/{stage}.{output}"
        self.run_id = run_id
        self.uri = f"{self.base}/{run_id}"
        self.fs, self.root = arrow_filesystem(self.uri)
        self._base_root = arrow_filesystem(self.base)[1]
        self._open = False
        self.stage = stage
        self.owner = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.time(), "disciplines": None}

    def _ensure_open(self) -> None:
        if not self._open:
            self.fs.create_dir(self.root, recursive=True)
            write_owner(self.fs, self.root, self.owner)
            HEARTBEATS.add(self.uri, self.fs, self.root, self.owner)
            self._open = True

    def claim(self, disciplines: Sequence[str] | None) -> None:
        """Take this step for `disciplines` (None: all of them) before anything is asked.

        Two runs of one step on the same disciplines would pay twice for every call, so when a live
        run of this step works on any of them and claimed first, this run stops here with a
        one-line error. Each of two runs that claim at once sees the other's folder: the later
        one stops. Runs on other disciplines go on side by side."""
        self.owner["disciplines"] = sorted(disciplines) if disciplines is not None else None
        self._ensure_open()
        mine = (self.owner["started"], self.run_id)
        for run_id, root, _ in _run_folders(self.fs, self._base_root):
            owner = read_owner(self.fs, root)
            if run_id == self.run_id or owner_is_dead(owner, self.stale_after_s):
                continue
            shared = _shared(self.owner["disciplines"], owner.get("disciplines"))
            if not shared or (float(owner.get("started", 0)), run_id) > mine:
                continue
            self.close()
            age = time.time() - float(owner.get("heartbeat", 0))
            raise GlanError(
                f"stage {self.stage!r} is already running on {shared} of this run's disciplines under "
                f"{self.base}: run {run_id} (host {owner.get('host')}, pid {owner.get('pid')}, heartbeat "
                f"{age:.0f} s ago); wait for it to end or stop it, since both would pay for the same calls "
                f"(a run whose host is lost counts as gone after pipeline.spool_stale_after_s="
                f"{self.stale_after_s:g} s without a heartbeat; runs on other --disciplines may go on at once)")

    def intents(self, key: str) -> IntentLog:
        """A new write's intent log, for `llm_udf(intents=...)`; hand it to `write` with the calls."""
        self._ensure_open()
        write_id = uuid.uuid4().hex[:12]
        self.fs.create_dir(f"{self.root}/{INTENTS}/{write_id}", recursive=True)
        return IntentLog(f"{self.uri}/{INTENTS}/{write_id}", write_id, key)

    def write(self, called: DataFrame, intents: IntentLog | None = None) -> list[str]:
        """Run the job that computes `called` (the LLM calls) and spool its rows; the file names.
        `intents`: the log the calls of `called` write to, so that both name the same write."""
        self._ensure_open()
        write_id = intents.write_id if intents is not None else uuid.uuid4().hex[:12]
        meta = called.mapInArrow(_writer(self.uri, write_id), _FILES).collect()
        return [row["path"] for row in meta]

    def unanswered(self, intents: IntentLog, files: list[str]) -> pa.Table | None:
        """After `write` returned `files`: the calls of task attempts that spooled nothing (attempts
        Spark retried after they had sent their calls)."""
        names = [n for n in _intent_files(self.fs, self.root) if n.startswith(f"{INTENTS}/{intents.write_id}/")]
        return _unanswered(self.fs, self.root, files, names, attempts_finished=True)

    def orphan_unanswered(self, orphan: Orphan) -> pa.Table | None:
        """The calls a dead run sent whose answers it never spooled."""
        fs, root = arrow_filesystem(orphan.uri)
        return _unanswered(fs, root, orphan.files, orphan.intents)

    def read(self, names: list[str], schema: T.StructType, key: str, failed: Column,
             folder: str | None = None) -> DataFrame:
        """The spooled rows, one per key (a retried task attempt may have spooled a key twice; a
        success wins over a failure). Files of another shape are a one-line error, not a guess."""
        folder = folder or self.uri
        if not names:
            return self.spark.createDataFrame([], schema)
        fs, root = arrow_filesystem(folder)
        found = pq.read_schema(fs.open_input_file(f"{root}/{names[0]}")).names
        if sorted(found) != sorted(schema.fieldNames()):
            raise GlanError(f"spool {folder} holds LLM results with columns {', '.join(found)}, not "
                            f"{', '.join(schema.fieldNames())} (written by another version of this stage): "
                            f"rerun with that version, or move the folder away to ask for those rows again")
        frame = self.spark.read.schema(schema).parquet(*[f"{folder}/{name}" for name in names])
        best = Window.partitionBy(key).orderBy(failed.cast("int"), F.col("_spool_file"))
        return (frame.withColumn("_spool_file", F.input_file_name())
                .withColumn("_spool_rank", F.row_number().over(best))
                .filter(F.col("_spool_rank") == 1).drop("_spool_rank", "_spool_file"))

    def remove(self, names: list[str], folder: str | None = None, intents: IntentLog | None = None) -> None:
        """Forget files whose rows are committed, and the intents of their write."""
        fs, root = arrow_filesystem(folder or self.uri)
        for name in names:
            try:
                fs.delete_file(f"{root}/{name}")
            except FileNotFoundError:
                pass
        if intents is not None:
            _delete_dir(fs, f"{root}/{INTENTS}/{intents.write_id}")

    def close(self) -> None:
        """The step is done: stop the heartbeat and remove this run's folder if nothing is left in it."""
        HEARTBEATS.discard(self.uri)
        if self._open and not any(_split(_list(self.fs, self.root))) and not _intent_files(self.fs, self.root):
            self.fs.delete_dir(self.root)
        self._open = False

    def orphans(self) -> list[Orphan]:
        """Folders of this step left by runs that are gone. Live runs' folders are left alone."""
        found = []
        for run_id, root, names in _run_folders(self.fs, self._base_root):
            uri = f"{self.base}/{run_id}"
            files, partial = _split(names)
            intents = _intent_files(self.fs, root)
            if run_id == self.run_id:  # an earlier step of this process that stopped on an error
                if files or partial or intents:
                    found.append(Orphan(uri, files, partial, intents))
                continue
            owner = read_owner(self.fs, root)
            if not owner_is_dead(owner, self.stale_after_s):
                log.warning("spool %s belongs to a run still alive (host %s, pid %s); leaving it to that run",
                            uri, owner.get("host"), owner.get("pid"))
                continue
            found.append(Orphan(uri, files, partial, intents))
        return found

    def keep_only(self, orphan: Orphan, frame: DataFrame | None) -> None:
        """Replace an orphan's files by `frame` (rows of other discipline slices, left for their runs)
        and drop its intents (record `orphan_unanswered` first); drop the folder when nothing is left."""
        fs, root = arrow_filesystem(orphan.uri)
        table = frame.toArrow() if frame is not None else None  # read before the files it comes from go
        if table is not None and table.num_rows:
            _publish(fs, root, f"part-kept-{uuid.uuid4().hex[:12]}.parquet", table)
        self.remove(orphan.files + orphan.partial, orphan.uri)
        _delete_dir(fs, f"{root}/{INTENTS}")
        if table is None or not table.num_rows:
            _delete_dir(fs, root)


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


@dataclass
class SpoolState:
    """What the spool folders of a run root hold now, per stage (see `spool_state`)."""

    spooled: dict[str, int]  # rows paid for and spooled, not committed yet (the next run commits them)
    running: dict[str, list[str]]  # live runs as `host:pid`
    usage: list[dict[str, Any]]  # per stage, kind (`spooled` | `in flight`) and model: calls and tokens


def spool_state(cfg: GlanConfig, disciplines: Collection[str] | None = None) -> SpoolState:
    """The spooled rows and in-flight intents of every step, limited to `disciplines` (ids; None: all),
    and the live runs. Read on the driver with pyarrow: the spool holds at most a chunk per run.

    A run killed between committing a chunk and removing its files shows those rows as spooled
    too until the next run of the stage clears them."""
    fs, root = arrow_filesystem(cfg.table_uri(SPOOL_DIR))
    stale_after_s = float(cfg.pipeline.spool_stale_after_s)
    state = SpoolState({}, {}, [])
    sums: dict[tuple[str, str, str | None], dict[str, int]] = {}

    def add(stage: str, kind: str, table: pa.Table, usage: pa.Table) -> None:
        if "discipline_id" in table.column_names and disciplines is not None:
            keep = pa.array([d in disciplines for d in table.column("discipline_id").to_pylist()], pa.bool_())
            usage = usage.filter(keep)
        elif disciplines is not None:
            usage = usage.slice(0, 0)
        for row in usage.to_pylist():
            total = sums.setdefault((stage, kind, row["model"]), {"calls": 0, "prompt_tokens": 0,
                                                                  "cached_tokens": 0, "completion_tokens": 0})
            total["calls"] += 1
            for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
                total[name] += row.get(name) or 0
        if kind == "spooled":
            state.spooled[stage] = state.spooled.get(stage, 0) + usage.num_rows

    for step in _list(fs, root, pafs.FileType.Directory):
        stage = step.split(".", 1)[0]
        state.spooled.setdefault(stage, 0)
        for _, folder, names in _run_folders(fs, f"{root}/{step}"):
            files, _ = _split(names)
            for name in files:
                try:
                    table = pq.read_table(fs.open_input_file(f"{folder}/{name}"))
                except (OSError, pa.ArrowInvalid):  # committed and removed since the listing
                    continue
                out = table.column("_out").combine_chunks()
                add(stage, "spooled", table, pa.table({name: out.field(name) for name in
                                                       ("model", "prompt_tokens", "cached_tokens", "completion_tokens")}))
            lost = _unanswered(fs, folder, files, _intent_files(fs, folder))
            if lost is not None:
                add(stage, "in flight", lost, lost.select(["model", "prompt_tokens"]))
            owner = read_owner(fs, folder)
            if not owner_is_dead(owner, stale_after_s):
                runs = state.running.setdefault(stage, [])
                where = f"{owner.get('host')}:{owner.get('pid')}"
                if where not in runs:  # one run, two steps of a stage (e.g. syllabus and its extraction)
                    runs.append(where)
    state.usage = [{"stage": stage, "table": kind, "model": model, **total}
                   for (stage, kind, model), total in sums.items()]
    state.spooled = {stage: n for stage, n in state.spooled.items() if n}
    return state


def spool_by_stage(cfg: GlanConfig) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Per stage: rows paid for and spooled but not committed yet, and the live runs (`host:pid`)."""
    state = spool_state(cfg)
    return state.spooled, state.running
