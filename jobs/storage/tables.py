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

# Every table an LLM call writes carries these: what was asked, of which model, at what price.
USAGE_FIELDS = (
    ("model", T.StringType()),
    ("prompt_name", T.StringType()),
    ("prompt_version", T.StringType()),
    ("temperature", T.DoubleType()),
    ("top_p", T.DoubleType()),
    ("prompt_tokens", T.LongType()),
    ("completion_tokens", T.LongType()),
    ("cached_tokens", T.LongType()),
    ("latency_s", T.DoubleType()),
    ("attempts", T.IntegerType()),
    ("created_at", T.TimestampType()),
    ("seed", T.LongType()),  # the sampling seed sent: from the row key and its attempt (null: none sent)
    ("batch_id", T.StringType()),  # the provider's batch that answered (null: asked online)
    ("billing", T.StringType()),  # online | batch: the price its tokens were paid at (null: online)
)
STRINGS = T.ArrayType(T.StringType())

TAXONOMY = register(TableSpec(
    name="taxonomy",
    schema=_schema(("discipline_id", T.StringType()), ("discipline", T.StringType()),
                   ("sub_field_id", T.StringType()), ("sub_field", T.StringType()),
                   ("field_id", T.StringType()), ("field", T.StringType()), ("description", T.StringType())),
    key=("discipline_id",),
    description="the disciplines (leaves of the taxonomy) with their sub-field and field",
))

SUBJECT_LISTS = register(TableSpec(
    name="subject_lists",
    schema=_schema(("list_id", T.StringType()), ("discipline_id", T.StringType()), ("sample_index", T.IntegerType()),
                   ("subjects_text", T.StringType()), *USAGE_FIELDS),
    key=("list_id",),
    description="GLAN step 2a: free-text subject lists, samples_per_discipline per discipline",
))

SUBJECT_CONVERSIONS = register(TableSpec(
    name="subject_conversions",
    schema=_schema(("list_id", T.StringType()), ("discipline_id", T.StringType()), ("sample_index", T.IntegerType()),
                   ("subjects_json", T.StringType()), *USAGE_FIELDS),
    key=("list_id",),
    description="GLAN step 2b: each subject list converted to subject_name / level / subtopics (JSON)",
))

SUBJECTS = register(TableSpec(
    name="subjects",
    schema=_schema(("subject_id", T.StringType()), ("discipline_id", T.StringType()),
                   ("subject_name", T.StringType()), ("level", T.StringType()), ("subtopics", STRINGS),
                   ("num_samples", T.IntegerType()), ("sample_indices", T.ArrayType(T.IntegerType()))),
    key=("subject_id",),
    description="unique subjects per discipline (never merged across disciplines) and how many samples named each",
))

SYLLABI = register(TableSpec(
    name="syllabi",
    schema=_schema(("syllabus_id", T.StringType()), ("subject_id", T.StringType()), ("discipline_id", T.StringType()),
                   ("syllabus_text", T.StringType()), *USAGE_FIELDS),
    key=("syllabus_id",),
    description="GLAN step 3a: one syllabus (raw text) per subject",
))

SESSION_LISTS = register(TableSpec(
    name="session_lists",
    schema=_schema(("syllabus_id", T.StringType()), ("discipline_id", T.StringType()),
                   ("sessions_json", T.StringType()), *USAGE_FIELDS),
    key=("syllabus_id",),
    description="GLAN step 3b: the extraction call's output per syllabus (JSON)",
))

SESSIONS = register(TableSpec(
    name="sessions",
    schema=_schema(("session_id", T.StringType()), ("syllabus_id", T.StringType()), ("discipline_id", T.StringType()),
                   ("session_index", T.IntegerType()), ("session_name", T.StringType()),
                   ("description", T.StringType()), ("key_concepts", STRINGS), ("num_concepts", T.IntegerType())),
    key=("session_id",),
    description="class sessions of each syllabus, in teaching order, with their key concepts",
))

CONCEPT_COMBINATIONS = register(TableSpec(
    name="concept_combinations",
    schema=_schema(("combination_id", T.StringType()), ("syllabus_id", T.StringType()),
                   ("discipline_id", T.StringType()), ("combination_index", T.IntegerType()),
                   ("strategy", T.StringType()), ("session_indices", T.ArrayType(T.IntegerType())),
                   ("session_names", STRINGS), ("concepts", STRINGS), ("learned_up_to", T.IntegerType()),
                   ("learned_up_to_name", T.StringType()),
                   ("num_possible_basic", T.LongType()), ("num_possible_challenging", T.LongType())),
    key=("combination_id",),
    description="GLAN step 4: sampled sessions and key concepts per question, never repeated per syllabus",
))

QUESTIONS = register(TableSpec(
    name="questions",
    schema=_schema(("question_id", T.StringType()), ("combination_id", T.StringType()),
                   ("syllabus_id", T.StringType()), ("subject_id", T.StringType()),
                   ("discipline_id", T.StringType()), ("question", T.StringType()), *USAGE_FIELDS),
    key=("question_id",),
    description="GLAN step 4: one homework question per concept combination",
))

ANSWERS = register(TableSpec(
    name="answers",
    schema=_schema(("answer_id", T.StringType()), ("question_id", T.StringType()), ("combination_id", T.StringType()),
                   ("syllabus_id", T.StringType()), ("subject_id", T.StringType()),
                   ("discipline_id", T.StringType()), ("answer", T.StringType()), *USAGE_FIELDS),
    key=("answer_id",),
    description="GLAN step 5: the cheaper model's answer to each question",
))

# Failed calls cost money too: each one's usage is kept here, also after a rerun succeeds and the
# row leaves `failures`, so that `glan cost` and `glan status` count every call that was paid for.
FAILED_CALLS = register(TableSpec(
    name="failed_calls",
    schema=_schema(
        ("call_id", T.StringType()),
        ("stage", T.StringType()),
        ("row_key", T.StringType()),
        ("error_class", T.StringType()),
        *USAGE_FIELDS,
    ),
    key=("call_id",),
    description="usage of every LLM call that ended in `failures` (append-only ledger)",
))

# --- batch mode (llm.mode: batch): the provider's batches, and which row keys each holds ---

LLM_BATCHES = register(TableSpec(
    name="llm_batches",
    schema=_schema(
        ("submission_id", T.StringType()),  # ours, written down before the provider's batch exists
        ("stage", T.StringType()),
        ("prompt_name", T.StringType()),
        ("output_table", T.StringType()),
        ("model", T.StringType()),
        ("round", T.IntegerType()),  # 0: first submission of its keys; n: their n-th resubmission
        ("state", T.StringType()),  # pending (keys chosen) | submitted (batch created) | collected
        ("batch_id", T.StringType()),
        ("input_file_id", T.StringType()),
        ("status", T.StringType()),  # the provider's: validating, in_progress, ..., completed, failed, expired, cancelled
        ("num_requests", T.LongType()),
        ("num_bytes", T.LongType()),
        ("request_uri", T.StringType()),  # the request file (JSONL) as it was uploaded
        ("num_completed", T.LongType()),  # the provider's request counts
        ("num_failed", T.LongType()),
        ("disciplines", STRINGS),
        ("created_at", T.TimestampType()),
        ("submitted_at", T.TimestampType()),
        ("ended_at", T.TimestampType()),
        ("collected_at", T.TimestampType()),
        ("output_file_id", T.StringType()),
        ("error_file_id", T.StringType()),
        ("error_message", T.StringType()),  # the provider's, for a batch that failed as a whole
        ("rows_written", T.LongType()),  # answers committed to the output table
        ("rows_failed", T.LongType()),  # rows sent to `failures` (answers that failed the checks, and
                                        # requests unanswered after llm.batch.max_resubmits)
        ("rows_resubmitted", T.LongType()),  # unanswered requests put in the next round's submission
    ),
    key=("submission_id",),
    description="batch mode's ledger: one row per request file and provider batch, from before it is created to "
                "its collection; a key in a batch not yet collected is never sent again",
))

LLM_BATCH_KEYS = register(TableSpec(
    name="llm_batch_keys",
    schema=_schema(("submission_id", T.StringType()), ("stage", T.StringType()), ("row_key", T.StringType()),
                   ("discipline_id", T.StringType()), ("seed", T.LongType())),
    key=("submission_id", "row_key"),
    description="the row keys (custom_id) of each llm_batches submission, with the seed each request sends",
))

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
    schema=_schema(
        ("instruction_id", T.StringType()),
        ("question_id", T.StringType()),
        ("combination_id", T.StringType()),
        ("syllabus_id", T.StringType()),
        ("subject_id", T.StringType()),
        ("discipline_id", T.StringType()),
        ("field", T.StringType()),
        ("discipline", T.StringType()),
        ("subject", T.StringType()),
        ("level", T.StringType()),
        ("question", T.StringType()),
        ("answer", T.StringType()),
        ("question_model", T.StringType()),
        ("answer_model", T.StringType()),
    ),
    key=("instruction_id",),
    description="the clean generated pairs with their lineage: answers without a contamination row",
))

# --- export tables ---
