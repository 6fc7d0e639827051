"""On a cluster: the executors' view of the run root, the endpoint and the key (jobs/spark/cluster.py),
and the whole pipeline through spark-submit on a local standalone cluster whose workers have the
dependencies but not the project, including a worker killed in the middle of an LLM stage."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from jobs.config.loader import load_config
from jobs.pipeline.stage import stages
from jobs.spark.cluster import Probe, executor_view, is_local_master, probe_for, problems
from scripts.local_cluster import VENV, LocalCluster
from tests.support import SHARED
from tests.taxonomies import TWO_DISCIPLINES

pytest_plugins = ["tests.fake_llm_fixture", "tests.cluster_fixture"]

# -- the executors' view, without Spark ---------------------------------------------------------------


def test_an_executor_reports_what_it_sees_of_the_run_root_the_endpoint_and_the_key(tmp_path, monkeypatch):
    marker = tmp_path / "probe"
    marker.write_text("t0k3n")
    with socket.create_server(("127.0.0.1", 0)) as listening:
        url = f"http://127.0.0.1:{listening.getsockname()[1]}/v1"
        probe = Probe(str(marker), "t0k3n", (url, "http://127.0.0.1:9/v1"), "GLAN_PROBE_KEY", "driver-host")
        monkeypatch.delenv("GLAN_PROBE_KEY", raising=False)
        view = executor_view(probe)
    assert view["sees_run_root"] is True
    assert view["unreachable"] == ["http://127.0.0.1:9/v1"]  # nothing listens on port 9
    assert view["has_key"] is False
    monkeypatch.setenv("GLAN_PROBE_KEY", "sk-x")
    assert executor_view(Probe(str(tmp_path / "elsewhere"), "t0k3n", (), "GLAN_PROBE_KEY"))["sees_run_root"] is False
    assert executor_view(Probe(None, key_env="GLAN_PROBE_KEY"))["has_key"] is True
    embedded = executor_view(Probe(None, driver_host="another-machine", on_driver_host=True))
    assert embedded["unreachable"] == ["the loopback of another-machine"]


def test_each_broken_assumption_is_one_line_that_says_what_to_set():
    cfg = load_config([], ["run_root=/data/run", "llm.base_url=http://127.0.0.1:8000/v1"])
    ok = {"host": "n1", "sees_run_root": True, "unreachable": [], "has_key": None}
    probe = Probe("/data/run/_cluster/probe-x", "x", ("http://127.0.0.1:8000/v1",), "OPENAI_API_KEY", "driver")
    assert problems(cfg, probe, [ok, ok]) == []
    found = problems(cfg, probe, [ok, {"host": "n2", "sees_run_root": False, "unreachable": ["http://127.0.0.1:8000/v1"],
                                       "has_key": False}])
    assert len(found) == 3 and all("\n" not in line for line in found)
    root, endpoint, key = found
    assert "run_root /data/run is a local path" in root and "n2" in root and "s3://" in root
    assert "llm.base_url is a loopback address (http://127.0.0.1:8000/v1)" in endpoint and "llm.base_url" in endpoint
    assert "OPENAI_API_KEY (llm.api_key_env)" in key


def test_the_probe_asks_only_what_the_stages_need():
    llm_stages = [s for s in stages() if s.calls]
    no_llm = [s for s in stages() if not s.calls]
    local = load_config([], ["llm.base_url=http://127.0.0.1:8000/v1"])
    assert probe_for(local, llm_stages, None, "").endpoints == ("http://127.0.0.1:8000/v1",)
    assert probe_for(local, llm_stages, None, "").key_env is None  # a loopback server takes no key
    remote = load_config([], ["llm.base_url=https://api.example.com/v1"])
    assert probe_for(remote, llm_stages, None, "").key_env == "OPENAI_API_KEY"
    assert probe_for(remote, llm_stages, None, "").endpoints == ()
    assert probe_for(remote, no_llm, None, "").key_env is None
    embedded = load_config([], ["llm.endpoint=embedded"])
    assert probe_for(embedded, llm_stages, None, "").on_driver_host
    assert is_local_master("local[2]") and not is_local_master("spark://127.0.0.1:7077")


# -- the local cluster ------------------------------------------------------------------------------------

KEY_ENV = "GLAN_TEST_KEY"
# Tables made without LLM calls and what the kill test rebuilds; the rest are copied.
ANSWERS_AND_AFTER = ("answers", "benchmark_items", "contamination", "instructions")


@pytest.mark.slow
def test_the_workers_python_has_the_dependencies_but_not_the_project(local_cluster, tmp_path):
    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(local_cluster.worker_python), "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, env={"PATH": os.environ["PATH"]})

    assert run("import pyspark, pandas, pyarrow, openai, deltalake, datasketch, jinja2").returncode == 0
    for package in ("jobs", "udfs", "prompts"):
        missing = run(f"import {package}")
        assert missing.returncode != 0 and f"No module named '{package}'" in missing.stderr
    state = local_cluster.state()
    assert state["aliveworkers"] == 2 and all(w["host"] == "127.0.0.1" for w in state["workers"])


@pytest.mark.slow
def test_without_the_zip_a_stage_on_the_cluster_stops_at_once_with_one_line(local_cluster, tmp_path):
    sets = ["--set", f"run_root={tmp_path / 'run'}", "--set", "storage.backend=embedded"]
    command = local_cluster.submit_command(["jobs/combinations.py", *sets])
    del command[command.index("--py-files"):command.index("--py-files") + 2]
    bare = subprocess.run(command, env=local_cluster.submit_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert bare.returncode == 2
    errors = [line for line in bare.stdout.splitlines() if line.startswith("glan: error:")]
    assert errors == ["glan: error: the executors cannot import glan-spark (No module named 'jobs'): ship it with "
                      "spark-submit --py-files dist/glan_spark-<version>-pyfiles.zip (built by python -m "
                      "jobs.spark.package), or install the package on every node"]
    assert not [p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith("_")]  # no table written


@dataclass
class ClusterRun:
    root: Path  # the driver's working directory: a temp folder, not the repo
    conf: Path
    run_root: Path
    cluster_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    procs: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    served: dict = field(default_factory=dict)


def cluster_conf(root: Path, url: str) -> Path:
    """The small run of tests/jobs/pipeline/test_runner.py, as a YAML file for --conf."""
    (root / "taxonomy.yaml").write_text(TWO_DISCIPLINES)
    conf = root / "cluster.yaml"
    conf.write_text(f"""\
run_root: {root / 'run'}
storage: {{backend: embedded}}
spark: {{shuffle_partitions: 2}}
taxonomy: {{file: {root / 'taxonomy.yaml'}}}
llm: {{endpoint: openai, base_url: "{url}", api_key_env: {KEY_ENV}, max_attempts: 2, backoff_initial_s: 0.05,
       backoff_max_s: 0.2}}
subjects: {{samples_per_discipline: 4, max_subjects_per_sample: 2}}
syllabus: {{max_sessions: 3, max_concepts_per_session: 3}}
combinations: {{questions_per_syllabus: 3}}
pipeline: {{rows_per_task: 16, commit_every_rows: 1000}}
decontam: {{benchmarks: [gsm8k, humaneval], benchmarks_dir: {SHARED / 'benchmarks'}}}
""")
    return conf


@pytest.fixture(scope="module")
def cluster_run(local_cluster, fake_llm_server, tmp_path_factory) -> ClusterRun:
    """Every stage's entry point through spark-submit on the cluster, in order, from a temp folder."""
    root = tmp_path_factory.mktemp("driver")
    run = ClusterRun(root, cluster_conf(root, fake_llm_server.url), root / "run", local_cluster.work_dir)
    fake_llm_server.reset()
    for stage in stages():
        started = time.monotonic()
        proc = local_cluster.submit([f"jobs/{stage.name}.py", "--conf", str(run.conf)], cwd=root,
                                    env={KEY_ENV: "sk-test-key"}, timeout=400)
        run.seconds[stage.name] = time.monotonic() - started
        run.procs[stage.name] = proc
        if proc.returncode != 0:
            break
    run.served = fake_llm_server.stats()
    return run


def glan_sql(run: ClusterRun, query: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("SPARK_", "PYSPARK_"))}
    proc = subprocess.run([str(VENV / "bin" / "glan"), "sql", query, "--conf", str(run.conf), "--format", "json"],
                          cwd=run.root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_every_stage_runs_through_spark_submit_on_the_cluster_and_glan_sql_reads_the_tables(cluster_run):
    run = cluster_run
    for name, proc in run.procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert list(run.procs) == [s.name for s in stages()]
    # The driver's own lines (its stdout and stderr reach spark-submit's stdout).
    assert all(f"[{name}] done" in run.procs[name].stdout for name in run.procs if name != "taxonomy")
    assert '"disciplines": 2' in run.procs["taxonomy"].stdout
    print("seconds per stage:", {name: round(s) for name, s in run.seconds.items()})
    assert (run.run_root / "_cluster").is_dir()  # where each stage's check of its executors left its marker
    # Each stage's executors got the project as the zip, in their work directories on the workers.
    shipped = list(run.cluster_dir.glob("worker-*/app-*/*/glan_spark-*-pyfiles.zip"))
    assert len({p.parent.parent.name for p in shipped}) >= len(run.procs) - 1  # all but the taxonomy's (no tasks)
    counts = glan_sql(run, "SELECT (SELECT count(*) FROM taxonomy) AS taxonomy, "
                           "(SELECT count(*) FROM subject_lists) AS subject_lists, "
                           "(SELECT count(*) FROM subject_conversions) AS subject_conversions, "
                           "(SELECT count(*) FROM subjects) AS subjects, (SELECT count(*) FROM syllabi) AS syllabi, "
                           "(SELECT count(*) FROM sessions) AS sessions, "
                           "(SELECT count(*) FROM concept_combinations) AS combinations, "
                           "(SELECT count(*) FROM questions) AS questions, (SELECT count(*) FROM answers) AS answers, "
                           "(SELECT count(*) FROM instructions) AS instructions")[0]
    kinds = run.served["by_kind"]
    # One call per row, each asked once and answered: what the server saw is what the tables hold.
    assert run.served["by_status"] == {"200": run.served["total"]} and run.served["repeated_ok"] == 0
    assert counts["taxonomy"] == 2
    assert kinds["subjects_list"] == counts["subject_lists"] == 2 * 4
    assert kinds["subjects_convert"] == counts["subject_conversions"] == 2 * 4
    assert kinds["syllabus"] == kinds["syllabus_extract"] == counts["syllabi"] == counts["subjects"] > 0
    assert counts["sessions"] > 0
    assert kinds["question"] == counts["questions"] == counts["combinations"] > 0
    assert kinds["answer"] == counts["answers"] == counts["questions"]
    assert 0 < counts["instructions"] <= counts["answers"]


def spool_snapshot(spool: Path) -> tuple[set[str], int]:
    """The keys of the successful results in a spool, and the calls of its intents whose task
    attempt spooled nothing (in flight)."""
    results = [p for p in spool.glob("*/part-*.parquet")]
    intents = [p for p in spool.glob("*/intents/*/part-*.parquet")]
    answered = {p.name.rsplit("-", 1)[0] for p in results}
    keys = set()
    for path in results:
        for row in pq.read_table(path).to_pylist():
            if row["_out"]["error_class"] is None:
                keys.add(row["question_id"])
    in_flight = sum(pq.read_metadata(p).num_rows for p in intents if p.name.rsplit("-", 1)[0] not in answered)
    return keys, in_flight


def copy_run_root(source: Path, target: Path, leave_out: tuple[str, ...]) -> None:
    """The tables of `source` but `leave_out` (Delta tables are self-contained folders)."""
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.is_dir() and entry.name not in leave_out and not entry.name.startswith("_"):
            shutil.copytree(entry, target / entry.name)


@pytest.mark.slow
def test_a_worker_killed_in_an_llm_stage_the_stage_completes_and_spooled_calls_are_not_paid_again(
        cluster_run, local_cluster, fake_llm_server):
    """Runs last in this module: the cluster has one worker left afterwards."""
    assert cluster_run.procs["questions"].returncode == 0
    run_root = cluster_run.root / "killed"
    copy_run_root(cluster_run.run_root, run_root, ANSWERS_AND_AFTER)
    questions = {r["question_id"]: r["question"] for r in
                 DeltaTable(str(run_root / "questions")).to_pyarrow_table(columns=["question_id", "question"]).to_pylist()}
    server = fake_llm_server
    server.reset()
    server.latency_ms = 300  # tasks of two rows: each a little over 0.3 s
    spool = run_root / "_spool" / "answers.answers"
    args = ["jobs/answers.py", "--conf", str(cluster_run.conf), "--set", f"run_root={run_root}",
            "--set", "pipeline.rows_per_task=2"]
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(local_cluster.submit, args, cwd=cluster_run.root, env={KEY_ENV: "sk-test-key"},
                                 timeout=400)
            deadline = time.monotonic() + 300
            while len(list(spool.glob("*/part-*.parquet"))) < 2 and not future.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not future.done(), future.result().stdout[-3000:]
            # Hold every new call at the server, so that at the kill no task sits between spooling its
            # results and reporting them done: every task is waiting for an answer, or between tasks.
            server.latency_ms = 8000
            time.sleep(3)
            spooled, in_flight = spool_snapshot(spool)
            local_cluster.kill_worker(0)
            killed_at = time.monotonic()
            server.latency_ms = 20
            proc = future.result(timeout=400)
    finally:
        server.latency_ms = 0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert spooled and in_flight > 0
    # The stage finished on the remaining worker, with every row.
    answers = DeltaTable(str(run_root / "answers")).to_pyarrow_table(columns=["question_id"]).column(0).to_pylist()
    assert sorted(answers) == sorted(questions)
    assert local_cluster.state()["aliveworkers"] == 1
    # No call whose answer reached the spool was asked again; only calls in flight at the kill were.
    texts = Counter(r.text for r in server.requests if r.kind == "answer")
    asked = {qid: sum(n for text, n in texts.items() if text.endswith(q)) for qid, q in questions.items()}
    assert all(asked[qid] == 1 for qid in spooled)
    assert sum(asked.values()) == server.count(kind="answer")
    assert len(questions) <= server.count(kind="answer") <= len(questions) + in_flight
    # The calls of the killed task are on record as possibly paid (glan cost counts them).
    failed_calls = DeltaTable(str(run_root / "failed_calls")).to_pyarrow_table().to_pylist()
    lost = [r for r in failed_calls if r["stage"] == "answers" and r["error_class"] == "in_flight"]
    assert 0 < len(lost) <= in_flight
    assert server.count(kind="answer") <= len(questions) + len(lost)
    print(f"kill: {len(spooled)} spooled, {in_flight} in flight; {server.count(kind='answer')} calls for "
          f"{len(questions)} rows; {time.monotonic() - killed_at:.0f}s after the kill")
