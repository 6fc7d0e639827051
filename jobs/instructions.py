"""GLAN step 6: decontamination of the generated pairs. Reads `answers` (with its question, subject,
discipline and field) and the benchmark registry; writes `benchmark_items`, `contamination` and
`instructions` (the clean pairs, with their lineage, as `glan export` reads them).

Every pair is checked, question and answer, against the test and training items of every benchmark
in `conf/benchmarks.yaml` (exact 13-gram overlap and MinHash LSH), and near-duplicate questions
inside the generated data are reduced to one per cluster. No LLM calls; the tables are rebuilt from
all answers each run, so they never disagree with `answers`.
Run: spark-submit jobs/instructions.py --conf conf/local.yaml
"""

from __future__ import annotations

import logging
import sys

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from jobs.common.config import GlanConfig
from jobs.common.errors import ConflictError
from jobs.common.storage import digests, get_storage
from jobs.common.tables import INSTRUCTIONS

USES_LLM = False
log = logging.getLogger(__name__)


def glan_pairs(spark: SparkSession, cfg: GlanConfig) -> DataFrame:
    """Every answered question with the lineage a training team needs, in the `instructions` schema."""
    read = get_storage(spark, cfg).read_or_empty
    answers = read("answers").select("question_id", "answer", F.col("model").alias("answer_model"))
    questions = read("questions").select("question_id", "combination_id", "syllabus_id", "subject_id",
                                         "discipline_id", "question", F.col("model").alias("question_model"))
    subjects = read("subjects").select("subject_id", F.col("subject_name").alias("subject"), "level")
    taxonomy = read("taxonomy").select("discipline_id", "discipline", "field")
    pairs = (answers.join(questions, "question_id", "inner").join(subjects, "subject_id", "inner")
             .join(taxonomy, "discipline_id", "inner")
             .withColumn("instruction_id", F.col("question_id")))
    return pairs.select(*INSTRUCTIONS.schema.fieldNames())


def _benchmark_items(spark: SparkSession, cfg: GlanConfig) -> DataFrame:
    """The registry's items as the benchmark files hold them now. The files are read every run (a
    few seconds), and the table is rewritten only when its rows differ: another benchmark set, or
    files that changed under the same names."""
    from jobs.decontaminate import staged_benchmark_items

    storage = get_storage(spark, cfg)
    with staged_benchmark_items(spark, cfg.decontam, cfg.table_uri("_scratch")) as fresh:
        def behind() -> DataFrame | None:
            same = storage.exists("benchmark_items") and digests(storage.read("benchmark_items")) == digests(fresh)
            return None if same else fresh

        storage.rebuild("benchmark_items", behind)
    return storage.read("benchmark_items")


def run_stage(spark: SparkSession, cfg: GlanConfig, disciplines: list[str] | None = None) -> dict:
    from jobs.decontaminate import decontaminate

    storage = get_storage(spark, cfg)
    items = None
    attempts = cfg.storage.commit_retries + 1
    for attempt in range(attempts):
        # Versions first, then the answers: a run that commits these tables in between (another
        # slice's decontamination) makes ours a conflict, and we derive them again.
        versions = {name: storage.version(name) for name in ("contamination", "instructions")}
        pairs = glan_pairs(spark, cfg)
        num_in = pairs.count()
        if num_in == 0:
            return {"pairs": 0, "clean": 0}
        items = items if items is not None else _benchmark_items(spark, cfg)
        instructions, contamination, report = decontaminate(pairs, items, cfg.decontam, id_col="instruction_id")
        try:
            for name, rows in (("contamination", contamination), ("instructions", instructions)):
                # Compared, not rewritten every run: a run killed between the two commits is
                # finished by the next one, which writes only what is still behind.
                if not (storage.exists(name) and digests(storage.read(name)) == digests(rows)):
                    storage.overwrite(rows, name, read_version=versions[name])
            break
        except ConflictError:
            if attempt + 1 == attempts:
                raise
            log.warning("decontaminate: another run committed its tables first; deriving them again")
    clean = storage.read("instructions").count()
    removed = {r["benchmark"]: r["num_pairs"] for r in report.collect()}
    return {"pairs": num_in, "clean": clean, **{f"removed_{k}": v for k, v in removed.items()}}


def main(argv: list[str] | None = None) -> int:
    from jobs.common.pipeline import stage_main

    return stage_main("decontaminate", argv)


if __name__ == "__main__":
    sys.exit(main())
