"""GLAN step 4: questions. Reads `concept_combinations`, `syllabi`, `subjects`; writes `questions`.

The prompt starts with the syllabus text, the same for every question of a subject, so endpoints
with prompt caching reuse it; a subject's questions run next to each other in one task for that
reason. Then the sampled sessions and concepts, and the session students have learned up to.
Run: spark-submit jobs/questions.py --conf conf/local.yaml
"""

from __future__ import annotations

import sys

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.common.config import GlanConfig
from jobs.common.llmstage import RESULT, run_llm_step, selected_disciplines, stable_id, usage_columns
from jobs.common.storage import get_storage

USES_LLM = True


def run_stage(spark: SparkSession, cfg: GlanConfig, disciplines: list[str] | None = None) -> dict:
    qc = cfg.questions
    storage = get_storage(spark, cfg)
    chosen = selected_disciplines(spark, cfg, disciplines).select("discipline_id")
    combos = storage.read_or_empty("concept_combinations").join(chosen, "discipline_id", "inner")
    todo = (
        storage.missing_rows(combos, "questions", "combination_id")
        .withColumn("question_id", stable_id("combination_id", F.lit(0)))
        .join(storage.read_or_empty("syllabi").select("syllabus_id", "subject_id", "syllabus_text"), "syllabus_id")
        .join(storage.read_or_empty("subjects").select("subject_id", "subject_name", "level"), "subject_id")
    )
    step = run_llm_step(
        todo, stage="questions", prompt="question", stage_llm=qc.llm,
        inputs=["subject_name", "level", "syllabus_text", "concepts", "session_names", "learned_up_to",
                "learned_up_to_name"],
        key="question_id", output="questions", output_key="question_id", cfg=cfg, scope=chosen,
        sort_within=("syllabus_id", "combination_index"),
        to_output=lambda ok: ok.select("question_id", "combination_id", "syllabus_id", "subject_id", "discipline_id",
                                       F.trim(F.col(RESULT)["text"]).alias("question"), *usage_columns(qc.llm)),
    )
    return step.figures("questions")


def main(argv: list[str] | None = None) -> int:
    from jobs.common.pipeline import stage_main

    return stage_main("questions", argv)


if __name__ == "__main__":
    sys.exit(main())
