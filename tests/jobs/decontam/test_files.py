"""What `glan decontaminate` (jobs/decontam/files.py) and the pipeline's decontaminate stage say
about the benchmarks they were asked to check: an unknown name stops the run before Spark starts,
the report names every benchmark asked for (zeros included), and one that contributed less than
asked (no items, a split of the registry's `splits` absent, no word to check) is a WARNING line."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from tests.support import SHARED
from jobs.config.loader import load_config
from jobs.decontam import registry
from jobs.decontam.detect import benchmark_coverage, format_report
from jobs.decontam.files import run
from jobs.decontam.registry import BenchmarkCoverage, BenchmarkSpec
from jobs.errors import ConfigError, InputError

GSM8K = SHARED / "benchmarks" / "gsm8k.jsonl.gz"
MINE_TEXTS = [
    "A farmer plants seven rows of tulips with eleven bulbs in each row and then gives away nine bulbs.",
    "Which layer of the atmosphere holds most of the ozone that absorbs ultraviolet light from the sun?",
    "Write a function that returns the longest run of equal neighbouring characters in a string.",
]


def _standalone_args(src, out, *extra: str) -> argparse.Namespace:
    """`glan decontaminate` arguments as the command line parses them."""
    from jobs.cli.args import add_config_args
    from jobs.decontam.files import add_arguments

    parser = add_config_args(add_arguments(argparse.ArgumentParser()))
    return parser.parse_args(["--input", str(src), "--text-fields", "prompt,response", "--output", str(out),
                              *extra])


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def short_registry(tmp_path):
    """A registry of four benchmarks: gsm8k (all there), `mine` (asks for test and train, holds
    test only), `symbols` (its items are brackets only) and `later` (asks for a split it lacks)."""
    mine = _write_jsonl(tmp_path / "mine.jsonl", [{"id": f"m{i}", "split": "test", "q": t}
                                                  for i, t in enumerate(MINE_TEXTS)])
    symbols = _write_jsonl(tmp_path / "symbols.jsonl", [{"expr": "( [ { < > } ] )"}, {"expr": "[ ] ( )"}])
    entries = [
        {"name": "gsm8k", "file": str(GSM8K), "text_fields": ["question", "answer"], "split": "test"},
        {"name": "mine", "file": mine, "text_fields": ["q"], "split_field": "split", "splits": ["test", "train"],
         "id_fields": ["id"]},
        {"name": "symbols", "file": symbols, "text_fields": ["expr"], "split": "test"},
        {"name": "later", "file": mine, "text_fields": ["q"], "split_field": "split", "splits": ["train"]},
    ]
    path = tmp_path / "registry.yaml"
    path.write_text(json.dumps({"benchmarks": entries}))  # JSON is YAML
    return path


def _gsm8k_question() -> str:
    import gzip

    with gzip.open(GSM8K, "rt") as fh:
        return json.loads(fh.readline())["question"]


def _table(report: str) -> dict[str, list[str]]:
    """The report's benchmark lines: name -> [items, removed, ngram, minhash, near_dup, splits...]."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("benchmark "))
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1:] if not line.startswith("WARNING")}


# ---------------------------------------------------------------------------------------------
# The registry: splits asked for, names as typed


def test_registry_splits_need_a_split_field():
    entry = {"name": "x", "file": "x.jsonl", "text_fields": ["t"]}
    spec, = registry.parse_registry({"benchmarks": [{**entry, "split_field": "s", "splits": "test"}]}, "reg.yaml")
    assert spec.splits == ("test",)
    with pytest.raises(ConfigError, match=r"reg\.yaml: benchmarks\[0\]: benchmark 'x': splits needs split_field"):
        registry.parse_registry({"benchmarks": [{**entry, "split": "test", "splits": ["train"]}]}, "reg.yaml")


def test_benchmark_rows_keep_the_registry_splits_and_name_repeats_by_file_position(tmp_path):
    path = _write_jsonl(tmp_path / "b.jsonl", [{"k": "a", "s": "dev", "q": "q0"}, {"k": "a", "s": "test", "q": "q1"},
                                               {"k": "a", "s": "train", "q": "q2"}, {"k": "b", "s": "test", "q": "q3"}])
    spec = BenchmarkSpec(name="b", file=path, text_fields=("q",), split_field="s", splits=("train", "test"),
                         id_fields=("k",))
    assert registry.benchmark_rows(spec, str(tmp_path)) == [("b", "test", "1", "q1"), ("b", "train", "2", "q2"),
                                                            ("b", "test", "3", "q3")]
    absent = BenchmarkSpec(name="b", file=path, text_fields=("q",), split_field="s", splits=("validation",))
    assert registry.benchmark_rows(absent, str(tmp_path)) == []  # no error: the report warns
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="benchmark 'e' has no records"):
        registry.benchmark_rows(BenchmarkSpec(name="e", file=str(empty), text_fields=("q",), split="test"),
                                str(tmp_path))


def test_names_are_taken_as_typed_around_commas():
    names = [s.name for s in registry.load_registry("benchmarks.yaml", ["gsm8k", " humaneval ", ""])]
    assert names == ["humaneval", "gsm8k"]


# ---------------------------------------------------------------------------------------------
# Coverage and its warnings (no Spark)


def _spec(**kw) -> BenchmarkSpec:
    return BenchmarkSpec(**{"name": "b", "file": "b.jsonl", "text_fields": ("q", "a"), "split_field": "split", **kw})


@pytest.mark.parametrize("coverage, expected", [
    (BenchmarkCoverage(_spec(), "/d/b.jsonl", items=(("test", 5),)), []),
    (BenchmarkCoverage(_spec(splits=("test", "train")), "/d/b.jsonl", items=(("test", 5),)),
     ["benchmark 'b': /d/b.jsonl holds no record of split(s) train (the registry's splits: test, train); "
      "only test 5 checked"]),
    (BenchmarkCoverage(_spec(splits=("train",)), "/d/b.jsonl"),
     ["benchmark 'b' contributed no items: /d/b.jsonl holds no record of split(s) train; nothing of it was checked"]),
    (BenchmarkCoverage(_spec(), "/d/b.jsonl", items=(("test", 2),), without_words=(("test", 2),)),
     ["benchmark 'b' contributed no items: none of its 2 items has a word in its text_fields (q, a); "
      "nothing of it was checked"]),
    (BenchmarkCoverage(_spec(), "/d/b.jsonl", items=(("test", 3),), without_words=(("test", 2),)), []),
    (BenchmarkCoverage(_spec(), "/d/b.jsonl"),
     ["benchmark 'b' contributed no items: no item was read from /d/b.jsonl; nothing of it was checked"]),
], ids=["complete", "split-missing", "no-items", "no-words", "some-without-words", "nothing-read"])
def test_coverage_warns_about_each_shortfall(coverage, expected):
    assert coverage.warnings() == expected


def test_coverage_lists_splits_and_items_without_words():
    cov = BenchmarkCoverage(_spec(), "/d/b.jsonl", items=(("test", 7), ("validation", 2)),
                            without_words=(("test", 1),))
    assert (cov.num_items, cov.num_without_words) == (9, 1)
    assert cov.splits_text() == "test 7, validation 2 (1 without a word to check)"


# ---------------------------------------------------------------------------------------------
# Coverage from the items, and the report (Spark, tiny data)


def test_benchmark_coverage_counts_items_per_split_and_lists_benchmarks_without_any(spark, short_registry):
    cfg = load_config(sets=[f"decontam.registry={short_registry}"]).decontam
    items = spark.createDataFrame(
        [("mine", "test", "m0", MINE_TEXTS[0]), ("mine", "test", "m1", "?!"), ("symbols", "test", "0", "( )"),
         ("gsm8k", "test", "0", "Janet has ducks.")],
        "benchmark string, split string, item_id string, text string")
    coverage = {c.spec.name: c for c in benchmark_coverage(items, cfg)}
    assert list(coverage) == ["gsm8k", "mine", "symbols", "later"]  # registry order, every one asked for
    assert coverage["mine"].items == (("test", 2),) and coverage["mine"].without_words == (("test", 1),)
    assert coverage["symbols"].num_without_words == coverage["symbols"].num_items == 1
    assert coverage["later"].items == () and coverage["later"].path == str(short_registry.parent / "mine.jsonl")


def test_format_report_lists_every_benchmark_then_warnings_last(spark):
    report = spark.createDataFrame([("b", 2, 2, 1, 0), ("self", 1, 0, 0, 1)],
                                   "benchmark string, num_pairs long, num_pairs_ngram long, "
                                   "num_pairs_minhash long, num_pairs_near_duplicate long")
    coverage = [BenchmarkCoverage(_spec(), "/d/b.jsonl", items=(("test", 4),)),
                BenchmarkCoverage(_spec(name="c", splits=("train",)), "/d/c.jsonl")]
    lines = format_report(report, 10, 7, coverage).splitlines()
    assert lines[0] == "pairs in: 10, clean: 7, removed: 3"
    table = _table("\n".join(lines))
    assert table == {"b": ["4", "2", "2", "1", "0", "test", "4"], "c": ["0", "0", "0", "0", "0", "-"],
                     "self": ["-", "1", "0", "0", "1"]}
    assert lines[-1] == ("WARNING: benchmark 'c' contributed no items: /d/c.jsonl holds no record of split(s) "
                         "train; nothing of it was checked")
    assert sum(line.startswith("WARNING") for line in lines) == 1


# ---------------------------------------------------------------------------------------------
# `glan decontaminate`


def test_an_unknown_benchmark_is_one_line_exit_2_before_spark_starts(tmp_path, capsys, monkeypatch):
    from jobs.cli.main import main as glan
    from jobs.decontam import files

    def no_spark(*args, **kwargs):
        raise AssertionError("Spark was started")

    monkeypatch.setattr(files, "get_spark", no_spark)
    src = _write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "response": "r"}])
    assert glan(["decontaminate", "--input", src, "--text-fields", "prompt,response", "--output",
                 str(tmp_path / "out"), "--benchmarks", "gsm8k,nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown benchmark(s) nosuch; known: arc_challenge, arc_easy" in err[0]
    with pytest.raises(InputError, match=r"lacks gsm8k\.jsonl\.gz"):  # a missing file: the same, before Spark
        run(_standalone_args(src, tmp_path / "out", "--benchmarks", "gsm8k",
                             "--set", f"decontam.benchmarks_dir={tmp_path / 'none'}"))
    assert not (tmp_path / "out").exists()


def test_report_names_every_benchmark_asked_for_and_warns_about_shortfalls(spark, tmp_path, short_registry):
    src = _write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": _gsm8k_question(), "response": "copied"},
        {"prompt": "Tell me a fact.", "response": MINE_TEXTS[1]},
        {"prompt": "What is the capital of France?", "response": "Paris."},
    ])
    report = run(_standalone_args(src, tmp_path / "out", "--set", f"decontam.registry={short_registry}"))
    assert report.startswith("pairs in: 3, clean: 1, removed: 2\n")
    table = _table(report)
    assert list(table) == ["gsm8k", "mine", "symbols", "later"]
    assert table["gsm8k"][:2] == ["1319", "1"] and table["mine"][:2] == ["3", "1"]
    assert table["mine"][5:] == ["test", "3"]
    assert table["symbols"] == ["2", "0", "0", "0", "0", "test", "2", "(2", "without", "a", "word", "to", "check)"]
    assert table["later"] == ["0", "0", "0", "0", "0", "-"]
    warnings = [line for line in report.splitlines() if line.startswith("WARNING: ")]
    assert [w.split("'")[1] for w in warnings] == ["mine", "symbols", "later"]
    assert "holds no record of split(s) train" in warnings[0] and "only test 3 checked" in warnings[0]


# ---------------------------------------------------------------------------------------------
# The pipeline's stage


def _stage_cfg(tmp_path, *sets: str):
    return load_config(sets=[f"run_root={tmp_path / 'run'}", "storage.backend=embedded", *sets])


def test_stage_refuses_an_unknown_benchmark_even_without_pairs(spark, tmp_path):
    from jobs.decontaminate import run as run_stage
    from jobs.pipeline.stage import StageContext

    cfg = _stage_cfg(tmp_path, "decontam.benchmarks=[gsm8k, nosuch]")
    with pytest.raises(ConfigError, match=r"unknown benchmark\(s\) nosuch"):
        run_stage(StageContext("decontaminate", spark, cfg))
    assert run_stage(StageContext("decontaminate", spark, _stage_cfg(tmp_path, "decontam.benchmarks=[gsm8k]"))) \
        == {"pairs": 0, "clean": 0}


def test_stage_logs_a_warning_per_shortfall_and_counts_benchmarks(spark, tmp_path, short_registry, monkeypatch,
                                                                   caplog):
    import jobs.decontaminate as stage
    from jobs.pipeline.stage import StageContext
    from jobs.storage.tables import INSTRUCTIONS

    def pair(pid: str, question: str) -> tuple:
        return (pid, pid, "c", "y", "s", "d", "Science", "Physics", "Optics", "college", question, "An answer.",
                "m", "m")

    pairs = spark.createDataFrame([pair("q1", _gsm8k_question()), pair("q2", "Why is the sky blue at noon?")],
                                  INSTRUCTIONS.schema)
    monkeypatch.setattr(stage, "glan_pairs", lambda storage: pairs)
    cfg = _stage_cfg(tmp_path, f"decontam.registry={short_registry}")
    with caplog.at_level(logging.WARNING, logger="jobs.decontaminate"):
        figures = stage.run(StageContext("decontaminate", spark, cfg))
    assert figures["pairs"] == 2 and figures["clean"] == 1 and figures["removed_gsm8k"] == 1
    assert (figures["benchmarks"], figures["benchmark_items"], figures["benchmark_warnings"]) == (4, 1319 + 3 + 2, 3)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m.split("'")[1] for m in warned if m.startswith("decontaminate: benchmark")] == ["mine", "symbols", "later"]
