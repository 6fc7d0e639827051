"""The training-ready export: determinism, the GLAN-Test split, shards, manifest and card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.config.export import ExportConfig, TrainConfig
from jobs.export import SHARD_SCHEMA, build_messages, num_shards_for, parse_args, shard_of

# Disciplines of different sizes: two are smaller than twice the held-out quota.
DISCIPLINE_SIZES = {"Chemistry": 70, "Law": 45, "Logic": 9, "Linguistics": 30, "Leisure industry": 1}
FIELDS = {"Chemistry": "Academic-Natural Science", "Law": "Academic-Social Science",
          "Logic": "Academic-Formal Science", "Linguistics": "Academic-Humanities",
          "Leisure industry": "Industry-Services"}
HELDOUT = 10
INSTRUCTIONS_SCHEMA = ("instruction_id string, field string, discipline string, subject string, "
                       "level string, question string, answer string, question_id string")


def instruction_rows() -> list[tuple]:
    rows = []
    for discipline, size in DISCIPLINE_SIZES.items():
        for i in range(size):
            rows.append((f"{discipline[:3].lower()}-{i:04d}", FIELDS[discipline], discipline,
                         f"{discipline} {i % 3}", ["undergraduate", "graduate"][i % 2],
                         f"In {discipline}, what is {i} times {len(discipline)}?",
                         f"{i} times {len(discipline)} is {i * len(discipline)}. " * (1 + i % 4),
                         f"q-{i}"))  # a lineage column the export ignores
    return rows


@pytest.fixture(scope="module")
def instructions(spark):
    return spark.createDataFrame(instruction_rows(), INSTRUCTIONS_SCHEMA)


@pytest.fixture(scope="module")
def exports(instructions, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    from jobs.export import build_export

    # A tiny shard size so the training split spreads over several shards.
    cfg = ExportConfig(heldout_per_discipline=HELDOUT, shard_size_mb=0.01, row_group_rows=16)
    out = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        path = tmp_path_factory.mktemp(f"export_{name}")
        out[name] = (path, build_export(instructions, cfg, str(path), seed, overwrite=True))
    return out


def read_split(root: Path, manifest: dict, split: str) -> list[dict]:
    rows = []
    for relative in manifest["splits"][split]["files"]:
        rows += pq.read_table(root / relative).to_pylist()
    return rows


def test_same_seed_gives_byte_identical_shards(exports):
    (root_a, manifest_a), (root_b, manifest_b) = exports["a"], exports["b"]
    files_a = sorted(p.relative_to(root_a) for p in (root_a / "data").iterdir())
    files_b = sorted(p.relative_to(root_b) for p in (root_b / "data").iterdir())
    assert files_a == files_b and len(files_a) >= 3
    for relative in files_a:
        assert (root_a / relative).read_bytes() == (root_b / relative).read_bytes(), relative
    assert manifest_a["shards"] == manifest_b["shards"]


def test_different_seed_changes_order_not_rows(exports):
    (root_a, manifest_a), (root_c, manifest_c) = exports["a"], exports["c"]
    ids_a = [r["id"] for s in ("train", "test") for r in read_split(root_a, manifest_a, s)]
    ids_c = [r["id"] for s in ("train", "test") for r in read_split(root_c, manifest_c, s)]
    assert sorted(ids_a) == sorted(ids_c)
    assert len(ids_a) == len(set(ids_a)) == sum(DISCIPLINE_SIZES.values())
    train_a = [r["id"] for r in read_split(root_a, manifest_a, "train")]
    train_c = [r["id"] for r in read_split(root_c, manifest_c, "train")]
    assert train_a != train_c


def test_heldout_is_at_most_the_quota_per_discipline(exports):
    root, manifest = exports["a"]
    test_rows = read_split(root, manifest, "test")
    per_discipline: dict[str, int] = {}
    for row in test_rows:
        per_discipline[row["discipline"]] = per_discipline.get(row["discipline"], 0) + 1
    # Quota 10, capped at half of a small discipline (floor): Logic 9 -> 4, Leisure 1 -> 0.
    expected = {"Chemistry": 10, "Law": 10, "Linguistics": 10, "Logic": 4}
    assert per_discipline == expected
    assert manifest["heldout"]["short_disciplines"] == {"Leisure industry": 0, "Logic": 4}
    train_ids = {r["id"] for r in read_split(root, manifest, "train")}
    assert train_ids.isdisjoint(r["id"] for r in test_rows)
    assert manifest["splits"]["test"]["num_rows"] == len(test_rows) == sum(expected.values())
    assert manifest["counts"]["Logic"] == {"field": "Academic-Formal Science", "train": 5, "test": 4}


def test_heldout_rows_are_the_first_of_their_discipline_in_shuffle_order(spark, exports):
    root, manifest = exports["a"]
    test_ids = {r["id"] for r in read_split(root, manifest, "test")}
    keys = dict(spark.createDataFrame([(r[0], r[2]) for r in instruction_rows()], "id string, d string")
                .selectExpr("id", "xxhash64(CAST(1 AS BIGINT), id) AS k").collect())
    for discipline in ("Chemistry", "Law"):
        ids = sorted((r[0] for r in instruction_rows() if r[2] == discipline), key=lambda i: (keys[i], i))
        assert set(ids[:HELDOUT]) == {i for i in test_ids if i in set(ids)}


def test_shards_follow_the_hash_order_and_their_key_range(spark, exports):
    root, manifest = exports["a"]
    num_train = manifest["splits"]["train"]["num_shards"]
    ids_by_shard = {s["shard"]: [r["id"] for r in pq.read_table(root / s["path"]).to_pylist()]
                    for s in manifest["shards"] if s["split"] == "train"}
    all_ids = [i for shard in sorted(ids_by_shard) for i in ids_by_shard[shard]]
    keys = dict(spark.createDataFrame([(i,) for i in all_ids], "id string")
                .selectExpr("id", "xxhash64(CAST(1 AS BIGINT), id) AS k").collect())
    assert all_ids == sorted(all_ids, key=lambda i: (keys[i], i))
    ranges = manifest["splits"]["train"]["num_key_ranges"]
    for shard, ids in ids_by_shard.items():
        assert {shard_of(keys[i], ranges) for i in ids} == {shard}
    assert num_train == len(ids_by_shard) <= ranges


def test_manifest_checksums_counts_and_schema_match_the_files(exports):
    root, manifest = exports["a"]
    listed = {s["path"] for s in manifest["shards"]}
    on_disk = {str(p.relative_to(root)) for p in (root / "data").glob("*.parquet")}
    assert listed == on_disk
    for shard in manifest["shards"]:
        data = (root / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == shard["num_bytes"]
        table = pq.read_table(root / shard["path"])
        assert table.num_rows == shard["num_rows"]
        assert table.schema.equals(SHARD_SCHEMA)
        assert table.schema.metadata is None  # no pandas metadata
    assert sum(s["num_rows"] for s in manifest["shards"]) == manifest["num_rows"] == sum(DISCIPLINE_SIZES.values())
    assert [f["name"] for f in manifest["schema"]["fields"]] == SHARD_SCHEMA.names
    assert json.loads((root / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert manifest["config"]["export"]["heldout_per_discipline"] == HELDOUT
    assert "pyarrow" in manifest["packages"] and "pyspark" in manifest["packages"]


def test_rows_carry_chat_messages(exports):
    root, manifest = exports["a"]
    row = read_split(root, manifest, "train")[0]
    assert row["messages"] == [{"role": "user", "content": row["question"]},
                               {"role": "assistant", "content": row["answer"]}]
    assert set(row) == {"id", "field", "discipline", "subject", "level", "question", "answer", "messages"}


def test_dataset_card_and_chart(exports):
    root, manifest = exports["a"]
    card = (root / "README.md").read_text()
    assert "| Academic-Natural Science | Chemistry | 60 | 10 |" in card
    assert "| Industry-Services | 1 | 0 |" in card
    assert "Leisure industry (0)" in card
    assert (root / "counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shards_load_with_hugging_face_datasets(exports, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face `datasets` is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root, manifest = exports["a"]
    loaded = datasets.load_dataset(
        "parquet", data_files={s: [str(root / f) for f in manifest["splits"][s]["files"]] for s in ("train", "test")},
        cache_dir=str(tmp_path / "cache"),
    )
    assert loaded["train"].num_rows == manifest["splits"]["train"]["num_rows"]
    assert loaded["test"].num_rows == manifest["splits"]["test"]["num_rows"]
    assert loaded["train"][0]["messages"][1]["role"] == "assistant"


def test_existing_output_needs_overwrite(instructions, exports):
    from jobs.export import build_export

    root, _ = exports["a"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_export(instructions, ExportConfig(), str(root), 1)


def test_pure_helpers():
    assert num_shards_for(0, 256, 0) == 0
    assert num_shards_for(10, 256, 5) == 1
    assert num_shards_for(600 * 1024 * 1024, 256, 10**6) == 3
    assert num_shards_for(600 * 1024 * 1024, 256, 2) == 2  # never more shards than rows
    assert shard_of(-(2**63), 4) == 0 and shard_of(2**63 - 1, 4) == 3 and shard_of(0, 4) == 2
    assert build_messages("q", "a", "be brief")[0] == {"role": "system", "content": "be brief"}


def test_cli_flags_parse():
    args = parse_args(["--output", "out", "--shard-size-mb", "64", "--heldout-per-discipline", "5",
                       "--seed", "7", "--set", "export.compression=snappy"])
    assert (args.output, args.shard_size_mb, args.heldout_per_discipline, args.seed) == ("out", 64.0, 5, 7)
    assert args.sets == ["export.compression=snappy"]


@pytest.mark.parametrize(("cls", "kwargs", "starts"), [
    (ExportConfig, {"heldout_per_discipline": -1}, "heldout_per_discipline=-1"),
    (ExportConfig, {"shard_size_mb": 0}, "shard_size_mb=0"),
    (ExportConfig, {"heldout_max_fraction": 1.5}, "heldout_max_fraction=1.5"),
    (TrainConfig, {"lr": -1}, "lr=-1 must be > 0"),
    (TrainConfig, {"epochs": 0}, "epochs=0"),
    (TrainConfig, {"micro_batch_tokens": 100, "max_seq_len": 200}, "micro_batch_tokens=100"),
])
def test_config_errors_name_the_field(cls, kwargs, starts):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert str(info.value).startswith(starts)


def test_config_defaults_are_the_papers():
    from jobs.config.loader import load_config

    cfg = load_config()
    assert cfg.export.heldout_per_discipline == 50
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.warmup_steps, cfg.train.final_lr,
            cfg.train.pairs_per_step) == (3, 3e-6, 1000, 0.0, 512)
