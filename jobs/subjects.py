"""GLAN step 2: subjects. Reads `taxonomy`; writes `subject_lists`, `subject_conversions`, `subjects`.

For each discipline, `subjects.samples_per_discipline` free-text calls (an education expert lists
what a student should learn), then one conversion call per list into subject_name / level /
subtopics. Within one discipline the same subject named by several samples is one row, the first
sample's, that counts them; across disciplines nothing is merged (the paper keeps calculus in
physics and mathematics).
Run: spark-submit jobs/subjects.py --conf conf/local.yaml [--disciplines "Mathematics,Physics"]
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.pipeline.keys import stable_id
from jobs.pipeline.llmstep import RESULT, ask, usage_columns
from jobs.pipeline.runner import stage_main
from jobs.pipeline.stage import LLMCall, Stage, StageContext
from jobs.storage.delta import differing_values
from udfs.llm.schemas import subjects_schema

PARSED_SUBJECTS = T.StructType([T.StructField("subjects", T.ArrayType(T.StructType([
    T.StructField("subject_name", T.StringType()),
    T.StructField("level", T.StringType()),
    T.StructField("subtopics", T.ArrayType(T.StringType())),
])))])


def list_requests(disciplines: DataFrame, samples: int) -> DataFrame:
    """One row per (discipline, sample): the free-text calls this discipline needs."""
    return disciplines.select(
        "discipline_id", "discipline", "sub_field", "field",
        F.explode(F.sequence(F.lit(0), F.lit(samples - 1))).alias("sample_index"),
    ).withColumn("list_id", stable_id("discipline_id", "sample_index"))


def build_subjects(conversions: DataFrame) -> DataFrame:
    """Merge the samples of each discipline: one row per (discipline, normalised subject name).

    As in the paper, a subject is one sample's subject: the first sample that named it (lowest
    sample index, then its place in that sample's list) gives its name, level and subtopics in
    their own order; the other samples only count (`num_samples`, `sample_indices`)."""
    exploded = (
        conversions
        .select("discipline_id", "sample_index",
                F.posexplode(F.from_json("subjects_json", PARSED_SUBJECTS)["subjects"]).alias("_position", "s"))
        .select("discipline_id", "sample_index", "_position",
                F.trim(F.col("s.subject_name")).alias("subject_name"),
                F.trim(F.col("s.level")).alias("level"), F.col("s.subtopics").alias("subtopics"))
        .filter(F.length("subject_name") > 0)
        .withColumn("_name_key", F.trim(F.regexp_replace(F.lower("subject_name"), r"[\s]+", " ")))
    )
    first = F.min(F.struct(F.col("sample_index").cast("int"), "_position", "subject_name", "level",
                           F.coalesce("subtopics", F.array().cast("array<string>")).alias("subtopics")))
    grouped = exploded.groupBy("discipline_id", "_name_key").agg(
        first.alias("_first"),
        F.countDistinct("sample_index").cast("int").alias("num_samples"),
        F.array_sort(F.collect_set(F.col("sample_index").cast("int"))).alias("sample_indices"),
    )
    return grouped.select(
        stable_id("discipline_id", "_name_key").alias("subject_id"),
        "discipline_id", F.col("_first.subject_name").alias("subject_name"), F.col("_first.level").alias("level"),
        F.col("_first.subtopics").alias("subtopics"), "num_samples", "sample_indices",
    )


def _list_rows(ctx: StageContext) -> DataFrame:
    return list_requests(ctx.chosen, ctx.cfg.subjects.samples_per_discipline)


def _conversion_rows(ctx: StageContext) -> DataFrame:
    return ctx.storage.read_or_empty("subject_lists").join(ctx.chosen.select("discipline_id", "discipline"),
                                                          "discipline_id", "inner")


LISTS = LLMCall(
    prompt="subjects_list", settings="subjects.llm", rows=_list_rows,
    inputs=("discipline", "sub_field", "field"),
    key="list_id", output="subject_lists", output_key="list_id",
    to_output=lambda ok, llm: ok.select("list_id", "discipline_id", F.col("sample_index").cast("int"),
                                        F.col(RESULT)["text"].alias("subjects_text"), *usage_columns(llm)),
    volume=lambda v: v.disciplines * v.samples_per_discipline,
)

CONVERSIONS = LLMCall(
    prompt="subjects_convert", settings="subjects.convert_llm", rows=_conversion_rows,
    schema=lambda cfg: subjects_schema(cfg.subjects.max_subjects_per_sample),
    inputs=("discipline", "subjects_text"),
    key="list_id", output="subject_conversions", output_key="list_id",
    to_output=lambda ok, llm: ok.select("list_id", "discipline_id", "sample_index",
                                        F.col(RESULT)["parsed"].alias("subjects_json"), *usage_columns(llm)),
    volume=lambda v: v.disciplines * v.samples_per_discipline,
)


def run(ctx: StageContext) -> dict:
    lists = ask(ctx, LISTS)
    conversions = ask(ctx, CONVERSIONS)
    rebuilt = ctx.storage.rebuild("subjects", lambda: subjects_behind(ctx.storage, ctx.chosen), column="discipline_id")
    return {**lists.figures("lists"), **conversions.figures("conversions"),
            "subjects_rebuilt": rebuilt.rows_written if rebuilt else 0}


STAGE = Stage(name="subjects", reads=("taxonomy",), writes=("subject_lists", "subject_conversions", "subjects"),
              calls=(LISTS, CONVERSIONS), run=run,
              description="`subjects.samples_per_discipline` free-text subject lists per discipline, each "
                          "converted to subjects with level and subtopics; merged per discipline")


def subjects_behind(storage, chosen: DataFrame) -> tuple[DataFrame, list[str]] | None:
    """Derived, no LLM: the subjects of every chosen discipline whose rows differ from what its
    conversions give now (a conversion added, or a run killed before it rebuilt them), with those
    disciplines; None when every one is up to date. Compared, never remembered."""
    ids = chosen.select("discipline_id")
    expected = build_subjects(storage.read_or_empty("subject_conversions").join(ids, "discipline_id", "inner"))
    current = storage.read_or_empty("subjects").join(ids, "discipline_id", "inner")
    behind = differing_values(expected, current, "discipline_id")
    if not behind:
        return None
    return expected.filter(F.col("discipline_id").isin(behind)), behind


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
