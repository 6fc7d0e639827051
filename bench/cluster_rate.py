"""One rate budget for the cluster (issue 16.3): a skewed stage under a requests-per-minute budget,
with the static split and with the rate coordinator, side by side.

    .venv/bin/python bench/cluster_rate.py [--rpm 360] [--long 2x120] [--short 10x6] [--workers 2] [--cores 2]
    .venv/bin/python bench/cluster_rate.py --master 'local[4]'      # without the local cluster

The stage's first partitions (`--long`: count x rows) hold most rows, the rest (`--short`) a few;
the budget is the bottleneck. The test server runs in its own process with a server-side limit equal
to the budget (at most rpm/6 requests per 10 seconds, as a provider quantises its per-minute limit;
429 beyond it) and injects `--inject-429` of its own. The stage runs on the local standalone
cluster of scripts/local_cluster.py (`--workers` workers of `--cores` cores: workers x cores tasks at
once), submitted once per mode, or in this process on `--master local[N]`. Per mode: requests per
minute achieved over the whole stage (requests answered 200 over the seconds from the server's first
request to its last) over the budget (target with the coordinator: >= 0.9), the worst 10-second
window the server saw, and the 429s: injected, and beyond the budget (target: none).
Last line: `budget_use=<the coordinator's achieved requests per minute over the budget>`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql.types import LongType  # noqa: E402

from bench.llm_throughput import server_stats, start_server, stop_server  # noqa: E402
from jobs.spark.session import get_spark  # noqa: E402
from udfs.llm.config import LLMConfig, StageLLMConfig  # noqa: E402
from udfs.llm.prompts import load_prompt  # noqa: E402
from udfs.llm_udf import concurrent_tasks, llm_udf, rate_coordinator  # noqa: E402

PROMPT = load_prompt("echo_topic", REPO / "tests" / "prompts_llm")
STAGE = StageLLMConfig(model="bench", max_tokens=1024)  # the server's free text is never cut
MODES = ("static", "coordinator")


def sizes_of(long: str, short: str) -> list[int]:
    """Partition sizes from 'COUNTxROWS' specs, long partitions first (Spark starts them first)."""
    sizes = []
    for spec in (long, short):
        count, rows = (int(x) for x in spec.lower().split("x"))
        sizes += [rows] * count
    return sizes


# -- one stage (the driver: in this process, or the app spark-submit runs) --------------------------


def skewed(spark, sizes: list[int]):
    rows = spark.sparkContext.parallelize(range(len(sizes)), len(sizes)).flatMap(
        lambda part: [(part, i, f"[p{part}-{i}] rate bench") for i in range(sizes[part])])
    return spark.createDataFrame(rows, "part INT, row INT, topic STRING")


@F.pandas_udf(LongType())
def _warm(ids: pd.Series) -> pd.Series:
    import udfs.llm.client  # noqa: F401, PLC0415 - the import the LLM tasks pay first, paid before the clock runs

    return ids


def warm_up(spark, tasks: int) -> None:
    """Start the executors' Python workers (and their imports) before the timed stage."""
    spark.range(0, tasks * 4, numPartitions=tasks).select(_warm("id")).collect()


def run_stage(spark, url: str, mode: str, rpm: int, sizes: list[int], in_flight: int) -> dict:
    llm = LLMConfig(base_url=url, api_key_env="GLAN_BENCH_NO_KEY", max_in_flight_per_task=in_flight,
                    requests_per_minute=rpm, rate_coordinator=mode == "coordinator", timeout_s=30.0,
                    max_attempts=10, backoff_initial_s=0.5, backoff_max_s=10.0)
    df = skewed(spark, sizes)
    tasks = concurrent_tasks(df)
    warm_up(spark, tasks)
    coordinator_stats = None
    with rate_coordinator(spark, llm, "bench") as coordinator:
        ask = llm_udf(PROMPT, llm, STAGE, concurrent_tasks=tasks, coordinator=coordinator)
        started = time.monotonic()
        rows = df.select(ask("topic").alias("r")).select("r.error_class", "r.attempts").collect()
        seconds = time.monotonic() - started
        if coordinator is not None:
            with urllib.request.urlopen(f"{coordinator}/stats", timeout=10) as response:
                coordinator_stats = json.load(response)
    return {"mode": mode, "rows": len(rows), "failed": sum(1 for r in rows if r["error_class"]),
            "concurrent_tasks": tasks, "stage_s": seconds, "coordinator": coordinator_stats}


# -- the test server -----------------------------------------------------------------------------------


def figures(stats: dict, rpm: int) -> dict:
    """What the server saw: requests answered 200 per minute from its first request to its last,
    over the budget; the worst 10 consecutive seconds; 429s injected and beyond the budget."""
    per_second = {int(k): v for k, v in stats["per_second"].items()}
    first, last = min(per_second), max(per_second)
    span_s = last - first + 1  # whole seconds, both ends counted: never flatters the rate
    ok = stats["by_status"].get("200", 0)
    worst = max(sum(per_second.get(s + i, 0) for i in range(10)) for s in range(first, last + 1))
    return {"span_s": span_s, "ok": ok, "achieved_rpm": ok / span_s * 60.0, "budget_use": ok / span_s * 60.0 / rpm,
            "worst_10s": worst, "injected_429": stats["by_fault"].get("429", 0),
            "beyond_budget_429": stats["by_fault"].get("rate_limit", 0)}


# -- both modes ------------------------------------------------------------------------------------------


def stage_args(args: argparse.Namespace, mode: str, url: str) -> list[str]:
    return ["--run", mode, "--url", url, "--rpm", str(args.rpm), "--long", args.long, "--short", args.short,
            "--in-flight", str(args.in_flight)]


def on_cluster(args: argparse.Namespace, mode: str, url: str, cluster) -> dict:
    done = cluster.submit([str(Path(__file__).resolve()), *stage_args(args, mode, url)], cwd=REPO, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {mode} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def measure(args: argparse.Namespace, run) -> dict[str, dict]:
    """Each mode against a fresh test server: the stage's own figures and the server's."""
    results = {}
    for mode in MODES:
        server, url = start_server("--latency-ms", f"{args.latency_ms:g}", "--rate-limit-rpm", str(args.rpm),
                                   "--rate-limit-window-s", "10", "--rate-429", f"{args.inject_429:g}",
                                   "--retry-after", "1", "--seed", "16")
        try:
            result = run(mode, url)
            result.update(figures(server_stats(url), args.rpm))
        finally:
            stop_server(server)
        results[mode] = result
        print(f"{mode}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return results


def report(args: argparse.Namespace, results: dict[str, dict], where: str) -> None:
    sizes = sizes_of(args.long, args.short)
    print(f"skewed stage on {where}: {len(sizes)} partitions, {sum(sizes)} rows (long {args.long}, short "
          f"{args.short}); budget {args.rpm} requests/minute ({args.rpm / 6:g} per 10 s), enforced by the server; "
          f"{args.inject_429:.0%} 429s injected; latency {args.latency_ms:g} ms")
    print(f"{'mode':<12} {'tasks':>5} {'rows ok':>8} {'stage s':>8} {'span s':>7} {'req/min':>8} {'of budget':>9} "
          f"{'worst 10s':>9} {'429 injected':>12} {'429 beyond':>10}")
    for mode, r in results.items():
        print(f"{mode:<12} {r['concurrent_tasks']:>5} {r['rows'] - r['failed']:>8} {r['stage_s']:>8.1f} "
              f"{r['span_s']:>7} {r['achieved_rpm']:>8.1f} {r['budget_use']:>9.3f} {r['worst_10s']:>9} "
              f"{r['injected_429']:>12} {r['beyond_budget_429']:>10}")
    stats = results["coordinator"]["coordinator"] or {}
    print(f"coordinator: granted {stats.get('granted_requests')} requests, {stats.get('returned_requests', 0)} "
          f"handed back, {stats.get('overloads', 0)} 429s reported, window halved {stats.get('decreases')} times "
          f"(now {stats.get('window')}); targets: budget use >= 0.9, no 429 beyond the injected ones")
    print(f"budget_use={results['coordinator']['budget_use']:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rpm", type=int, default=360, help="the cluster-wide budget, and the server's limit")
    parser.add_argument("--long", default="2x120", help="COUNTxROWS: the partitions that hold most rows")
    parser.add_argument("--short", default="10x6", help="COUNTxROWS: the rest")
    parser.add_argument("--in-flight", type=int, default=8, help="llm.max_in_flight_per_task")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--inject-429", type=float, default=0.02, help="429s the server injects (not the limit's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="per worker")
    parser.add_argument("--master", default=None, help="e.g. local[4]: run in this process instead of the cluster")
    parser.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)  # the submitted app: one stage
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = sizes_of(args.long, args.short)
    if args.run:
        spark = get_spark("bench-cluster-rate", master=args.master)
        print("RESULT " + json.dumps(run_stage(spark, args.url, args.run, args.rpm, sizes, args.in_flight)), flush=True)
        return
    if args.master:
        spark = get_spark("bench-cluster-rate", master=args.master, shuffle_partitions=len(sizes))
        results = measure(args, lambda mode, url: run_stage(spark, url, mode, args.rpm, sizes, args.in_flight))
        report(args, results, args.master)
        return
    from scripts.local_cluster import LocalCluster  # noqa: PLC0415 - the cluster only when it is asked for

    with tempfile.TemporaryDirectory(prefix="glan-cluster-rate-") as folder:
        with LocalCluster(Path(folder), workers=args.workers, cores_per_worker=args.cores) as cluster:
            results = measure(args, lambda mode, url: on_cluster(args, mode, url, cluster))
    report(args, results, f"a local cluster of {args.workers} workers x {args.cores} cores")


if __name__ == "__main__":
    main()
