"""The one place that builds a SparkSession for glan-spark.

Locally (no spark-submit) it starts `local[*]`; under spark-submit, Databricks or EMR it never
overrides the master the launcher chose. Anything Spark would drop into the current directory
(warehouse, Derby metastore, scratch) goes under the run root instead.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from pyarrow import fs
from pyspark.logger import PySparkLogger
from pyspark.sql import SparkSession

# Spark prints a banner and INFO lines on start-up; this keeps the console to warnings and errors.
QUIET_LOG4J = """\
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = error
logger.nativecode.name = org.apache.hadoop.util.NativeCodeLoader
logger.nativecode.level = error
logger.spark_utils.name = org.apache.spark.util.Utils
logger.spark_utils.level = error
# A failed task's trace is raised again on the driver, which prints it once as one line; these
# would print it (and its retries) again above that line.
logger.executor.name = org.apache.spark.executor.Executor
logger.executor.level = fatal
logger.tasksets.name = org.apache.spark.scheduler.TaskSetManager
logger.tasksets.level = fatal
"""


def launched_by_spark_submit() -> bool:
    """True when a launcher (spark-submit, Databricks, an existing session) owns the JVM."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or SparkSession.getActiveSession() is not None


def is_local_path(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")


def local_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()


def arrow_filesystem(uri: str):
    """pyarrow's filesystem and path for a local path or any URI pyarrow understands (s3://, gs://,
    abfs://, hdfs://); Databricks' `dbfs:/x` is its FUSE mount `/dbfs/x`."""
    if uri.startswith("dbfs:/"):
        uri = "/dbfs/" + uri[len("dbfs:/"):].lstrip("/")
    if is_local_path(uri):
        return fs.LocalFileSystem(), str(local_path(uri))
    return fs.FileSystem.from_uri(uri)


def _scratch_dir(run_root: str | None) -> Path:
    """Where Spark's own files go: under a local run root, else a private temp folder."""
    if run_root and is_local_path(run_root):
        path = local_path(run_root) / "_spark"
    else:
        path = Path(tempfile.gettempdir()) / f"glan-spark-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_spark(
    app_name: str = "glan",
    *,
    master: str | None = None,
    shuffle_partitions: int | None = None,
    run_root: str | None = None,
    extra_conf: dict[str, str] | None = None,
) -> SparkSession:
    """Return the session for this process, creating it if needed.

    `master` is only used when nothing launched us; a master given by spark-submit always wins.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active

    builder = SparkSession.builder.appName(app_name)
    scratch = _scratch_dir(run_root)
    if not launched_by_spark_submit():
        # Workers must run the interpreter that has our dependencies, not whatever `python3` is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        log4j = scratch / "log4j2.properties"
        if not log4j.exists() or log4j.read_text() != QUIET_LOG4J:
            log4j.write_text(QUIET_LOG4J)
        builder = (
            builder.master(master or os.environ.get("GLAN_SPARK_MASTER", "local[*]"))
            .config("spark.driver.extraJavaOptions",
                    f"-Dlog4j2.configurationFile=file:{log4j} -Dderby.system.home={scratch / 'derby'}")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.ui.enabled", "false")
            .config("spark.driver.memory", os.environ.get("GLAN_SPARK_DRIVER_MEMORY", "4g"))
        )
    builder = (
        builder.config("spark.sql.warehouse.dir", str(scratch / "warehouse"))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.debug.maxToStringFields", "1000")  # wide LLM tables; no truncation warnings
    )
    if shuffle_partitions is not None:
        builder = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    for key, value in (extra_conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    _quiet_python_loggers()
    return spark


def _quiet_python_loggers() -> None:
    """PySpark logs every failed query as a JSON line before raising it; the exception itself
    reaches our caller, so these copies are noise on the console."""
    for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
        PySparkLogger.getLogger(name).setLevel(logging.CRITICAL + 1)
