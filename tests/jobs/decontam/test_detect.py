"""Decontamination end to end on the real benchmark files: planted items are found, clean text is
not flagged, results do not depend on partitioning, near-duplicates keep the smallest id, and the
standalone command writes clean data and the contamination table."""

from __future__ import annotations

import argparse
import json
import random
import sys

import pandas as pd
import pytest

from tests.support import REPO, SHARED
from jobs.config.loader import load_config
from jobs.errors import ConfigError, InputError
from jobs.decontam.detect import (CONTAMINATION_COLUMNS, build_benchmark_items, decontaminate, detect,
                                  staged_benchmark_items)
from jobs.decontam.files import run

sys.path.insert(0, str(REPO / "bench"))
import decontam as synth  # noqa: E402  (the benchmark's deterministic pair generator)

NUM_PER_KIND = 100
NUM_CLEAN = 2000


def _cfg(*sets: str):
    return load_config(sets=[f"decontam.benchmarks_dir={SHARED / 'benchmarks'}", *sets]).decontam


def _clean_texts(rng: random.Random, num: int) -> list[tuple[str, str]]:
    """Generated-looking pairs: the test LLM server's prose when it is there, and real prose."""
    prose = synth.Prose(11)
    try:
        from udfs.servers.fake_llm import free_text
    except ImportError:  # the test server is another module's work; real prose alone will do
        free_text = None
    out = []
    for i in range(num):
        if free_text is not None and i % 2:
            out.append((prose.text(rng, rng.randint(8, 30)) + "?", free_text(rng)))
        else:
            out.append((prose.text(rng, rng.randint(12, 60)), prose.text(rng, rng.randint(40, 160))))
    return out


@pytest.fixture(scope="module")
def items(spark):
    return build_benchmark_items(spark, _cfg()).cache()


@pytest.fixture(scope="module")
def planted_run(spark, items):
    rng = random.Random(3)
    prose = synth.Prose(3)
    pool = synth.plantable([tuple(r) for r in items.collect()], min_words=8)
    chosen = rng.sample(pool, NUM_PER_KIND * len(synth.PLANT_KINDS))
    rows, truth = [], {}
    for i, (question, answer) in enumerate(_clean_texts(rng, NUM_CLEAN)):
        rows.append((f"c{i:05d}", question, answer, "clean"))
    for i, (bench, _split, item_id, text) in enumerate(chosen):
        kind = synth.PLANT_KINDS[i % len(synth.PLANT_KINDS)]
        planted = synth.plant(text, kind, rng, prose)
        question, answer = prose.text(rng, 20), prose.text(rng, 60)
        if i % 2:
            question = planted
        else:
            answer = planted
        pid = f"t{i:05d}"
        rows.append((pid, question, answer, kind))
        truth[pid] = (kind, bench, item_id)
    pairs = spark.createDataFrame(pd.DataFrame(rows, columns=["pair_id", "question", "answer", "kind"]))
    instructions, contamination, report = decontaminate(pairs, items, _cfg(), near_dup=False)
    return truth, contamination.toPandas(), instructions.toPandas(), report.toPandas()


@pytest.mark.slow
@pytest.mark.parametrize("kind, minimum", [("verbatim", 0.99), ("embedded", 0.99), ("noisy", 0.99),
                                           ("edited", 0.9)])
def test_planted_items_are_found(planted_run, kind, minimum):
    truth, found, _, _ = planted_run
    flagged = set(zip(found["pair_id"], found["benchmark"]))
    cases = [(pid, bench) for pid, (k, bench, _) in truth.items() if k == kind]
    recall = sum(case in flagged for case in cases) / len(cases)
    assert recall >= minimum, f"{kind}: recall {recall:.3f}"


@pytest.mark.slow
def test_verbatim_items_name_the_item_and_an_excerpt(planted_run):
    truth, found, _, _ = planted_run
    exact = set(zip(found["pair_id"], found["benchmark"], found["item_id"]))
    verbatim = [(pid, b, i) for pid, (k, b, i) in truth.items() if k == "verbatim"]
    named = [key for key in verbatim if key in exact]
    assert len(named) >= 0.95 * len(verbatim)  # the rest: the benchmark holds the same text twice
    assert list(found.columns) == list(CONTAMINATION_COLUMNS)
    assert found["excerpt"].str.len().gt(0).all() and found["score"].between(0, 1).all()
    assert set(found["detector"]) == {"ngram", "minhash"}


@pytest.mark.slow
def test_clean_text_is_not_flagged(planted_run):
    truth, found, instructions, _ = planted_run
    false = set(found["pair_id"]) - set(truth)
    assert len(false) / NUM_CLEAN <= 0.001, found[found["pair_id"].isin(false)].head().to_string()
    kept = set(instructions["pair_id"])
    assert len([p for p in kept if p.startswith("c")]) >= NUM_CLEAN - 2
    assert list(instructions.columns) == ["pair_id", "question", "answer", "kind"]  # all columns kept
    assert not kept & set(found["pair_id"])


@pytest.mark.slow
def test_report_counts_pairs_per_benchmark_and_detector(planted_run):
    _, found, _, report = planted_run
    for row in report.itertuples():
        mine = found[found["benchmark"] == row.benchmark]
        assert row.num_pairs == mine["pair_id"].nunique()
        assert row.num_pairs_ngram == mine[mine["detector"] == "ngram"]["pair_id"].nunique()
        assert row.num_pairs_minhash == mine[mine["detector"] == "minhash"]["pair_id"].nunique()


def _small_pairs(spark, items_rows, num=150):
    rng = random.Random(5)
    prose = synth.Prose(5)
    rows = []
    for i in range(num):
        q, a = prose.text(rng, 25), prose.text(rng, 50)
        if i % 10 == 0:
            q = items_rows[i][3]
        if i % 10 == 1:
            a = synth.plant(items_rows[i][3], "embedded", rng, prose)
        if i % 15 == 2:  # near-identical questions: same words, different case and punctuation
            q = synth.noisy(rows[0][1], rng)
        rows.append((f"p{i:04d}", q, a))
    return pd.DataFrame(rows, columns=["pair_id", "question", "answer"])


def _sorted(df) -> list[tuple]:
    return sorted(tuple(r) for r in df.collect())


@pytest.mark.slow
def test_results_are_identical_across_runs_and_partitionings(spark):
    cfg = _cfg("decontam.benchmarks=[gsm8k,mbpp,humaneval]")
    items = build_benchmark_items(spark, cfg)
    frame = _small_pairs(spark, [tuple(r) for r in items.orderBy("item_id").limit(150).collect()])
    results = []
    for parts in (1, 3, 7):
        pairs = spark.createDataFrame(frame).repartition(parts)
        instructions, contamination, report = decontaminate(pairs, items.repartition(parts + 1), cfg)
        results.append((_sorted(instructions), _sorted(contamination), _sorted(report)))
    assert results[0] == results[1] == results[2]
    _, contamination, _ = results[0]
    dups = [r for r in contamination if r[4] == "near_duplicate"]
    assert dups and all(r[3] == "p0000" and r[0] > "p0000" for r in dups)  # the smallest id is kept
    assert len({r[0] for r in contamination if r[4] != "near_duplicate"}) >= 25


@pytest.mark.slow
def test_near_duplicate_clusters_keep_the_smallest_id(spark):
    from jobs.decontam.detect import connected_components

    edges = spark.createDataFrame([("b", "c"), ("c", "d"), ("a", "d"), ("x", "y")], ["a", "b"])
    labels = dict(tuple(r) for r in connected_components(edges.repartition(3)).collect())
    assert labels == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}


def test_missing_text_column_is_an_input_error(spark):
    items = spark.createDataFrame([("gsm8k", "test", "0", "a benchmark item of a few words")],
                                  "benchmark string, split string, item_id string, text string")
    pairs = spark.createDataFrame([("p1", "q")], ["pair_id", "question"])
    with pytest.raises(InputError, match="answer"):
        detect(pairs, items, _cfg())


def test_config_values_are_checked():
    with pytest.raises(ConfigError, match=r"decontam\.minhash\.num_perm=100 is not divisible by bands=16"):
        load_config(sets=["decontam.minhash.num_perm=100", "decontam.minhash.bands=16"])
    with pytest.raises(ConfigError, match=r"decontam\.ngram\.min_words"):
        load_config(sets=["decontam.ngram.min_words=20"])
    assert _cfg().minhash.bands_rows() == (25, 5)
    assert _cfg("decontam.minhash.bands=16").minhash.bands_rows() == (16, 8)


def _standalone_args(src, out, *extra: str) -> argparse.Namespace:
    """`glan decontaminate` arguments as the command line parses them."""
    from jobs.cli.args import add_config_args
    from jobs.decontam.files import add_arguments

    parser = add_config_args(add_arguments(argparse.ArgumentParser()))
    return parser.parse_args(["--input", str(src), "--text-fields", "prompt,response", "--output", str(out),
                              "--benchmarks", "gsm8k", *extra])


@pytest.mark.slow
def test_standalone_command_writes_delta_tables_that_glan_sql_reads(spark, tmp_path, capsys):
    from deltalake import DeltaTable

    from jobs.cli.main import main as glan

    spec_items = build_benchmark_items(spark, _cfg("decontam.benchmarks=[gsm8k]")).limit(3).collect()
    rows = [{"prompt": "Tell me about the ocean and its tides in two short sentences.", "response": "Tides."},
            {"prompt": spec_items[0]["text"], "response": "copied"},
            {"prompt": "What is 2 + 2?", "response": "4"}]
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    report = run(_standalone_args(src, out))  # the benchmarks: the tests' shared copy (conftest)
    clean = DeltaTable(str(out / "instructions")).to_pandas()
    found = DeltaTable(str(out / "contamination")).to_pandas()
    assert sorted(clean.columns) == ["prompt", "response"]
    assert len(clean) == 2 and spec_items[0]["text"] not in set(clean["prompt"])
    assert set(found["benchmark"]) == {"gsm8k"} and set(found["field"]) == {"prompt"}
    assert "gsm8k" in report and "removed: 1" in report
    assert list((out / "_scratch").iterdir()) == []  # the staged benchmark file is gone
    capsys.readouterr()
    assert glan(["sql", "--set", f"run_root={out}", "--format", "json",
                 "SELECT count(*) AS n, min(prompt) AS first FROM instructions"]) == 0
    answer = capsys.readouterr().out
    assert '"n": 2' in answer and '"first": "Tell me about the ocean' in answer
    assert glan(["sql", "--set", f"run_root={out}", "--format", "json",
                 "SELECT count(*) AS n FROM contamination"]) == 0
    assert f'"n": {len(found)}' in capsys.readouterr().out
    run(_standalone_args(src, out, "--benchmarks", "humaneval"))  # a rerun replaces the tables
    assert len(DeltaTable(str(out / "instructions")).to_pandas()) == 3


GOOD = json.dumps({"prompt": "What is the capital of France?", "response": "Paris."})


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"prompt": "unterminated', GOOD], r"line 2 is not valid JSON \(Unterminated string"),
    ([GOOD, "", GOOD, json.dumps({"prompt": "no answer"})], r"line 4 has no field 'response'"),
    ([GOOD, json.dumps({"prompt": None, "response": "x"})], r"line 2 has no field 'prompt'"),
    ([json.dumps({"question": "q", "answer": "a"})], r"line 1 has no field 'prompt'"),
    (["[1, 2]", GOOD], r"line 1 is not a JSON object"),
])
def test_bad_input_records_stop_the_run_with_file_line_and_field(spark, tmp_path, capsys, lines, message):
    from jobs.cli.main import main as glan

    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"^{src}: {message}"):
        run(_standalone_args(src, out))
    assert not out.exists()  # nothing written
    capsys.readouterr()
    assert glan(["decontaminate", "--input", str(src), "--text-fields", "prompt,response",
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"glan: error: {src}: line ")


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_input_says_it_is_empty(spark, tmp_path, content):
    src = tmp_path / "empty.jsonl"
    src.write_text(content)
    with pytest.raises(InputError, match=rf"^{src}: the input is empty \(no records\)$"):
        run(_standalone_args(src, tmp_path / "out"))


@pytest.mark.slow
@pytest.mark.parametrize("how", [["--skip-bad-records"], ["--set", "decontam.skip_bad_records=true"]])
def test_bad_records_can_be_skipped_and_counted(spark, tmp_path, how):
    from deltalake import DeltaTable

    src = tmp_path / "data.jsonl"
    src.write_text("\n".join([GOOD, '{"prompt": "broken', json.dumps({"prompt": "only a prompt"}),
                              json.dumps({"prompt": "2 + 2?", "response": "4"})]) + "\n")
    report = run(_standalone_args(src, tmp_path / "out", *how))
    assert report.startswith("skipped 2 bad input records: 1 not valid JSON, 1 without 'response'\n"
                             "pairs in: 2, clean: 2, removed: 0")
    clean = DeltaTable(str(tmp_path / "out" / "instructions")).to_pandas()
    assert sorted(clean["prompt"]) == ["2 + 2?", "What is the capital of France?"]
    assert "_corrupt_record" not in clean.columns


def test_staged_benchmark_items_are_read_from_a_file_not_shipped_in_tasks(spark, tmp_path):
    cfg = _cfg("decontam.benchmarks=[gsm8k,humaneval]")
    expected = sorted(tuple(r) for r in build_benchmark_items(spark, cfg).collect())
    with staged_benchmark_items(spark, cfg, str(tmp_path / "scratch")) as staged:
        plan = staged._jdf.queryExecution().executedPlan().toString()
        assert "FileScan parquet" in plan and "LocalTableScan" not in plan and "Scan ExistingRDD" not in plan
        assert sorted(tuple(r) for r in staged.collect()) == expected
    assert list((tmp_path / "scratch").iterdir()) == []


def test_benchmark_items_follow_the_files_and_are_rewritten_only_when_they_change(spark, tmp_path):
    import gzip
    import shutil

    from jobs.storage.delta import get_storage
    from jobs.decontaminate import _benchmark_items
    from jobs.pipeline.stage import StageContext

    bench = tmp_path / "benchmarks"
    bench.mkdir()
    shutil.copy(SHARED / "benchmarks" / "gsm8k.jsonl.gz", bench / "gsm8k.jsonl.gz")
    cfg = load_config(sets=[f"run_root={tmp_path / 'run'}", "storage.backend=embedded",
                            f"decontam.benchmarks_dir={bench}", "decontam.benchmarks=[gsm8k]"])
    storage = get_storage(spark, cfg)
    first = _benchmark_items(StageContext("decontaminate", spark, cfg)).count()
    assert first > 1000 and storage.info("benchmark_items").version == 0
    _benchmark_items(StageContext("decontaminate", spark, cfg))
    assert storage.info("benchmark_items").version == 0  # same files: not rewritten
    records = gzip.decompress((bench / "gsm8k.jsonl.gz").read_bytes()).splitlines()[:10]
    (bench / "gsm8k.jsonl.gz").write_bytes(gzip.compress(b"\n".join(records) + b"\n"))
    assert _benchmark_items(StageContext("decontaminate", spark, cfg)).count() == 10  # same name, new content: rebuilt
    assert storage.info("benchmark_items").version == 1
    assert list((tmp_path / "run" / "_scratch").iterdir()) == []


def test_missing_benchmarks_leave_the_output_folder_alone(spark, tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text(GOOD + "\n")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"lacks gsm8k.jsonl.gz: run `glan benchmarks fetch --dest "):
        run(_standalone_args(src, out, "--set", f"decontam.benchmarks_dir={tmp_path / 'none'}"))
    assert not out.exists()
