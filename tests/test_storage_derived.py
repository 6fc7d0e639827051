"""Derived tables on the embedded backend: replacing one slice's rows, re-deriving on conflict,
and removing the files of writes that never committed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from jobs.common.config import load_config
from jobs.common.errors import ConflictError, GlanError
from jobs.common.storage import WRITES_DIR, EmbeddedDeltaStorage, differing_values, get_storage


@pytest.fixture()
def cfg(tmp_path):
    return load_config([], [f"run_root={tmp_path / 'run'}", "storage.backend=embedded"])


@pytest.fixture()
def storage(spark, cfg) -> EmbeddedDeltaStorage:
    st = get_storage(spark, cfg)
    assert isinstance(st, EmbeddedDeltaStorage)
    return st


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
    from jobs.common import storage as module

    module._CLEANED.clear()
    storage.append_missing(frame(spark, [("b", "2")]), "leftovers", "item")
    assert not dead.exists()
    assert {r["item"] for r in storage.read("leftovers").collect()} == {"1", "2"}
    assert not list((Path(storage.uri("leftovers")) / WRITES_DIR).iterdir())  # a finished write leaves no marker
