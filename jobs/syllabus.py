"""GLAN step 3: syllabi. Reads `subjects`; writes `syllabi`, `session_lists`, `sessions`.

One call per subject designs the syllabus (free text, kept whole); a second call extracts its class
sessions, each with name, description and key concepts.
Run: spark-submit jobs/syllabus.py --conf conf/local.yaml [--disciplines "Mathematics"]
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.common.config import GlanConfig
from jobs.common.llmstage import RESULT, run_llm_step, selected_disciplines, stable_id, usage_columns
from jobs.common.storage import get_storage
from udfs.schemas import sessions_schema

USES_LLM = True

PARSED_SESSIONS = T.StructType([T.StructField("sessions", T.ArrayType(T.StructType([
    T.StructField("name", T.StringType()),
    T.StructField("description", T.StringType()),
    T.StructField("key_concepts", T.ArrayType(T.StringType())),
])))])


def build_sessions(session_lists: DataFrame) -> DataFrame:
    """One row per class session, in teaching order; blank concepts are dropped."""
    exploded = session_lists.select(
        "syllabus_id", "discipline_id",
        F.posexplode(F.from_json("sessions_json", PARSED_SESSIONS)["sessions"]).alias("session_index", "s"),
    )
    concepts = F.filter(F.transform("s.key_concepts", lambda c: F.trim(c)), lambda c: F.length(c) > 0)
    return exploded.select(
        stable_id("syllabus_id", "session_index").alias("session_id"),
        "syllabus_id", "discipline_id",
        F.col("session_index").cast("int").alias("session_index"),
        F.trim("s.name").alias("session_name"),
        F.trim("s.description").alias("description"),
        concepts.alias("key_concepts"),
        F.size(concepts).cast("int").alias("num_concepts"),
    )


def run_stage(spark: SparkSession, cfg: GlanConfig, disciplines: list[str] | None = None) -> dict:
    sy = cfg.syllabus
    storage = get_storage(spark, cfg)
    chosen = selected_disciplines(spark, cfg, disciplines).select("discipline_id", "discipline")
    subjects = storage.read_or_empty("subjects").join(chosen, "discipline_id", "inner")

    todo = storage.missing_rows(subjects, "syllabi", "subject_id").withColumn("syllabus_id", stable_id("subject_id"))
    syllabi = run_llm_step(
        todo, stage="syllabus", prompt="syllabus", stage_llm=sy.llm,
        inputs=["subject_name", "level", "subtopics", "discipline"],
        key="syllabus_id", output="syllabi", output_key="syllabus_id", cfg=cfg, scope=chosen,
        to_output=lambda ok: ok.select("syllabus_id", "subject_id", "discipline_id",
                                       F.col(RESULT)["text"].alias("syllabus_text"), *usage_columns(sy.llm)),
    )

    written = (storage.read_or_empty("syllabi").join(chosen, "discipline_id", "inner")
               .join(storage.read_or_empty("subjects").select("subject_id", "subject_name"), "subject_id", "inner"))
    extracted = run_llm_step(
        storage.missing_rows(written, "session_lists", "syllabus_id"),
        stage="syllabus", prompt="syllabus_extract", stage_llm=sy.extract_llm,
        schema=sessions_schema(sy.max_sessions, sy.max_concepts_per_session),
        inputs=["subject_name", "syllabus_text"],
        key="syllabus_id", output="session_lists", output_key="syllabus_id", cfg=cfg, scope=chosen,
        to_output=lambda ok: ok.select("syllabus_id", "discipline_id", F.col(RESULT)["parsed"].alias("sessions_json"),
                                       *usage_columns(sy.extract_llm)),
    )
    if storage.exists("session_lists"):
        lists = storage.read_or_empty("session_lists")
        storage.append_missing(build_sessions(storage.missing_rows(lists, "sessions", "syllabus_id")),
                               "sessions", "session_id")
    return {**syllabi.figures("syllabi"), **extracted.figures("extractions")}


def main(argv: list[str] | None = None) -> int:
    from jobs.common.pipeline import stage_main

    return stage_main("syllabus", argv)


if __name__ == "__main__":
    sys.exit(main())
