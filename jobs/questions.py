"""GLAN step 4: questions. Reads `concept_combinations`, `syllabi`, `subjects`; writes `questions`.

The prompt starts with the syllabus text, the same for every question of a subject, so endpoints
with prompt caching reuse it; a subject's questions run next to each other in one task for that
reason. Then the sampled sessions and concepts, and the session students have learned up to.
Run: spark-submit jobs/questions.py --conf conf/local.yaml
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.pipeline.keys import stable_id
from jobs.pipeline.llmstep import RESULT, ask, usage_columns
from jobs.pipeline.runner import stage_main
from jobs.pipeline.stage import LLMCall, Stage, StageContext


def _question_rows(ctx: StageContext) -> DataFrame:
    read = ctx.storage.read_or_empty
    return (ctx.mine("concept_combinations")
            .withColumn("question_id", stable_id("combination_id", F.lit(0)))
            .join(read("syllabi").select("syllabus_id", "subject_id", "syllabus_text"), "syllabus_id")
            .join(read("subjects").select("subject_id", "subject_name", "level"), "subject_id"))


QUESTIONS = LLMCall(
    prompt="question", settings="questions.llm", rows=_question_rows,
    inputs=("subject_name", "level", "syllabus_text", "concepts", "session_names", "learned_up_to",
            "learned_up_to_name"),
    key="question_id", output="questions", output_key="question_id",
    sort_within=("syllabus_id", "combination_index"),
    to_output=lambda ok, llm: ok.select("question_id", "combination_id", "syllabus_id", "subject_id", "discipline_id",
                                        F.trim(F.col(RESULT)["text"]).alias("question"), *usage_columns(llm)),
    volume=lambda v: v.questions,
)


def run(ctx: StageContext) -> dict:
    return ask(ctx, QUESTIONS).figures("questions")


STAGE = Stage(name="questions", reads=("concept_combinations", "syllabi", "subjects"), writes=("questions",),
              calls=(QUESTIONS,), run=run,
              description="one homework question per combination, the syllabus text first (prompt-cache friendly)")


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
