"""Every table of a run: its schema and key, declared once. Writes are checked against these.

Tables are plural nouns, keys `<entity>_id`, flags `is_`/`has_`, counts `num_`. Every field is
nullable on purpose: Delta schema evolution breaks on NOT NULL columns that Spark infers from
literals, so "required" is checked by the jobs, not by the storage schema.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import types as T


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: T.StructType
    key: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    description: str = ""


def _schema(*fields: tuple[str, T.DataType]) -> T.StructType:
    return T.StructType([T.StructField(name, dtype, nullable=True) for name, dtype in fields])


TABLES: dict[str, TableSpec] = {}


def register(spec: TableSpec) -> TableSpec:
    TABLES[spec.name] = spec
    return spec


def spec_for(name: str) -> TableSpec | None:
    return TABLES.get(name)


# --- LLM layer tables ---

FAILURES = register(TableSpec(
    name="failures",
    schema=_schema(
        ("failure_id", T.StringType()),
        ("stage", T.StringType()),
        ("row_key", T.StringType()),
        ("error_class", T.StringType()),
        ("error_message", T.StringType()),
        ("attempts", T.IntegerType()),
        ("failed_at", T.TimestampType()),
    ),
    key=("failure_id",),
    description="LLM calls that failed after their retries; retried by the next run of their stage",
))

# --- pipeline tables (taxonomy, subjects, syllabi, sessions, concept_combinations, questions, answers) ---

# --- decontamination tables (benchmark_items, contamination, instructions) ---

BENCHMARK_ITEMS = register(TableSpec(
    name="benchmark_items",
    schema=_schema(
        ("benchmark", T.StringType()),
        ("split", T.StringType()),
        ("item_id", T.StringType()),
        ("text", T.StringType()),
    ),
    key=("benchmark", "item_id"),
    description="benchmark records to decontaminate against: the registry's text fields joined by newlines",
))

CONTAMINATION = register(TableSpec(
    name="contamination",
    schema=_schema(
        ("pair_id", T.StringType()),
        ("field", T.StringType()),
        ("benchmark", T.StringType()),
        ("item_id", T.StringType()),
        ("detector", T.StringType()),
        ("score", T.DoubleType()),
        ("excerpt", T.StringType()),
    ),
    key=("pair_id", "field", "benchmark", "item_id", "detector"),
    description="why a generated pair was removed: detector ngram|minhash against a benchmark item, "
                "or near_duplicate (benchmark 'self', item_id = the pair kept)",
))

INSTRUCTIONS = register(TableSpec(
    name="instructions",
    schema=_schema(  # the input pairs' columns, kept as they are; align with `answers` when wired
        ("pair_id", T.StringType()),
        ("question", T.StringType()),
        ("answer", T.StringType()),
    ),
    key=("pair_id",),
    description="the clean generated pairs: every input column of the pairs without a contamination row",
))

# --- export tables ---
