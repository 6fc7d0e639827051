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
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from jobs.common.config import GlanConfig
from jobs.common.errors import GlanError
from jobs.common.spark import arrow_filesystem

log = logging.getLogger(__name__)

SPOOL_DIR = "_spool"
OWNER = "_owner.json"
HEARTBEAT_S = 30.0
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


def _num_rows(fs: pafs.FileSystem, path: str) -> int:
    return pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows


def _writer(uri: str, write_id: str):
    """mapInArrow function: one Parquet file per batch of results, published when complete."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
        fs, root = arrow_filesystem(uri)
        local = isinstance(fs, pafs.LocalFileSystem)
        for index, batch in enumerate(batches):
            if batch.num_rows == 0:
                continue
            name = f"part-{part:05d}-{write_id}-a{attempt}-{index:04d}.parquet"
            target = f"{root}/{name}"
            with fs.open_output_stream(f"{root}/_{name}" if local else target) as sink:
                pq.write_table(pa.Table.from_batches([batch]), sink, compression="zstd")
            if local:
                fs.move(f"{root}/_{name}", target)
            yield pa.RecordBatch.from_pydict({"path": [name], "rows": [batch.num_rows]},
                                             schema=to_arrow_schema(_FILES))

    return write


# ---------------------------------------------------------------------------------------------
# Owners: who is writing a folder, and whether they are still alive


class _Heartbeat:
    """One daemon thread per driver that rewrites the owner file of every open spool folder."""

    def __init__(self) -> None:
        self.folders: dict[str, tuple[pafs.FileSystem, str, dict]] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, uri: str, fs: pafs.FileSystem, root: str, owner: dict) -> None:
        with self.lock:
            self.folders[uri] = (fs, root, owner)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="glan-spool-heartbeat", daemon=True)
                self.thread.start()

    def discard(self, uri: str) -> None:
        with self.lock:
            self.folders.pop(uri, None)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                folders = list(self.folders.values())
            for fs, root, owner in folders:
                try:
                    _write_owner(fs, root, owner)
                except OSError as exc:  # storage hiccup: the next beat tries again
                    log.debug("spool heartbeat for %s failed: %s", root, exc)


_HEARTBEAT = _Heartbeat()


def _write_owner(fs: pafs.FileSystem, root: str, owner: dict) -> None:
    """The owner file: who writes the folder (run id, host, pid), since when, for which disciplines
    (None: all), and the time of this heartbeat."""
    with fs.open_output_stream(f"{root}/{OWNER}") as sink:
        sink.write(json.dumps({**owner, "heartbeat": time.time()}).encode())


def _read_owner(fs: pafs.FileSystem, root: str) -> dict | None:
    try:
        return json.loads(fs.open_input_stream(f"{root}/{OWNER}").read())
    except (OSError, ValueError):  # none, or cut off mid-write: the writer died
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_is_dead(owner: dict | None, stale_after_s: float, now: float | None = None) -> bool:
    """A folder's writer is gone: no owner file, no heartbeat for `stale_after_s`, or (same host)
    its process no longer exists."""
    if not owner:
        return True
    now = time.time() if now is None else now
    if now - float(owner.get("heartbeat", 0)) > stale_after_s:
        return True
    return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))


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
    """The folder of a dead run: its complete files and the ones it was still writing."""

    uri: str
    files: list[str]
    partial: list[str]


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
            _write_owner(self.fs, self.root, self.owner)
            _HEARTBEAT.add(self.uri, self.fs, self.root, self.owner)
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
            owner = _read_owner(self.fs, root)
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

    def write(self, called: DataFrame) -> list[str]:
        """Run the job that computes `called` (the LLM calls) and spool its rows; the file names."""
        self._ensure_open()
        meta = called.mapInArrow(_writer(self.uri, uuid.uuid4().hex[:12]), _FILES).collect()
        return [row["path"] for row in meta]

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

    def remove(self, names: list[str], folder: str | None = None) -> None:
        """Forget files whose rows are committed."""
        fs, root = arrow_filesystem(folder or self.uri)
        for name in names:
            try:
                fs.delete_file(f"{root}/{name}")
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """The step is done: stop the heartbeat and remove this run's folder if nothing is left in it."""
        _HEARTBEAT.discard(self.uri)
        if self._open and not any(_split(_list(self.fs, self.root))):
            self.fs.delete_dir(self.root)
        self._open = False

    def orphans(self) -> list[Orphan]:
        """Folders of this step left by runs that are gone. Live runs' folders are left alone."""
        found = []
        for run_id, root, names in _run_folders(self.fs, self._base_root):
            uri = f"{self.base}/{run_id}"
            files, partial = _split(names)
            if run_id == self.run_id:  # an earlier step of this process that stopped on an error
                if files or partial:
                    found.append(Orphan(uri, files, partial))
                continue
            owner = _read_owner(self.fs, root)
            if not owner_is_dead(owner, self.stale_after_s):
                log.warning("spool %s belongs to a run still alive (host %s, pid %s); leaving it to that run",
                            uri, owner.get("host"), owner.get("pid"))
                continue
            found.append(Orphan(uri, files, partial))
        return found

    def keep_only(self, orphan: Orphan, frame: DataFrame | None) -> None:
        """Replace an orphan's files by `frame` (rows of other discipline slices, left for their runs);
        drop the folder when nothing is left."""
        fs, root = arrow_filesystem(orphan.uri)
        table = frame.toArrow() if frame is not None else None  # read before the files it comes from go
        if table is not None and table.num_rows:
            name = f"part-kept-{uuid.uuid4().hex[:12]}.parquet"
            with fs.open_output_stream(f"{root}/_{name}") as sink:
                pq.write_table(table, sink, compression="zstd")
            fs.move(f"{root}/_{name}", f"{root}/{name}")
        self.remove(orphan.files + orphan.partial, orphan.uri)
        if table is None or not table.num_rows:
            try:
                fs.delete_dir(root)
            except FileNotFoundError:
                pass


def spool_by_stage(cfg: GlanConfig) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Per stage: rows paid for and spooled but not committed yet (the next run commits them), and
    the live runs working on it now, as `host:pid`."""
    fs, root = arrow_filesystem(cfg.table_uri(SPOOL_DIR))
    stale_after_s = float(cfg.pipeline.spool_stale_after_s)
    spooled: dict[str, int] = {}
    running: dict[str, list[str]] = {}
    for step in _list(fs, root, pafs.FileType.Directory):
        stage = step.split(".", 1)[0]
        for _, folder, names in _run_folders(fs, f"{root}/{step}"):
            files, _ = _split(names)
            spooled[stage] = spooled.get(stage, 0) + sum(_num_rows(fs, f"{folder}/{name}") for name in files)
            owner = _read_owner(fs, folder)
            if not owner_is_dead(owner, stale_after_s):
                runs = running.setdefault(stage, [])
                where = f"{owner.get('host')}:{owner.get('pid')}"
                if where not in runs:  # one run, two steps of a stage (e.g. syllabus and its extraction)
                    runs.append(where)
    return spooled, running
