"""Shared fixtures. One SparkSession for the whole test run (starting one costs seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import SHARED

# Tests read the benchmark files from the shared copy (offline, fast), never from the user-level
# cache that a product run fills from PyPI; a test that sets decontam.benchmarks_dir still wins.
os.environ["GLAN_BENCHMARKS_DIR"] = str(SHARED / "benchmarks")


@pytest.fixture(scope="session")
def spark_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spark")


@pytest.fixture(scope="session")
def spark(spark_root) -> Iterator:
    from jobs.spark.session import get_spark

    session = get_spark("glan-tests", master="local[2]", shuffle_partitions=2, run_root=str(spark_root))
    yield session
    session.stop()
pytest_plugins = ["tests.fake_llm_fixture"]
