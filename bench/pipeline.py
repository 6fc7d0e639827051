"""The whole GLAN pipeline against the loopback test server (latency 0), about 2,000 answers.

Prints seconds per stage and answers per second overall; the last line is `answers_per_s=<x>`.
The test server runs in its own process so that it does not share the driver's GIL.
Run: python bench/pipeline.py [--disciplines 4] [--questions-per-syllabus 16]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.config.loader import load_config
from jobs.pipeline.stage import StageContext, stages
from jobs.spark.session import get_spark
from jobs.storage.delta import get_storage
from jobs.glan.taxonomy import load_taxonomy


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli.main", "fake-llm", "--port", "0", "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"fake-llm did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[-1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disciplines", type=int, default=4)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--subjects-per-sample", type=int, default=5)
    parser.add_argument("--questions-per-syllabus", type=int, default=20)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="glan-bench-pipeline-"))
    server, url = start_server()
    try:
        cfg = load_config([], [f"run_root={root / 'run'}", "storage.backend=embedded", "llm.endpoint=openai",
                               f"llm.base_url={url}", "llm.max_in_flight_per_task=32",
                               f"subjects.samples_per_discipline={args.samples}",
                               f"subjects.max_subjects_per_sample={args.subjects_per_sample}",
                               "syllabus.max_sessions=6", "syllabus.max_concepts_per_session=5",
                               f"combinations.questions_per_syllabus={args.questions_per_syllabus}"])
        names = [row.discipline for row in load_taxonomy(cfg.taxonomy.path()).disciplines()[: args.disciplines]]
        spark = get_spark("bench-pipeline", run_root=cfg.run_root, shuffle_partitions=4)
        spark.range(4).count()  # start the executors outside the timings
        seconds = {}
        started = time.perf_counter()
        for stage in stages():
            t0 = time.perf_counter()
            stage.run(StageContext(stage.name, spark, cfg, names))
            seconds[stage.name] = time.perf_counter() - t0
        total = time.perf_counter() - started
        storage = get_storage(spark, cfg)
        counts = {t: storage.read_or_empty(t).count() for t in
                  ("subjects", "syllabi", "sessions", "concept_combinations", "questions", "answers", "failures")}
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name, value in seconds.items():
        print(f"stage_{name}_s={value:.1f}")
    print("rows: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"total_s={total:.1f} (disciplines={args.disciplines}: {', '.join(names)})")
    shutil.rmtree(root, ignore_errors=True)
    print(f"answers_per_s={counts['answers'] / total:.1f}")


if __name__ == "__main__":
    main()
