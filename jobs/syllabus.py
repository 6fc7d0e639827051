"""GLAN step 3: syllabi. Reads `subjects`; writes `syllabi`, `session_lists`, `sessions`.

One call per subject designs the syllabus (free text, kept whole); a second call extracts its class
sessions, each with name, description and key concepts.
Run: spark-submit jobs/syllabus.py --conf conf/local.yaml [--disciplines "Mathematics"]
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
from udfs.llm.schemas import sessions_schema

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


def _syllabus_rows(ctx: StageContext) -> DataFrame:
    chosen = ctx.chosen.select("discipline_id", "discipline")
    return (ctx.storage.read_or_empty("subjects").join(chosen, "discipline_id", "inner")
            .withColumn("syllabus_id", stable_id("subject_id")))


def _extract_rows(ctx: StageContext) -> DataFrame:
    chosen = ctx.chosen.select("discipline_id", "discipline")
    return (ctx.storage.read_or_empty("syllabi").join(chosen, "discipline_id", "inner")
            .join(ctx.storage.read_or_empty("subjects").select("subject_id", "subject_name"), "subject_id", "inner"))


SYLLABI = LLMCall(
    prompt="syllabus", settings="syllabus.llm", rows=_syllabus_rows,
    inputs=("subject_name", "level", "subtopics", "discipline"),
    key="syllabus_id", output="syllabi", output_key="syllabus_id",
    to_output=lambda ok, llm: ok.select("syllabus_id", "subject_id", "discipline_id",
                                        F.col(RESULT)["text"].alias("syllabus_text"), *usage_columns(llm)),
    volume=lambda v: v.subjects,
)

EXTRACTIONS = LLMCall(
    prompt="syllabus_extract", settings="syllabus.extract_llm", rows=_extract_rows,
    schema=lambda cfg: sessions_schema(cfg.syllabus.max_sessions, cfg.syllabus.max_concepts_per_session),
    inputs=("subject_name", "syllabus_text"),
    key="syllabus_id", output="session_lists", output_key="syllabus_id",
    to_output=lambda ok, llm: ok.select("syllabus_id", "discipline_id", F.col(RESULT)["parsed"].alias("sessions_json"),
                                        *usage_columns(llm)),
    volume=lambda v: v.subjects,
)


def run(ctx: StageContext) -> dict:
    syllabi = ask(ctx, SYLLABI)
    extracted = ask(ctx, EXTRACTIONS)
    storage = ctx.storage
    if storage.exists("session_lists"):
        lists = storage.read_or_empty("session_lists")
        storage.append_missing(build_sessions(storage.missing_rows(lists, "sessions", "syllabus_id")),
                               "sessions", "session_id")
    return {**syllabi.figures("syllabi"), **extracted.figures("extractions")}


STAGE = Stage(name="syllabus", reads=("subjects", "taxonomy"), writes=("syllabi", "session_lists", "sessions"),
              calls=(SYLLABI, EXTRACTIONS), run=run,
              description="one syllabus per subject, then its class sessions with key concepts extracted")


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
