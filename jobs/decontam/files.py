"""`glan decontaminate` on any dataset: JSONL, Parquet or Delta in, the clean rows and the
reasons for every removal out, as Delta tables under --output (`glan sql --set run_root=DIR`).

Run: glan decontaminate --input PATH --text-fields a,b --output DIR [--benchmarks NAMES]
     (or spark-submit jobs/decontaminate.py --input PATH ...)
Bad input stops the run with one line that names the file and line, before anything is written;
so does a benchmark name the registry lacks, or a missing benchmark file, before Spark starts. The
report names every benchmark asked for, with a WARNING line for one that contributed less than asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import unquote

from deltalake import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.cli.args import add_config_args, config_from_args
from jobs.decontam.detect import benchmark_coverage, decontaminate, format_report, staged_benchmark_items
from jobs.decontam.fetch import ensure_benchmark_files
from jobs.decontam.registry import load_registry
from jobs.errors import InputError
from jobs.spark.session import arrow_filesystem, get_spark
from jobs.storage.delta import Storage, get_storage


CORRUPT = "_corrupt_record"  # Spark's column for JSON lines it cannot parse


def read_input(spark: SparkSession, path: str) -> DataFrame:
    """JSONL (optionally .gz), Parquet, or a Delta table folder (has _delta_log). Lines of JSON that
    do not parse come through in `_corrupt_record` (see `check_input`)."""
    lower = path.lower().rstrip("/")
    local = Path(path)
    if (local / "_delta_log").is_dir() or lower.endswith(".delta"):
        # delta-rs lists the current snapshot's files; Spark reads them without the Delta jars
        return spark.read.parquet(*DeltaTable(path).file_uris())
    if lower.endswith(".parquet") or (local.is_dir() and any(local.glob("*.parquet"))):
        return spark.read.parquet(path)
    if lower.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")) or local.is_dir():
        return (spark.read.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT)
                .json(path))
    raise InputError(f"{path}: expected JSONL, Parquet or a Delta table")


@dataclasses.dataclass(frozen=True)
class InputCheck:
    """What `check_input` found: records read, and the bad ones (skipped, or the run stopped)."""

    num_records: int
    num_bad: int = 0
    num_malformed: int = 0
    num_missing: tuple[tuple[str, int], ...] = ()  # (text field, records without it)

    def summary(self) -> str:
        parts = [f"{self.num_malformed} not valid JSON"] if self.num_malformed else []
        parts += [f"{n} without '{field}'" for field, n in self.num_missing if n]
        return ", ".join(parts)


def _open_text_lines(uri: str) -> Iterator[str]:
    """The lines of a (gzipped) text file Spark read, on the driver."""
    fs, local = arrow_filesystem(unquote(uri))
    with fs.open_input_stream(local) as raw:
        stream = gzip.open(raw) if uri.endswith(".gz") else raw
        yield from io.TextIOWrapper(stream, encoding="utf-8", errors="replace")


def first_bad_line(lines: Iterator[str], fields: Sequence[str]) -> tuple[int, str] | None:
    """(line number from 1, what is wrong) of the first non-blank line that is not a JSON object
    holding every field with a value; None when all are good."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            return lineno, f"is not valid JSON ({exc.msg})"
        if not isinstance(record, dict):
            return lineno, "is not a JSON object"
        for field in fields:
            if record.get(field) is None:
                return lineno, f"has no field '{field}'"
    return None


def check_input(data: DataFrame, path: str, fields: Sequence[str], *, skip: bool) -> tuple[DataFrame, InputCheck]:
    """The input's records minus `_corrupt_record`, checked: every record must parse and have each
    text field (a null counts as missing). A bad record is an InputError naming the file, its line
    and the field, unless `skip` (decontam.skip_bad_records): then bad records are dropped and
    counted. An input without records is an InputError saying so."""
    if not data.columns:  # Spark infers no columns from files without a single record
        raise InputError(f"{path}: the input is empty (no records)")
    if data.columns == [CORRUPT]:
        data = data.cache()  # Spark refuses queries of raw JSON that read only the corrupt-record column
    corrupt = F.col(CORRUPT) if CORRUPT in data.columns else F.lit(None)
    absent = [f for f in fields if f not in data.columns]
    missing = [corrupt.isNull() & (F.lit(True) if f in absent else F.col(f).isNull()) for f in fields]
    is_bad = corrupt.isNotNull()
    for is_missing in missing:
        is_bad = is_bad | is_missing
    counts = data.select(F.count(F.lit(1)), F.count(F.when(is_bad, 1)), F.count(corrupt),
                         *[F.count(F.when(is_missing, 1)) for is_missing in missing]).first()
    check = InputCheck(counts[0], counts[1], counts[2], tuple(zip(fields, counts[3:])))
    if check.num_records == 0:
        raise InputError(f"{path}: the input is empty (no records)")
    if check.num_bad and not (skip and not absent):
        where = data.filter(is_bad).select(F.input_file_name().alias("file")).first()["file"]
        _raise_bad_record(where or path, fields, check, absent)
    return data.filter(~is_bad).drop(CORRUPT) if check.num_bad else data, check


def _raise_bad_record(uri: str, fields: Sequence[str], check: InputCheck, absent: Sequence[str]) -> None:
    name = unquote(uri.removeprefix("file://"))
    hint = ("" if absent else "; decontam.skip_bad_records=true (--skip-bad-records) drops such records "
            "and counts them in the report")
    total = f"{check.summary()} of {check.num_records} records"
    if uri.lower().endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
        found = first_bad_line(_open_text_lines(uri), fields)
        if found is not None:
            raise InputError(f"{name}: line {found[0]} {found[1]} ({total}){hint}")
    raise InputError(f"{name}: bad records ({total}){hint}")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`glan decontaminate` arguments (the caller adds --conf/--set)."""
    parser.add_argument("--input", required=True, help="JSONL, Parquet or Delta path of the data to clean")
    parser.add_argument("--text-fields", required=True, help="comma-separated columns to check, e.g. prompt,response")
    parser.add_argument("--output", required=True,
                        help="folder for the Delta tables instructions/ and contamination/ (glan sql --set run_root=DIR)")
    parser.add_argument("--benchmarks", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--id-field", default=None, help="column that identifies a row (default: a hash of the row)")
    parser.add_argument("--near-dup", action="store_true", help="also drop near-duplicate rows (off by default here)")
    parser.add_argument("--skip-bad-records", action="store_true", default=None,
                        help="drop and count input records that are not valid JSON or lack a text field "
                             "(default: decontam.skip_bad_records, false: they stop the run)")
    return parser


def write_output_table(storage: Storage, df: DataFrame, name: str) -> None:
    """Replace table `name` of a standalone run with `df`, whatever its columns, in one commit: the
    pipeline's schema for that name (tables.py) holds only for rows of that shape."""
    storage.overwrite(df, name, own_schema=True)


def run(args: argparse.Namespace, cfg=None) -> str:
    """Standalone decontamination: writes the Delta tables <output>/instructions and
    <output>/contamination (readable with `glan sql --set run_root=<output>`) and returns the
    report text (the CLI prints it): a line for every benchmark asked for, and a WARNING line for
    each that contributed less than asked. Nothing is written when the input is bad, and a
    benchmark name the registry lacks or a benchmark file that is missing stops the run before
    Spark starts."""
    cfg = cfg or config_from_args(args)
    dc = cfg.decontam
    names = tuple(n.strip() for n in args.benchmarks.split(",") if n.strip()) or dc.benchmarks
    fields = tuple(f.strip() for f in args.text_fields.split(",") if f.strip())
    dc = dataclasses.replace(dc, benchmarks=names, text_fields=fields)
    ensure_benchmark_files(load_registry(dc.registry, dc.benchmarks), dc.benchmarks_dir)
    skip = dc.skip_bad_records if args.skip_bad_records is None else args.skip_bad_records
    out = args.output.rstrip("/")
    out_cfg = dataclasses.replace(cfg, run_root=out)
    # run_root=None: Spark's own files go to a temp folder, so a bad input leaves --output untouched
    spark = get_spark("decontaminate", master=cfg.spark.master, shuffle_partitions=cfg.spark.shuffle_partitions,
                      run_root=None, extra_conf=cfg.spark.conf)
    data, check = check_input(read_input(spark, args.input), args.input, fields, skip=skip)
    id_col = args.id_field
    if id_col is None:
        id_col = "_row_id"  # identical rows share an id, and a verdict
        data = data.withColumn(id_col, F.xxhash64(F.to_json(F.struct(*data.columns))).cast("string"))
    storage = get_storage(spark, out_cfg)
    with staged_benchmark_items(spark, dc, out_cfg.table_uri("_scratch")) as items:
        instructions, contamination, report = decontaminate(data, items, dc, id_col=id_col, text_cols=fields,
                                                            near_dup=args.near_dup)
        if args.id_field is None:
            instructions = instructions.drop(id_col)
        write_output_table(storage, instructions, "instructions")
        write_output_table(storage, contamination, "contamination")
        coverage = benchmark_coverage(items, dc)
    num_out = storage.read("instructions").count()
    text = format_report(report, check.num_records - check.num_bad, num_out, coverage)
    if check.num_bad:
        text = f"skipped {check.num_bad} bad input records: {check.summary()}\n{text}"
    return text


def main(argv: list[str] | None = None) -> int:
    """`glan decontaminate ...` (standalone). The GLAN pipeline's stage is jobs/decontaminate.py."""
    parser = add_config_args(add_arguments(argparse.ArgumentParser(prog="glan decontaminate")))
    print(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    main(sys.argv[1:])
