"""Decontamination (GLAN step 6). Reads the generated pairs and `benchmark_items`, writes
`contamination` and `instructions` (the clean pairs), and logs a report per benchmark.

Two detectors, both hash joins with the benchmark side broadcast:
- exact word n-gram overlap (13-grams; whole items of 8..12 words): every benchmark n-gram hash is
  broadcast as a sorted array; a pandas UDF hashes all windows of a batch of texts at once and keeps
  the few that hit; those join the broadcast (n-gram -> item) table;
- MinHash LSH over word n-grams (datasketch's affine32 signatures): band keys of the texts join the
  broadcast (band key -> item) table; every candidate is confirmed by exact Jaccard or containment.
Optionally near-identical generated questions are clustered (LSH candidates, exact Jaccard,
connected components by min-label propagation) and all but the smallest id of a cluster dropped.

Run: spark-submit jobs/decontaminate.py --conf conf/local.yaml
Standalone: glan decontaminate --input PATH --text-fields a,b --output DIR [--benchmarks NAMES]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from jobs.common import textsim
from jobs.common.benchmarks import benchmark_rows, load_registry
from jobs.common.decontam_config import DecontamConfig, MinHashConfig, NearDupConfig, NgramConfig
from jobs.common.errors import InputError

log = logging.getLogger(__name__)

BENCHMARK_ITEMS_SCHEMA = T.StructType([
    T.StructField("benchmark", T.StringType()), T.StructField("split", T.StringType()),
    T.StructField("item_id", T.StringType()), T.StructField("text", T.StringType()),
])
CONTAMINATION_COLUMNS = ("pair_id", "field", "benchmark", "item_id", "detector", "score", "excerpt")
SELF = "self"  # the `benchmark` of near-duplicate rows: the generated data itself

_ITEM_FEATURES = T.StructType([
    T.StructField("grams", T.ArrayType(T.LongType())),
    T.StructField("num_grams", T.IntegerType()),
    T.StructField("bands", T.ArrayType(T.LongType())),
])
_TEXT_HITS = T.StructType([
    T.StructField("grams", T.ArrayType(T.LongType())),
    T.StructField("gram_pos", T.ArrayType(T.IntegerType())),
    T.StructField("bands", T.ArrayType(T.LongType())),
])
_SIMILARITY = T.StructType([
    T.StructField("jaccard", T.DoubleType()), T.StructField("containment", T.DoubleType()),
])


# ---------------------------------------------------------------------------------------------
# Benchmark items


def build_benchmark_items(spark: SparkSession, cfg: DecontamConfig) -> DataFrame:
    """`benchmark_items` (benchmark, split, item_id, text) of the registry's benchmarks (all, or
    `cfg.benchmarks`), read from `cfg.benchmarks_dir`."""
    rows = []
    for spec in load_registry(cfg.registry, cfg.benchmarks):
        rows.extend(benchmark_rows(spec, cfg.benchmarks_dir, spark))
    frame = pd.DataFrame(rows, columns=[f.name for f in BENCHMARK_ITEMS_SCHEMA.fields])
    return spark.createDataFrame(frame, BENCHMARK_ITEMS_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Hashing UDFs (vectorised per Arrow batch)


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if len(sorted_set) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    idx = np.searchsorted(sorted_set, values)
    idx[idx == len(sorted_set)] = 0
    return sorted_set[idx] == values


def _split_by_row(row: np.ndarray, values: np.ndarray, num_rows: int) -> list[np.ndarray]:
    """values grouped by their (sorted) row index, one array per row (empty where none)."""
    bounds = np.searchsorted(row, np.arange(num_rows + 1))
    return [values[bounds[i]:bounds[i + 1]] for i in range(num_rows)]


def _gram_sizes(ng: NgramConfig) -> list[int]:
    return list(range(ng.min_words, ng.n + 1))


def _band_matrix(lengths: np.ndarray, wh: np.ndarray, ngram: int, num_perm: int, seed: int,
                 bands: int, rows: int) -> np.ndarray:
    row, hv = textsim.shingle_hashes_batch(lengths, wh, ngram)
    sig = textsim.minhash_signatures(row, hv, len(lengths), num_perm, seed)
    return textsim.band_keys(sig, bands, rows)


def item_features(texts: pd.Series, ng: NgramConfig, mh: MinHashConfig) -> pd.DataFrame:
    """Per benchmark item: its n-gram hashes (or its whole text as one gram when it has
    min_words..n-1 words), their number, and its MinHash band keys."""
    lengths, wh, _ = textsim.flatten_words(texts)
    num = len(lengths)
    wins = textsim.window_hashes(lengths, wh, _gram_sizes(ng))
    parts_row, parts_hash = [wins[ng.n][0]], [wins[ng.n][2]]
    for k in range(ng.min_words, ng.n):
        t, p, h = wins[k]
        whole = (lengths[t] == k) & (p == 0)
        parts_row.append(t[whole])
        parts_hash.append(h[whole])
    row = np.concatenate(parts_row)
    grams = np.concatenate(parts_hash).view(np.int64)
    order = np.lexsort((grams, row))
    row, grams = row[order], grams[order]
    keep = np.ones(len(row), dtype=bool)
    keep[1:] = (row[1:] != row[:-1]) | (grams[1:] != grams[:-1])
    per_row = _split_by_row(row[keep], grams[keep], num)
    bands, rows = mh.bands_rows()
    keys = _band_matrix(lengths, wh, mh.ngram, mh.num_perm, mh.seed, bands, rows)
    return pd.DataFrame({
        "grams": per_row,
        "num_grams": [len(g) for g in per_row],
        "bands": [keys[i] if lengths[i] else keys[i][:0] for i in range(num)],
    })


def text_hits(texts: pd.Series, ng: NgramConfig, mh: MinHashConfig, gram_set: np.ndarray,
              band_set: np.ndarray) -> pd.DataFrame:
    """Per generated text: the window hashes (and their word positions) that are benchmark
    n-grams, and the band keys that some benchmark item shares."""
    lengths, wh, _ = textsim.flatten_words(texts)
    num = len(lengths)
    if ng.enabled:
        wins = textsim.window_hashes(lengths, wh, _gram_sizes(ng))
        rows = np.concatenate([w[0] for w in wins.values()])
        pos = np.concatenate([w[1] for w in wins.values()])
        hashes = np.concatenate([w[2] for w in wins.values()]).view(np.int64)
        hit = _in_sorted(hashes, gram_set)
        rows, pos, hashes = rows[hit], pos[hit], hashes[hit]
        order = np.argsort(rows, kind="stable")
        gram_hits = _split_by_row(rows[order], hashes[order], num)
        pos_hits = _split_by_row(rows[order], pos[order].astype(np.int32), num)
    else:
        gram_hits = pos_hits = [np.zeros(0, dtype=np.int64)] * num
    if mh.enabled:
        bands, r = mh.bands_rows()
        keys = _band_matrix(lengths, wh, mh.ngram, mh.num_perm, mh.seed, bands, r)
        mask = _in_sorted(keys.ravel(), band_set).reshape(keys.shape) & (lengths > 0)[:, None]
        band_hits = [keys[i][mask[i]] for i in range(num)]
    else:
        band_hits = [np.zeros(0, dtype=np.int64)] * num
    return pd.DataFrame({"grams": gram_hits, "gram_pos": pos_hits, "bands": band_hits})


def _item_features_udf(ng: NgramConfig, mh: MinHashConfig):
    @F.pandas_udf(_ITEM_FEATURES)
    def features(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        for texts in batches:
            yield item_features(texts, ng, mh)
    return features


def _text_hits_udf(ng: NgramConfig, mh: MinHashConfig, gram_bc, band_bc):
    @F.pandas_udf(_TEXT_HITS)
    def hits(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        gram_set, band_set = gram_bc.value, band_bc.value  # loaded once per task
        for texts in batches:
            yield text_hits(texts, ng, mh, gram_set, band_set)
    return hits


def _similarity_udf(ngram: int):
    """Exact Jaccard of two texts' shingle sets, and the containment of the second in the first."""
    @F.pandas_udf(_SIMILARITY)
    def similarity(texts: pd.Series, others: pd.Series) -> pd.DataFrame:
        out = [textsim.jaccard_sorted(textsim.ngram_hashes(o, ngram), textsim.ngram_hashes(t, ngram))
               for t, o in zip(texts, others)]
        return pd.DataFrame(out, columns=["jaccard", "containment"])
    return similarity


def _near_dup_bands_udf(nd: NearDupConfig):
    bands, rows = textsim.optimal_bands_rows(nd.threshold, nd.num_perm)

    @F.pandas_udf(T.ArrayType(T.LongType()))
    def band_udf(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for texts in batches:
            lengths, wh, _ = textsim.flatten_words(texts)
            keys = _band_matrix(lengths, wh, nd.ngram, nd.num_perm, nd.seed, bands, rows)
            yield pd.Series([keys[i] if lengths[i] else keys[i][:0] for i in range(len(lengths))])
    return band_udf


@F.pandas_udf(T.StringType())
def _excerpt_udf(texts: pd.Series, positions: pd.Series, sizes: pd.Series, chars: pd.Series) -> pd.Series:
    """The matched words (normalised) for n-gram hits; the text's start for MinHash matches."""
    out = []
    for text, pos, size, limit in zip(texts, positions, sizes, chars):
        if pos is None or pd.isna(pos):
            out.append(" ".join((text or "").split())[: int(limit)])
        else:
            out.append(" ".join(textsim.words(text)[int(pos): int(pos) + int(size)])[: int(limit)])
    return pd.Series(out)


# ---------------------------------------------------------------------------------------------
# Detectors


def pair_texts(pairs: DataFrame, id_col: str, text_cols: Sequence[str]) -> DataFrame:
    """One row per (pair, checked field): pair_id, field, text."""
    missing = [c for c in (id_col, *text_cols) if c not in pairs.columns]
    if missing:
        raise InputError(f"input has no column(s) {', '.join(missing)}; it has {', '.join(pairs.columns)}")
    parts = [pairs.select(F.col(id_col).cast("string").alias("pair_id"), F.lit(c).alias("field"),
                          F.col(c).cast("string").alias("text"))
             for c in text_cols]
    out = parts[0]
    for part in parts[1:]:
        out = out.unionByName(part)
    return out


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    return np.unique(values.astype(np.int64))


def detect(pairs: DataFrame, items: DataFrame, cfg: DecontamConfig, *, id_col: str | None = None,
           text_cols: Sequence[str] | None = None) -> DataFrame:
    """Contamination rows (pair_id, field, benchmark, item_id, detector, score, excerpt) of the
    pairs' text columns against the benchmark items; one row per (pair, field, item, detector)."""
    spark = pairs.sparkSession
    id_col = id_col or cfg.id_field
    text_cols = list(text_cols or cfg.text_fields)
    ng, mh = cfg.ngram, cfg.minhash
    started = time.monotonic()

    keyed = items.select("benchmark", "item_id", "text",
                         F.xxhash64("benchmark", "item_id").alias("item_key"))
    feats = (keyed.withColumn("_f", _item_features_udf(ng, mh)("text"))
             .select("item_key", "benchmark", "item_id", "text", "_f.grams", "_f.num_grams", "_f.bands")
             .cache())
    item_grams = feats.select("item_key", F.explode("grams").alias("gram")) if ng.enabled else None
    item_bands = feats.select("item_key", F.explode("bands").alias("band")) if mh.enabled else None
    # The benchmark's hash sets, sorted, go to every task once; texts keep only what hits them.
    gram_set = _collect_longs(item_grams, "gram") if ng.enabled else np.zeros(0, np.int64)
    band_set = _collect_longs(item_bands, "band") if mh.enabled else np.zeros(0, np.int64)
    sc = spark.sparkContext
    gram_bc, band_bc = sc.broadcast(gram_set), sc.broadcast(band_set)
    meta = feats.select("item_key", "benchmark", "item_id", "num_grams")

    texts = pair_texts(pairs, id_col, text_cols)
    hits = (texts.withColumn("_h", _text_hits_udf(ng, mh, gram_bc, band_bc)("text"))
            .filter((F.size("_h.grams") > 0) | (F.size("_h.bands") > 0))
            .select("pair_id", "field", "text", "_h.grams", "_h.gram_pos", "_h.bands")
            .cache())

    found = []
    if ng.enabled:
        gram_hits = hits.select("pair_id", "field", "text",
                                F.explode(F.arrays_zip("grams", "gram_pos")).alias("_g"))
        gram_hits = gram_hits.select("pair_id", "field", "text", F.col("_g.grams").alias("gram"),
                                     F.col("_g.gram_pos").alias("pos"))
        matched = (gram_hits.join(F.broadcast(_hit_rows(item_grams, gram_hits, "gram")), on="gram", how="inner")
                   .groupBy("pair_id", "field", "item_key")
                   .agg(F.countDistinct("gram").alias("matches"), F.min("pos").alias("pos"),
                        F.first("text").alias("text"))
                   .filter(F.col("matches") >= ng.min_matches)
                   .join(F.broadcast(meta), on="item_key", how="inner"))
        scored = matched.select(
            "pair_id", "field", "benchmark", "item_id", "text", "pos", F.lit("ngram").alias("detector"),
            F.least(F.lit(1.0), F.col("matches") / F.greatest(F.col("num_grams"), F.lit(1))).alias("score"))
        found.append(_best(scored, cfg.max_items_per_pair).select(
            *CONTAMINATION_COLUMNS[:-1],
            _excerpt_udf("text", "pos", F.lit(ng.n), F.lit(cfg.excerpt_chars)).alias("excerpt")))
    if mh.enabled:
        item_text = feats.select("item_key", F.col("text").alias("item_text"))
        band_hits = hits.select("pair_id", "field", "text", F.explode("bands").alias("band"))
        candidates = (band_hits.join(F.broadcast(_hit_rows(item_bands, band_hits, "band")), on="band", how="inner")
                      .select("pair_id", "field", "text", "item_key")
                      .dropDuplicates(["pair_id", "field", "item_key"])
                      .join(F.broadcast(item_text), on="item_key", how="inner"))
        confirmed = (candidates.withColumn("_s", _similarity_udf(mh.ngram)("text", "item_text"))
                     .filter((F.col("_s.jaccard") >= mh.threshold)
                             | (F.col("_s.containment") >= mh.containment_threshold))
                     .join(F.broadcast(meta), on="item_key", how="inner"))
        scored = confirmed.select(
            "pair_id", "field", "benchmark", "item_id", "text", F.lit("minhash").alias("detector"),
            F.greatest("_s.jaccard", "_s.containment").alias("score"))
        found.append(_best(scored, cfg.max_items_per_pair).select(
            *CONTAMINATION_COLUMNS[:-1],
            _excerpt_udf("text", F.lit(None).cast("int"), F.lit(0), F.lit(cfg.excerpt_chars)).alias("excerpt")))
    out = found[0]
    for part in found[1:]:
        out = out.unionByName(part)
    log.info("detect: %d benchmark n-grams, %d band keys broadcast (%.1fs)", len(gram_set),
             len(band_set), time.monotonic() - started)
    return out.select(*CONTAMINATION_COLUMNS)


def _hit_rows(item_side: DataFrame, hits: DataFrame, key: str) -> DataFrame:
    """The rows of a benchmark hash table whose hash some text hit: the (small) distinct hit set
    is broadcast into a semi-join over the cached benchmark table, and the result is what the
    texts' hits join in turn, broadcast."""
    return item_side.join(F.broadcast(hits.select(key).distinct()), on=key, how="left_semi")


def _best(scored: DataFrame, limit: int) -> DataFrame:
    """At most `limit` items per (pair, field, benchmark, detector): the best scores, ties to the
    smallest item_id, so templated benchmarks (BBH) do not list thousands of sibling items."""
    rank = Window.partitionBy("pair_id", "field", "benchmark", "detector").orderBy(
        F.col("score").desc(), F.col("item_id").asc())
    return scored.withColumn("_rank", F.row_number().over(rank)).filter(F.col("_rank") <= limit).drop("_rank")


def _collect_longs(df: DataFrame, column: str) -> np.ndarray:
    frame = df.select(column).toPandas()
    return _sorted_unique(frame[column].to_numpy())


# ---------------------------------------------------------------------------------------------
# Near-duplicates inside the generated data


def near_duplicates(pairs: DataFrame, cfg: DecontamConfig, *, id_col: str | None = None) -> DataFrame:
    """Contamination rows for near-identical generated texts (`near_dup.field`): clusters are the
    connected components of LSH candidates confirmed by exact Jaccard; the smallest pair_id of a
    cluster is kept, every other member is a row with benchmark 'self', item_id = the kept id."""
    nd = cfg.near_dup
    id_col = id_col or cfg.id_field
    texts = pair_texts(pairs, id_col, [nd.field]).select("pair_id", "text")
    keyed = texts.withColumn("band", F.explode(_near_dup_bands_udf(nd)("text")))
    left = keyed.select("band", F.col("pair_id").alias("a"))
    right = keyed.select("band", F.col("pair_id").alias("b"))
    candidates = (left.join(right, on="band", how="inner")
                  .filter(F.col("a") < F.col("b"))
                  .select("a", "b").distinct())
    text_a = texts.select(F.col("pair_id").alias("a"), F.col("text").alias("text_a"))
    text_b = texts.select(F.col("pair_id").alias("b"), F.col("text").alias("text_b"))
    edges = (candidates.join(text_a, on="a", how="inner").join(text_b, on="b", how="inner")
             .withColumn("_s", _similarity_udf(nd.ngram)("text_a", "text_b"))
             .filter(F.col("_s.jaccard") >= nd.threshold)
             .select("a", "b", F.col("_s.jaccard").alias("jaccard"))
             .localCheckpoint())
    labels = connected_components(edges.select("a", "b"), nd.max_iterations)
    best = (edges.select(F.col("a").alias("node"), "jaccard")
            .unionByName(edges.select(F.col("b").alias("node"), "jaccard"))
            .groupBy("node").agg(F.max("jaccard").alias("score")))
    dropped = labels.filter(F.col("label") != F.col("node")).join(best, on="node", how="inner")
    return (dropped.join(texts.withColumnRenamed("pair_id", "node"), on="node", how="inner")
            .select(F.col("node").alias("pair_id"), F.lit(nd.field).alias("field"),
                    F.lit(SELF).alias("benchmark"), F.col("label").alias("item_id"),
                    F.lit("near_duplicate").alias("detector"), "score",
                    _excerpt_udf("text", F.lit(None).cast("int"), F.lit(0),
                                 F.lit(cfg.excerpt_chars)).alias("excerpt")))


def connected_components(edges: DataFrame, max_iterations: int = 50) -> DataFrame:
    """(node, label) for every node of an undirected edge list (a, b): label = the smallest node
    of its component, by min-label propagation (deterministic whatever the partitioning)."""
    both = (edges.select(F.col("a").alias("src"), F.col("b").alias("dst"))
            .unionByName(edges.select(F.col("b").alias("src"), F.col("a").alias("dst")))
            .localCheckpoint())
    labels = (both.groupBy(F.col("src").alias("node"))
              .agg(F.least(F.col("src"), F.min("dst")).alias("label"))
              .localCheckpoint())
    for _ in range(max_iterations):
        spread = (both.join(labels.withColumnRenamed("node", "dst"), on="dst", how="inner")
                  .groupBy(F.col("src").alias("node")).agg(F.min("label").alias("_nb")))
        updated = (labels.join(spread, on="node", how="left")
                   .select("node", F.least("label", F.coalesce("_nb", "label")).alias("label"),
                           (F.col("_nb") < F.col("label")).alias("_changed"))
                   .localCheckpoint())
        labels = updated.select("node", "label")
        if updated.filter(F.col("_changed")).limit(1).count() == 0:
            return labels
    raise RuntimeError(f"connected components did not converge in {max_iterations} rounds "
                       f"(decontam.near_dup.max_iterations)")


# ---------------------------------------------------------------------------------------------
# The whole step


def decontaminate(pairs: DataFrame, items: DataFrame, cfg: DecontamConfig, *, id_col: str | None = None,
                  text_cols: Sequence[str] | None = None, near_dup: bool | None = None
                  ) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(instructions, contamination, report). instructions: the pairs with no contamination row,
    all their columns kept. report: per benchmark, the pairs removed in all and by detector."""
    id_col = id_col or cfg.id_field
    contamination = detect(pairs, items, cfg, id_col=id_col, text_cols=text_cols)
    if cfg.near_dup.enabled if near_dup is None else near_dup:
        contamination = contamination.unionByName(near_duplicates(pairs, cfg, id_col=id_col))
    contamination = contamination.localCheckpoint()
    removed = contamination.select(F.col("pair_id").alias("_pair_id")).distinct()
    instructions = (pairs.join(removed, on=F.col(id_col).cast("string") == F.col("_pair_id"), how="left_anti"))
    return instructions, contamination, build_report(contamination)


def build_report(contamination: DataFrame) -> DataFrame:
    """Per benchmark: num_pairs (removed because of it) and num_pairs_<detector>."""
    def by(detector: str) -> Column:
        return F.countDistinct(F.when(F.col("detector") == detector, F.col("pair_id"))).alias(f"num_pairs_{detector}")
    return (contamination.groupBy("benchmark")
            .agg(F.countDistinct("pair_id").alias("num_pairs"), by("ngram"), by("minhash"), by("near_duplicate"))
            .orderBy("benchmark"))


def format_report(report: DataFrame, num_in: int, num_out: int) -> str:
    lines = [f"pairs in: {num_in}, clean: {num_out}, removed: {num_in - num_out}",
             f"{'benchmark':<24}{'removed':>9}{'ngram':>9}{'minhash':>9}{'near_dup':>9}"]
    for row in report.collect():
        lines.append(f"{row['benchmark']:<24}{row['num_pairs']:>9}{row['num_pairs_ngram']:>9}"
                     f"{row['num_pairs_minhash']:>9}{row['num_pairs_near_duplicate']:>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry points


def read_input(spark: SparkSession, path: str) -> DataFrame:
    """JSONL (optionally .gz), Parquet, or a Delta table folder (has _delta_log)."""
    lower = path.lower().rstrip("/")
    local = Path(path)
    if (local / "_delta_log").is_dir() or lower.endswith(".delta"):
        from deltalake import DeltaTable

        # delta-rs lists the current snapshot's files; Spark reads them without the Delta jars
        return spark.read.parquet(*DeltaTable(path).file_uris())
    if lower.endswith(".parquet") or (local.is_dir() and any(local.glob("*.parquet"))):
        return spark.read.parquet(path)
    if lower.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")) or local.is_dir():
        return spark.read.json(path)
    raise InputError(f"{path}: expected JSONL, Parquet or a Delta table")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`glan decontaminate` arguments (the caller adds --conf/--set)."""
    parser.add_argument("--input", required=True, help="JSONL, Parquet or Delta path of the data to clean")
    parser.add_argument("--text-fields", required=True, help="comma-separated columns to check, e.g. prompt,response")
    parser.add_argument("--output", required=True, help="folder for instructions/ and contamination/ (Parquet)")
    parser.add_argument("--benchmarks", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--id-field", default=None, help="column that identifies a row (default: a hash of the row)")
    parser.add_argument("--near-dup", action="store_true", help="also drop near-duplicate rows (off by default here)")
    return parser


def run(args: argparse.Namespace, cfg=None) -> str:
    """Standalone decontamination: writes <output>/instructions and <output>/contamination as
    Parquet and returns the report text (the CLI prints it)."""
    from jobs.common.jobargs import config_from_args
    from jobs.common.spark import get_spark

    cfg = cfg or config_from_args(args)
    dc = cfg.decontam
    names = tuple(n for n in args.benchmarks.split(",") if n) or dc.benchmarks
    fields = tuple(f.strip() for f in args.text_fields.split(",") if f.strip())
    dc = dataclasses.replace(dc, benchmarks=names, text_fields=fields)
    spark = get_spark("decontaminate", master=cfg.spark.master, shuffle_partitions=cfg.spark.shuffle_partitions,
                      run_root=args.output, extra_conf=cfg.spark.conf)
    data = read_input(spark, args.input)
    id_col = args.id_field
    if id_col is None:
        id_col = "_row_id"  # identical rows share an id, and a verdict
        data = data.withColumn(id_col, F.xxhash64(F.to_json(F.struct(*data.columns))).cast("string"))
    items = build_benchmark_items(spark, dc)
    instructions, contamination, report = decontaminate(data, items, dc, id_col=id_col, text_cols=fields,
                                                        near_dup=args.near_dup)
    if args.id_field is None:
        instructions = instructions.drop(id_col)
    out = args.output.rstrip("/")
    instructions.write.mode("overwrite").parquet(f"{out}/instructions")
    contamination.write.mode("overwrite").parquet(f"{out}/contamination")
    num_in = data.count()
    num_out = spark.read.parquet(f"{out}/instructions").count()
    return format_report(report, num_in, num_out)


def run_glan(spark: SparkSession, pairs: DataFrame, cfg) -> str:
    """The GLAN step: `pairs` has the id column (decontam.id_field), question, answer and more.
    Writes benchmark_items, contamination and instructions through the storage layer."""
    from jobs.common.storage import overwrite, read_table

    dc = cfg.decontam
    items = build_benchmark_items(spark, dc)
    overwrite(items, "benchmark_items", cfg)
    items = read_table(spark, "benchmark_items", cfg)
    instructions, contamination, report = decontaminate(pairs, items, dc)
    overwrite(contamination, "contamination", cfg)
    overwrite(instructions, "instructions", cfg)
    num_in = pairs.count()
    return format_report(report, num_in, read_table(spark, "instructions", cfg).count())


def main(argv: list[str] | None = None) -> None:
    """`glan decontaminate ...` (standalone). The GLAN run calls `run_glan` with its pairs."""
    from jobs.common.jobargs import add_config_args

    parser = add_config_args(add_arguments(argparse.ArgumentParser(prog="glan decontaminate")))
    print(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
