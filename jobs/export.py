"""Training-ready export. Reads `instructions`, writes Parquet shards, `manifest.json` and a card.

Run: glan export --output DIR [--shard-size-mb N] [--heldout-per-discipline 50] [--seed S]
 or: spark-submit jobs/export.py --conf conf/local.yaml --output DIR

Layout of DIR:
    data/train-00000.parquet ...   shuffled training pairs
    data/test-00000.parquet ...    GLAN-Test: up to `heldout_per_discipline` pairs per discipline
    manifest.json                  counts per split and shard, schema, sha256 per shard, config
    README.md, counts.png          the dataset card and its chart

Determinism, without collecting rows to the driver:
- every row gets `_key = xxhash64(seed, instruction_id)`; the order of the data is (_key, id);
- held-out rows are the first rows of each discipline in that order (a window over a narrow
  projection of id, discipline and key; the chosen ids are broadcast back);
- a row's shard is a fixed function of its key (the key range is cut into equal slices), so shard
  membership does not depend on how Spark partitioned the input;
- each shard is written by one task with pyarrow from rows sorted by (_key, id), with a fixed
  schema, row-group size and codec, and no pandas metadata or timestamps: the same seed and rows
  give byte-identical files. Concatenating the shards in name order gives the shuffled order.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from jobs.cli.args import add_config_args, config_from_args
from jobs.cli.guard import run_guarded
from jobs.config.export import ExportConfig
from jobs.errors import EXIT_OK, ConfigError
from jobs.spark.session import arrow_filesystem, get_spark
from jobs.storage.delta import read_table

log = logging.getLogger("glan.export")

SPLITS = ("train", "test")
EXPORT_COLUMNS = ("id", "field", "discipline", "subject", "level", "question", "answer")

MESSAGE_TYPE = pa.struct([pa.field("role", pa.string(), nullable=False),
                          pa.field("content", pa.string(), nullable=False)])
SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("field", pa.string()),
    pa.field("discipline", pa.string()),
    pa.field("subject", pa.string()),
    pa.field("level", pa.string()),
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("messages", pa.list_(pa.field("item", MESSAGE_TYPE, nullable=False)), nullable=False),
])

# What each shard-writing task reports back: one small row per file.
SHARD_RESULT_SCHEMA = ("split string, shard long, path string, num_rows long, "
                       "num_bytes long, sha256 string")

_TWO_TO_64 = float(2**64)


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested without Spark)


def shard_of(key: int, num_shards: int) -> int:
    """The shard of a signed 64-bit key: the key range cut into `num_shards` equal slices.

    Mirrors the Spark expression in `_shard_column` (both use doubles, so they agree exactly).
    """
    return min(num_shards - 1, int(math.floor((key / _TWO_TO_64 + 0.5) * num_shards)))


def num_shards_for(total_bytes: int, shard_size_mb: float, num_rows: int) -> int:
    """Enough shards that each holds about `shard_size_mb` of text, never more than one per row."""
    if num_rows == 0:
        return 0
    return max(1, min(num_rows, math.ceil(total_bytes / (shard_size_mb * 1024 * 1024))))


def build_messages(question: str, answer: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def shard_filename(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.parquet"


def shard_bytes(rows: "Any", cfg: ExportConfig) -> bytes:
    """One shard as Parquet bytes. `rows` is a pandas DataFrame already in output order."""
    columns = {name: pa.array(rows[name].tolist(), type=SHARD_SCHEMA.field(name).type)
               for name in EXPORT_COLUMNS}
    columns["messages"] = pa.array(
        [build_messages(q, a, cfg.system_prompt) for q, a in zip(rows["question"], rows["answer"])],
        type=SHARD_SCHEMA.field("messages").type,
    )
    table = pa.Table.from_pydict(columns, schema=SHARD_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(
        table, sink,
        row_group_size=cfg.row_group_rows,
        compression=cfg.compression,
        compression_level=cfg.compression_level,
        use_dictionary=["field", "discipline", "subject", "level"],
        write_statistics=True,
        version="2.6",
        data_page_version="1.0",
    )
    return sink.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Filesystem (local paths and any URI pyarrow understands: s3://, gs://, abfs://, hdfs://, dbfs:/)


def _write_bytes(uri_dir: str, relative: str, data: bytes) -> None:
    filesystem, root = arrow_filesystem(uri_dir)
    path = f"{root.rstrip('/')}/{relative}"
    filesystem.create_dir(path.rpartition("/")[0], recursive=True)
    with filesystem.open_output_stream(path) as out:
        out.write(data)


def _prepare_output(output: str, overwrite: bool) -> None:
    filesystem, root = arrow_filesystem(output)
    root = root.rstrip("/")
    existing = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    if existing and not overwrite:
        raise FileExistsError(f"export output {output} is not empty; pass --overwrite to replace it")
    for info in existing:
        if info.type == fs.FileType.Directory:
            filesystem.delete_dir(info.path)
        else:
            filesystem.delete_file(info.path)
    filesystem.create_dir(root, recursive=True)


# ---------------------------------------------------------------------------------------------
# Spark


def _shard_column(key: str, num_shards: int) -> Column:
    fraction = F.col(key).cast("double") / F.lit(_TWO_TO_64) + F.lit(0.5)
    return F.least(F.floor(fraction * F.lit(num_shards)), F.lit(num_shards - 1)).cast("long")


def _shard_writer(output: str, cfg: ExportConfig) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """A function for applyInPandas: writes one (split, shard) group as one file."""

    def write(group: pd.DataFrame) -> pd.DataFrame:
        rows = group.sort_values(["_key", "id"], kind="mergesort").reset_index(drop=True)
        split, shard = str(rows["_split"].iloc[0]), int(rows["_shard"].iloc[0])
        data = shard_bytes(rows, cfg)
        relative = f"data/{shard_filename(split, shard)}"
        _write_bytes(output, relative, data)
        return pd.DataFrame([{"split": split, "shard": shard, "path": relative, "num_rows": len(rows),
                              "num_bytes": len(data), "sha256": sha256_hex(data)}])

    return write


def select_heldout(keyed: DataFrame, cfg: ExportConfig) -> DataFrame:
    """Ids of the held-out rows: the first `heldout_per_discipline` of each discipline in key
    order, capped at `heldout_max_fraction` of the discipline. Runs on (id, discipline, _key)
    only, so the window's sort never carries question and answer text."""
    by_discipline = Window.partitionBy("discipline")
    ordered = by_discipline.orderBy("_key", "id")
    quota = F.least(F.lit(cfg.heldout_per_discipline),
                    F.floor(F.col("_num_in_discipline") * F.lit(cfg.heldout_max_fraction)))
    return (
        keyed.select("id", "discipline", "_key")
        .withColumn("_num_in_discipline", F.count(F.lit(1)).over(by_discipline))
        .withColumn("_rank", F.row_number().over(ordered))
        .filter(F.col("_rank") <= quota)
        .select("id")
    )


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("glan-spark", "pyspark", "pyarrow", "pandas", "xxhash"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def key_rows(instructions: DataFrame, seed: int) -> DataFrame:
    """The exported columns, `id` as a string, and each row's shuffle key `_key`."""
    return instructions.select(
        F.col("instruction_id").cast("string").alias("id"),
        "field", "discipline", "subject", "level", "question", "answer",
        F.xxhash64(F.lit(seed).cast("long"), F.col("instruction_id").cast("string")).alias("_key"),
    )


def split_rows(keyed: DataFrame, cfg: ExportConfig) -> DataFrame:
    """`keyed` with `_split`: "test" for the held-out rows, "train" for the others, "dropped" for
    rows without a question or an answer."""
    has_text = F.col("question").isNotNull() & F.col("answer").isNotNull()
    heldout_ids = select_heldout(keyed.filter(has_text), cfg).withColumn("_is_heldout", F.lit(True))
    return (
        keyed.join(F.broadcast(heldout_ids), on="id", how="left")
        .withColumn("_split", F.when(~has_text, F.lit("dropped"))
                    .when(F.col("_is_heldout"), F.lit("test"))
                    .otherwise(F.lit("train")))
        .drop("_is_heldout")
    )


@dataclass(frozen=True)
class SplitCounts:
    """Rows and sizes per split and discipline: what the shard count and the manifest need."""

    num_rows: int                                # rows exported, both splits
    num_dropped: int                             # rows without a question or an answer
    rows: dict[str, int]                         # per split
    key_ranges: dict[str, int]                   # per split: the key range is cut into this many shards
    per_discipline: dict[str, dict[str, Any]]    # discipline -> {"field", "train", "test"}
    short: dict[str, int]                        # disciplines with fewer held-out pairs than the quota


def count_splits(rows: DataFrame, cfg: ExportConfig) -> SplitCounts:
    """Counts and text bytes per split, field and discipline (a small collect: one row each)."""
    text_bytes = sum(
        F.coalesce(F.octet_length(F.col(name)), F.lit(0)) for name in EXPORT_COLUMNS
    ) + F.coalesce(F.octet_length("question") + F.octet_length("answer"), F.lit(0))  # `messages`
    counts = (
        rows.groupBy("_split", "field", "discipline")
        .agg(F.count(F.lit(1)).alias("num_rows"), F.sum(text_bytes).alias("num_bytes"))
        .collect()
    )
    dropped = sum(r["num_rows"] for r in counts if r["_split"] == "dropped")
    counts = [r for r in counts if r["_split"] != "dropped"]
    split_rows_n = {s: sum(r["num_rows"] for r in counts if r["_split"] == s) for s in SPLITS}
    split_bytes = {s: sum(r["num_bytes"] or 0 for r in counts if r["_split"] == s) for s in SPLITS}
    per_discipline: dict[str, dict[str, Any]] = {}
    for r in counts:
        entry = per_discipline.setdefault(r["discipline"], {"field": r["field"], "train": 0, "test": 0})
        entry[r["_split"]] += r["num_rows"]
    return SplitCounts(
        num_rows=sum(r["num_rows"] for r in counts),
        num_dropped=dropped,
        rows=split_rows_n,
        key_ranges={s: num_shards_for(split_bytes[s], cfg.shard_size_mb, split_rows_n[s]) for s in SPLITS},
        per_discipline=per_discipline,
        short={d: c["test"] for d, c in sorted(per_discipline.items()) if c["test"] < cfg.heldout_per_discipline},
    )


def _log_counts(counts: SplitCounts, cfg: ExportConfig, seed: int) -> None:
    if counts.num_dropped:
        log.warning("export: %d rows without a question or an answer were left out", counts.num_dropped)
    log.info("export: %d rows in (%d train, %d held out), %s shards, seed %d",
             counts.num_rows, counts.rows["train"], counts.rows["test"], counts.key_ranges, seed)
    if counts.short:
        log.warning("export: %d disciplines have fewer than %d held-out pairs: %s",
                    len(counts.short), cfg.heldout_per_discipline,
                    ", ".join(f"{d}={n}" for d, n in list(counts.short.items())[:20]))


def write_shards(rows: DataFrame, cfg: ExportConfig, output: str, key_ranges: dict[str, int]) -> list[dict[str, Any]]:
    """One task per (split, shard) writes its file; the files' rows, sizes and checksums, in order."""
    shard_expr = F.lit(0).cast("long")
    for split in SPLITS:
        if key_ranges[split]:
            shard_expr = F.when(F.col("_split") == split,
                                _shard_column("_key", key_ranges[split])).otherwise(shard_expr)
    written = (
        rows.filter(F.col("_split") != "dropped")
        .withColumn("_shard", shard_expr)
        .groupBy("_split", "_shard")
        .applyInPandas(_shard_writer(output, cfg), SHARD_RESULT_SCHEMA)
        .collect()
    )
    return sorted((r.asDict() for r in written), key=lambda r: (SPLITS.index(r["split"]), r["shard"]))


def build_manifest(cfg: ExportConfig, seed: int, counts: SplitCounts, shards: list[dict[str, Any]],
                   run_config: dict[str, Any] | None) -> dict[str, Any]:
    """manifest.json: counts per split, discipline and shard, checksums, schema, config, versions."""
    per_discipline = counts.per_discipline
    return {
        "format": "glan-export/1",
        "seed": seed,
        "order": "xxhash64(seed, id) ascending, then id; shards in name order",
        "num_rows": counts.num_rows,
        "num_dropped": counts.num_dropped,
        # num_key_ranges: the key range is cut into this many slices; an empty slice writes no file.
        "splits": {s: {"num_rows": counts.rows[s], "num_shards": sum(1 for x in shards if x["split"] == s),
                       "num_key_ranges": counts.key_ranges[s],
                       "files": [x["path"] for x in shards if x["split"] == s]} for s in SPLITS},
        "shards": shards,
        "heldout": {"per_discipline": cfg.heldout_per_discipline,
                    "max_fraction": cfg.heldout_max_fraction,
                    "short_disciplines": counts.short},
        "counts": {d: per_discipline[d] for d in sorted(per_discipline)},
        "schema": {"fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable}
                              for f in SHARD_SCHEMA]},
        "config": {"export": dataclasses.asdict(cfg), "run": run_config},
        "packages": _package_versions(),
    }


def build_export(instructions: DataFrame, cfg: ExportConfig, output: str, seed: int | None = None, *,
                 overwrite: bool = False, run_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the shards, manifest and card for `instructions` under `output`; return the manifest.

    `seed` overrides `cfg.seed`. `run_config` (the whole run's config) is stored in the manifest.
    """
    seed = cfg.seed if seed is None else seed
    started = time.monotonic()
    _prepare_output(output, overwrite)
    rows = split_rows(key_rows(instructions, seed), cfg)
    counts = count_splits(rows, cfg)                                   # phase 1: counts and sizes
    _log_counts(counts, cfg, seed)
    shards = write_shards(rows, cfg, output, counts.key_ranges) if counts.num_rows else []  # phase 2
    manifest = build_manifest(cfg, seed, counts, shards, run_config)
    _write_bytes(output, "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    _write_bytes(output, "counts.png", render_chart(manifest))
    _write_bytes(output, "README.md", render_card(manifest).encode())
    log.info("export: %d files written to %s in %.1fs", len(shards), output, time.monotonic() - started)
    return manifest


# ---------------------------------------------------------------------------------------------
# The dataset card


def _field_counts(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    fields: dict[str, dict[str, int]] = {}
    for entry in manifest["counts"].values():
        slot = fields.setdefault(entry["field"] or "(none)", {"train": 0, "test": 0})
        slot["train"] += entry["train"]
        slot["test"] += entry["test"]
    return dict(sorted(fields.items()))


def render_chart(manifest: dict[str, Any]) -> bytes:
    """Pairs per field (stacked train/test) and the spread of pairs per discipline, as PNG."""
    # heavy and optional (a dev extra): matplotlib loads only to draw the chart
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), which must come first: no display

    fields = _field_counts(manifest)
    names = list(fields) or ["(empty)"]
    train = [fields[n]["train"] for n in fields] or [0]
    test = [fields[n]["test"] for n in fields] or [0]
    per_discipline = [c["train"] + c["test"] for c in manifest["counts"].values()] or [0]

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.barh(names, train, label="train")
    left.barh(names, test, left=train, label="test (GLAN-Test)")
    left.set_xlabel("pairs")
    left.set_title("Pairs per field")
    left.legend(loc="lower right")
    left.invert_yaxis()
    right.hist(per_discipline, bins=min(30, max(1, len(per_discipline))))
    right.set_xlabel("pairs per discipline")
    right.set_ylabel("disciplines")
    right.set_title(f"{len(manifest['counts'])} disciplines")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def render_card(manifest: dict[str, Any]) -> str:
    splits = manifest["splits"]
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: data/train-*.parquet",
        "  - split: test",
        "    path: data/test-*.parquet",
        "---",
        "",
        "# GLAN instruction-tuning data",
        "",
        "Synthetic instruction/answer pairs generated with GLAN (a taxonomy of human knowledge, "
        "subjects, syllabi, class sessions and key concepts, then questions and answers), "
        "decontaminated against the evaluation benchmarks.",
        "",
        f"- rows: {manifest['num_rows']:,} ({splits['train']['num_rows']:,} train in "
        f"{splits['train']['num_shards']} shards, {splits['test']['num_rows']:,} test in "
        f"{splits['test']['num_shards']} shards)",
        f"- test split (GLAN-Test): up to {manifest['heldout']['per_discipline']} pairs per discipline",
        f"- order: {manifest['order']}; seed {manifest['seed']}",
        "- columns: " + ", ".join(f"`{f['name']}` ({f['type']})" for f in manifest["schema"]["fields"]),
        "",
        "Load with `datasets.load_dataset(\"parquet\", data_files={\"train\": \"data/train-*.parquet\", "
        "\"test\": \"data/test-*.parquet\"})`. Checksums of every shard are in `manifest.json`.",
        "",
        "![pairs per field](counts.png)",
        "",
    ]
    short = manifest["heldout"]["short_disciplines"]
    if short:
        lines += [f"{len(short)} disciplines have fewer than {manifest['heldout']['per_discipline']} "
                  "test pairs (their rows were too few): "
                  + ", ".join(f"{d} ({n})" for d, n in short.items()), ""]
    lines += ["## Pairs per field", "", "| field | train | test |", "|---|---:|---:|"]
    lines += [f"| {name} | {c['train']:,} | {c['test']:,} |" for name, c in _field_counts(manifest).items()]
    lines += ["", "## Pairs per discipline", "", "| field | discipline | train | test |", "|---|---|---:|---:|"]
    lines += [f"| {c['field']} | {d} | {c['train']:,} | {c['test']:,} |"
              for d, c in sorted(manifest["counts"].items(), key=lambda kv: (str(kv[1]["field"]), str(kv[0])))]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="glan export", description=__doc__.split("\n")[0])
    add_config_args(parser)
    parser.add_argument("--output", required=True, help="directory or URI for shards, manifest and card")
    parser.add_argument("--shard-size-mb", type=float, help="target shard size (export.shard_size_mb)")
    parser.add_argument("--heldout-per-discipline", type=int,
                        help="GLAN-Test pairs per discipline (export.heldout_per_discipline)")
    parser.add_argument("--seed", type=int, help="shuffle seed (export.seed)")
    parser.add_argument("--version", type=int, help="read this version of the instructions table")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in --output")
    return parser.parse_args(argv)


def export_config(cfg: ExportConfig, args: argparse.Namespace) -> ExportConfig:
    """The `export:` section with the flags given on the command line applied over it."""
    overrides = {name: value for name, value in (
        ("shard_size_mb", args.shard_size_mb),
        ("heldout_per_discipline", args.heldout_per_discipline),
        ("seed", args.seed),
    ) if value is not None}
    try:
        return dataclasses.replace(cfg, **overrides)
    except ValueError as exc:
        raise ConfigError(f"--{str(exc).split('=')[0].replace('_', '-')}: {exc}") from None


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    """Read `instructions` (at `--version` if given) and export it as `args` say; the manifest."""
    cfg = config_from_args(args)
    export_cfg = export_config(cfg.export, args)
    spark = get_spark("export", master=cfg.spark.master, shuffle_partitions=cfg.spark.shuffle_partitions,
                      run_root=cfg.run_root, extra_conf=cfg.spark.conf)
    instructions = read_table(spark, "instructions", cfg, version=args.version)
    run_config = cfg.to_dict()
    run_config["export"] = dataclasses.asdict(export_cfg)
    run_config["sources"] = list(cfg.sources)
    return build_export(instructions, export_cfg, args.output, export_cfg.seed,
                        overwrite=args.overwrite, run_config=run_config)


def main(argv: list[str] | None = None) -> int:
    """`glan export ...` and `spark-submit jobs/export.py ...`: 0, or one line on stderr and an
    exit code of jobs/errors.py (under `glan export` the line is printed once, here)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)

    def export() -> int:
        run_export(args)
        return EXIT_OK

    return run_guarded(export, argv)


if __name__ == "__main__":
    sys.exit(main())
