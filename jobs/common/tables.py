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

# --- export tables ---
