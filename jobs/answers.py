"""GLAN step 5: answers. Reads `questions`; writes `answers`, one per question, from the cheaper
model (T 0.7, top_p 0.95). Each answer keeps the ids that join it back to its question,
combination, syllabus, subject and discipline (and through `taxonomy`, its field).
Run: spark-submit jobs/answers.py --conf conf/local.yaml
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.pipeline.llmstep import RESULT, ask, usage_columns
from jobs.pipeline.runner import stage_main
from jobs.pipeline.stage import LLMCall, Stage, StageContext


def _answer_rows(ctx: StageContext) -> DataFrame:
    """Every question with text."""
    return ctx.mine("questions").withColumn("answer_id", F.col("question_id")).filter(F.length(F.trim("question")) > 0)


ANSWERS = LLMCall(
    prompt="answer", settings="answers.llm", rows=_answer_rows,
    inputs=("question",), constants=lambda cfg: {"system_prompt": cfg.answers.system_prompt or ""},
    key="answer_id", output="answers", output_key="answer_id",
    to_output=lambda ok, llm: ok.select("answer_id", "question_id", "combination_id", "syllabus_id", "subject_id",
                                        "discipline_id", F.trim(F.col(RESULT)["text"]).alias("answer"),
                                        *usage_columns(llm)),
    volume=lambda v: v.questions,
)


def run(ctx: StageContext) -> dict:
    return ask(ctx, ANSWERS).figures("answers")


STAGE = Stage(name="answers", reads=("questions",), writes=("answers",), calls=(ANSWERS,), run=run,
              description="one answer per question from the cheaper model")


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
