"""GLAN step 4 (sampling): concept combinations. Reads `sessions`; writes `concept_combinations`.

Both strategies of the paper: basic (1-5 key concepts of one class session) and challenging (2-5
concepts from two sessions, both contributing). Seeded and deterministic per syllabus, never the
same combination twice; raising `combinations.questions_per_syllabus` later only adds new ones.
The exact number of possible combinations of each kind is stored with every row. No LLM calls.
Run: spark-submit jobs/combinations.py --conf conf/local.yaml
"""

from __future__ import annotations

import sys

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.glan.combinations import CombinationsConfig, combination_id
from jobs.pipeline.runner import stage_main
from jobs.pipeline.slices import selected_disciplines
from jobs.pipeline.stage import Stage, StageContext
from jobs.storage.tables import CONCEPT_COMBINATIONS


def combinations_for_syllabus(sessions: pd.DataFrame, cc: CombinationsConfig, n: int | None = None) -> pd.DataFrame:
    """The first `n` (default: questions_per_syllabus) combinations of one syllabus (its sessions'
    rows, any order) as output rows."""
    sessions = sessions.sort_values("session_index")
    syllabus_id = sessions["syllabus_id"].iloc[0]
    discipline_id = sessions["discipline_id"].iloc[0]
    concepts = [list(c) if c is not None else [] for c in sessions["key_concepts"]]
    names = list(sessions["session_name"])
    indices = [int(i) for i in sessions["session_index"]]
    counts = cc.count(concepts)
    rows = []
    for combo in cc.sample(concepts, syllabus_id, n):
        rows.append({
            "combination_id": combination_id(syllabus_id, combo),
            "syllabus_id": syllabus_id,
            "discipline_id": discipline_id,
            "combination_index": combo.index,
            "strategy": combo.strategy,
            "session_indices": [indices[s] for s in combo.sessions],
            "session_names": [names[s] for s in combo.sessions],
            "concepts": [c for group in combo.concept_names(concepts) for c in group],
            "learned_up_to": indices[combo.learned_up_to],
            "learned_up_to_name": names[combo.learned_up_to],
            "num_possible_basic": counts.basic,
            "num_possible_challenging": counts.challenging,
        })
    return pd.DataFrame(rows, columns=CONCEPT_COMBINATIONS.schema.fieldNames())


def build_combinations(sessions: DataFrame, cc: CombinationsConfig, n: int | None = None) -> DataFrame:
    def per_syllabus(frame: pd.DataFrame) -> pd.DataFrame:
        return combinations_for_syllabus(frame, cc, n)

    return (sessions.select("syllabus_id", "discipline_id", "session_index", "session_name", "key_concepts")
            .groupBy("syllabus_id").applyInPandas(per_syllabus, CONCEPT_COMBINATIONS.schema))


def questions_per_syllabus(ctx: StageContext) -> int:
    """`combinations.questions_per_syllabus`, else target_pairs shared over the syllabi the
    configured taxonomy (taxonomy.disciplines, else all) is expected to have: the mean number of
    syllabi of its disciplines that have sessions, times its disciplines. Exact once every
    discipline has its syllabi; an estimate for a run of a slice before the others."""
    cc = ctx.cfg.combinations
    if cc.questions_per_syllabus is not None:
        return cc.questions_per_syllabus
    scope = selected_disciplines(ctx.spark, ctx.cfg, None).select("discipline_id")
    counts = [row["n"] for row in ctx.storage.read_or_empty("sessions").join(scope, "discipline_id", "left_semi")
              .groupBy("discipline_id").agg(F.countDistinct("syllabus_id").alias("n")).collect()]
    if not counts:
        return cc.per_syllabus(1)
    return cc.per_syllabus(sum(counts) / len(counts) * scope.count())


def run(ctx: StageContext) -> dict:
    n = questions_per_syllabus(ctx)
    result = ctx.storage.append_missing(build_combinations(ctx.mine("sessions"), ctx.cfg.combinations, n),
                                        "concept_combinations", "combination_id")
    return {"questions_per_syllabus": n, "combinations_written": result.rows_written}


STAGE = Stage(name="combinations", reads=("sessions",), writes=("concept_combinations",), run=run,
              description="samples sessions and key concepts per question (basic and challenging), "
                          "seeded, never repeated; no LLM")


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
