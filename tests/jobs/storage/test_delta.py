"""The storage layer on the embedded backend: real Delta tables written by Spark + delta-rs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import types as T

from jobs.config.loader import load_config
from jobs.errors import ConflictError, GlanError, SchemaMismatchError, TableNotFoundError
from jobs.storage import tables
from jobs.storage.delta import WRITES_DIR, EmbeddedDeltaStorage, differing_values, get_storage


@pytest.fixture()
def cfg(tmp_path):
    return load_config([], [f"run_root={tmp_path / 'run'}", "storage.backend=embedded"])


@pytest.fixture()
def storage(spark, cfg) -> EmbeddedDeltaStorage:
    st = get_storage(spark, cfg)
    assert isinstance(st, EmbeddedDeltaStorage)
    return st


def rows(spark, pairs):
    return spark.createDataFrame(pairs, "id string, text string")


def ids(df) -> list[str]:
    return sorted(r["id"] for r in df.select("id").collect())


def test_appending_the_same_rows_twice_leaves_one_copy(spark, storage):
    df = rows(spark, [(f"k{i}", f"text {i}") for i in range(20)])
    first = storage.append_missing(df, "things", "id")
    second = storage.append_missing(df, "things", "id")
    assert (first.rows_written, second.rows_written) == (20, 0)
    assert second.version is None  # nothing to write is not a commit
    assert storage.read("things").count() == 20
    assert DeltaTable(storage.uri("things")).version() == 0


def test_appending_a_mix_adds_only_the_new_keys(spark, storage):
    storage.append_missing(rows(spark, [("a", "1"), ("b", "2")]), "things", "id")
    result = storage.append_missing(rows(spark, [("b", "changed"), ("c", "3"), ("c", "3"), ("d", "4")]), "things", "id")
    assert result.rows_written == 2
    table = {r["id"]: r["text"] for r in storage.read("things").collect()}
    assert table == {"a": "1", "b": "2", "c": "3", "d": "4"}  # an existing key is never rewritten


def test_tables_are_real_delta_tables(spark, storage):
    storage.append_missing(rows(spark, [("a", "1"), ("b", "2")]), "things", "id")
    storage.append_missing(rows(spark, [("c", "3")]), "things", "id")
    dt = DeltaTable(storage.uri("things"))
    assert sorted(dt.to_pandas()["id"]) == ["a", "b", "c"]
    history = dt.history()
    assert [h["version"] for h in history] == [1, 0]
    assert [h["operation"] for h in history] == ["WRITE", "CREATE TABLE"]
    info = storage.info("things")
    assert (info.rows, info.version) == (3, 1) and info.last_commit is not None


def test_reading_version_n_returns_what_was_there_at_version_n(spark, storage):
    storage.append_missing(rows(spark, [("a", "1")]), "things", "id")
    storage.append_missing(rows(spark, [("b", "2")]), "things", "id")
    storage.overwrite(rows(spark, [("z", "9")]), "things")
    assert ids(storage.read("things", version=0)) == ["a"]
    assert ids(storage.read("things", version=1)) == ["a", "b"]
    assert ids(storage.read("things", version=2)) == ["z"]
    assert ids(storage.read("things")) == ["z"]


def test_a_schema_mismatch_is_a_clear_error(spark, storage):
    storage.append_missing(rows(spark, [("a", "1")]), "things", "id")
    wrong_type = spark.createDataFrame([("b", 2)], "id string, text long")
    with pytest.raises(SchemaMismatchError, match="table 'things': column 'text' is bigint, the table has string"):
        storage.append_missing(wrong_type, "things", "id")
    extra = spark.createDataFrame([("b", "2", 3)], "id string, text string, n int")
    with pytest.raises(SchemaMismatchError, match="unexpected column.*n"):
        storage.append_missing(extra, "things", "id")
    assert ids(storage.read("things")) == ["a"]


def test_declared_table_schema_is_enforced(spark, storage):
    bad = spark.createDataFrame([("f1", "stage")], "failure_id string, stage string")
    with pytest.raises(SchemaMismatchError, match="table 'failures'.*missing column"):
        storage.append_missing(bad, "failures", "failure_id")
    assert not storage.exists("failures")


def test_missing_table_is_a_clear_error(storage):
    with pytest.raises(TableNotFoundError, match="table 'nope' does not exist"):
        storage.read("nope")


def test_missing_rows_is_input_minus_committed_keys(spark, storage):
    storage.append_missing(rows(spark, [("a", "1"), ("b", "2")]), "things", "id")
    todo = storage.missing_rows(rows(spark, [("a", "x"), ("c", "y")]), "things", "id")
    assert ids(todo) == ["c"]


def _run_script(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


SCRIPT_HEAD = """
    import os, sys, signal, time
    from jobs.config.loader import load_config
    from jobs.spark.session import get_spark
    from jobs.storage.delta import get_storage
    cfg = load_config([], ["run_root={root}", "storage.backend=embedded"])
    spark = get_spark("t", master="local[1]", shuffle_partitions=1, run_root="{scratch}")
    st = get_storage(spark, cfg)
    df = spark.createDataFrame([(f"{p}{{i}}", "x") for i in range({n})], "id string, text string")
"""


@pytest.mark.slow
def test_write_killed_before_commit_leaves_table_as_before(spark, storage, tmp_path):
    storage.append_missing(rows(spark, [("a", "1")]), "things", "id")
    before_files = set(os.listdir(storage.uri("things")))
    code = SCRIPT_HEAD.format(root=storage.cfg.run_root, scratch=tmp_path / "s1", n=50, p="k") + """
    staged = st.stage(df, "things", "id")
    assert staged.files, "nothing staged"
    os.kill(os.getpid(), signal.SIGKILL)   # dies after the Parquet files, before the commit
    """
    proc = _run_script(code, tmp_path)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftover = set(os.listdir(storage.uri("things"))) - before_files
    assert any(name.endswith(".parquet") for name in leftover)  # the files were written...
    assert DeltaTable(storage.uri("things")).version() == 0      # ...but never committed
    assert ids(storage.read("things")) == ["a"]
    assert len(DeltaTable(storage.uri("things")).to_pandas()) == 1
    rerun = storage.append_missing(rows(spark, [(f"k{i}", "x") for i in range(50)]), "things", "id")
    assert rerun.rows_written == 50
    assert storage.read("things").count() == 51


@pytest.mark.slow
def test_two_processes_appending_at_once_both_commit(storage, tmp_path):
    root = storage.cfg.run_root
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    code = SCRIPT_HEAD + """
    staged = st.stage(df, "things", "id")
    open(os.path.join("{barrier}", "{p}"), "w").close()
    deadline = time.time() + 120
    while len(os.listdir("{barrier}")) < 2 and time.time() < deadline:
        time.sleep(0.05)
    result = st.commit(staged)
    print("WROTE", result.rows_written)
    """
    # Writer "a" adds a0..a29; writer "b" adds b0..b29: both commit against the same read version.
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code.format(
        root=root, scratch=tmp_path / p, n=30, p=p, barrier=barrier))],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-2000:]
        assert "WROTE 30" in out
    dt = DeltaTable(storage.uri("things"))
    frame = dt.to_pandas()
    assert len(frame) == 60 and frame["id"].is_unique
    assert dt.version() == 1  # one created the table, the other appended after resolving the conflict


def test_concurrent_writers_of_the_same_keys_never_duplicate(spark, storage):
    """A commit that lost the race drops the keys the winner committed instead of duplicating them."""
    first = storage.stage(rows(spark, [("a", "1"), ("b", "2")]), "things", "id")
    second = storage.stage(rows(spark, [("b", "2"), ("c", "3")]), "things", "id")
    assert storage.commit(first).rows_written == 2
    assert storage.commit(second).rows_written == 1
    frame = DeltaTable(storage.uri("things")).to_pandas()
    assert sorted(frame["id"]) == ["a", "b", "c"]


def test_repeated_keys_across_tasks_of_one_write_are_written_once(spark, storage):
    # The same key in different partitions: found from the key hashes the tasks send back.
    df = spark.createDataFrame([(f"k{i % 7}", "x") for i in range(40)], "id string, text string").repartition(4)
    result = storage.append_missing(df, "things", "id")
    assert result.rows_written == 7
    frame = DeltaTable(storage.uri("things")).to_pandas()
    assert sorted(frame["id"]) == [f"k{i}" for i in range(7)]


def test_a_writer_that_loses_the_race_to_create_a_table_keeps_only_its_new_keys(storage, spark, monkeypatch):
    first = storage.stage(rows(spark, [("a", "1"), ("b", "1")]), "fresh", "id")
    second = storage.stage(rows(spark, [("b", "2"), ("c", "2")]), "fresh", "id")
    assert storage.commit(first).rows_written == 2
    # The second writer looked before the first one's log existed, so it tries to create the table.
    real_table, calls = storage._table, []

    def looked_too_early(name, version=None):
        calls.append(name)
        return None if len(calls) == 1 else real_table(name, version)

    monkeypatch.setattr(storage, "_table", looked_too_early)
    assert storage.commit(second).rows_written == 1
    assert ids(storage.read("fresh")) == ["a", "b", "c"]
    assert storage.read("fresh").filter("id = 'b'").first()["text"] == "1"  # the first writer's row


# --- derived tables: one slice's rows replaced, re-derived on conflict; leftovers of dead writes ---


def frame(spark, rows):
    return spark.createDataFrame(rows, "group_id string, item string")


def content(storage, name="things") -> set[tuple]:
    return {(r["group_id"], r["item"]) for r in storage.read(name).collect()}


def parquet_files(storage, name="things") -> set[str]:
    return {p.name for p in Path(storage.uri(name)).glob("*.parquet")}


def test_replace_rewrites_only_its_values_and_files_hold_one_value(spark, storage):
    storage.replace(frame(spark, [("a", "1"), ("a", "2"), ("b", "1"), ("c", "1")]), "things", "group_id",
                    ["a", "b", "c"], split=True)
    per_file = [set(pq.read_table(f).column("group_id").to_pylist())
                for f in DeltaTable(storage.uri("things")).file_uris()]
    assert sorted(len(v) for v in per_file) == [1, 1, 1]
    b_file = next(f for f in DeltaTable(storage.uri("things")).file_uris()
                  if pq.read_table(f).column("group_id").to_pylist() == ["b"])
    storage.replace(frame(spark, [("a", "new")]), "things", "group_id", ["a"], split=True)
    assert content(storage) == {("a", "new"), ("b", "1"), ("c", "1")}
    assert b_file in DeltaTable(storage.uri("things")).file_uris()  # b's file was not rewritten


def test_replace_on_a_file_of_several_values_carries_the_others_over(spark, storage):
    storage.overwrite(frame(spark, [("a", "1"), ("b", "1"), ("b", "2")]).coalesce(1), "things")
    storage.replace(frame(spark, [("a", "9")]), "things", "group_id", ["a", "z"])
    assert content(storage) == {("a", "9"), ("b", "1"), ("b", "2")}
    storage.replace(frame(spark, []), "things", "group_id", ["b"])  # replacing with nothing deletes
    assert content(storage) == {("a", "9")}


def test_replace_refuses_rows_outside_its_values_and_leaves_nothing(spark, storage):
    storage.replace(frame(spark, [("a", "1")]), "things", "group_id", ["a"], split=True)
    before = parquet_files(storage)
    with pytest.raises(GlanError, match="group_id='b'"):
        storage.replace(frame(spark, [("a", "2"), ("b", "2")]), "things", "group_id", ["a"], split=True)
    assert content(storage) == {("a", "1")} and parquet_files(storage) == before


def test_two_slices_committing_at_once_both_land(spark, storage):
    storage.replace(frame(spark, [("a", "0"), ("b", "0")]), "things", "group_id", ["a", "b"], split=True)
    # Both planned on the same version; the second commit finds the table moved.
    first = storage.stage(frame(spark, [("a", "1")]), "things", mode="replace", column="group_id",
                          values=["a"], split=True)
    second = storage.stage(frame(spark, [("b", "1")]), "things", mode="replace", column="group_id",
                           values=["b"], split=True)
    storage.commit(first)
    storage.commit(second)
    assert content(storage) == {("a", "1"), ("b", "1")}


def test_the_same_values_written_at_once_are_derived_again(spark, storage):
    storage.replace(frame(spark, [("a", "0")]), "things", "group_id", ["a"], split=True)
    stale = storage.stage(frame(spark, [("a", "old")]), "things", mode="replace", column="group_id",
                          values=["a"], split=True)
    storage.replace(frame(spark, [("a", "new")]), "things", "group_id", ["a"], split=True)
    with pytest.raises(ConflictError):
        storage.commit(stale)
    assert content(storage) == {("a", "new")}
    assert not any(stale.write_id in name for name in parquet_files(storage))  # its files are gone

    calls = []

    def build():
        calls.append(storage.version("things"))
        if len(calls) == 1:  # another run commits while we derive
            storage.replace(frame(spark, [("a", "theirs")]), "things", "group_id", ["a"], split=True)
        return frame(spark, [("a", f"ours-{len(calls)}")]), ["a"]

    storage.rebuild("things", build, column="group_id")
    assert len(calls) == 2 and content(storage) == {("a", "ours-2")}


def test_rebuild_writes_nothing_when_the_table_agrees(spark, storage):
    storage.overwrite(frame(spark, [("a", "1")]), "things")
    version = storage.version("things")
    assert storage.rebuild("things", lambda: None) is None
    assert storage.version("things") == version


def test_an_overwrite_planned_before_another_commit_is_a_conflict(spark, storage):
    storage.overwrite(frame(spark, [("a", "1")]), "things")
    planned = storage.version("things")
    storage.overwrite(frame(spark, [("b", "1")]), "things")
    with pytest.raises(ConflictError):
        storage.overwrite(frame(spark, [("c", "1")]), "things", read_version=planned)
    assert content(storage) == {("b", "1")}
    assert len(parquet_files(storage)) == 2  # the refused write's file was removed


def test_differing_values_names_exactly_the_groups_that_changed(spark):
    expected = frame(spark, [("a", "1"), ("b", "1"), ("b", "2"), ("c", "1")])
    current = frame(spark, [("b", "2"), ("b", "1"), ("c", "x"), ("d", "1")])
    assert differing_values(expected, current, "group_id") == ["a", "c", "d"]


def leftover(storage, write_id: str, age_s: float = 0.0, name="things") -> Path:
    path = Path(storage.uri(name)) / f"part-00000-{write_id}-a0-000.snappy.parquet"
    pq.write_table(pa.table({"group_id": ["x"], "item": ["x"]}), path)
    if age_s:
        old = time.time() - age_s
        os.utime(path, (old, old))
    return path


def test_files_of_writes_that_never_committed_are_removed_and_live_ones_kept(spark, storage):
    storage.overwrite(frame(spark, [("a", "1")]), "things")
    committed = parquet_files(storage)
    dead = leftover(storage, "d" * 16, age_s=7200)       # no marker, old: a write killed long ago
    young = leftover(storage, "e" * 16)                   # no marker, young: may still be committing
    marked_dead = leftover(storage, "f" * 16)             # its marker names a process that is gone
    marked_live = leftover(storage, "1" * 16)             # its marker names this live process
    markers = Path(storage.uri("things")) / WRITES_DIR
    owner = {"host": os.uname().nodename, "heartbeat": time.time()}
    for write_id, pid in (("f" * 16, 2 ** 22 + 17), ("1" * 16, os.getpid())):
        (markers / write_id).mkdir(parents=True)
        (markers / write_id / "_owner.json").write_text(json.dumps({**owner, "pid": pid}))

    removed = storage.remove_orphans("things")
    assert sorted(removed) == sorted([dead.name, marked_dead.name])
    assert parquet_files(storage) == committed | {young.name, marked_live.name}
    assert not (markers / ("f" * 16)).exists() and (markers / ("1" * 16)).exists()
    assert storage.remove_orphans("things", min_age_s=0) == [young.name]
    assert content(storage) == {("a", "1")}


def test_the_next_write_of_a_table_removes_its_leftovers(spark, cfg, tmp_path):
    storage = get_storage(spark, cfg)
    storage.append_missing(frame(spark, [("a", "1")]), "leftovers", "item")
    dead = leftover(storage, "d" * 16, age_s=7200, name="leftovers")
    EmbeddedDeltaStorage(spark, cfg)  # a new run: a new process in real life
    from jobs.storage import delta as module

    module._CLEANED.clear()
    storage.append_missing(frame(spark, [("b", "2")]), "leftovers", "item")
    assert not dead.exists()
    assert {r["item"] for r in storage.read("leftovers").collect()} == {"1", "2"}
    assert not list((Path(storage.uri("leftovers")) / WRITES_DIR).iterdir())  # a finished write leaves no marker


def test_vacuum_removes_leftovers_and_only_old_removed_files(spark, storage):
    storage.overwrite(frame(spark, [("a", "1")]), "things")
    storage.overwrite(frame(spark, [("b", "1")]), "things")  # the first file is now a removed one
    dead = leftover(storage, "d" * 16, age_s=7200)
    assert storage.vacuum("things", retention_hours=168) == 1  # the removed file is younger than a week
    assert not dead.exists() and len(parquet_files(storage)) == 2
    assert storage.read("things", version=0).count() == 1       # time travel still works
    assert storage.vacuum("things", retention_hours=0) == 1
    assert len(parquet_files(storage)) == 1 and content(storage) == {("b", "1")}


def test_a_write_whose_task_fails_leaves_no_file(spark, storage):
    from pyspark.sql import functions as F

    storage.append_missing(frame(spark, [("a", "1")]), "things", "item")
    before = parquet_files(storage)
    rows = (spark.range(8).repartition(4).select(
        F.lit("g").alias("group_id"),
        F.when(F.col("id") == 5, F.raise_error(F.lit("disk full"))).otherwise(F.col("id").cast("string")).alias("item")))
    with pytest.raises(Exception, match="disk full"):
        storage.append_missing(rows, "things", "item")
    assert parquet_files(storage) == before  # the other tasks' files went with the failed write
    assert content(storage) == {("a", "1")}


def test_a_table_made_before_a_column_was_added_takes_new_rows_without_it(spark, storage, monkeypatch, caplog):
    spec = tables.TABLES["answers"]
    older = T.StructType([f for f in spec.schema.fields if f.name != "seed"])
    monkeypatch.setitem(tables.TABLES, "answers", replace(spec, schema=older))
    storage.append_missing(spark.createDataFrame([{"answer_id": "a", "answer": "x"}], older), "answers", "answer_id")
    monkeypatch.setitem(tables.TABLES, "answers", spec)  # this version: answers has `seed`
    rows = spark.createDataFrame([{"answer_id": "b", "answer": "y", "seed": 5}], spec.schema)
    assert storage.append_missing(rows, "answers", "answer_id").rows_written == 1
    assert sorted(r.answer_id for r in storage.read("answers").collect()) == ["a", "b"]
    assert "without column(s) seed" in caplog.text
    fresh = get_storage(spark, load_config([], [f"run_root={storage.cfg.run_root}2", "storage.backend=embedded"]))
    fresh.append_missing(rows, "answers", "answer_id")
    assert fresh.read("answers").first().seed == 5  # a new run root has the column
