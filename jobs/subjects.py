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

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.common.config import GlanConfig
from jobs.common.llmstage import RESULT, run_llm_step, selected_disciplines, stable_id, usage_columns
from jobs.common.storage import differing_values, get_storage
from udfs.schemas import subjects_schema

USES_LLM = True

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


def run_stage(spark: SparkSession, cfg: GlanConfig, disciplines: list[str] | None = None) -> dict:
    sc = cfg.subjects
    storage = get_storage(spark, cfg)
    chosen = selected_disciplines(spark, cfg, disciplines)

    requests = list_requests(chosen, sc.samples_per_discipline)
    lists = run_llm_step(
        storage.missing_rows(requests, "subject_lists", "list_id"),
        stage="subjects", prompt="subjects_list", stage_llm=sc.llm,
        inputs=["discipline", "sub_field", "field"], seed="sample_index",
        key="list_id", output="subject_lists", output_key="list_id", cfg=cfg, scope=chosen,
        to_output=lambda ok: ok.select("list_id", "discipline_id", F.col("sample_index").cast("int"),
                                       F.col(RESULT)["text"].alias("subjects_text"), *usage_columns(sc.llm)),
    )

    listed = (storage.read_or_empty("subject_lists").join(chosen.select("discipline_id", "discipline"),
                                                           "discipline_id", "inner"))
    conversions = run_llm_step(
        storage.missing_rows(listed, "subject_conversions", "list_id"),
        stage="subjects", prompt="subjects_convert", stage_llm=sc.convert_llm,
        schema=subjects_schema(sc.max_subjects_per_sample),
        inputs=["discipline", "subjects_text"],
        key="list_id", output="subject_conversions", output_key="list_id", cfg=cfg, scope=chosen,
        to_output=lambda ok: ok.select("list_id", "discipline_id", "sample_index",
                                       F.col(RESULT)["parsed"].alias("subjects_json"), *usage_columns(sc.convert_llm)),
    )
    rebuilt = storage.rebuild("subjects", lambda: subjects_behind(storage, chosen), column="discipline_id")
    return {**lists.figures("lists"), **conversions.figures("conversions"),
            "subjects_rebuilt": rebuilt.rows_written if rebuilt else 0}


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
    from jobs.common.pipeline import stage_main

    return stage_main("subjects", argv)


if __name__ == "__main__":
    sys.exit(main())
