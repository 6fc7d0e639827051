"""The --py-files artifact: spark-submit ships it and executors import glan-spark from it."""

from __future__ import annotations

import pytest

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from jobs.spark.package import build_pyfiles
from jobs.pipeline.stage import stages

from tests.support import REPO  # noqa: E402


def test_pyfiles_zip_holds_packages_templates_and_conf(tmp_path):
    first = build_pyfiles(tmp_path / "a")
    names = set(zipfile.ZipFile(first).namelist())
    assert {"jobs/__init__.py", "jobs/storage/delta.py", "udfs/__init__.py", "conf/base.yaml"} <= names
    assert not any("__pycache__" in n for n in names)
    second = build_pyfiles(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()  # reproducible: same sources, same bytes


@pytest.mark.slow
def test_spark_submit_py_files_imports_the_package_on_executors(tmp_path):
    artifact = build_pyfiles(tmp_path / "dist")
    job = tmp_path / "check_cluster.py"
    shutil.copy(REPO / "jobs" / "check_cluster.py", job)  # run from outside the repo
    spark_submit = Path(sys.executable).parent / "spark-submit"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET")}
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    proc = subprocess.run(
        [str(spark_submit), "--master", "local[2]", "--py-files", str(artifact), str(job),
         "--set", f"run_root={tmp_path / 'run'}", "--set", "storage.backend=embedded"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    driver = [l for l in lines if l["check"] == "driver"]
    executors = [l for l in lines if l["check"] == "executor"]
    assert driver and driver[0]["master"] == "local[2]"  # the master spark-submit gave is kept
    assert executors
    for report in executors:
        # Imported from the shipped zip, not from the source tree or an installed copy.
        assert f"{artifact.name}/jobs/__init__.py" in report["jobs"], report
        assert f"{artifact.name}/udfs/__init__.py" in report["udfs"], report


# -- what scripts/setup.sh installs ------------------------------------------------------------------

TRAINING_ONLY = {"torch", "deepspeed", "transformers", "accelerate"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_default_setup_installs_no_training_or_compiled_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    default = _requirement_names(project["dependencies"] + project["optional-dependencies"]["local"])
    assert not default & TRAINING_ONLY
    assert "llama-cpp-python" not in default  # compiles llama.cpp from source
    assert "xllamacpp" in default
    assert TRAINING_ONLY <= _requirement_names(project["optional-dependencies"]["train"])


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    block = readme.split("Run the tests:", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert "\n" not in block  # one line
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == block
    assert "--dev" in block  # the suite needs the training packages and the test tools


def test_the_main_job_imports_no_training_package():
    modules = ["jobs.cli.main", "jobs.pipeline.runner", "udfs.servers.embedded"] + [stage.module for stage in stages()]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in {sorted(TRAINING_ONLY)!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
