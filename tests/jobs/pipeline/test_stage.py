"""A stage is declared once: adding one file to jobs/ puts it in `glan run`, `glan status` and
`glan cost` (also --estimate), in the order its tables say."""

from __future__ import annotations

import sys
import textwrap

import pytest
from pyspark.sql import functions as F

import jobs
from jobs.cli.status import stage_status
from jobs.config.loader import load_config
from jobs.errors import ConfigError, GlanError
from jobs.pipeline.costs import estimate, usage_by_stage
from jobs.pipeline.prices import load_prices
from jobs.pipeline.runner import run_pipeline
from jobs.pipeline.stage import Stage, markdown_table, ordered, stages
from jobs.storage.delta import get_storage
from jobs.storage.tables import ANSWERS, TABLES
from tests.support import REPO

# A whole stage, as a newcomer would write it: one LLM call over the answers, one table.
TOY_STAGE = textwrap.dedent('''
    """A toy stage: asks the answer prompt about every answer. Reads `answers`, writes `toy_notes`."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from jobs.pipeline.llmstep import RESULT, ask, usage_columns
    from jobs.pipeline.stage import LLMCall, Stage
    from jobs.storage.tables import USAGE_FIELDS, TableSpec, register

    register(TableSpec(name="toy_notes", key=("note_id",), schema=T.StructType(
        [T.StructField("note_id", T.StringType()), T.StructField("discipline_id", T.StringType()),
         T.StructField("note", T.StringType())] + [T.StructField(n, t) for n, t in USAGE_FIELDS])))

    NOTES = LLMCall(
        prompt="answer", settings="answers.llm",
        rows=lambda ctx: ctx.mine("answers").select(F.col("answer_id").alias("note_id"), "discipline_id",
                                                     F.col("answer").alias("question")),
        inputs=("question",), constants=lambda cfg: {"system_prompt": ""},
        key="note_id", output="toy_notes", output_key="note_id",
        to_output=lambda ok, llm: ok.select("note_id", "discipline_id", F.col(RESULT)["text"].alias("note"),
                                            *usage_columns(llm)),
        volume=lambda v: v.questions,
    )

    STAGE = Stage(name="toy", reads=("answers",), writes=("toy_notes",), calls=(NOTES,),
                  run=lambda ctx: ask(ctx, NOTES).figures("notes"))
''')


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """jobs/toy.py, without touching the repository: a folder of its own on the package's path."""
    folder = tmp_path / "more_jobs"
    folder.mkdir()
    (folder / "toy.py").write_text(TOY_STAGE)
    monkeypatch.setattr(jobs, "__path__", [*jobs.__path__, str(folder)])
    yield "toy"
    TABLES.pop("toy_notes", None)
    sys.modules.pop("jobs.toy", None)


def test_the_stages_run_in_the_order_their_tables_give():
    names = [s.name for s in stages()]
    assert names == ["taxonomy", "subjects", "syllabus", "combinations", "questions", "answers", "decontaminate"]
    assert all(s.module == f"jobs.{s.name}" for s in stages())


@pytest.mark.slow
def test_a_stage_file_is_found_placed_run_counted_and_priced(spark, fake_llm, tmp_path, toy_stage):
    names = [s.name for s in stages()]
    assert names.index("answers") < names.index("toy")  # it reads what answers writes
    cfg = load_config([], [f"run_root={tmp_path / 'run'}", "storage.backend=embedded", "llm.endpoint=openai",
                           f"llm.base_url={fake_llm.url}", "llm.api_key_env=GLAN_TEST_KEY", "llm.max_attempts=1",
                           "taxonomy.disciplines=[Mathematics]"])
    assert run_pipeline(cfg, stages=["taxonomy"]) == 0
    storage = get_storage(spark, cfg)
    maths = storage.read("taxonomy").filter(F.col("discipline") == "Mathematics").first()["discipline_id"]
    answers = spark.createDataFrame([{"answer_id": f"a{i}", "discipline_id": maths, "answer": f"answer {i}"}
                                     for i in range(3)], ANSWERS.schema)
    storage.append_missing(answers, "answers", "answer_id")

    before = {r["stage"]: r for r in stage_status(spark, cfg)}
    assert (before["toy"]["done"], before["toy"]["to_do"]) == (0, 3)
    assert run_pipeline(cfg, stages=["toy"]) == 0
    assert fake_llm.count() == 3
    after = {r["stage"]: r for r in stage_status(spark, cfg)}
    assert (after["toy"]["done"], after["toy"]["to_do"]) == (3, 0)
    assert after["toy"]["tokens"] > 0 and after["toy"]["truncated"] == "0.0%"

    used = [u for u in usage_by_stage(spark, cfg) if u["stage"] == "toy"]
    assert [(u["table"], u["calls"]) for u in used] == [("toy_notes", 3)]
    prices, assumptions = load_prices()
    planned = [r for r in estimate(cfg, assumptions, prices) if r["stage"] == "toy"]
    questions = next(r for r in estimate(cfg, assumptions, prices) if r["call"] == "question")["calls"]
    assert [(r["call"], r["calls"]) for r in planned] == [("answer", questions)]


def test_stages_that_read_each_other_in_a_circle_are_refused():
    def noop(ctx):
        return {}

    a = Stage(name="a", reads=("t2",), writes=("t1",), run=noop)
    b = Stage(name="b", reads=("t1",), writes=("t2",), run=noop)
    assert [s.name for s in ordered([b, Stage(name="c", reads=(), writes=("t1x",), run=noop)])] == ["b", "c"]
    with pytest.raises(ConfigError, match="cycle"):
        ordered([a, b])


def test_readme_stage_table_is_the_declarations():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- stages:", 1)[1].split("<!-- /stages -->", 1)[0]
    table = block.split("\n", 1)[1].strip()
    assert table == markdown_table(stages()), "README's stage table is stale: paste `glan stages --format markdown`"


def test_a_stage_check_stops_the_run_before_its_first_stage(spark, tmp_path):
    cfg = load_config([], [f"run_root={tmp_path / 'run'}", "storage.backend=embedded",
                           "decontam.benchmarks=[gsm8k, nosuch]"])
    with pytest.raises(GlanError, match="nosuch"):
        run_pipeline(cfg)
    assert not get_storage(spark, cfg).exists("taxonomy")  # nothing ran
