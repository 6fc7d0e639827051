"""GLAN step 6: decontamination of the generated pairs. Reads `answers` (with its question, subject,
discipline and field) and the benchmark registry; writes `benchmark_items`, `contamination` and
`instructions` (the clean pairs, with their lineage, as `glan export` reads them).

Every pair is checked, question and answer, against the items of every benchmark in
`conf/benchmarks.yaml` (exact 13-gram overlap and MinHash LSH): the paper asks for test and training
items, and the default files hold mostly test splits (the file's header says which are missing, and
how to add them). Near-duplicate questions inside the generated data are reduced to one per
cluster. No LLM calls; the tables are rebuilt from all answers each run, so they never disagree
with `answers`. A benchmark name the registry lacks stops the stage (exit 2), pairs or none; one
that contributed less than asked (no items, a split of the registry's `splits` absent) is a logged
warning, and the figures count the benchmarks and their items.
Run: spark-submit jobs/decontaminate.py --conf conf/local.yaml
     spark-submit jobs/decontaminate.py --input PATH --text-fields a,b --output DIR: any dataset
     (the same as `glan decontaminate`, jobs/decontam/files.py)
"""

from __future__ import annotations

import logging
import sys

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.config.loader import GlanConfig
from jobs.decontam import files
from jobs.decontam.detect import benchmark_coverage, decontaminate, staged_benchmark_items
from jobs.decontam.registry import load_registry
from jobs.errors import ConflictError
from jobs.pipeline.runner import stage_main
from jobs.pipeline.stage import Stage, StageContext
from jobs.storage.delta import Storage, digests
from jobs.storage.tables import INSTRUCTIONS

log = logging.getLogger(__name__)


def glan_pairs(storage: Storage) -> DataFrame:
    """Every answered question with the lineage a training team needs, in the `instructions` schema."""
    read = storage.read_or_empty
    answers = read("answers").select("question_id", "answer", F.col("model").alias("answer_model"))
    questions = read("questions").select("question_id", "combination_id", "syllabus_id", "subject_id",
                                         "discipline_id", "question", F.col("model").alias("question_model"))
    subjects = read("subjects").select("subject_id", F.col("subject_name").alias("subject"), "level")
    taxonomy = read("taxonomy").select("discipline_id", "discipline", "field")
    pairs = (answers.join(questions, "question_id", "inner").join(subjects, "subject_id", "inner")
             .join(taxonomy, "discipline_id", "inner")
             .withColumn("instruction_id", F.col("question_id")))
    return pairs.select(*INSTRUCTIONS.schema.fieldNames())


def _benchmark_items(ctx: StageContext) -> DataFrame:
    """The registry's items as the benchmark files hold them now. The files are read every run (a
    few seconds), and the table is rewritten only when its rows differ: another benchmark set, or
    files that changed under the same names."""
    storage = ctx.storage
    with staged_benchmark_items(ctx.spark, ctx.cfg.decontam, ctx.cfg.table_uri("_scratch")) as fresh:
        def behind() -> DataFrame | None:
            same = storage.exists("benchmark_items") and digests(storage.read("benchmark_items")) == digests(fresh)
            return None if same else fresh

        storage.rebuild("benchmark_items", behind)
    return storage.read("benchmark_items")


def check(cfg: GlanConfig) -> None:
    """An unknown benchmark name fails before any stage of the run starts, not once pairs exist."""
    load_registry(cfg.decontam.registry, cfg.decontam.benchmarks)


def run(ctx: StageContext) -> dict:
    storage, cfg = ctx.storage, ctx.cfg
    check(cfg)  # also here: a stage run alone, or from a test
    items = None
    attempts = cfg.storage.commit_retries + 1
    for attempt in range(attempts):
        # Versions first, then the answers: a run that commits these tables in between (another
        # slice's decontamination) makes ours a conflict, and we derive them again.
        versions = {name: storage.version(name) for name in ("contamination", "instructions")}
        pairs = glan_pairs(storage)
        num_in = pairs.count()
        if num_in == 0:
            return {"pairs": 0, "clean": 0}
        items = items if items is not None else _benchmark_items(ctx)
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
    coverage = benchmark_coverage(items, cfg.decontam)
    warnings = [message for cov in coverage for message in cov.warnings()]
    for message in warnings:
        log.warning("decontaminate: %s", message)
    removed = {r["benchmark"]: r["num_pairs"] for r in report.collect()}
    return {"pairs": num_in, "clean": clean, "benchmarks": len(coverage),
            "benchmark_items": sum(cov.num_items for cov in coverage), "benchmark_warnings": len(warnings),
            **{f"removed_{k}": v for k, v in removed.items()}}


STAGE = Stage(name="decontaminate", reads=("answers", "questions", "subjects", "taxonomy"),
              writes=("benchmark_items", "contamination", "instructions"), run=run,
              description="removes pairs that overlap a benchmark (13-grams, MinHash LSH) and near-duplicate "
                          "questions; no LLM",
              check=check)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg == "--input" or arg.startswith("--input=") for arg in argv):
        return files.main(argv)
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
