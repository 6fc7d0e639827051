"""What a run assumes about the machines its executors are on, checked before a stage spends anything.

In local mode the driver and the executors are one process: one filesystem, one loopback
interface, one environment. On a cluster (any master but `local[...]`) each of these may differ,
and a run that assumed them would fail late, task by task, or worse, write where nobody reads.
So before the first stage the driver asks every executor, in one small Spark job:

- a local `run_root` (a path, not a URI): can the executor read the marker file the driver just
  wrote there? Tasks write the spool and the tables' Parquet files, and read files the driver wrote
  (the staged benchmark items), under the run root; on several machines that takes storage all of
  them share (s3://, abfss://, dbfs:/, or a shared mount at the same path);
- a loopback `llm.base_url` (or `llm.endpoint: embedded`, which serves on the driver's loopback):
  can the executor reach it? The LLM is called from the executors;
- the API key: is the variable `llm.api_key_env` set in the executor's environment? The client
  reads it there (a spark-submit environment reaches the driver only).

On one machine (the local standalone cluster of scripts/local_cluster.py) all of these hold and the
run goes on; otherwise it stops with one line that says what to configure.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from jobs.errors import ConfigError
from jobs.spark.session import arrow_filesystem, is_local_path
from udfs.llm.client import is_loopback

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from jobs.config.loader import GlanConfig
    from jobs.pipeline.stage import Stage

PROBE_DIR = "_cluster"  # under the run root: the marker files of the check, removed after it


def is_local_master(master: str) -> bool:
    return master.startswith("local")


@dataclass(frozen=True)
class Probe:
    """What the driver asks each executor; shipped to the tasks."""

    marker: str | None = None  # a file under a local run root that the driver wrote, and its text
    token: str = ""
    endpoints: tuple[str, ...] = ()  # loopback LLM URLs the executors must reach
    key_env: str | None = None  # the API key's variable, when the executors' calls need it
    driver_host: str = ""
    # llm.endpoint embedded: the server starts on the driver's loopback after this check, so an
    # executor must be on the driver's machine (the same host name) to reach it.
    on_driver_host: bool = False


def executor_view(probe: Probe) -> dict[str, Any]:
    """Run on an executor: what it sees of the run root, the endpoints and the environment."""
    sees_run_root = None
    if probe.marker is not None:
        try:
            with open(probe.marker, encoding="utf-8") as f:
                sees_run_root = f.read() == probe.token
        except OSError:
            sees_run_root = False
    host = socket.gethostname()
    unreachable = [url for url in probe.endpoints if not _connects(url)]
    if probe.on_driver_host and host != probe.driver_host:
        unreachable.append(f"the loopback of {probe.driver_host}")
    has_key = bool(os.environ.get(probe.key_env)) if probe.key_env else None
    return {"host": host, "sees_run_root": sees_run_root, "unreachable": unreachable,
            "has_key": has_key}


def _connects(url: str, timeout_s: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def problems(cfg: GlanConfig, probe: Probe, views: Sequence[dict[str, Any]]) -> list[str]:
    """One line per assumption some executor breaks, saying what to configure."""
    found = []

    def hosts(failing: Sequence[dict[str, Any]]) -> str:
        names = sorted({v["host"] for v in failing})
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    blind = [v for v in views if v["sees_run_root"] is False]
    if blind:
        found.append(f"run_root {cfg.run_root} is a local path, and the executors on {hosts(blind)} cannot see the "
                     f"file the driver (host {probe.driver_host}) wrote there; on a cluster set run_root to storage "
                     "every node reads and writes (s3://..., abfss://..., dbfs:/..., or a shared mount at the same path)")
    cut_off = [v for v in views if v["unreachable"]]
    if cut_off:
        urls = sorted({u for v in cut_off for u in v["unreachable"]})
        what = ("llm.endpoint embedded serves on the driver's loopback" if cfg.llm.endpoint == "embedded"
                else "llm.base_url is a loopback address")
        found.append(f"{what} ({', '.join(urls)}), and the executors on {hosts(cut_off)} cannot reach it (they make "
                     "the LLM calls): start it on their machine, or on a cluster set llm.endpoint: openai and "
                     "llm.base_url to a server every node reaches, or run on one machine (spark.master local[*])")
    keyless = [v for v in views if v["has_key"] is False]
    if keyless:
        found.append(f"the executors on {hosts(keyless)} lack the environment variable {probe.key_env} "
                     f"(llm.api_key_env), which their LLM calls read; set it in every node's environment (the "
                     "cluster's environment variables, from a secret store), not only in spark-submit's")
    return found


def probe_for(cfg: GlanConfig, stages: Sequence[Stage], marker: str | None, token: str) -> Probe:
    """The questions worth asking for `stages`: endpoints and the key only when one of them calls an LLM."""
    online = [c for s in stages for c in s.calls if cfg.llm.mode_of(c.llm(cfg)) == "online"]
    embedded = bool(online) and cfg.llm.endpoint == "embedded"
    urls = tuple(dict.fromkeys(u for u in (*cfg.llm.base_urls, cfg.llm.base_url) if u)) if online else ()
    endpoints = () if embedded else tuple(u for u in urls if is_loopback(u))
    needs_key = bool(online) and not embedded and not (urls and all(map(is_loopback, urls)))
    return Probe(marker, token, endpoints, cfg.llm.api_key_env if needs_key else None, socket.gethostname(),
                 on_driver_host=embedded)


def check_executors(spark: SparkSession, cfg: GlanConfig, stages: Sequence[Stage]) -> None:
    """On a cluster, ask the executors what `stages` need of them (see the module); raise a
    ConfigError with the first thing to configure. Nothing to ask in local mode."""
    if is_local_master(spark.sparkContext.master):
        return
    found = executor_problems(spark, cfg, stages)
    if found:
        raise ConfigError(found[0])


def executor_problems(spark: SparkSession, cfg: GlanConfig, stages: Sequence[Stage]) -> list[str]:
    """What the executors running now lack for `stages`, one line each (see `problems`)."""
    fs = marker = None
    token = uuid.uuid4().hex
    if is_local_path(cfg.run_root):
        fs, root = arrow_filesystem(cfg.table_uri(PROBE_DIR))
        fs.create_dir(root, recursive=True)
        marker = f"{root}/probe-{token}"
        with fs.open_output_stream(marker) as out:
            out.write(token.encode())
    probe = probe_for(cfg, stages, marker, token)
    try:
        views = _ask_executors(spark, probe)
    finally:
        if fs is not None:
            fs.delete_file(marker)
    return problems(cfg, probe, views)


def _ask_executors(spark: SparkSession, probe: Probe) -> list[dict[str, Any]]:
    """One task per core, twice over, so that every executor running now answers. An executor that
    cannot import glan-spark fails the probe's tasks: that is the first thing to configure."""
    tasks = 2 * max(1, spark.sparkContext.defaultParallelism)
    try:
        return spark.sparkContext.parallelize(range(tasks), tasks).map(lambda _: executor_view(probe)).collect()
    except Exception as exc:  # Py4JJavaError or PythonException, with the executor's traceback inside
        missing = re.search(r"No module named '(jobs|udfs|prompts|conf)[.']", str(exc))
        if missing is None:
            raise
        raise ConfigError(f"the executors cannot import glan-spark (No module named '{missing.group(1)}'): ship it "
                          "with spark-submit --py-files dist/glan_spark-<version>-pyfiles.zip (built by python -m "
                          "jobs.spark.package), or install the package on every node") from None
