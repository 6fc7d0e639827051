"""LLM layer throughput: 5,000 requests through a real Spark stage against the test server.

    .venv/bin/python bench/llm_throughput.py [--rows 5000] [--tasks 2] [--in-flight 32] [--latency-ms 200]

(a) Spark requests/s over the ideal (tasks * in_flight) / latency;
(b) the same Spark run over a plain asyncio + openai loop with the same requests in flight, no Spark;
(c) with 10% 429 (Retry-After 1 s) and 5% 500 injected: rows completed, duplicates, requests per row.

The test server runs in its own process so its CPU does not share the driver's GIL. The Spark
Python workers are warmed up (imports, first connection) on a small batch before the timed run, as
they would be a few seconds into a real stage. Last line: `throughput_ratio=<a>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyspark.sql import functions as F  # noqa: E402

from jobs.spark.session import get_spark  # noqa: E402
from udfs.llm.config import LLMConfig, StageLLMConfig  # noqa: E402
from udfs.llm_udf import llm_udf  # noqa: E402
from udfs.llm.prompts import load_prompt  # noqa: E402

PROMPT = load_prompt("echo_topic", REPO / "tests" / "prompts_llm")
STAGE = StageLLMConfig(model="bench", max_tokens=1024)


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "udfs.servers.fake_llm", "--port", "0", "--no-record", *flags],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    line = process.stdout.readline()
    if not line.startswith("fake-llm listening on "):
        raise RuntimeError(f"fake server did not start: {line!r}")
    return process, line.split()[-1]


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(10)


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as response:
        return json.load(response)


def spark_run(spark, url: str, rows: int, tasks: int, in_flight: int, prefix: str) -> tuple[float, list]:
    llm = LLMConfig(base_url=url, api_key_env="GLAN_BENCH_NO_KEY", max_in_flight_per_task=in_flight,
                    timeout_s=30.0, max_attempts=8, backoff_initial_s=0.5, backoff_max_s=10.0)
    ask = llm_udf(PROMPT, llm, STAGE, concurrent_tasks=tasks)
    df = spark.range(0, rows, numPartitions=tasks).select(
        "id", F.concat(F.lit(prefix), F.col("id").cast("string")).alias("topic")
    )
    out = df.select("id", ask("topic").alias("r")).select("id", "r.error_class", "r.attempts")
    started = time.monotonic()
    collected = out.collect()
    return time.monotonic() - started, collected


async def plain_loop(url: str, rows: int, in_flight: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="sk-no-key-required", max_retries=0, timeout=30.0)
    sem = asyncio.Semaphore(in_flight)

    async def one(i: int) -> None:
        async with sem:
            await client.chat.completions.create(
                model=STAGE.model, messages=PROMPT.render(topic=f"plain {i}"), temperature=STAGE.temperature,
                top_p=STAGE.top_p, max_tokens=STAGE.max_tokens, extra_headers={"X-Glan-Call": PROMPT.name},
            )

    await asyncio.gather(*(one(i) for i in range(64)))  # warm the connection pool, as Spark's run was
    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(rows)))
    elapsed = time.monotonic() - started
    await client.close()
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=32, help="per task")
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--fault-rows", type=int, default=None, help="rows for (c); default --rows")
    args = parser.parse_args(argv)
    total_in_flight = args.tasks * args.in_flight
    ideal_rps = total_in_flight / (args.latency_ms / 1000.0)

    spark = get_spark("bench-llm", master=f"local[{args.tasks}]", shuffle_partitions=args.tasks)
    server, url = start_server("--latency-ms", f"{args.latency_ms:g}")
    try:
        spark_run(spark, url, total_in_flight * 2, args.tasks, args.in_flight, "warm ")
        spark_seconds, rows = spark_run(spark, url, args.rows, args.tasks, args.in_flight, "topic ")
        failed = sum(1 for r in rows if r["error_class"])
        spark_rps = args.rows / spark_seconds
        plain_seconds = asyncio.run(plain_loop(url, args.rows, total_in_flight))
        plain_rps = args.rows / plain_seconds
    finally:
        stop_server(server)
    ratio_ideal = spark_rps / ideal_rps
    ratio_plain = spark_rps / plain_rps
    print(f"(a) spark: {args.rows} rows in {spark_seconds:.2f} s = {spark_rps:.1f} req/s; ideal "
          f"{total_in_flight}/{args.latency_ms / 1000:g}s = {ideal_rps:.0f} req/s; ratio {ratio_ideal:.3f} "
          f"(target >= 0.9); failed rows {failed}")
    print(f"(b) plain asyncio+openai, {total_in_flight} in flight: {plain_rps:.1f} req/s; "
          f"spark/plain {ratio_plain:.3f} (target >= 0.9)")

    fault_rows = args.fault_rows or args.rows
    server, url = start_server("--latency-ms", f"{args.latency_ms:g}", "--rate-429", "0.1",
                               "--retry-after", "1", "--rate-500", "0.05", "--seed", "11")
    try:
        seconds, rows = spark_run(spark, url, fault_rows, args.tasks, args.in_flight, "fault ")
        stats = server_stats(url)
    finally:
        stop_server(server)
    ids = [r["id"] for r in rows]
    completed = sum(1 for r in rows if r["error_class"] is None)
    duplicates = len(ids) - len(set(ids))
    print(f"(c) 10% 429 (Retry-After 1 s) + 5% 500: {completed}/{fault_rows} rows completed, "
          f"{duplicates} duplicate rows, {stats['repeated_ok']} repeated successful answers at the server, "
          f"{stats['total'] / fault_rows:.3f} requests per row ({stats['by_status']}), {seconds:.1f} s")
    print(f"throughput_ratio={ratio_ideal:.3f}")


if __name__ == "__main__":
    main()
