"""notebooks/explore.ipynb runs top to bottom on a small run made against the loopback test server."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.config.loader import load_config
from jobs.pipeline.runner import run_pipeline
from tests.taxonomies import TWO_DISCIPLINES as TAXONOMY

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
pytest.importorskip("matplotlib")

from tests.support import REPO
NOTEBOOK = REPO / "notebooks" / "explore.ipynb"


def small_run(tmp_path: Path, url: str) -> list[str]:
    """`--set` values for a small run: 2 disciplines, 2 subject lists each, 2 questions per syllabus."""
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(TAXONOMY)
    values = {
        "run_root": tmp_path / "run", "storage.backend": "embedded", "taxonomy.file": taxonomy,
        "spark.master": "local[2]", "spark.shuffle_partitions": 2,
        "llm.endpoint": "openai", "llm.base_url": url, "llm.api_key_env": "GLAN_TEST_KEY",
        "llm.max_attempts": 2, "llm.backoff_initial_s": 0.05, "llm.backoff_max_s": 0.2,
        "subjects.samples_per_discipline": 2, "subjects.max_subjects_per_sample": 2,
        "syllabus.max_sessions": 3, "syllabus.max_concepts_per_session": 3,
        "combinations.questions_per_syllabus": 2, "pipeline.rows_per_task": 16,
    }
    return [f"{k}={v}" for k, v in values.items()]


def outputs(cell, kind: str = "text/plain") -> str:
    """All text of one kind a cell produced: streams, results and displays."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and kind == "text/plain":
            parts.append(out["text"])
        elif kind in out.get("data", {}):
            parts.append(out["data"][kind])
    return "\n".join(parts)


def cell_with(nb, text: str):
    """The first code cell whose source contains `text`."""
    return next(c for c in nb.cells if c.cell_type == "code" and text in c.source)


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_on_a_small_run(fake_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("GLAN_TEST_KEY", "sk-test-key")
    sets = small_run(tmp_path, fake_llm.url)
    assert run_pipeline(load_config([], sets)) == 0

    # A python3 kernel running this interpreter (the venv's), found first on JUPYTER_PATH.
    prefix = tmp_path / "jupyter"
    kernelspec.install(prefix=str(prefix), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    # The kernel inherits this environment: the run to explore, a small Spark driver.
    monkeypatch.setenv("GLAN_CONF", "conf/local.yaml")
    monkeypatch.setenv("GLAN_SET", ";".join(sets))
    monkeypatch.setenv("GLAN_SPARK_DRIVER_MEMORY", "1g")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    assert str(tmp_path / "run") in outputs(cell_with(nb, "cfg = load_config("))
    counts = outputs(cell_with(nb, "counts = query("))
    assert "Mathematics" in counts and "Logic" in counts and "answers" in counts
    assert outputs(cell_with(nb, "ax.barh("), "image/png")  # the pairs-per-discipline chart
    assert "session_name" in outputs(cell_with(nb, "sessions = query("))
    assert "question" in outputs(cell_with(nb, "samples = query("))
    assert "Q: " in outputs(cell_with(nb, 'print(f"Q: '))
    assert "no such table: failures" in outputs(cell_with(nb, "FROM failures"))  # nothing failed: no table
    assert "gpt-4o-mini" in outputs(cell_with(nb, "tokens = query("))
    assert outputs(cell_with(nb, "Tokens by stage"), "image/png")
    # The run includes the decontaminate stage: nothing was contaminated, every pair is an instruction.
    assert "pairs_removed" in outputs(cell_with(nb, "FROM contamination"))
    assert "no such table" not in outputs(cell_with(nb, "FROM instructions"))
