"""LLM results written down by the task that paid for them, before anything is committed.

Each Arrow batch of LLM results (a task's rows, usually) is written as one Parquet file under
`<run_root>/_spool/<stage>.<output>/` the moment its calls are done, by the task itself. The driver
then commits the chunk from those files and deletes them. So:

- a run killed mid-chunk loses only the calls still in flight: the rerun commits what the spool
  holds before it asks for anything;
- a lost executor or a failed commit never makes Spark recompute (and pay for) finished calls,
  because the results live in storage, not in an executor's cache;
- a task attempt retried by Spark may leave a second file with the same keys; reading dedupes by
  key and prefers a success.

A file appears under its final name only when complete (written under a `_`-prefixed name and
renamed on local disks; object stores publish an object only when its upload is closed).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from jobs.common.config import GlanConfig
from jobs.common.errors import GlanError

log = logging.getLogger(__name__)

SPOOL_DIR = "_spool"
_FILES = T.StructType([T.StructField("path", T.StringType()), T.StructField("rows", T.LongType())])


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a spool URI; Databricks' `dbfs:/x` is its FUSE mount `/dbfs/x`."""
    if uri.startswith("dbfs:/"):
        uri = "/dbfs/" + uri[len("dbfs:/"):].lstrip("/")
    return pafs.FileSystem.from_uri(uri)


def _writer(uri: str, write_id: str):
    """mapInArrow function: one Parquet file per batch of results, published when complete."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
        fs, root = _filesystem(uri)
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


class Spool:
    """The spool folder of one LLM step (`stage` writing `output`)."""

    def __init__(self, spark: SparkSession, cfg: GlanConfig, stage: str, output: str) -> None:
        self.spark = spark
        self.uri = f"{cfg.table_uri(SPOOL_DIR).rstrip('/')}/{stage}.{output}"
        self.fs, self.root = _filesystem(self.uri)

    def write(self, called: DataFrame) -> list[str]:
        """Run the job that computes `called` (the LLM calls) and spool its rows; the file names."""
        self.fs.create_dir(self.root, recursive=True)
        meta = called.mapInArrow(_writer(self.uri, uuid.uuid4().hex[:12]), _FILES).collect()
        return [row["path"] for row in meta]

    @staticmethod
    def _list(fs: pafs.FileSystem, root: str) -> list[str]:
        selector = pafs.FileSelector(root, allow_not_found=True)
        return sorted(info.base_name for info in fs.get_file_info(selector)
                      if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"))

    def _names(self) -> list[str]:
        return self._list(self.fs, self.root)

    def leftover(self) -> list[str]:
        """Complete files left by an earlier run that stopped before committing them."""
        return [name for name in self._names() if not name.startswith(("_", "."))]

    def partial(self) -> list[str]:
        """Files a killed task was still writing: unreadable, and never committed."""
        return [name for name in self._names() if name.startswith("_")]

    def rows(self, names: list[str] | None = None) -> int:
        """Rows in the given spool files (default: all complete ones), read from their footers."""
        return sum(pq.ParquetFile(self.fs.open_input_file(f"{self.root}/{name}")).metadata.num_rows
                   for name in (self.leftover() if names is None else names))

    def read(self, names: list[str], schema: T.StructType, key: str, failed: "F.Column") -> DataFrame:
        """The spooled rows, one per key (a retried task attempt may have spooled a key twice; a
        success wins over a failure). Files of another shape are a one-line error, not a guess."""
        if not names:
            return self.spark.createDataFrame([], schema)
        found = pq.read_schema(self.fs.open_input_file(f"{self.root}/{names[0]}")).names
        if sorted(found) != sorted(schema.fieldNames()):
            raise GlanError(f"spool {self.uri} holds LLM results with columns {', '.join(found)}, not "
                            f"{', '.join(schema.fieldNames())} (written by another version of this stage): "
                            f"rerun with that version, or move the folder away to ask for those rows again")
        frame = self.spark.read.schema(schema).parquet(*[f"{self.uri}/{name}" for name in names])
        best = Window.partitionBy(key).orderBy(failed.cast("int"), F.col("_spool_file"))
        return (frame.withColumn("_spool_file", F.input_file_name())
                .withColumn("_spool_rank", F.row_number().over(best))
                .filter(F.col("_spool_rank") == 1).drop("_spool_rank", "_spool_file"))

    def remove(self, names: list[str]) -> None:
        """Forget files whose rows are committed."""
        for name in names:
            try:
                self.fs.delete_file(f"{self.root}/{name}")
            except FileNotFoundError:
                pass


def spooled_by_stage(cfg: GlanConfig) -> dict[str, int]:
    """Rows paid for and spooled but not committed yet, per stage (the next run commits them)."""
    fs, root = _filesystem(cfg.table_uri(SPOOL_DIR))
    counts: dict[str, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and "." in info.base_name:
            for name in Spool._list(fs, info.path):
                if not name.startswith(("_", ".")):
                    meta = pq.ParquetFile(fs.open_input_file(f"{info.path}/{name}")).metadata
                    stage = info.base_name.split(".", 1)[0]
                    counts[stage] = counts.get(stage, 0) + meta.num_rows
    return counts
