"""A run killed while calls are in flight: `glan cost` still counts every call the endpoint served."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jobs.pipeline.costs import usage_by_stage
from jobs.pipeline.runner import run_pipeline
from tests.jobs.pipeline.test_runner import KILLED_RUN, REPO, make_cfg, settings
from tests.jobs.pipeline.test_spool import _key  # noqa: F401 - autouse fixture: the test key in the environment

pytest_plugins = ["tests.fake_llm_fixture"]
DELAY_S = 1.5  # per question call: a task's calls stay in flight this long


def in_flight_ages(spool: Path) -> list[float]:
    """Seconds since each intent file was written whose task attempt has spooled no result yet."""
    now = time.time()
    answered = {p.name.rsplit("-", 1)[0] for p in spool.glob("*/part-*.parquet")}
    return [now - p.stat().st_mtime for p in spool.glob("*/intents/*/part-*.parquet")
            if p.name.rsplit("-", 1)[0] not in answered]


@pytest.mark.slow  # two pipeline runs, one killed (several minutes on 2 busy cores); test_cost_intents covers it fast
def test_a_run_killed_with_calls_in_flight_counts_every_call_served(spark, fake_llm, tmp_path):
    small = {"pipeline.commit_every_rows": 16, "pipeline.rows_per_task": 2}
    make_cfg(tmp_path, fake_llm.url, name="killed", **small)  # writes the taxonomy file
    fake_llm.add_rule(kind="question", delay_ms=DELAY_S * 1000)
    sets = settings(tmp_path / "killed", tmp_path / "taxonomy.yaml", fake_llm.url, **small)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_RUN), *sets], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    spool = tmp_path / "killed" / "_spool" / "questions.questions"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        ages = in_flight_ages(spool)
        # Kill when some results are spooled and every task in flight sent its calls a while ago and
        # will not finish (and start another) before the kill lands.
        if ages and any(spool.glob("*/part-*.parquet")) and all(0.4 < age < DELAY_S - 0.6 for age in ages):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its JVM and Python workers, calls in flight
    proc.wait(timeout=60)

    cfg = make_cfg(tmp_path, fake_llm.url, name="killed", **small)
    usage = usage_by_stage(spark, cfg)
    in_flight = sum(u["calls"] for u in usage if u["table"] == "spool (in flight)")
    assert in_flight > 0
    counted = {u["table"]: 0 for u in usage}
    for u in usage:
        counted[u["table"]] += u["calls"]
    assert sum(counted.values()) == fake_llm.count(), counted  # committed + failed + spooled + in flight

    fake_llm.rules.clear()
    assert run_pipeline(cfg) == 0
    usage = usage_by_stage(spark, cfg)
    assert sum(u["calls"] for u in usage if u["table"] == "failed_calls (in flight)") == in_flight
    assert sum(u["calls"] for u in usage) == fake_llm.count()  # the calls asked again are new calls
    assert not list(spool.rglob("*.parquet"))
