"""The --py-files artifact: spark-submit ships it and executors import glan-spark from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from jobs.common.package import build_pyfiles

REPO = Path(__file__).resolve().parents[1]


def test_pyfiles_zip_holds_packages_templates_and_conf(tmp_path):
    first = build_pyfiles(tmp_path / "a")
    names = set(zipfile.ZipFile(first).namelist())
    assert {"jobs/__init__.py", "jobs/common/storage.py", "udfs/__init__.py", "conf/base.yaml"} <= names
    assert not any("__pycache__" in n for n in names)
    second = build_pyfiles(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()  # reproducible: same sources, same bytes


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
