"""The storage layer: every table of a run is a Delta table at `<run_root>/<name>/`.

One interface, two backends (DESIGN.md, "Storage layer"):

- `NativeDeltaStorage`: Spark's own Delta source (`format("delta")`, `DeltaTable.merge`), used where
  the Delta jars are on the cluster (Databricks, EMR with Delta).
- `EmbeddedDeltaStorage`: no Delta jars. Spark tasks write Parquet files with pyarrow
  (`mapInArrow`) and return one metadata row per file; the driver commits them in one Delta
  transaction with delta-rs (`deltalake`). Reads ask delta-rs for the snapshot's file list, so files
  of a write that never committed are invisible.

Writes are insert-only by key (`append_missing`) or whole-table (`overwrite`). A row is never
written twice: the rows to write are the input minus the keys already committed, and a concurrent
writer that committed the same keys first is detected at commit time (optimistic concurrency) and
those rows are dropped from this write rather than recomputed, so no LLM call is paid twice.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from delta.tables import DeltaTable as SparkDeltaTable  # delta-spark: the native backend's API
from deltalake import CommitProperties, DeltaTable, Schema, Transaction
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction, RemoveAction, create_table_with_add_actions
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

from jobs.config.loader import GlanConfig
from jobs.errors import ConflictError, GlanError, SchemaMismatchError, TableNotFoundError
from jobs.storage.owners import HEARTBEATS, owner_is_dead, read_owner, write_owner
from jobs.storage.tables import spec_for

log = logging.getLogger(__name__)

FILE_META = T.StructType([
    T.StructField("path", T.StringType()),
    T.StructField("size", T.LongType()),
    T.StructField("num_records", T.LongType()),
    T.StructField("key_hashes", T.BinaryType()),  # int64 xxhash64 of each row's key, in file order
    T.StructField("split_value", T.StringType()),  # the one value of the split column in the file
])
KEY_HASH = "_glan_key_hash"
_FILE_META_ARROW = pa.schema([("path", pa.string()), ("size", pa.int64()), ("num_records", pa.int64()),
                              ("key_hashes", pa.binary()), ("split_value", pa.string())])
# Roll over to a new Parquet file once this many uncompressed bytes went into the current one.
TARGET_FILE_BYTES = 512 * 1024 * 1024
# Markers of the writes under way in a table folder (embedded backend), for the leftovers cleanup.
WRITES_DIR = "_glan_writes"
_CLEANED: set[tuple[str, int]] = set()  # tables this process already cleaned of leftovers
# Fault injection for the crash tests: SIGKILL this process (its process group when it leads
# one: the JVM and Python workers too) right after its N-th commit ("N"), or its first commit to
# a table ("<table>"). Never set in production.
KILL_AFTER_COMMIT_ENV = "GLAN_FAULT_KILL_AFTER_COMMIT"
_COMMITS = {"n": 0}


@dataclass(frozen=True)
class WriteResult:
    table: str
    rows_written: int
    version: int | None  # the committed version, None when nothing needed writing


@dataclass(frozen=True)
class TableInfo:
    name: str
    rows: int
    version: int
    last_commit: datetime | None
    uri: str


def _keys(key: str | Sequence[str]) -> list[str]:
    return [key] if isinstance(key, str) else list(key)


def _type_str(dtype: T.DataType) -> str:
    return dtype.simpleString()


def without_newer_columns(df: DataFrame, name: str, table: T.StructType) -> DataFrame:
    """Rows for a table written by an earlier version: the columns its TableSpec has gained since
    (nullable, e.g. `seed`) are left out, with a warning, instead of failing every write; a new run
    root has them."""
    spec = spec_for(name)
    if spec is None:
        return df
    have = set(table.fieldNames())
    newer = [c for c in df.columns if c not in have and c in spec.schema.fieldNames()]
    if not newer:
        return df
    if (name, tuple(newer)) not in _WARNED_OLDER:
        _WARNED_OLDER.add((name, tuple(newer)))
        log.warning("table '%s' was made by an earlier version without column(s) %s: written without them "
                    "(a new run root has them)", name, ", ".join(newer))
    return df.drop(*newer)


_WARNED_OLDER: set[tuple[str, tuple[str, ...]]] = set()


def check_schema(df: DataFrame, name: str, expected: T.StructType | None) -> DataFrame:
    """The rows must have exactly the table's columns and types; returns them in table order."""
    if expected is None:
        return df
    got = {f.name: f.dataType for f in df.schema.fields}
    want = {f.name: f.dataType for f in expected.fields}
    missing = [c for c in want if c not in got]
    extra = [c for c in got if c not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected column(s) {', '.join(extra)}")
        raise SchemaMismatchError(f"table '{name}': schema mismatch: {'; '.join(parts)}")
    for column, dtype in want.items():
        if _strip_nullability(got[column]) != _strip_nullability(dtype):
            raise SchemaMismatchError(
                f"table '{name}': column '{column}' is {_type_str(got[column])}, the table has {_type_str(dtype)}")
    return df.select(*want)


def _strip_nullability(dtype: T.DataType) -> T.DataType:
    """Nullability is not part of the contract (Spark infers NOT NULL from literals)."""
    if isinstance(dtype, T.StructType):
        return T.StructType([T.StructField(f.name, _strip_nullability(f.dataType), True) for f in dtype.fields])
    if isinstance(dtype, T.ArrayType):
        return T.ArrayType(_strip_nullability(dtype.elementType), True)
    if isinstance(dtype, T.MapType):
        return T.MapType(_strip_nullability(dtype.keyType), _strip_nullability(dtype.valueType), True)
    return dtype


def _nullable(schema: T.StructType) -> T.StructType:
    return _strip_nullability(schema)  # type: ignore[return-value]


class Storage(ABC):
    """Tables of one run root."""

    backend = "abstract"

    def __init__(self, spark: SparkSession, cfg: GlanConfig) -> None:
        self.spark = spark
        self.cfg = cfg

    def uri(self, name: str) -> str:
        return self.cfg.table_uri(name)

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def read(self, name: str, version: int | None = None) -> DataFrame: ...

    @abstractmethod
    def append_missing(self, df: DataFrame, name: str, key: str | Sequence[str]) -> WriteResult: ...

    @abstractmethod
    def overwrite(self, df: DataFrame, name: str, read_version: int | None = None, *,
                  own_schema: bool = False) -> WriteResult:
        """Replace the whole table with `df`. `own_schema`: the rows' columns, whatever the
        pipeline's schema for that name (tables.py) says (`glan decontaminate` keeps its input's)."""

    @abstractmethod
    def replace(self, df: DataFrame, name: str, column: str, values: Sequence[str], *,
                read_version: int | None = None, split: bool = False) -> WriteResult:
        """Replace the rows whose `column` is in `values` with `df` (whose rows hold only those
        values), leaving every other row as it is: runs on other values may write at the same time."""

    @abstractmethod
    def version(self, name: str) -> int:
        """The table's current version, -1 when it does not exist."""

    def rebuild(self, name: str, build: Callable[[], DataFrame | tuple[DataFrame, Sequence[str]] | None], *,
                column: str | None = None) -> WriteResult | None:
        """Bring a table derived from others (no LLM) up to date with its inputs.

        `build()` compares the table with its inputs as they are now and returns None when they
        agree, else the rows to write: the whole table, or with `column` a pair (rows, the values
        of `column` they replace). The table's version is read before `build` reads the inputs,
        so a run that commits the same table in between makes this a conflict, and the rows are
        derived again rather than written from inputs older than that run's."""
        attempts = self.cfg.storage.commit_retries + 1
        for attempt in range(attempts):
            read_version = self.version(name)
            built = build()
            if built is None:
                return None
            try:
                if column is None:
                    return self.overwrite(built, name, read_version=read_version)
                rows, values = built
                return self.replace(rows, name, column, values, read_version=read_version, split=True)
            except ConflictError:
                if attempt + 1 == attempts:
                    raise
                log.warning("table '%s': another run committed it first; deriving it again from the inputs", name)
        return None

    @abstractmethod
    def history(self, name: str, limit: int | None = None) -> list[dict]: ...

    @abstractmethod
    def info(self, name: str) -> TableInfo: ...

    def list_tables(self) -> list[str]:
        """Folders under the run root that hold a Delta log, sorted by name."""
        fs, root = pafs.FileSystem.from_uri(self.cfg.table_uri(""))
        try:
            entries = fs.get_file_info(pafs.FileSelector(root.rstrip("/"), allow_not_found=True))
        except (OSError, pa.ArrowException):
            return []
        names = []
        for entry in entries:
            if entry.type == pafs.FileType.Directory and not entry.base_name.startswith(("_", ".")):
                log_dir = fs.get_file_info(f"{entry.path}/_delta_log")
                if log_dir.type == pafs.FileType.Directory:
                    names.append(entry.base_name)
        return sorted(names)

    def read_or_empty(self, name: str) -> DataFrame:
        """The table, or no rows in its declared schema when it does not exist yet (a stage whose
        every call failed leaves no table behind; the next stage then simply has nothing to do)."""
        if self.exists(name):
            return self.read(name)
        spec = spec_for(name)
        if spec is None:
            raise TableNotFoundError(f"table '{name}' does not exist under {self.cfg.run_root}")
        return self.spark.createDataFrame([], spec.schema)

    def missing_rows(self, df: DataFrame, name: str, key: str | Sequence[str]) -> DataFrame:
        """Rows of `df` whose key is not in table `name` yet: the work a resumed stage still has."""
        if not self.exists(name):
            return df
        keys = _keys(key)
        done = self.read(name).select(*keys).distinct()
        return df.join(done, on=keys, how="left_anti")

    def require(self, name: str) -> None:
        if not self.exists(name):
            raise TableNotFoundError(f"table '{name}' does not exist under {self.cfg.run_root} (run its stage first)")


# ---------------------------------------------------------------------------------------------
# Embedded backend: pyarrow writes in tasks, delta-rs commits on the driver


class _TaskFiles:
    """The Parquet files one task writes into a table folder: a new file past TARGET_FILE_BYTES or
    when the split value changes; for each, its name, size, rows, key hashes and split value."""

    def __init__(self, table_uri: str, write_id: str, arrow_schema: pa.Schema) -> None:
        ctx = TaskContext.get()
        self.part, self.attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
        self.fs, self.root = pafs.FileSystem.from_uri(table_uri)
        self.write_id, self.arrow_schema = write_id, arrow_schema
        self.written: list[tuple[str, int, int, bytes, str | None]] = []
        self.writer = self.name = self.value = None
        self.rows = self.bytes_in = self.file_index = 0
        self.hashes: list[pa.Array] = []

    def needs_new_file(self, value: object) -> bool:
        return self.writer is None or self.bytes_in >= TARGET_FILE_BYTES or value != self.value

    def open(self, value: object) -> None:
        self.close()
        self.value = value
        # The attempt number keeps a retried task from overwriting a file a previous attempt may
        # still be writing; only the successful attempt's rows reach the driver.
        self.name = f"part-{self.part:05d}-{self.write_id}-a{self.attempt}-{self.file_index:03d}.snappy.parquet"
        self.file_index += 1
        sink = self.fs.open_output_stream(f"{self.root}/{self.name}")
        self.writer = pq.ParquetWriter(sink, self.arrow_schema, compression="snappy")
        self.rows = self.bytes_in = 0

    def write(self, batch: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([batch])
        if KEY_HASH in table.column_names:
            self.hashes.append(table.column(KEY_HASH).combine_chunks())
            table = table.drop_columns([KEY_HASH])
        self.writer.write_table(table.cast(self.arrow_schema))
        self.rows += batch.num_rows
        self.bytes_in += batch.nbytes

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        size = self.fs.get_file_info(f"{self.root}/{self.name}").size
        blob = b"".join(h.to_numpy(zero_copy_only=False).astype("<i8").tobytes() for h in self.hashes)
        self.written.append((self.name, size, self.rows, blob, None if self.value is None else str(self.value)))
        self.hashes.clear()
        self.writer = None

    def where(self) -> str:
        return f"{self.root}/{self.name}" if self.name else self.root

    def metadata(self) -> pa.RecordBatch:
        w = self.written
        return pa.RecordBatch.from_pydict(
            {"path": [x[0] for x in w], "size": [x[1] for x in w], "num_records": [x[2] for x in w],
             "key_hashes": [x[3] for x in w], "split_value": [x[4] for x in w]},
            schema=_FILE_META_ARROW,
        )


def _write_files_udf(table_uri: str, write_id: str, arrow_schema: pa.Schema, split_by: str | None = None):
    """mapInArrow function: write this task's rows into Parquet files under the table folder.

    With `split_by` (rows sorted by it within the task), every file holds one value of that
    column, so a later `replace` of some values touches only their own files."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        files = _TaskFiles(table_uri, write_id, arrow_schema)
        try:
            for batch in _split_runs(batches, split_by):
                if batch.num_rows == 0:
                    continue
                value = batch.column(split_by)[0].as_py() if split_by else None
                if files.needs_new_file(value):
                    files.open(value)
                files.write(batch)
            files.close()
        except OSError as exc:  # pyarrow's message names no file: say which one (a full disk, say)
            code = exc.errno or (errno.ENOSPC if "No space left" in str(exc) else errno.EIO)
            raise OSError(code, exc.strerror or str(exc), files.where()) from exc
        if files.written:
            yield files.metadata()

    return write


def _split_runs(batches: Iterator[pa.RecordBatch], column: str | None) -> Iterator[pa.RecordBatch]:
    """The batches cut wherever `column` changes value (unchanged when `column` is None)."""
    for batch in batches:
        if column is None or batch.num_rows == 0:
            yield batch
            continue
        values = batch.column(column).to_pylist()
        start = 0
        for i in range(1, len(values) + 1):
            if i == len(values) or values[i] != values[start]:
                yield batch.slice(start, i - start)
                start = i


@dataclass
class StagedWrite:
    """Parquet files written into a table folder but not committed: invisible to every reader."""

    name: str
    uri: str
    write_id: str
    schema: T.StructType
    files: list[tuple[str, int, int]]  # (relative path, bytes, rows)
    read_version: int  # -1 when the table did not exist
    key: tuple[str, ...]
    mode: str  # append | overwrite | replace
    # replace: the rows whose `column` holds one of `values` are replaced by the staged rows
    column: str | None = None
    values: frozenset = frozenset()
    file_values: dict[str, str | None] = field(default_factory=dict)  # file -> its value of `column`
    carried: list[tuple[str, int, int]] = field(default_factory=list)  # other rows of rewritten files

    @property
    def rows(self) -> int:
        return sum(f[2] for f in self.files)

    @property
    def app_id(self) -> str:
        return f"glan-spark:{self.write_id}"


class EmbeddedDeltaStorage(Storage):
    backend = "embedded"

    def _table(self, name: str, version: int | None = None):
        uri = self.uri(name)
        if not DeltaTable.is_deltatable(uri):
            return None
        return DeltaTable(uri, version=version)

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(name))

    def version(self, name: str) -> int:
        dt = self._table(name)
        return dt.version() if dt is not None else -1

    def _spark_schema(self, name: str, dt) -> T.StructType:
        spec = spec_for(name)
        arrow = pa.schema(dt.schema().to_arrow())
        if spec is not None and {f.name for f in spec.schema.fields} == set(arrow.names):
            return spec.schema
        return from_arrow_schema(_spark_compatible(arrow))

    def read(self, name: str, version: int | None = None) -> DataFrame:
        dt = self._table(name)
        if dt is None:
            raise TableNotFoundError(f"table '{name}' does not exist under {self.cfg.run_root}")
        if version is not None:
            if version < 0 or version > dt.version():
                raise GlanError(f"table '{name}' has versions 0..{dt.version()}, not {version}")
            dt.load_as_version(version)
        schema = self._spark_schema(name, dt)
        files = dt.file_uris()
        if not files:
            return self.spark.createDataFrame([], schema)
        # Never read the folder itself: it also holds removed and uncommitted files.
        return self.spark.read.schema(schema).parquet(*files)

    # -- writing ----------------------------------------------------------------------------

    def stage(self, df: DataFrame, name: str, key: str | Sequence[str] = (), mode: str = "append", *,
              read_version: int | None = None, column: str | None = None,
              values: Sequence[str] = (), split: bool = False, own_schema: bool = False) -> StagedWrite:
        """Phase 1: write the new rows as Parquet files; nothing is visible until `commit`.

        `read_version`: the table's version when the caller read the inputs these rows derive
        from (default: now); a commit by another writer after it is a conflict. `mode="replace"`
        replaces the rows whose `column` is in `values`; with `split`, each file holds one value
        of `column`, so later replaces of other values never touch it."""
        keys = tuple(_keys(key)) if key else ()
        spec = spec_for(name)
        dt = self._table(name)
        if read_version is None:
            read_version = dt.version() if dt is not None else -1
        if dt is not None and mode in ("append", "replace"):
            table = self._spark_schema(name, dt)
            df = check_schema(without_newer_columns(df, name, table), name, table)
        else:
            df = check_schema(df, name, spec.schema if spec and not own_schema else None)
        if keys:
            missing = [k for k in keys if k not in df.columns]
            if missing:
                raise SchemaMismatchError(f"table '{name}': key column(s) {', '.join(missing)} not in the rows")
            if dt is not None and mode == "append" and dt.file_uris():
                done = self.read(name).select(*keys)
                df = df.join(done, on=list(keys), how="left_anti")
        split_by = column if split else None
        if split_by is not None:
            df = df.sortWithinPartitions(split_by)
        schema = _nullable(df.schema)
        if keys:
            # Duplicates inside this batch are found from key hashes the tasks send back, not by a
            # shuffle of the rows (which would cost more than the write itself).
            df = df.withColumn(KEY_HASH, F.xxhash64(*keys))
        arrow_schema = to_arrow_schema(schema, timezone="UTC")
        uri = self.uri(name)
        write_id = uuid.uuid4().hex[:16]
        fs, root = pafs.FileSystem.from_uri(uri)
        fs.create_dir(root, recursive=True)
        self._remove_orphans_once(name)
        self._mark(fs, root, write_id)
        try:
            meta = df.mapInArrow(_write_files_udf(uri, write_id, arrow_schema, split_by), FILE_META).collect()
        except BaseException:
            self._drop_write(fs, root, write_id)
            self._unmark(uri, write_id)
            raise
        files = [(r["path"], r["size"], r["num_records"]) for r in meta]
        staged = StagedWrite(name, uri, write_id, schema, files, read_version, keys, mode, column, frozenset(values),
                             {r["path"]: r["split_value"] for r in meta if split_by is not None})
        if split_by is not None:
            strays = sorted({r["split_value"] for r in meta} - staged.values, key=str)
            if strays:
                self.discard(staged)
                raise GlanError(f"table '{name}': rows to replace hold {column}={strays[0]!r}, "
                                f"which is not among the values being replaced")
        if keys:
            _drop_duplicate_keys(staged, [bytes(r["key_hashes"] or b"") for r in meta])
        return staged

    def commit(self, staged: StagedWrite, operation_note: str = "") -> WriteResult:
        """Phase 2: one Delta commit for every staged file, idempotent through an app transaction.
        A write that cannot commit removes its files: they never reach a reader either way."""
        try:
            if staged.mode == "append" and not staged.files:
                return WriteResult(staged.name, 0, None)
            for _ in range(self.cfg.storage.commit_retries + 1):
                try:
                    version = self._commit_once(staged, operation_note)
                    log.info("committed %s rows to %s (version %s)", staged.rows, staged.name, version)
                    _after_commit(staged.name)
                    return WriteResult(staged.name, staged.rows, version)
                # Two writers creating a table at once: the loser sees FileExistsError or, when the
                # winner's log is already there, DeltaError("A Delta Lake table already exists ...").
                except (CommitFailedError, DeltaError, OSError) as exc:
                    done = self._already_committed(staged)
                    if done is not None:
                        return WriteResult(staged.name, staged.rows, done)
                    if "already exists" in str(exc) or isinstance(exc, CommitFailedError):
                        self._resolve_conflict(staged)
                        if staged.mode == "append" and not staged.files:
                            return WriteResult(staged.name, 0, None)
                        continue
                    raise
            raise ConflictError(
                f"table '{staged.name}': gave up after {self.cfg.storage.commit_retries + 1} conflicting commits "
                "by other writers; rerun the stage to write the remaining rows")
        except BaseException:
            if self._already_committed(staged) is None:
                self.discard(staged)
            raise
        finally:
            self._unmark(staged.uri, staged.write_id)

    def _already_committed(self, staged: StagedWrite) -> int | None:
        try:
            dt = self._table(staged.name)
            if dt is not None and dt.transaction_version(staged.app_id) is not None:
                return dt.version()
        except Exception:  # noqa: BLE001 - asked while handling another error: unknown counts as no
            pass
        return None

    def _commit_once(self, staged: StagedWrite, operation_note: str) -> int:
        now = int(time.time() * 1000)
        props = CommitProperties(
            app_transactions=[Transaction(staged.app_id, 1, now)],
            custom_metadata={"glan.write_id": staged.write_id, "glan.rows": str(staged.rows),
                             **({"glan.note": operation_note} if operation_note else {})},
            max_commit_retries=0,  # a concurrent commit must come back to us: we check keys ourselves
        )
        arrow_schema = to_arrow_schema(staged.schema, timezone="UTC")
        dt = self._table(staged.name)
        if dt is not None and dt.version() != staged.read_version:
            # Someone committed after we planned and before we loaded: treat it as the
            # conflict it is, so the keys check in _resolve_conflict runs before we commit.
            raise CommitFailedError(f"table moved from version {staged.read_version} to {dt.version()}")
        removed = self._plan_replace(staged, dt) if staged.mode == "replace" and dt is not None else []

        def add(path: str, size: int, rows: int) -> AddAction:
            stats = {"numRecords": rows}
            value = staged.file_values.get(path)
            if value is not None:
                stats.update(minValues={staged.column: value}, maxValues={staged.column: value})
            return AddAction(path, size, {}, now, True, json.dumps(stats))

        actions = [add(*f) for f in staged.files + staged.carried]
        if dt is None:
            create_table_with_add_actions(staged.uri, Schema.from_arrow(arrow_schema), actions,
                                          mode="error", name=staged.name, commit_properties=props)
        elif staged.mode == "replace":
            dt.create_write_transaction(removed + actions, mode="append", schema=dt.schema(), commit_properties=props)
        else:
            schema = Schema.from_arrow(arrow_schema) if staged.mode == "overwrite" else dt.schema()
            dt.create_write_transaction(actions, mode=staged.mode, schema=schema, commit_properties=props)
        dt = self._table(staged.name)
        return dt.version()

    def _plan_replace(self, staged: StagedWrite, dt) -> list:
        """Remove actions for every file holding a row being replaced; rows of other values in those
        files are written again (`staged.carried`). Files that hold one value (stats) are decided
        without reading them."""
        fs, root = pafs.FileSystem.from_uri(staged.uri)
        self._drop_carried(staged)
        actions = pa.table(dt.get_add_actions(flatten=True))
        lo, hi = f"min.{staged.column}", f"max.{staged.column}"
        removed, carried = [], []
        now = int(time.time() * 1000)
        for row in actions.to_pylist():
            single = row.get(lo) is not None and row.get(lo) == row.get(hi)
            if single and row[lo] not in staged.values:
                continue
            if not single:
                table = pq.read_table(f"{root}/{row['path']}", filesystem=fs)
                hit = pc.is_in(table.column(staged.column).cast(pa.string()),
                               value_set=pa.array(sorted(staged.values), pa.string()))
                if not pc.any(hit).as_py():
                    continue
                others = table.filter(pc.invert(pc.fill_null(hit, False)))
                if others.num_rows:
                    carried.append(others)
            removed.append(RemoveAction(row["path"], True, now, row["size_bytes"]))
        if carried:
            path = f"part-carry-{staged.write_id}-{uuid.uuid4().hex[:6]}.snappy.parquet"
            pq.write_table(pa.concat_tables(carried, promote_options="default"), f"{root}/{path}",
                           filesystem=fs, compression="snappy")
            staged.carried = [(path, fs.get_file_info(f"{root}/{path}").size, sum(t.num_rows for t in carried))]
        return removed

    def _drop_carried(self, staged: StagedWrite) -> None:
        fs, root = pafs.FileSystem.from_uri(staged.uri)
        for path, _, _ in staged.carried:
            try:
                fs.delete_file(f"{root}/{path}")
            except OSError:
                pass
        staged.carried = []

    def _resolve_conflict(self, staged: StagedWrite) -> None:
        """Another writer committed first. An append drops from our staged files the keys it
        committed; a replace goes on when the other writer left our values alone."""
        if staged.mode == "overwrite":
            raise ConflictError(f"table '{staged.name}' changed while it was being overwritten; rerun")
        dt = self._table(staged.name)
        new_version = dt.version()
        if staged.read_version >= 0:
            before = set(self._table(staged.name, staged.read_version).file_uris())
        else:
            before = set()
        added = [f for f in dt.file_uris() if f not in before]
        staged.read_version = new_version
        if staged.mode == "replace":
            # Another run's rows of our values mean it derived them at the same time, maybe from
            # newer inputs: derive again. Rows it only carried over (other values of files it
            # rewrote) are planned anew by the next attempt.
            theirs = [_read_columns(f, [staged.column]) for f in added if "part-carry-" not in f]
            hit = any(pc.any(pc.is_in(t.column(0).cast(pa.string()),
                                      value_set=pa.array(sorted(staged.values), pa.string()))).as_py()
                      for t in theirs if t.num_rows)
            if hit:
                raise ConflictError(f"table '{staged.name}': another run rewrote the same "
                                    f"{staged.column} values at the same time; rerun")
            return
        if not staged.key or not added:
            return
        fs, root = pafs.FileSystem.from_uri(staged.uri)
        theirs = pa.concat_tables([_read_columns(f, list(staged.key)) for f in added])
        their_keys = _key_set(theirs, staged.key)
        kept_files = []
        for path, size, rows in staged.files:
            table = pq.read_table(f"{root}/{path}", filesystem=fs)
            mask = pa.array([k not in their_keys for k in _key_list(table, staged.key)], pa.bool_())
            if pc.all(mask).as_py():
                kept_files.append((path, size, rows))
                continue
            kept = table.filter(mask)
            fs.delete_file(f"{root}/{path}")
            if kept.num_rows:
                new_path = path.replace(".snappy.parquet", "-r.snappy.parquet")
                pq.write_table(kept, f"{root}/{new_path}", filesystem=fs, compression="snappy")
                kept_files.append((new_path, fs.get_file_info(f"{root}/{new_path}").size, kept.num_rows))
        dropped = staged.rows - sum(f[2] for f in kept_files)
        log.warning("table '%s': a concurrent writer committed %d of our keys first; dropped them", staged.name, dropped)
        staged.files = kept_files

    def discard(self, staged: StagedWrite) -> None:
        """Delete staged files that will never be committed."""
        fs, root = pafs.FileSystem.from_uri(staged.uri)
        self._drop_carried(staged)
        for path, _, _ in staged.files:
            try:
                fs.delete_file(f"{root}/{path}")
            except OSError:
                pass
        self._unmark(staged.uri, staged.write_id)

    def append_missing(self, df: DataFrame, name: str, key: str | Sequence[str]) -> WriteResult:
        return self.commit(self.stage(df, name, key, mode="append"))

    def overwrite(self, df: DataFrame, name: str, read_version: int | None = None, *,
                  own_schema: bool = False) -> WriteResult:
        return self.commit(self.stage(df, name, (), mode="overwrite", read_version=read_version,
                                      own_schema=own_schema))

    def replace(self, df: DataFrame, name: str, column: str, values: Sequence[str], *,
                read_version: int | None = None, split: bool = False) -> WriteResult:
        return self.commit(self.stage(df, name, (), mode="replace", read_version=read_version,
                                      column=column, values=values, split=split))

    # -- leftovers of writes that never committed ----------------------------------------------

    def _mark(self, fs: pafs.FileSystem, root: str, write_id: str) -> None:
        """From its first file until its commit (or discard), a write has a folder in
        `<table>/_glan_writes/` whose owner file (host, pid, a heartbeat every 30 s, as the spool's)
        tells a cleanup by another run that its files are not leftovers."""
        marker = f"{root}/{WRITES_DIR}/{write_id}"
        owner = {"write_id": write_id, "host": socket.gethostname(), "pid": os.getpid()}
        fs.create_dir(marker, recursive=True)
        write_owner(fs, marker, owner)
        HEARTBEATS.add(marker, fs, marker, owner)

    def _unmark(self, uri: str, write_id: str) -> None:
        fs, root = pafs.FileSystem.from_uri(uri)
        marker = f"{root}/{WRITES_DIR}/{write_id}"
        HEARTBEATS.discard(marker)
        try:
            fs.delete_dir(marker)
        except OSError:
            pass

    def _drop_write(self, fs: pafs.FileSystem, root: str, write_id: str) -> None:
        """Every file a failed write left (a task failed, a full disk, say: the others' files too)."""
        for info in fs.get_file_info(pafs.FileSelector(root)):
            if info.type == pafs.FileType.File and _write_id_of(info.base_name) == write_id:
                try:
                    fs.delete_file(info.path)
                except OSError:
                    pass

    def _remove_orphans_once(self, name: str) -> None:
        key = (self.uri(name), os.getpid())
        if key in _CLEANED:
            return
        _CLEANED.add(key)
        try:
            removed = self.remove_orphans(name)
        except (OSError, pa.ArrowException) as exc:  # cleanup must never stop a write
            log.warning("table '%s': could not look for leftover files: %s", name, exc)
            return
        if removed:
            log.warning("table '%s': removed %d file(s) of writes that never committed", name, len(removed))

    def remove_orphans(self, name: str, min_age_s: float | None = None) -> list[str]:
        """Delete Parquet files in the table folder that no commit ever added: the leftovers of
        writes killed before they committed. A file is kept while its write is alive (its marker
        names a live process, or a heartbeat younger than pipeline.spool_stale_after_s), and while
        it is younger than `min_age_s` (default: the same stale time) when no marker says who
        wrote it."""
        dt = self._table(name)
        if dt is None:
            return []
        stale = float(self.cfg.pipeline.spool_stale_after_s)
        min_age_s = stale if min_age_s is None else min_age_s
        fs, root = pafs.FileSystem.from_uri(self.uri(name))
        markers = {info.base_name: read_owner(fs, info.path)
                   for info in fs.get_file_info(pafs.FileSelector(f"{root}/{WRITES_DIR}", allow_not_found=True))
                   if info.type == pafs.FileType.Directory}
        live = {w for w, owner in markers.items() if not owner_is_dead(owner, stale)}
        committed = _committed_write_ids(dt)
        now = time.time()
        removed = []
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            base = info.base_name
            if info.type != pafs.FileType.File or not base.endswith(".parquet") or base.startswith(("_", ".")):
                continue
            write_id = _write_id_of(base)
            if write_id is None or write_id in committed or write_id in live:
                continue
            if write_id not in markers and now - info.mtime.timestamp() < min_age_s:
                continue
            fs.delete_file(info.path)
            removed.append(base)
        for write_id in set(markers) - live:
            try:
                fs.delete_dir(f"{root}/{WRITES_DIR}/{write_id}")
            except OSError:
                pass
        return removed

    def vacuum(self, name: str, retention_hours: float, min_age_s: float | None = None) -> int:
        """`glan vacuum`: the leftovers of dead writes (`remove_orphans`), then, through delta-rs,
        files that commits removed more than `retention_hours` ago (time travel to versions older
        than that stops working). Returns the number of files deleted."""
        removed = len(self.remove_orphans(name, min_age_s))
        dt = self._table(name)
        if dt is None:
            return removed
        return removed + len(dt.vacuum(retention_hours=int(retention_hours), dry_run=False,
                                       enforce_retention_duration=False))

    # -- metadata ---------------------------------------------------------------------------

    def history(self, name: str, limit: int | None = None) -> list[dict]:
        dt = self._table(name)
        if dt is None:
            raise TableNotFoundError(f"table '{name}' does not exist under {self.cfg.run_root}")
        return dt.history(limit)

    def info(self, name: str) -> TableInfo:
        dt = self._table(name)
        if dt is None:
            raise TableNotFoundError(f"table '{name}' does not exist under {self.cfg.run_root}")
        actions = pa.table(dt.get_add_actions(flatten=True))
        rows = int(pc.sum(actions.column("num_records")).as_py() or 0) if actions.num_rows else 0
        last = dt.history(1)
        when = (datetime.fromtimestamp(last[0]["timestamp"] / 1000, tz=timezone.utc) if last else None)
        return TableInfo(name, rows, dt.version(), when, self.uri(name))


def _after_commit(name: str) -> None:
    _COMMITS["n"] += 1
    when = os.environ.get(KILL_AFTER_COMMIT_ENV)
    if when and (name == when or (when.isdigit() and _COMMITS["n"] >= int(when))):
        log.warning("fault injection: killed after commit %d (table '%s')", _COMMITS["n"], name)
        if os.getsid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _committed_write_ids(dt) -> set[str]:
    return {entry["glan.write_id"] for entry in dt.history() if entry.get("glan.write_id")}


def _write_id_of(file_name: str) -> str | None:
    """The write id in the name of a file this backend wrote (`part-<task|carry>-<write id>-...`)."""
    parts = file_name.split("-")
    if len(parts) >= 4 and parts[0] == "part" and len(parts[2]) == 16:
        return parts[2]
    return None


def _drop_duplicate_keys(staged: StagedWrite, blobs: list[bytes]) -> None:
    """Keep the first row of every key in this batch; rewrite only the files that hold a repeat.

    Candidates come from 64-bit key hashes; the rewrite compares the real keys, so a hash
    collision between different keys never drops a row."""
    per_file = [np.frombuffer(b, dtype="<i8") for b in blobs]
    if not per_file:
        return
    every = np.concatenate(per_file)
    values, counts = np.unique(every, return_counts=True)
    repeated = values[counts > 1]
    if repeated.size == 0:
        return
    fs, root = pafs.FileSystem.from_uri(staged.uri)
    seen: set = set()
    kept_files = []
    for (path, size, rows), hashes in zip(staged.files, per_file):
        if not np.isin(hashes, repeated).any():
            kept_files.append((path, size, rows))
            continue
        table = pq.read_table(f"{root}/{path}", filesystem=fs)
        mask = []
        for key, in_repeat in zip(_key_list(table, staged.key), np.isin(hashes, repeated)):
            mask.append(not (in_repeat and key in seen))
            if in_repeat:
                seen.add(key)
        kept = table.filter(pa.array(mask, pa.bool_()))
        fs.delete_file(f"{root}/{path}")
        if kept.num_rows:
            new_path = path.replace(".snappy.parquet", "-d.snappy.parquet")
            pq.write_table(kept, f"{root}/{new_path}", filesystem=fs, compression="snappy")
            kept_files.append((new_path, fs.get_file_info(f"{root}/{new_path}").size, kept.num_rows))
    log.info("table '%s': dropped %d repeated keys inside one write", staged.name,
             staged.rows - sum(f[2] for f in kept_files))
    staged.files = kept_files


def _read_columns(uri: str, columns: list[str]) -> pa.Table:
    fs, path = pafs.FileSystem.from_uri(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def _key_list(table: pa.Table, key: Sequence[str]) -> list:
    if len(key) == 1:
        return table.column(key[0]).to_pylist()
    return list(zip(*(table.column(k).to_pylist() for k in key)))


def _key_set(table: pa.Table, key: Sequence[str]) -> set:
    return set(_key_list(table, key))


def _spark_compatible(schema: pa.Schema) -> pa.Schema:
    """delta-rs hands back large/view string types that Spark's converter does not know."""

    def fix(dtype: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
            return pa.string()
        if pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
            return pa.binary()
        if pa.types.is_large_list(dtype) or pa.types.is_list_view(dtype) or pa.types.is_list(dtype):
            return pa.list_(fix(dtype.value_type))
        if pa.types.is_struct(dtype):
            return pa.struct([pa.field(f.name, fix(f.type)) for f in dtype])
        if pa.types.is_map(dtype):
            return pa.map_(fix(dtype.key_type), fix(dtype.item_type))
        return dtype

    return pa.schema([pa.field(f.name, fix(f.type)) for f in schema])


# ---------------------------------------------------------------------------------------------
# Native backend: Spark's Delta source (Databricks, EMR with Delta)


class NativeDeltaStorage(Storage):
    backend = "native"

    def _delta(self, name: str):
        return SparkDeltaTable.forPath(self.spark, self.uri(name))

    def exists(self, name: str) -> bool:
        return SparkDeltaTable.isDeltaTable(self.spark, self.uri(name))

    def read(self, name: str, version: int | None = None) -> DataFrame:
        self.require(name)
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(self.uri(name))

    def _register(self, name: str) -> None:
        storage = self.cfg.storage
        if storage.catalog and storage.schema:
            full = f"`{storage.catalog}`.`{storage.schema}`.`{name}`"
            self.spark.sql(f"CREATE TABLE IF NOT EXISTS {full} USING DELTA LOCATION '{self.uri(name)}'")

    def append_missing(self, df: DataFrame, name: str, key: str | Sequence[str]) -> WriteResult:
        keys = _keys(key)
        spec = spec_for(name)
        df = check_schema(df, name, spec.schema if spec else None).dropDuplicates(keys)
        if not self.exists(name):
            df.write.format("delta").mode("append").save(self.uri(name))
        else:
            table = self.read(name).schema
            df = check_schema(without_newer_columns(df, name, table), name, table)
            condition = " AND ".join(f"t.`{k}` = s.`{k}`" for k in keys)
            (self._delta(name).alias("t").merge(df.alias("s"), condition)
             .whenNotMatchedInsertAll().execute())
        self._register(name)
        last = self._delta(name).history(1).collect()[0]
        metrics = last["operationMetrics"] or {}
        rows = int(metrics.get("numTargetRowsInserted", metrics.get("numOutputRows", 0)))
        return WriteResult(name, rows, int(last["version"]))

    def version(self, name: str) -> int:
        return int(self._delta(name).history(1).collect()[0]["version"]) if self.exists(name) else -1

    def overwrite(self, df: DataFrame, name: str, read_version: int | None = None, *,
                  own_schema: bool = False) -> WriteResult:
        # Delta's own optimistic concurrency decides conflicts here; read_version is for the embedded backend.
        spec = spec_for(name)
        df = check_schema(df, name, spec.schema if spec and not own_schema else None)
        df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(self.uri(name))
        return self._written(name)

    def replace(self, df: DataFrame, name: str, column: str, values: Sequence[str], *,
                read_version: int | None = None, split: bool = False) -> WriteResult:
        spec = spec_for(name)
        df = check_schema(df, name, spec.schema if spec else None)
        if split:
            df = df.repartition(column)
        quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values) or "NULL"
        (df.write.format("delta").mode("overwrite").option("replaceWhere", f"`{column}` IN ({quoted})")
         .save(self.uri(name)))
        return self._written(name)

    def vacuum(self, name: str, retention_hours: float, min_age_s: float | None = None) -> int:
        # Delta's VACUUM removes uncommitted leftovers and old removed files alike.
        self.spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        return self.spark.sql(f"VACUUM delta.`{self.uri(name)}` RETAIN {int(retention_hours)} HOURS").count()

    def _written(self, name: str) -> WriteResult:
        self._register(name)
        last = self._delta(name).history(1).collect()[0]
        return WriteResult(name, int((last["operationMetrics"] or {}).get("numOutputRows", 0)), int(last["version"]))

    def history(self, name: str, limit: int | None = None) -> list[dict]:
        rows = self._delta(name).history(limit or 1000).collect()
        return [row.asDict(recursive=True) for row in rows]

    def info(self, name: str) -> TableInfo:
        detail = self.spark.sql(f"DESCRIBE DETAIL delta.`{self.uri(name)}`").collect()[0]
        last = self._delta(name).history(1).collect()[0]
        rows = self.read(name).count()
        return TableInfo(name, rows, int(last["version"]), detail["lastModified"], self.uri(name))


# ---------------------------------------------------------------------------------------------
# Choosing a backend, and the functions jobs call


def delta_jars_loaded(spark: SparkSession) -> bool:
    """True when the JVM can load io.delta.tables.DeltaTable (Databricks, EMR with Delta)."""
    try:
        jvm = spark._jvm  # noqa: SLF001 - py4j is the only way to ask the JVM
    except Exception:  # Spark Connect has no JVM handle; Databricks serverless always has Delta
        return True
    if jvm is None:
        return True
    try:
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        return True
    except Exception:
        return False


@lru_cache(maxsize=8)
def _backend_for(spark: SparkSession, choice: str) -> str:
    if choice != "auto":
        return choice
    return "native" if delta_jars_loaded(spark) else "embedded"


def get_storage(spark: SparkSession, cfg: GlanConfig) -> Storage:
    backend = _backend_for(spark, cfg.storage.backend)
    if backend == "native":
        if not delta_jars_loaded(spark):
            raise GlanError("storage.backend is native but the Delta jars are not on the classpath "
                            "(io.delta.tables.DeltaTable does not load); use storage.backend=embedded")
        return NativeDeltaStorage(spark, cfg)
    return EmbeddedDeltaStorage(spark, cfg)


def read_table(spark: SparkSession, name: str, cfg: GlanConfig, version: int | None = None) -> DataFrame:
    return get_storage(spark, cfg).read(name, version)


def table_exists(spark: SparkSession, name: str, cfg: GlanConfig) -> bool:
    return get_storage(spark, cfg).exists(name)


def append_missing(df: DataFrame, name: str, key: str | Sequence[str], cfg: GlanConfig) -> WriteResult:
    return get_storage(df.sparkSession, cfg).append_missing(df, name, key)


def overwrite(df: DataFrame, name: str, cfg: GlanConfig) -> WriteResult:
    return get_storage(df.sparkSession, cfg).overwrite(df, name)


def missing_rows(df: DataFrame, name: str, key: str | Sequence[str], cfg: GlanConfig) -> DataFrame:
    return get_storage(df.sparkSession, cfg).missing_rows(df, name, key)


def digests(df: DataFrame, column: str | None = None) -> dict:
    """(rows, sum of row hashes) per value of `column` (or for the whole frame under None):
    equal for the same rows in any order and any file layout."""
    columns = sorted(df.columns)
    figures = [F.count(F.lit(1)).alias("n"),
               F.sum(F.xxhash64(*columns).cast("decimal(38,0)")).alias("h")]
    grouped = df.groupBy(column).agg(*figures) if column else df.agg(*figures).select(F.lit(None).alias("_v"), "*")
    return {row[0]: (int(row["n"]), int(row["h"] or 0)) for row in grouped.collect()}


def differing_values(expected: DataFrame, current: DataFrame, column: str) -> list:
    """The values of `column` whose rows in `current` are not exactly those in `expected`."""
    want, have = digests(expected, column), digests(current, column)
    return sorted((v for v in set(want) | set(have) if want.get(v) != have.get(v)), key=str)


def empty_like(spark: SparkSession, schema: T.StructType) -> DataFrame:
    return spark.createDataFrame([], schema)


__all__ = [
    "EmbeddedDeltaStorage", "NativeDeltaStorage", "Storage", "StagedWrite", "TableInfo", "WriteResult",
    "append_missing", "check_schema", "delta_jars_loaded", "empty_like", "get_storage", "missing_rows",
    "overwrite", "read_table", "table_exists",
]
