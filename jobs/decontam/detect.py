"""Decontamination (GLAN step 6). Reads the generated pairs and `benchmark_items`, writes
`contamination` and `instructions` (the clean pairs), and logs a report per benchmark.

The benchmark side is hashed in parallel and collected once to the driver (`BenchmarkIndex`); its
n-gram hashes and band keys go to every task as two `textsim.HashSet`s. One mapInArrow pass over
the texts hashes all windows and MinHash bands of a batch at once and lets out only the rows that
hit; the few benchmark rows they hit are joined to them, broadcast:
- exact word n-gram overlap (13-grams; whole items of 8..12 words): hit windows join the
  (n-gram -> item) rows;
- MinHash LSH over word n-grams (datasketch's affine32 signatures): hit band keys join the
  (band key -> item) rows; every candidate is confirmed by exact Jaccard or containment.
Optionally near-identical generated questions are clustered (LSH candidates, exact Jaccard,
connected components by min-label propagation) and all but the smallest id of a cluster dropped.

The pipeline's stage is jobs/decontaminate.py; the standalone command on any dataset is
jobs/decontam/files.py (`glan decontaminate --input PATH ...`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from jobs.config.decontam import DecontamConfig, MinHashConfig, NearDupConfig, NgramConfig
from jobs.decontam import textsim
from jobs.decontam.fetch import ensure_benchmark_files
from jobs.decontam.registry import (BenchmarkCoverage, benchmark_rows, load_registry, resolve_benchmarks_dir,
                                    resolve_file)
from jobs.errors import InputError
from jobs.spark.session import arrow_filesystem

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
    T.StructField("pair_id", T.StringType()), T.StructField("field", T.StringType()),
    T.StructField("text", T.StringType()),
    T.StructField("grams", T.ArrayType(T.LongType())),
    T.StructField("gram_pos", T.ArrayType(T.IntegerType())),
    T.StructField("bands", T.ArrayType(T.LongType())),
])
_SIMILARITY = T.StructType([
    T.StructField("jaccard", T.DoubleType()), T.StructField("containment", T.DoubleType()),
])


# ---------------------------------------------------------------------------------------------
# Benchmark items


def _benchmark_table(spark: SparkSession, cfg: DecontamConfig) -> pa.Table:
    """The rows of `benchmark_items`, read on the driver from the benchmarks folder (fetched into
    the user-level cache first when that is the folder and it lacks files)."""
    specs = load_registry(cfg.registry, cfg.benchmarks)
    folder = ensure_benchmark_files(specs, cfg.benchmarks_dir)
    rows = []
    for spec in specs:
        rows.extend(benchmark_rows(spec, folder, spark))
    columns = list(zip(*rows)) if rows else [[] for _ in BENCHMARK_ITEMS_SCHEMA.fields]
    return pa.table([pa.array(column, pa.string()) for column in columns],
                    names=[f.name for f in BENCHMARK_ITEMS_SCHEMA.fields])


def build_benchmark_items(spark: SparkSession, cfg: DecontamConfig) -> DataFrame:
    """`benchmark_items` (benchmark, split, item_id, text) of the registry's benchmarks (all, or
    `cfg.benchmarks`), read from the benchmarks folder, as a DataFrame of local data (tests, bench:
    Spark carries the rows inside its tasks; the jobs use `staged_benchmark_items`)."""
    return spark.createDataFrame(_benchmark_table(spark, cfg).to_pandas(), BENCHMARK_ITEMS_SCHEMA)


@contextmanager
def staged_benchmark_items(spark: SparkSession, cfg: DecontamConfig, scratch: str) -> Iterator[DataFrame]:
    """`benchmark_items` read by Spark from a Parquet file the driver writes under `scratch` (a
    folder the executors can read), removed on exit. Handing Spark the rows themselves would ship
    them inside its tasks: 26 MB for the default benchmarks, and a warning on every run."""
    table = _benchmark_table(spark, cfg)  # first: missing benchmarks leave no folder behind
    fs, root = arrow_filesystem(scratch)
    name = f"benchmark_items-{uuid.uuid4().hex[:12]}.parquet"
    fs.create_dir(root, recursive=True)
    pq.write_table(table, f"{root}/{name}", filesystem=fs, compression="zstd")
    try:
        yield spark.read.schema(BENCHMARK_ITEMS_SCHEMA).parquet(f"{scratch.rstrip('/')}/{name}")
    finally:
        fs.delete_file(f"{root}/{name}")


@F.pandas_udf(T.IntegerType())
def _num_words_udf(texts: pd.Series) -> pd.Series:
    lengths, _, _ = textsim.flatten_words(texts)
    return pd.Series(lengths, dtype="int32")


def benchmark_coverage(items: DataFrame, cfg: DecontamConfig) -> list[BenchmarkCoverage]:
    """What each benchmark asked for (`cfg.benchmarks`, else every one of the registry) contributed
    to `items`, in registry order: its items per split and those without a word to check. One
    that contributed nothing is listed too, with zero items: the report warns about it."""
    specs = load_registry(cfg.registry, cfg.benchmarks)
    folder, _ = resolve_benchmarks_dir(cfg.benchmarks_dir)
    counts = (items.withColumn("_no_words", (_num_words_udf("text") == 0).cast("int"))
              .groupBy("benchmark", "split")
              .agg(F.count(F.lit(1)).alias("num_items"), F.sum("_no_words").alias("num_without_words"))
              .collect())
    by_name: dict[str, list] = {}
    for row in counts:
        by_name.setdefault(row["benchmark"], []).append(row)
    out = []
    for spec in specs:
        order = {split: i for i, split in enumerate(spec.splits)}
        rows = sorted(by_name.get(spec.name, []), key=lambda r: (order.get(r["split"], len(order)), r["split"]))
        out.append(BenchmarkCoverage(spec, resolve_file(spec, folder),
                                     items=tuple((r["split"], r["num_items"]) for r in rows),
                                     without_words=tuple((r["split"], r["num_without_words"]) for r in rows
                                                         if r["num_without_words"])))
    return out


# ---------------------------------------------------------------------------------------------
# Hashing UDFs (vectorised per Arrow batch)


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
    wins = textsim.window_hashes(lengths, wh, [ng.n], whole=range(ng.min_words, ng.n))
    parts_row = [wins[k][0] for k in _gram_sizes(ng)]
    parts_hash = [wins[k][2] for k in _gram_sizes(ng)]
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


def text_hits(texts: pa.Array | pd.Series, ng: NgramConfig, mh: MinHashConfig, gram_set: textsim.HashSet,
              band_set: textsim.HashSet) -> tuple[np.ndarray, pa.Array, pa.Array, pa.Array]:
    """The generated texts that hit the benchmark side: (their indexes in `texts`, and for each
    of them as Arrow lists: the window hashes that are benchmark n-grams, those windows' word
    positions, and the band keys that some benchmark item shares)."""
    lengths, wh, _ = textsim.flatten_words(texts)
    num = len(lengths)
    empty = np.zeros(0, dtype=np.int64)
    g_rows, g_pos, g_hash = empty, empty, empty
    b_rows, b_keys = empty, empty
    if ng.enabled:
        wins = textsim.window_hashes(lengths, wh, _gram_sizes(ng))
        rows = np.concatenate([w[0] for w in wins.values()])
        hashes = np.concatenate([w[2] for w in wins.values()]).view(np.int64)
        hit = np.nonzero(gram_set.contains(hashes))[0]
        pos = np.concatenate([w[1] for w in wins.values()])[hit]
        order = np.argsort(rows[hit], kind="stable")
        g_rows, g_pos, g_hash = rows[hit][order], pos[order], hashes[hit][order]
    if mh.enabled:
        bands, r = mh.bands_rows()
        keys = _band_matrix(lengths, wh, mh.ngram, mh.num_perm, mh.seed, bands, r)
        mask = band_set.contains(keys.ravel()).reshape(keys.shape) & (lengths > 0)[:, None]
        b_rows, b_keys = np.nonzero(mask)[0], keys[mask]          # row-major: grouped by text
    hit_rows = np.union1d(g_rows, b_rows).astype(np.int64)

    def lists(rows: np.ndarray, values: np.ndarray, kind: pa.DataType) -> pa.Array:
        counts = np.bincount(rows, minlength=num)[hit_rows] if num else empty
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, kind))

    return (hit_rows, lists(g_rows, g_hash, pa.int64()), lists(g_rows, g_pos.astype(np.int32), pa.int32()),
            lists(b_rows, b_keys, pa.int64()))


def _item_features_udf(ng: NgramConfig, mh: MinHashConfig):
    @F.pandas_udf(_ITEM_FEATURES)
    def features(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        for texts in batches:
            yield item_features(texts, ng, mh)
    return features


def _text_hits_fn(ng: NgramConfig, mh: MinHashConfig, gram_bc, band_bc):
    """mapInArrow over (pair_id, field, text): only the rows that hit come out, with their hits."""
    def hits(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        gram_set, band_set = gram_bc.value, band_bc.value  # loaded once per task
        for batch in batches:
            rows, grams, gram_pos, bands = text_hits(batch.column("text"), ng, mh, gram_set, band_set)
            take = pa.array(rows, pa.int64())
            yield pa.RecordBatch.from_arrays(
                [batch.column(c).take(take) for c in ("pair_id", "field", "text")] + [grams, gram_pos, bands],
                names=["pair_id", "field", "text", "grams", "gram_pos", "bands"])
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


def _flat_longs(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """All values of a list<bigint> column of a (combined) Arrow table, and the row of each."""
    if table.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lists = table.column(column).chunk(0)
    keys = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    return keys, rows


class BenchmarkIndex:
    """The benchmark side, collected once to the driver: every (n-gram hash, item) and (band key,
    item) of the items, as numpy arrays, with the item's benchmark, item_id, n-gram count and text;
    and the hash sets the text side tests its windows and band keys against."""

    def __init__(self, table: pa.Table, ng: NgramConfig, mh: MinHashConfig) -> None:
        table = table.combine_chunks()
        self.meta = table.select(["benchmark", "item_id", "num_grams", "text"])
        self.gram_keys, self.gram_rows = _flat_longs(table, "grams")
        self.band_keys, self.band_rows = _flat_longs(table, "bands")
        self.gram_set = textsim.HashSet(self.gram_keys if ng.enabled else [])
        self.band_set = textsim.HashSet(self.band_keys if mh.enabled else [])

    def rows_of(self, spark: SparkSession, name: str, hit: np.ndarray, *, text: bool = False) -> DataFrame:
        """A small DataFrame (name, item_key = the item's row here, benchmark, item_id, num_grams
        [, item_text]) of the benchmark rows whose key is in `hit` (the keys some text hit)."""
        keys, rows = (self.gram_keys, self.gram_rows) if name == "gram" else (self.band_keys, self.band_rows)
        keep = textsim.HashSet(hit).contains(keys)
        keys, rows = keys[keep], rows[keep]
        meta = self.meta.take(pa.array(rows, pa.int64()))
        frame = pd.DataFrame({name: keys, "item_key": rows,
                              "benchmark": meta.column("benchmark").to_pandas(),
                              "item_id": meta.column("item_id").to_pandas(),
                              "num_grams": meta.column("num_grams").to_numpy(zero_copy_only=False)})
        fields = [T.StructField(name, T.LongType()), T.StructField("item_key", T.LongType()),
                  T.StructField("benchmark", T.StringType()), T.StructField("item_id", T.StringType()),
                  T.StructField("num_grams", T.IntegerType())]
        if text:
            frame["item_text"] = meta.column("text").to_pandas()
            fields.append(T.StructField("item_text", T.StringType()))
        return spark.createDataFrame(frame, T.StructType(fields))


def detect(pairs: DataFrame, items: DataFrame, cfg: DecontamConfig, *, id_col: str | None = None,
           text_cols: Sequence[str] | None = None) -> DataFrame:
    """Contamination rows (pair_id, field, benchmark, item_id, detector, score, excerpt) of the
    pairs' text columns against the benchmark items; one row per (pair, field, item, detector)."""
    spark = pairs.sparkSession
    ng, mh = cfg.ngram, cfg.minhash
    started = time.monotonic()
    texts = pair_texts(pairs, id_col or cfg.id_field, list(text_cols or cfg.text_fields))
    index = _benchmark_index(items, ng, mh)
    indexed = time.monotonic()
    hits = _hit_texts(texts, index, ng, mh)
    # Only the benchmark rows whose key some text hit take part in the joins, broadcast.
    hit_table = hits.select("grams", "bands").toArrow().combine_chunks()
    found = []
    if ng.enabled:
        hit_grams, _ = _flat_longs(hit_table, "grams")
        found.append(_ngram_matches(hits, index.rows_of(spark, "gram", hit_grams), cfg))
    if mh.enabled:
        hit_bands, _ = _flat_longs(hit_table, "bands")
        found.append(_minhash_matches(hits, index.rows_of(spark, "band", hit_bands, text=True), cfg))
    out = found[0]
    for part in found[1:]:
        out = out.unionByName(part)
    log.info("detect: %d benchmark n-grams, %d band keys broadcast (%.1fs), %d texts hit (%.1fs)",
             len(index.gram_set), len(index.band_set), indexed - started, hit_table.num_rows,
             time.monotonic() - indexed)
    return out.select(*CONTAMINATION_COLUMNS)


def _benchmark_index(items: DataFrame, ng: NgramConfig, mh: MinHashConfig) -> BenchmarkIndex:
    """The benchmark side, hashed in parallel and collected once to the driver."""
    feats = (items.withColumn("_f", _item_features_udf(ng, mh)("text"))
             .select("benchmark", "item_id", "text", "_f.grams", "_f.num_grams", "_f.bands"))
    return BenchmarkIndex(feats.toArrow(), ng, mh)


def _hit_texts(texts: DataFrame, index: BenchmarkIndex, ng: NgramConfig, mh: MinHashConfig) -> DataFrame:
    """One pass over the texts, the index's hash sets broadcast to every task; only the (few) rows
    that hit come out of it, cached: both detectors read them."""
    sc = texts.sparkSession.sparkContext
    gram_bc, band_bc = sc.broadcast(index.gram_set), sc.broadcast(index.band_set)
    return texts.mapInArrow(_text_hits_fn(ng, mh, gram_bc, band_bc), _TEXT_HITS).cache()


def _ngram_matches(hits: DataFrame, item_grams: DataFrame, cfg: DecontamConfig) -> DataFrame:
    """The `ngram` detector: hit windows joined to the benchmark (n-gram, item) rows they hit; an
    item matched by at least `min_matches` distinct n-grams of a text scores the share of its own
    n-grams matched."""
    ng = cfg.ngram
    gram_hits = hits.select("pair_id", "field", "text",
                            F.explode(F.arrays_zip("grams", "gram_pos")).alias("_g"))
    gram_hits = gram_hits.select("pair_id", "field", "text", F.col("_g.grams").alias("gram"),
                                 F.col("_g.gram_pos").alias("pos"))
    matched = (gram_hits.join(F.broadcast(item_grams.select("gram", "item_key")), on="gram", how="inner")
               .groupBy("pair_id", "field", "item_key")
               .agg(F.countDistinct("gram").alias("matches"), F.min("pos").alias("pos"),
                    F.first("text").alias("text"))
               .filter(F.col("matches") >= ng.min_matches)
               .join(F.broadcast(item_grams.select("item_key", "benchmark", "item_id", "num_grams")
                                 .dropDuplicates(["item_key"])), on="item_key", how="inner"))
    scored = matched.select(
        "pair_id", "field", "benchmark", "item_id", "text", "pos", F.lit("ngram").alias("detector"),
        F.least(F.lit(1.0), F.col("matches") / F.greatest(F.col("num_grams"), F.lit(1))).alias("score"))
    return _best(scored, cfg.max_items_per_pair).select(
        *CONTAMINATION_COLUMNS[:-1],
        _excerpt_udf("text", "pos", F.lit(ng.n), F.lit(cfg.excerpt_chars)).alias("excerpt"))


def _minhash_matches(hits: DataFrame, item_bands: DataFrame, cfg: DecontamConfig) -> DataFrame:
    """The `minhash` detector: texts and items that share a band key are candidates, confirmed by
    exact Jaccard or containment of their shingle sets; the score is the larger of the two."""
    mh = cfg.minhash
    band_hits = hits.select("pair_id", "field", "text", F.explode("bands").alias("band"))
    candidates = (band_hits.join(F.broadcast(item_bands.select("band", "item_key")), on="band", how="inner")
                  .select("pair_id", "field", "text", "item_key")
                  .dropDuplicates(["pair_id", "field", "item_key"])
                  .join(F.broadcast(item_bands.drop("band").dropDuplicates(["item_key"])),
                        on="item_key", how="inner"))
    confirmed = (candidates.withColumn("_s", _similarity_udf(mh.ngram)("text", "item_text"))
                 .filter((F.col("_s.jaccard") >= mh.threshold)
                         | (F.col("_s.containment") >= mh.containment_threshold)))
    scored = confirmed.select(
        "pair_id", "field", "benchmark", "item_id", "text", F.lit("minhash").alias("detector"),
        F.greatest("_s.jaccard", "_s.containment").alias("score"))
    return _best(scored, cfg.max_items_per_pair).select(
        *CONTAMINATION_COLUMNS[:-1],
        _excerpt_udf("text", F.lit(None).cast("int"), F.lit(0), F.lit(cfg.excerpt_chars)).alias("excerpt"))


def _best(scored: DataFrame, limit: int) -> DataFrame:
    """At most `limit` items per (pair, field, benchmark, detector): the best scores, ties to the
    smallest item_id, so templated benchmarks (BBH) do not list thousands of sibling items."""
    rank = Window.partitionBy("pair_id", "field", "benchmark", "detector").orderBy(
        F.col("score").desc(), F.col("item_id").asc())
    return scored.withColumn("_rank", F.row_number().over(rank)).filter(F.col("_rank") <= limit).drop("_rank")


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


def format_report(report: DataFrame, num_in: int, num_out: int,
                  coverage: Sequence[BenchmarkCoverage] = ()) -> str:
    """The report as text: pairs in and out; a line per benchmark of `coverage` (every one asked
    for, zeros included: its items, the pairs it removed, in all and by detector, and its items per
    split), then the report's other rows (`self`: near-duplicates); last a `WARNING: ...` line for
    each benchmark that contributed less than was asked (see BenchmarkCoverage.warnings)."""
    removed = {row["benchmark"]: row for row in report.collect()}
    lines = [f"pairs in: {num_in}, clean: {num_out}, removed: {num_in - num_out}",
             f"{'benchmark':<24}{'items':>9}{'removed':>9}{'ngram':>9}{'minhash':>9}{'near_dup':>9}  splits"]

    def line(name: str, items: str, splits: str) -> str:
        row = removed.get(name)
        counts = [row[c] if row else 0 for c in ("num_pairs", "num_pairs_ngram", "num_pairs_minhash",
                                                 "num_pairs_near_duplicate")]
        return f"{name:<24}{items:>9}" + "".join(f"{n:>9}" for n in counts) + (f"  {splits}" if splits else "")

    listed = {cov.spec.name for cov in coverage}
    lines += [line(cov.spec.name, str(cov.num_items), cov.splits_text()) for cov in coverage]
    lines += [line(name, "-", "") for name in removed if name not in listed]
    lines += [f"WARNING: {message}" for cov in coverage for message in cov.warnings()]
    return "\n".join(lines)
