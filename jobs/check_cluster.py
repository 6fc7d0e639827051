"""Check that a cluster can run glan-spark: the driver and every executor import the package and
its dependencies, the storage backend is chosen, and (on a cluster, not in local mode) the executors
see the run root, reach a loopback or embedded LLM endpoint and have the API key's variable, as
every stage checks before it starts (jobs/spark/cluster.py). Prints one JSON line per check.
Run: spark-submit --py-files dist/glan_spark-<version>-pyfiles.zip jobs/check_cluster.py --conf conf/emr.yaml
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.cli.args import add_config_args, config_from_args
from jobs.pipeline.stage import stages
from jobs.spark.cluster import executor_problems, is_local_master
from jobs.spark.session import get_spark
from jobs.storage.delta import get_storage


def _executor_report(_: int) -> str:
    # Imported on the executor, in the UDF, on purpose: this is the check that they import there.
    import jobs  # noqa: PLC0415
    import udfs  # noqa: PLC0415

    found = {}
    for module in ("pyarrow", "pandas", "openai", "tenacity", "jinja2", "jsonschema", "yaml", "datasketch"):
        try:
            found[module] = getattr(importlib.import_module(module), "__version__", "ok")
        except ImportError as exc:
            found[module] = f"MISSING: {exc}"
    return json.dumps({"jobs": jobs.__file__, "udfs": udfs.__file__, "python": sys.executable, "deps": found})


def main(argv: list[str] | None = None) -> int:
    args = add_config_args(argparse.ArgumentParser(description="check a cluster for glan-spark")).parse_args(argv)
    cfg = config_from_args(args)
    spark = get_spark("glan-check", run_root=cfg.run_root)
    report = F.udf(_executor_report, T.StringType())
    tasks = max(2, spark.sparkContext.defaultParallelism)
    rows = spark.range(tasks).repartition(tasks).select(report("id").alias("r")).distinct().collect()
    print(json.dumps({"check": "driver", "master": spark.sparkContext.master,
                      "storage": get_storage(spark, cfg).backend}))
    for row in rows:
        print(json.dumps({"check": "executor", **json.loads(row["r"])}))
    missing = [r for r in rows if "MISSING" in r["r"]]
    problems = [] if is_local_master(spark.sparkContext.master) else executor_problems(spark, cfg, stages())
    for problem in problems:
        print(json.dumps({"check": "cluster", "problem": problem}))
    return 1 if missing or problems else 0


if __name__ == "__main__":
    sys.exit(main())
