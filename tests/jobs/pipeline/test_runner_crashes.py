"""What a crash or a second run leaves behind, the next run finishes exactly: kills at every commit
boundary (not only inside LLM calls), derived tables that fell behind their inputs, and runs of
different discipline slices on one run root at once. Against the loopback test server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs.config.loader import load_config
from jobs.pipeline.runner import run_pipeline
from jobs.storage.delta import KILL_AFTER_COMMIT_ENV, get_storage
from tests.taxonomies import TWO_DISCIPLINES
from tests.jobs.pipeline.test_runner import settings as pipeline_settings

pytest_plugins = ["tests.fake_llm_fixture"]
from tests.support import REPO
# Columns that differ between two runs of the same work: when and how fast, not what; and the
# cached prompt tokens, which depend on what the server saw before (another run's same prompts).
VOLATILE = {"created_at", "latency_s", "failed_at", "cached_tokens"}

RUN = """
import sys
from jobs.config.loader import load_config
from jobs.pipeline.runner import run_pipeline
sys.exit(run_pipeline(load_config([], sys.argv[1:])))
"""


def settings(run_root: Path, taxonomy: Path, url: str, **extra: object) -> list[str]:
    small = {"subjects.samples_per_discipline": 2, "decontam.benchmarks": "[gsm8k]"}
    return pipeline_settings(run_root, taxonomy, url, **{**small, **extra})


@pytest.fixture()
def taxonomy(tmp_path) -> Path:
    path = tmp_path / "taxonomy.yaml"
    path.write_text(TWO_DISCIPLINES)
    return path


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("GLAN_TEST_KEY", "sk-test-key")


def start(sets: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(RUN), *sets], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env})


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err


def snapshot(spark, cfg) -> dict[str, list[tuple]]:
    """Every table of a run as sorted rows, without the columns that record time."""
    storage = get_storage(spark, cfg)
    tables = {}
    for name in storage.list_tables():
        frame = storage.read(name)
        columns = sorted(c for c in frame.columns if c not in VOLATILE)
        tables[name] = sorted((tuple(str(v) for v in row) for row in frame.select(*columns).collect()))
    return tables


def discipline_id(spark, cfg, name: str) -> str:
    return get_storage(spark, cfg).read("taxonomy").filter(F.col("discipline") == name).first()["discipline_id"]


@pytest.mark.slow
def test_subjects_behind_their_conversions_are_rebuilt_without_asking_again(spark, fake_llm, tmp_path, taxonomy):
    cfg = load_config([], settings(tmp_path / "run", taxonomy, fake_llm.url))
    assert run_pipeline(cfg, stages=["taxonomy", "subjects"]) == 0
    storage = get_storage(spark, cfg)
    expected = snapshot(spark, cfg)["subjects"]
    logic = discipline_id(spark, cfg, "Logic")
    # What a run killed between committing Logic's conversions and rebuilding `subjects` leaves.
    empty = storage.read("subjects").limit(0)
    storage.replace(empty, "subjects", "discipline_id", [logic])
    assert storage.read("subjects").filter(F.col("discipline_id") == logic).count() == 0
    fake_llm.reset()

    assert run_pipeline(cfg, stages=["taxonomy", "subjects"]) == 0
    assert fake_llm.count() == 0                      # compared with its inputs, not asked again
    assert snapshot(spark, cfg)["subjects"] == expected
    version = storage.version("subjects")
    assert run_pipeline(cfg, stages=["subjects"]) == 0
    assert storage.version("subjects") == version      # up to date: nothing rewritten


@pytest.mark.slow
def test_a_slice_killed_after_its_conversions_is_finished_by_the_next_run(spark, fake_llm, tmp_path, taxonomy):
    """The issue's reproduction: one run on Mathematics, a run on Logic SIGKILLed (process group)
    right after it committed `subject_conversions`, then Logic again."""
    math = load_config([], settings(tmp_path / "run", taxonomy, fake_llm.url, **{"taxonomy.disciplines": "[Mathematics]"}))
    assert run_pipeline(math) == 0
    sets = settings(tmp_path / "run", taxonomy, fake_llm.url, **{"taxonomy.disciplines": "[Logic]"})
    code, err = finish(start(sets, **{KILL_AFTER_COMMIT_ENV: "subject_conversions"}))
    assert code == -signal.SIGKILL, err[-2000:]
    logic_cfg = load_config([], sets)
    logic = discipline_id(spark, logic_cfg, "Logic")
    storage = get_storage(spark, logic_cfg)
    assert storage.read("subject_conversions").filter(F.col("discipline_id") == logic).count() == 2
    lists = fake_llm.count(kind="subjects_list")

    assert run_pipeline(logic_cfg) == 0
    assert fake_llm.count(kind="subjects_list") == lists  # the conversions it had are not asked again
    for name in ("subjects", "syllabi", "sessions", "concept_combinations", "questions", "answers"):
        assert storage.read(name).filter(F.col("discipline_id") == logic).count() > 0, name
    from jobs.cli.status import stage_status

    assert all(row["to_do"] == 0 for row in stage_status(spark, logic_cfg)), stage_status(spark, logic_cfg)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_kill_at_every_commit_boundary_still_ends_in_the_same_tables(spark, fake_llm, tmp_path, taxonomy):
    reference = load_config([], settings(tmp_path / "reference", taxonomy, fake_llm.url))
    assert run_pipeline(reference) == 0
    expected = snapshot(spark, reference)
    calls = fake_llm.count()
    fake_llm.reset()  # a prompt the server saw before would come back with cached tokens

    # Every run commits once and is killed (driver, JVM and workers) right after; the next run
    # starts from what it left. The last one finds the work done and exits 0.
    sets = settings(tmp_path / "killed", taxonomy, fake_llm.url)
    kills = 0
    for _ in range(40):
        code, err = finish(start(sets, **{KILL_AFTER_COMMIT_ENV: "1"}))
        if code != -signal.SIGKILL:
            break
        kills += 1
    assert code == 0, err[-3000:]
    assert kills >= len(expected)  # at least one kill after a commit of every table
    assert snapshot(spark, load_config([], sets)) == expected
    # Nothing was asked twice: the killed runs together made exactly the reference's calls.
    assert fake_llm.count() == calls


@pytest.mark.slow
def test_two_slices_started_together_share_a_run_root(spark, fake_llm, tmp_path, taxonomy):
    reference = load_config([], settings(tmp_path / "reference", taxonomy, fake_llm.url))
    assert run_pipeline(reference) == 0
    fake_llm.reset()
    fake_llm.latency_ms = 50

    def slice_of(name: str, **extra: object) -> list[str]:
        return settings(tmp_path / "shared", taxonomy, fake_llm.url, **{"taxonomy.disciplines": f"[{name}]", **extra})

    # A fresh run root: both create `taxonomy` and rewrite `subjects`, `failures`, `instructions`.
    runs = [start(slice_of("Mathematics")), start(slice_of("Logic"))]
    for proc in runs:
        code, err = finish(proc)
        assert code == 0, err[-3000:]
    shared = load_config([], slice_of("Mathematics"))
    assert snapshot(spark, shared) == snapshot(spark, reference)

    # An existing run root, with new work for both at once.
    more = {"combinations.questions_per_syllabus": 3}
    runs = [start(slice_of("Mathematics", **more)), start(slice_of("Logic", **more))]
    for proc in runs:
        code, err = finish(proc)
        assert code == 0, err[-3000:]
    assert run_pipeline(load_config([], settings(tmp_path / "reference", taxonomy, fake_llm.url, **more))) == 0
    assert snapshot(spark, shared) == snapshot(spark, reference)


@pytest.mark.slow
def test_the_same_slice_twice_on_a_fresh_root_says_already_running(fake_llm, tmp_path, taxonomy):
    fake_llm.latency_ms = 300  # the first run is still listing subjects when the second arrives
    sets = settings(tmp_path / "run", taxonomy, fake_llm.url)
    runs = [start(sets), start(sets)]
    results = sorted(finish(proc) for proc in runs)
    (first, _), (second, err) = results
    assert first == 0
    assert second != 0
    last = err.strip().splitlines()[-1]
    assert "already running" in last or "is running" in last, err[-3000:]
    assert "changed while it was being overwritten" not in err


@pytest.mark.slow
def test_failed_calls_make_the_run_exit_3_unless_within_the_allowed_share(fake_llm, tmp_path, taxonomy):
    from jobs.errors import EXIT_FAILED_CALLS

    fake_llm.add_rule(kind="subjects_convert", contains="Logic", status=400)  # 2 of 8 calls fail
    strict = load_config([], settings(tmp_path / "strict", taxonomy, fake_llm.url))
    assert run_pipeline(strict, stages=["taxonomy", "subjects"]) == EXIT_FAILED_CALLS
    lenient = load_config([], settings(tmp_path / "lenient", taxonomy, fake_llm.url,
                                       **{"pipeline.max_failed_share": 0.25}))
    assert run_pipeline(lenient, stages=["taxonomy", "subjects"]) == 0
    tighter = load_config([], settings(tmp_path / "tighter", taxonomy, fake_llm.url,
                                       **{"pipeline.max_failed_share": 0.2}))
    assert run_pipeline(tighter, stages=["taxonomy", "subjects"]) == EXIT_FAILED_CALLS
