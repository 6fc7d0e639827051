"""GLAN step 5: answers. Reads `questions`; writes `answers`, one per question, from the cheaper
model (T 0.7, top_p 0.95). Each answer keeps the ids that join it back to its question,
combination, syllabus, subject and discipline (and through `taxonomy`, its field).
Run: spark-submit jobs/answers.py --conf conf/local.yaml
"""

from __future__ import annotations

import sys

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from jobs.common.config import GlanConfig
from jobs.common.llmstage import RESULT, run_llm_step, selected_disciplines, usage_columns
from jobs.common.storage import get_storage

USES_LLM = True


def run_stage(spark: SparkSession, cfg: GlanConfig, disciplines: list[str] | None = None) -> dict:
    ac = cfg.answers
    storage = get_storage(spark, cfg)
    chosen = selected_disciplines(spark, cfg, disciplines).select("discipline_id")
    questions = storage.read_or_empty("questions").join(chosen, "discipline_id", "inner")
    todo = (storage.missing_rows(questions.withColumn("answer_id", F.col("question_id")), "answers", "answer_id")
            .filter(F.length(F.trim("question")) > 0))
    step = run_llm_step(
        todo, stage="answers", prompt="answer", stage_llm=ac.llm,
        inputs=["question", F.lit(ac.system_prompt or "").alias("system_prompt")],
        key="answer_id", output="answers", output_key="answer_id", cfg=cfg, scope=chosen,
        to_output=lambda ok: ok.select("answer_id", "question_id", "combination_id", "syllabus_id", "subject_id",
                                       "discipline_id", F.trim(F.col(RESULT)["text"]).alias("answer"),
                                       *usage_columns(ac.llm)),
    )
    return step.figures("answers")


def main(argv: list[str] | None = None) -> int:
    from jobs.common.pipeline import stage_main

    return stage_main("answers", argv)


if __name__ == "__main__":
    sys.exit(main())
