"""Embedded Delta backend vs Spark's own Parquet writer, side by side in one run.

1M rows x (id, 500-character text): `append_missing` into a new table through the embedded backend
(Spark tasks write Parquet with pyarrow, delta-rs commits) and plain `df.write.parquet`, each
timed after a warm-up, alternating, best of N. Prints the ratio of wall times last.
Run: python bench/storage.py [--rows 1000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from jobs.config.loader import load_config
from jobs.spark.session import get_spark
from jobs.storage.delta import get_storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="glan-bench-storage-"))
    cfg = load_config([], [f"run_root={root / 'run'}", "storage.backend=embedded"])
    spark = get_spark("bench-storage", run_root=cfg.run_root, shuffle_partitions=args.partitions)
    storage = get_storage(spark, cfg)
    # 500 characters of hex from four salted SHA-512s: realistic entropy, not a repeated literal.
    text = F.substring(F.concat(*[F.sha2(F.concat(F.col("id").cast("string"), F.lit(s)), 512)
                                  for s in ("a", "b", "c", "d")]), 1, 500)
    source = spark.range(args.rows, numPartitions=args.partitions).select(
        F.format_string("id-%09d", "id").alias("id"), text.alias("text"))
    data = source.cache()
    print(f"rows={data.count()} partitions={args.partitions}")  # materialise outside the timings

    def spark_parquet(i: int) -> float:
        out = root / f"parquet-{i}"
        t0 = time.perf_counter()
        data.write.parquet(str(out))
        return time.perf_counter() - t0

    def embedded_append(i: int) -> float:
        t0 = time.perf_counter()
        result = storage.append_missing(data, f"bench_{i}", "id")
        elapsed = time.perf_counter() - t0
        assert result.rows_written == args.rows, result
        return elapsed

    spark_parquet(-1), embedded_append(-1)  # warm-up: JIT, Python workers
    plain, embedded = [], []
    for i in range(args.repeats):
        plain.append(spark_parquet(i))
        embedded.append(embedded_append(i))
    print(f"spark_write_parquet_s={min(plain):.2f} (runs: {', '.join(f'{t:.2f}' for t in plain)})")
    print(f"embedded_append_missing_s={min(embedded):.2f} (runs: {', '.join(f'{t:.2f}' for t in embedded)})")
    spark.stop()
    shutil.rmtree(root, ignore_errors=True)
    print(f"ratio={min(embedded) / min(plain):.2f}")


if __name__ == "__main__":
    main()
