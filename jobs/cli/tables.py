"""`glan tables` (every table of the run: rows, version, last commit, missing files) and
`glan vacuum` (files of writes that never committed, and files removed long enough ago)."""

from __future__ import annotations

import argparse
import sys
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import DeltaTable

from jobs.cli.args import config_from_args
from jobs.cli.output import print_rows, spark_for
from jobs.errors import ConfigError
from jobs.spark.session import arrow_filesystem
from jobs.storage.delta import get_storage


def table_health(storage, name: str) -> tuple[int, int]:
    """(rows, missing files) of a table: the rows its Delta log records (add actions' numRecords,
    cheap on any size) and how many data files the log lists that do not exist, which that count
    still includes. One listing of the table's folder (pages of 1000 names on object stores, not a
    request per file), with pyarrow, for either backend."""
    uri = storage.uri(name)
    actions = pa.table(DeltaTable(uri).get_add_actions(flatten=True)).select(["path", "num_records"]).to_pydict()
    rows = sum(n or 0 for n in actions["num_records"])
    fs, root = arrow_filesystem(uri)
    root = root.rstrip("/")
    there = {info.path[len(root) + 1:] for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if info.type == pafs.FileType.File}
    missing = 0
    for path in actions["path"]:
        if "://" in path:  # an absolute URI (a shallow clone's files)
            other_fs, other = arrow_filesystem(path)
            missing += other_fs.get_file_info(other).type == pafs.FileType.NotFound
        else:
            missing += unquote(path) not in there
    return rows, missing


def cmd_tables(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    storage = get_storage(spark_for(cfg, "glan-tables"), cfg)
    names = storage.list_tables()
    if not names:
        print(f"no tables under {cfg.run_root}")
        return 0
    rows, broken = [], []
    for name in names:
        info = storage.info(name)
        logged, missing = table_health(storage, name)
        when = info.last_commit.strftime("%Y-%m-%d %H:%M:%S UTC") if info.last_commit else ""
        rows.append([info.name, logged, info.version, when, missing, info.uri])
        if missing:
            broken.append(f"{name} ({missing})")
    print_rows(["table", "rows", "version", "last_commit", "missing_files", "path"], rows, args.format, max_width=200)
    if broken:
        print(f"glan tables: rows are counted from each table's Delta log; data files the log lists are missing "
              f"in {', '.join(broken)}, and those counts include their rows (reads of these tables fail)",
              file=sys.stderr)
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.retention_hours < 0:
        raise ConfigError(f"--retention-hours must be >= 0, got {args.retention_hours:g}")
    storage = get_storage(spark_for(cfg, "glan-vacuum"), cfg)
    rows = [[name, storage.vacuum(name, args.retention_hours)] for name in storage.list_tables()]
    print_rows(["table", "files_deleted"], rows, "text")
    return 0
