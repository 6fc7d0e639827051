"""Configuration errors and the `glan` CLI: one-line errors, exit code 2, nothing written."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from py4j.protocol import Py4JJavaError

from jobs.cli import main as cli
from jobs.cli.output import format_table
from jobs.config.loader import load_config
from jobs.errors import ConfigError

from tests.support import REPO


# The JVM itself prints this once at start-up, before glan can say anything; it is not our output.
JVM_NOTICE = "WARNING: Using incubator modules"


def glan(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stderr = "".join(line for line in proc.stderr.splitlines(keepends=True) if not line.startswith(JVM_NOTICE))
    return proc


def test_defaults_are_the_base_file_then_later_files_win(tmp_path):
    (tmp_path / "a.yaml").write_text("llm:\n  timeout_s: 10\n  max_attempts: 2\n")
    (tmp_path / "b.yaml").write_text("llm:\n  timeout_s: 20\n")
    cfg = load_config([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")], ["llm.max_attempts=4"])
    assert (cfg.llm.timeout_s, cfg.llm.max_attempts) == (20.0, 4)
    assert cfg.llm.api_key_env == "OPENAI_API_KEY"  # untouched defaults come from conf/base.yaml


def test_packaged_conf_files_are_found_by_name():
    assert load_config(["local.yaml"]).llm.endpoint == "embedded"
    assert load_config(["emr"]).storage.backend == "native"


@pytest.mark.parametrize(("content", "sets", "message"), [
    ("llm:\n  base_ulr: http://x\n", [], r"^{file}: unknown key 'llm.base_ulr'$"),
    ("llm:\n  timeout_s: fast\n", [], r"^{file}: llm.timeout_s must be a float, got str 'fast'$"),
    ("storage:\n  backend: s3\n", [], r"^{file}: storage.backend='s3' is not one of 'auto', 'native', 'embedded'$"),
    ("llm:\n  max_in_flight_per_task: 0\n", [], r"^{file}: llm.max_in_flight_per_task=0 must be >= 1$"),
    ("llm: [1, 2]\n", [], r"^{file}: llm must be a mapping, got list$"),
    ("run_root: [\n", [], r"^{file} line \d+: not valid YAML"),
    ("", ["spark.shuffle_partitions=many"], r"^--set: spark.shuffle_partitions must be a int, got str 'many'$"),
    ("", ["nope.key=1"], r"^--set: unknown key 'nope'$"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, content, sets, message):
    path = tmp_path / "my.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config([str(path)], sets)
    assert re.match(message.format(file=re.escape(str(path))), str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_is_exit_2_one_line_and_nothing_written(tmp_path):
    proc = glan("tables", "--conf", "missing.yaml", "--set", f"run_root={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "glan: error: config file not found: missing.yaml"
    assert not (tmp_path / "run").exists()
    assert sorted(os.listdir(tmp_path)) == []  # no spark-warehouse, metastore_db or derby.log either


@pytest.mark.parametrize("sets", [["llm.bogus=1"], ["llm.timeout_s=abc"]])
def test_bad_set_is_exit_2_and_nothing_written(tmp_path, sets):
    args = ["run"] + [x for s in sets for x in ("--set", s)] + ["--set", f"run_root={tmp_path / 'run'}"]
    proc = glan(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("glan: error: --set: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_tables_and_sql_over_a_run(tmp_path):
    run = tmp_path / "run"
    setup = f"""
from jobs.config.loader import load_config
from jobs.spark.session import get_spark
from jobs.storage.delta import append_missing
cfg = load_config([], ["run_root={run}", "storage.backend=embedded"])
spark = get_spark("t", master="local[1]", run_root=cfg.run_root)
append_missing(spark.createDataFrame([("a", "Mathematics", 3), ("b", "Physics", 5)], "id string, discipline string, n int"), "topics", "id", cfg)
append_missing(spark.createDataFrame([("q1", "a")], "question_id string, id string"), "quizzes", "question_id", cfg)
"""
    done = subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    common = ["--set", f"run_root={run}", "--set", "storage.backend=embedded"]

    tables = glan("tables", *common, cwd=tmp_path)
    assert tables.returncode == 0, tables.stderr
    lines = tables.stdout.splitlines()
    assert lines[0].split()[:4] == ["table", "rows", "version", "last_commit"]
    assert lines[2].split()[:3] == ["quizzes", "1", "0"] and lines[3].split()[:3] == ["topics", "2", "0"]

    sql = glan("sql", "SELECT s.discipline, s.n, q.question_id FROM topics s LEFT JOIN quizzes q USING (id) "
               "ORDER BY s.n", *common, cwd=tmp_path)
    assert sql.returncode == 0, sql.stderr
    assert sql.stdout.splitlines() == [
        "discipline   n  question_id",
        "-----------  -  -----------",
        "Mathematics  3  q1",
        "Physics      5  NULL",
    ]
    as_json = glan("sql", "SELECT id, n FROM topics ORDER BY id", "--format", "json", *common, cwd=tmp_path)
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == [{"id": "a", "n": 3}, {"id": "b", "n": 5}]
    as_csv = glan("sql", "SELECT id, n FROM topics ORDER BY id", "--format", "csv", *common, cwd=tmp_path)
    assert as_csv.stdout.splitlines() == ["id,n", "a,3", "b,5"]

    bad = glan("sql", "SELECT nope FROM topics", *common, cwd=tmp_path)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr
    assert "Traceback" not in bad.stderr and "at org.apache" not in bad.stderr
    assert not (tmp_path / "spark-warehouse").exists() and not (tmp_path / "metastore_db").exists()


def test_format_table_aligns_and_cuts_long_cells():
    text = format_table(["name", "n"], [["a", 1], ["b" * 100, 22]], max_width=10)
    assert text.splitlines() == ["name         n", "----------  --", "a            1", "bbbbbbb...  22"]


@pytest.mark.parametrize(("content", "message"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "{file}: not a YAML text file (byte 0 is not UTF-8)"),
    (b"- run_root\n- llm\n", "{file}: the top level must be a mapping of keys, not list"),
    (b"run_root: [\n", "{file} line 2: not valid YAML (expected the node content, but found '<stream end>')"),
], ids=["binary", "list", "syntax"])
def test_an_unreadable_conf_file_is_exit_2_and_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "conf.yaml"
    path.write_bytes(content)
    proc = glan("tables", "--conf", str(path), "--set", f"run_root={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "glan: error: " + message.format(file=path)
    assert not (tmp_path / "run").exists()


def _worker_raises(spark, error: OSError) -> Exception:
    """The exception a Spark action raises when a Python task fails with `error`."""
    from pyspark.sql import functions as F

    @F.udf("string")
    def write(_):
        raise error

    try:
        spark.range(1).select(write("id")).collect()
    except Exception as exc:  # noqa: BLE001 - whichever class Spark wraps it in
        return exc
    raise AssertionError("the task did not fail")


FULL_DISKS = {
    "python": lambda spark: OSError(errno.ENOSPC, "No space left on device", "/full/run/answers/part-0.parquet"),
    "java": lambda spark: Py4JJavaError("An error occurred while calling o42.save.\n", spark._jvm.org.apache.spark.SparkException(
        "Job aborted", spark._jvm.java.io.FileNotFoundException("/full/run/answers/_delta_log/00001.json (No space left on device)"))),
    "python worker": lambda spark: _worker_raises(spark, OSError(errno.ENOSPC, "No space left on device", "/full/run/spool/a.jsonl")),
}


@pytest.mark.parametrize(("make_error", "path"), [
    (FULL_DISKS["python"], "/full/run/answers/part-0.parquet"),
    (FULL_DISKS["java"], "/full/run/answers/_delta_log/00001.json"),
    (FULL_DISKS["python worker"], "/full/run/spool/a.jsonl"),
], ids=list(FULL_DISKS))
def test_a_full_disk_is_one_last_line_naming_the_path(spark, monkeypatch, capsys, make_error, path):
    error = make_error(spark)
    monkeypatch.setattr(cli, "cmd_tables", lambda args: (_ for _ in ()).throw(error))
    try:
        assert cli.main(["tables"]) == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"glan: error: no space left on device: {path} ("), err
        assert len(err.strip().splitlines()) == 1
        # Nothing the JVM logs afterwards (tasks being killed, shutdown) can land below that line.
        assert spark._jvm.org.apache.logging.log4j.LogManager.getRootLogger().getLevel().toString() == "OFF"
    finally:
        spark.sparkContext.setLogLevel("WARN")


@pytest.mark.parametrize("make_error", [
    lambda spark: Py4JJavaError("An error occurred while calling o42.save.\n",
                                spark._jvm.java.io.IOException("No space left on device")),
    lambda spark: _worker_raises(spark, OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")),
], ids=["java", "pyarrow in a python worker"])
def test_a_full_disk_without_a_path_names_the_run_root_and_its_free_space(spark, monkeypatch, capsys, tmp_path, make_error):
    error = make_error(spark)
    monkeypatch.setattr(cli, "cmd_tables", lambda args: (_ for _ in ()).throw(error))
    try:
        assert cli.main(["tables", "--set", f"run_root={tmp_path / 'run'}"]) == 1
    finally:
        spark.sparkContext.setLogLevel("WARN")
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"glan: error: no space left on device \(the error names no file; run root "
                        rf"{re.escape(str(tmp_path / 'run'))} [\d.]+ [KMGT]?B free, temp .+ [\d.]+ [KMGT]?B free\)", line), line


def test_a_python_worker_error_is_its_own_last_line(spark, monkeypatch, capsys):
    error = _worker_raises(spark, ValueError("row 7 has no question_id"))
    monkeypatch.setattr(cli, "cmd_tables", lambda args: (_ for _ in ()).throw(error))
    try:
        assert cli.main(["tables"]) == 1
    finally:
        spark.sparkContext.setLogLevel("WARN")
    assert capsys.readouterr().err.strip() == "glan: error: PYTHON_EXCEPTION: ValueError: row 7 has no question_id"


@pytest.mark.slow
def test_tables_flags_missing_data_files_and_vacuum_removes_leftovers(tmp_path):
    run = tmp_path / "run"
    setup = f"""
from jobs.config.loader import load_config
from jobs.spark.session import get_spark
from jobs.storage.delta import append_missing
cfg = load_config([], ["run_root={run}", "storage.backend=embedded"])
spark = get_spark("t", master="local[1]", run_root=cfg.run_root)
append_missing(spark.createDataFrame([("a", 1), ("b", 2)], "id string, n int").repartition(2), "topics", "id", cfg)
"""
    done = subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted((run / "topics").glob("part-*.parquet"))
    assert len(files) == 2
    files[0].unlink()                                               # a data file lost under the table
    leftover = run / "topics" / "part-00009-abcdefabcdefabcd-a0-000.snappy.parquet"
    leftover.write_bytes(files[1].read_bytes())                     # and a write that never committed
    os.utime(leftover, (0, 0))
    common = ["--set", f"run_root={run}", "--set", "storage.backend=embedded"]

    tables = glan("tables", *common, "--format", "csv", cwd=tmp_path)
    assert tables.returncode == 0, tables.stderr
    header, row = tables.stdout.splitlines()[:2]
    assert header.split(",")[:5] == ["table", "rows", "version", "last_commit", "missing_files"]
    assert row.split(",")[1] == "2" and row.split(",")[4] == "1"  # the log's count, and the file it lacks
    assert "Delta log" in tables.stderr and "topics (1)" in tables.stderr

    vacuum = glan("vacuum", *common, cwd=tmp_path)
    assert vacuum.returncode == 0, vacuum.stderr
    assert not leftover.exists() and files[1].exists()
