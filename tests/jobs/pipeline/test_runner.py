"""The GLAN pipeline end to end against the loopback test server (no real LLM)."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from jobs.glan.combinations import count_basic, count_challenging
from jobs.config.loader import load_config
from jobs.errors import EXIT_FAILED_CALLS
from jobs.pipeline.runner import run_pipeline
from jobs.storage.delta import read_table
from tests.taxonomies import TWO_DISCIPLINES as TAXONOMY

pytest_plugins = ["tests.fake_llm_fixture"]
from tests.support import REPO
SHARED = REPO.parent / "shared"
SAMPLES = 10

NEW_DISCIPLINE = "          - name: Systems science\n"


def settings(run_root: Path, taxonomy: Path, url: str, **extra: object) -> list[str]:
    values = {
        "run_root": run_root, "storage.backend": "embedded", "taxonomy.file": taxonomy,
        "llm.endpoint": "openai", "llm.base_url": url, "llm.api_key_env": "GLAN_TEST_KEY",
        "llm.max_attempts": 2, "llm.backoff_initial_s": 0.05, "llm.backoff_max_s": 0.2,
        "subjects.max_subjects_per_sample": 2, "syllabus.max_sessions": 3,
        "syllabus.max_concepts_per_session": 3, "combinations.questions_per_syllabus": 2,
        "pipeline.rows_per_task": 16, "pipeline.commit_every_rows": 1000,
        "decontam.benchmarks": "[gsm8k, humaneval]",  # the full set is bench/decontam.py's job
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def make_cfg(tmp_path: Path, url: str, name: str = "run", **extra: object):
    taxonomy = tmp_path / "taxonomy.yaml"
    if not taxonomy.exists():
        taxonomy.write_text(TAXONOMY)
    return load_config([], settings(tmp_path / name, taxonomy, url, **extra))


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("GLAN_TEST_KEY", "sk-test-key")


def table(spark, name, cfg):
    return read_table(spark, name, cfg)


@pytest.mark.slow
def test_end_to_end_rows_calls_lineage_and_resume(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url)
    assert run_pipeline(cfg) == 0

    # GLAN step 2: ten subject-list calls and ten conversions per discipline.
    assert fake_llm.count(kind="subjects_list") == SAMPLES * 2
    assert fake_llm.count(kind="subjects_convert") == SAMPLES * 2
    subjects = table(spark, "subjects", cfg)
    assert subjects.count() > 0
    assert subjects.filter("num_samples < 1").count() == 0
    # Step 3: exactly one syllabus call (and one extraction) per unique subject.
    assert fake_llm.count(kind="syllabus") == subjects.count() == table(spark, "syllabi", cfg).count()
    assert fake_llm.count(kind="syllabus_extract") == subjects.count()
    # Step 4: no combination twice for one syllabus; counts stored and equal to the formulas.
    combos = table(spark, "concept_combinations", cfg)
    keyed = combos.select("syllabus_id", F.array_sort("concepts").alias("c"), "session_indices")
    assert keyed.distinct().count() == combos.count() == combos.select("combination_id").distinct().count()
    sessions = table(spark, "sessions", cfg).groupBy("syllabus_id").agg(F.collect_list("num_concepts").alias("m"))
    for row in sessions.join(combos.select("syllabus_id", "num_possible_basic", "num_possible_challenging")
                             .distinct(), "syllabus_id").collect():
        sizes = [m for m in row["m"] if m > 0]
        assert row["num_possible_basic"] == sum(count_basic(m) for m in sizes)
        assert row["num_possible_challenging"] == sum(count_challenging(a, b)
                                                      for a, b in itertools.combinations(sizes, 2))
    # Steps 4-5: one question per combination, one answer per question, every lineage joins.
    answers = table(spark, "answers", cfg)
    assert fake_llm.count(kind="question") == combos.count() == table(spark, "questions", cfg).count()
    assert fake_llm.count(kind="answer") == answers.count() == combos.count()
    lineage = (answers.join(table(spark, "questions", cfg).select("question_id", "combination_id"),
                            ["question_id", "combination_id"])
               .join(combos.select("combination_id", "syllabus_id"), ["combination_id", "syllabus_id"])
               .join(table(spark, "syllabi", cfg).select("syllabus_id", "subject_id"), ["syllabus_id", "subject_id"])
               .join(subjects.select("subject_id", "discipline_id"), ["subject_id", "discipline_id"])
               .join(table(spark, "taxonomy", cfg).select("discipline_id", "field"), "discipline_id"))
    assert lineage.count() == answers.count()
    row = answers.first()
    assert (row["model"], row["temperature"], row["top_p"]) == ("gpt-4o-mini", 0.7, 0.95)
    assert row["prompt_name"] == "answer" and len(row["prompt_version"]) > 0 and row["completion_tokens"] > 0

    # Usage recorded on the rows is exactly what the endpoint served, and `glan status` agrees.
    from jobs.pipeline.costs import usage_by_stage
    from jobs.cli.status import stage_status

    served = fake_llm.stats()["tokens"]
    usage = usage_by_stage(spark, cfg)
    assert sum(u["prompt_tokens"] for u in usage) == served["prompt"]
    assert sum(u["completion_tokens"] for u in usage) == served["completion"]
    assert sum(u["calls"] for u in usage) == fake_llm.count()
    status = {r["stage"]: r for r in stage_status(spark, cfg)}
    assert status["answers"]["done"] == answers.count() and status["answers"]["to_do"] == 0
    assert status["subjects"]["done"] == SAMPLES * 2 and status["subjects"]["failures"] == 0

    # Step 6: every pair is checked; a planted benchmark question is removed, the rest are the
    # instructions, with their lineage; and they export to training shards.
    instructions = table(spark, "instructions", cfg)
    assert instructions.count() == answers.count()
    assert instructions.filter("field IS NULL OR discipline IS NULL OR subject IS NULL").count() == 0
    from jobs.export import build_export

    manifest = build_export(instructions, cfg.export, str(tmp_path / "export"), seed=1)
    assert sum(s["num_rows"] for s in manifest["splits"].values()) == answers.count()

    # Resume: a second run pays for nothing.
    calls = fake_llm.count()
    assert run_pipeline(cfg) == 0
    assert fake_llm.count() == calls

    # Adding a discipline expands only that discipline.
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(taxonomy.read_text() + NEW_DISCIPLINE)
    before = {r["discipline_id"] for r in table(spark, "subject_lists", cfg).select("discipline_id").collect()}
    assert run_pipeline(cfg) == 0
    new_requests = fake_llm.requests[calls:]
    assert len([r for r in new_requests if r.kind == "subjects_list"]) == SAMPLES
    assert all("Systems science" in r.text for r in new_requests if r.kind == "subjects_list")
    lists = table(spark, "subject_lists", cfg)
    added = {r["discipline_id"] for r in lists.select("discipline_id").collect()} - before
    assert len(added) == 1 and lists.filter(F.col("discipline_id").isin(list(added))).count() == SAMPLES
    new_subjects = table(spark, "subjects", cfg).filter(F.col("discipline_id").isin(list(added))).count()
    assert len([r for r in new_requests if r.kind == "syllabus"]) == new_subjects


@pytest.mark.slow
def test_garbage_and_empty_lists_fill_failures_then_a_rerun_retries_only_them(spark, fake_llm, tmp_path):
    cfg = make_cfg(tmp_path, fake_llm.url, **{"subjects.samples_per_discipline": 2})
    fake_llm.add_rule(kind="subjects_convert", contains="Logic", empty_lists=True)
    fake_llm.add_rule(kind="repair", text="this is not JSON {{{")
    fake_llm.add_rule(kind="answer", status=401, echo_key="full")  # as OpenAI does with a bad key
    assert run_pipeline(cfg) == EXIT_FAILED_CALLS  # no crash, and the exit code says calls failed
    failures = table(spark, "failures", cfg)
    by_stage = {r["stage"]: r["n"] for r in failures.groupBy("stage").agg(F.count("*").alias("n")).collect()}
    assert by_stage["subjects"] == 2  # both Logic samples: empty list, then a garbage repair
    assert by_stage["answers"] == table(spark, "questions", cfg).count() > 0
    answer_failure = failures.filter("stage = 'answers'").first()
    assert (answer_failure["error_class"], answer_failure["attempts"]) == ("auth", 1)  # a 401 is not retried
    # The key the server echoed is in no table, no cell of any column.
    from jobs.storage.delta import get_storage
    storage = get_storage(spark, cfg)
    for name in storage.list_tables():
        frame = storage.read(name)
        text = frame.select(F.concat_ws("|", *[F.col(c).cast("string") for c in frame.columns]).alias("t"))
        assert text.filter(F.col("t").contains("sk-test-key")).count() == 0, name
    assert not table_exists(spark, cfg, "answers")  # nothing half written
    # Failed calls were paid for: their tokens are in `failed_calls`, so the usage adds up to what was served.
    from jobs.pipeline.costs import usage_by_stage
    served = fake_llm.stats()["tokens"]
    usage = usage_by_stage(spark, cfg)
    assert sum(u["prompt_tokens"] for u in usage) == served["prompt"] > 0
    assert sum(u["completion_tokens"] for u in usage) == served["completion"]
    failed_calls = {(u["stage"], u["calls"]) for u in usage if u["table"] == "failed_calls"}
    assert ("subjects", 2) in failed_calls

    fake_llm.reset()  # the endpoint behaves again
    with gzip.open(SHARED / "benchmarks" / "gsm8k.jsonl.gz", "rt") as f:
        planted = json.loads(f.readline())["question"]
    fake_llm.add_rule(kind="answer", times=1, text=f"Here is a similar problem. {planted} Solve it the same way.")
    assert run_pipeline(cfg) == 0
    assert fake_llm.count(kind="subjects_list") == 0          # committed rows are never asked again
    assert fake_llm.count(kind="subjects_convert") == 2       # only the failed ones
    assert table(spark, "failures", cfg).count() == 0         # and they left the table
    assert table(spark, "failed_calls", cfg).filter("stage = 'subjects'").count() == 2  # their cost stays
    assert table(spark, "answers", cfg).count() == table(spark, "questions", cfg).count()
    # The answer that quotes GSM8K is removed from the instructions, and the report says why.
    contamination = table(spark, "contamination", cfg)
    assert contamination.filter("benchmark = 'gsm8k'").select("pair_id").distinct().count() == 1
    assert table(spark, "instructions", cfg).count() == table(spark, "answers", cfg).count() - 1


def table_exists(spark, cfg, name):
    from jobs.storage.delta import table_exists as exists
    return exists(spark, name, cfg)


KILLED_RUN = """
import sys
from jobs.config.loader import load_config
from jobs.errors import EXIT_FAILED_CALLS
from jobs.pipeline.runner import run_pipeline
cfg = load_config([], sys.argv[1:])
run_pipeline(cfg)
"""


def spooled_rows(folder: Path) -> dict[str, str]:
    """question_id -> question text of the complete files in a questions spool folder."""
    import pyarrow.parquet as pq
    rows = {}
    for path in sorted(folder.glob("*/part-*.parquet")) if folder.exists() else []:
        try:
            table = pq.read_table(path)
        except FileNotFoundError:  # committed and removed since the listing
            continue
        for row in table.to_pylist():
            if row["_out"]["error_class"] is None:
                rows[row["question_id"]] = row["_out"]["text"]
    return rows


@pytest.mark.slow
def test_run_killed_in_the_questions_stage_resumes_without_paying_twice(spark, fake_llm, tmp_path):
    # Chunks of 8 rows in tasks of 2: a kill finds some chunks committed and, in the chunk under
    # way, some tasks' results already spooled.
    small = {"pipeline.commit_every_rows": 16, "pipeline.rows_per_task": 2}
    reference = make_cfg(tmp_path, fake_llm.url, name="reference", **small)
    assert run_pipeline(reference) == 0
    expected = {(r["question_id"], r["question"]) for r in table(spark, "questions", reference).collect()}
    assert len(expected) > 32  # several commits' worth

    fake_llm.reset()
    fake_llm.latency_ms = 150  # slow enough to be caught inside a chunk
    sets = settings(tmp_path / "killed", tmp_path / "taxonomy.yaml", fake_llm.url, **small)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_RUN), *sets], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    questions_path = tmp_path / "killed" / "questions"
    spool = tmp_path / "killed" / "_spool" / "questions.questions"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if DeltaTable.is_deltatable(str(questions_path)) and any(spool.glob("*/part-*.parquet")):
            done = set(DeltaTable(str(questions_path)).to_pyarrow_table(columns=["question_id"]).column(0).to_pylist())
            if set(spooled_rows(spool)) - done:  # some spooled results are not committed yet
                break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its JVM and Python workers, mid-stage
    proc.wait(timeout=60)
    cfg = make_cfg(tmp_path, fake_llm.url, name="killed", **small)
    committed = {r["question_id"] for r in table(spark, "questions", cfg).collect()}
    assert 0 < len(committed) < len(expected)
    assert not table_exists(spark, cfg, "answers")
    spooled = {k: v for k, v in spooled_rows(spool).items() if k not in committed}
    assert spooled, "the kill came between a commit and the next spooled task; nothing to recover"
    assert set(spooled.items()) <= expected  # the spool holds the very answers the calls returned
    from jobs.cli.status import stage_status
    status = {r["stage"]: r for r in stage_status(spark, cfg)}
    assert status["questions"]["spooled"] >= len(spooled) > 0  # `glan status` shows the paid, uncommitted rows

    fake_llm.reset()
    fake_llm.latency_ms = 0
    assert run_pipeline(cfg) == 0
    resumed = table(spark, "questions", cfg)
    assert resumed.count() == resumed.select("question_id").distinct().count()  # no duplicates
    assert {(r["question_id"], r["question"]) for r in resumed.collect()} == expected
    # No LLM call for a row committed or spooled before the kill: the rerun asked only for the rest.
    assert fake_llm.count(kind="question") == len(expected) - len(committed) - len(spooled)
    assert fake_llm.count(kind="subjects_list") == 0 and fake_llm.count(kind="syllabus") == 0
    assert not list(spool.rglob("*.parquet"))  # the spool is emptied once committed
    assert {r["stage"]: r for r in stage_status(spark, cfg)}["questions"]["spooled"] == 0
