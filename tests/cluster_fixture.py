"""The `local_cluster` fixture: a standalone Spark master and two one-core workers on 127.0.0.1
(scripts/local_cluster.py), started once per test module and stopped after it.

Use from a test module with `pytest_plugins = ["tests.cluster_fixture"]`. Executors run the
cluster's own Python, which has the dependencies but not glan-spark: `local_cluster.submit(...)`
ships the project as the `--py-files` zip, as spark-submit does on a real cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scripts.local_cluster import LocalCluster


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2, cores_per_worker=1) as cluster:
        yield cluster
