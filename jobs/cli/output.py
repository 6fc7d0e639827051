"""What every `glan` command prints: rows as an aligned table, CSV or JSON lines; and the Spark
session a command reads the run's tables with."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from typing import Any

from jobs.config.loader import GlanConfig
from jobs.spark.session import get_spark


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """An aligned plain-text table, cells cut to `max_width` characters."""

    def cell(value: Any) -> str:
        if value is None:
            text = "NULL"
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, default=str, ensure_ascii=False)
        else:
            text = str(value)
        text = text.replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 3] + "..."

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool)
                   for row in rows if row[i] is not None) and bool(rows) for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "asDict"):
        return {k: _to_jsonable(v) for k, v in value.asDict(recursive=False).items()}
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def print_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str, max_width: int = 60) -> None:
    if fmt == "json":
        for row in rows:
            print(json.dumps({c: _to_jsonable(v) for c, v in zip(columns, row)}, ensure_ascii=False))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")  # csv's default "\r\n" leaves "3\r" in `| tail -1`
        writer.writerow(columns)
        for row in rows:
            writer.writerow([json.dumps(_to_jsonable(v), ensure_ascii=False) if isinstance(v, (list, dict)) or hasattr(v, "asDict")
                             else v for v in row])
    else:
        print(format_table(columns, [[_to_jsonable(v) for v in row] for row in rows], max_width))


def spark_for(cfg: GlanConfig, app: str):
    return get_spark(app, master=cfg.spark.master, shuffle_partitions=cfg.spark.shuffle_partitions,
                     run_root=cfg.run_root, extra_conf=cfg.spark.conf)
