"""An export split tokenised once, into flat memory-mapped arrays every rank shares.

Held as Python lists, 10M pairs of about 600 tokens would take over 200 GB on each rank; here a
split is one array of token ids per shard (uint16 when the vocabulary fits, else int32), its
offsets and its prompt lengths. The ranks split the shards between them (shard i is rank
i % world_size's), each writes its parts under `<output>/tokenized/<split>-<key>/`, and after a
barrier every rank maps all of them read-only: the page cache holds one copy per node, and a
resumed or repeated run with the same shards, tokenizer and settings reads them without
tokenising again.

The key hashes everything the tokens depend on: the manifest's sha256 of each shard, the
tokenizer (its full serialised form, chat template and special tokens), the prompt format, the
system prompt and max_seq_len. A shard's checksum is verified by the rank that tokenises it, on
the bytes it tokenises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.spark.session import arrow_filesystem
from jobs.training.recipe import PLAIN_PROMPT, Example, cut_to_length, example_from_tokens, label_tokens, prompt_text

log = logging.getLogger("glan.train")

CACHE_FORMAT = 1  # bump when the layout or the way pairs become tokens changes


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the tokens: the serialised tokenizer, chat template and specials."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary stands for it
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.bos_token,
                              tokenizer.eos_token_id, len(tokenizer)]).encode())
    return digest.hexdigest()


def split_files(manifest: dict[str, Any], split: str) -> list[str]:
    """The split's shards in order; none for a split the export does not have."""
    return list(manifest["splits"].get(split, {}).get("files", []))


def cache_key(manifest: dict[str, Any], split: str, tokenizer: Any, max_len: int,
              system_prompt: str | None) -> str:
    shards = {s["path"]: s["sha256"] for s in manifest["shards"]}
    files = split_files(manifest, split)
    inputs = {"format": CACHE_FORMAT, "split": split, "shards": [(f, shards[f]) for f in files],
              "tokenizer": tokenizer_fingerprint(tokenizer), "plain_prompt": PLAIN_PROMPT,
              "system_prompt": system_prompt, "max_len": max_len}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TokenizedSplit:
    """Examples of one split by index, in the export's order, read from memory-mapped parts."""

    tokens: Sequence[np.ndarray]   # per part: every sequence's ids back to back
    offsets: Sequence[np.ndarray]  # per part: n + 1 positions into `tokens`
    starts: np.ndarray             # index of each part's first example, then the total
    lengths: np.ndarray            # per example: tokens in its sequence
    prompt_lengths: np.ndarray     # per example
    directory: Path

    def __len__(self) -> int:
        return int(self.starts[-1])

    def label_counts(self) -> np.ndarray:
        return label_tokens(self.lengths, self.prompt_lengths)

    def example(self, index: int) -> Example:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        local = index - int(self.starts[part])
        begin, end = self.offsets[part][local], self.offsets[part][local + 1]
        return example_from_tokens(self.tokens[part][begin:end].tolist(), int(self.prompt_lengths[index]))


def token_dtype(tokenizer: Any) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _part_paths(directory: Path, index: int) -> tuple[Path, Path]:
    return directory / f"part-{index:05d}.tokens.npy", directory / f"part-{index:05d}.index.npz"


def _write_atomically(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as out:
        write(out)
    os.replace(tmp, path)


def read_shard(uri: str, expected_sha256: str | None) -> pa.Table:
    """The question and answer columns of one shard (a local path or any pyarrow URI)."""
    filesystem, path = arrow_filesystem(uri)
    with filesystem.open_input_file(path) as source:
        data = source.readall()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{uri}: sha256 does not match manifest.json")
    return pq.read_table(pa.BufferReader(data), columns=["question", "answer"])


def tokenize_shard(table: pa.Table, tokenizer: Any, max_len: int, system_prompt: str | None,
                   dtype: np.dtype, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids back to back, offsets, prompt lengths) of one shard's pairs, in its order."""
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    prompt_lengths: list[int] = []
    questions, answers = table.column("question"), table.column("answer")
    for start in range(0, table.num_rows, chunk):
        qs = questions.slice(start, chunk).to_pylist()
        prompts = tokenizer([prompt_text(tokenizer, q, system_prompt) for q in qs],
                            add_special_tokens=False)["input_ids"]
        replies = tokenizer(answers.slice(start, chunk).to_pylist(), add_special_tokens=False)["input_ids"]
        flat: list[int] = []
        for prompt_ids, answer_ids in zip(prompts, replies):
            prompt, answer = cut_to_length(prompt_ids, answer_ids, tokenizer.eos_token_id, max_len)
            flat += prompt
            flat += answer
            lengths.append(len(prompt) + len(answer))
            prompt_lengths.append(len(prompt))
        pieces.append(np.asarray(flat, dtype=dtype))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    return tokens, offsets, np.asarray(prompt_lengths, dtype=np.int32)


def prepare_split(manifest: dict[str, Any], root: str, split: str, tokenizer: Any, *, max_len: int,
                  system_prompt: str | None, cache_root: Path, rank: int = 0, world_size: int = 1,
                  barrier: Callable[[], None] = lambda: None, verify: bool = True) -> TokenizedSplit:
    """Tokenise this rank's share of the split's shards into the cache (skipping parts already
    there), wait for the other ranks, and map every part. Every rank must call it."""
    files = split_files(manifest, split)
    checksums = {s["path"]: s["sha256"] for s in manifest["shards"]}
    directory = cache_root / f"{split}-{cache_key(manifest, split, tokenizer, max_len, system_prompt)[:16]}"
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer)
    started, made, pairs = time.monotonic(), 0, 0
    for index in range(rank, len(files), world_size):
        tokens_path, index_path = _part_paths(directory, index)
        if index_path.is_file():
            continue
        table = read_shard(f"{root.rstrip('/')}/{files[index]}", checksums[files[index]] if verify else None)
        tokens, offsets, prompt_lengths = tokenize_shard(table, tokenizer, max_len, system_prompt, dtype)
        _write_atomically(tokens_path, lambda out: np.save(out, tokens))
        # The index is written last: a part whose index exists is complete.
        _write_atomically(index_path, lambda out: np.savez(out, offsets=offsets, prompt_lengths=prompt_lengths))
        made, pairs = made + 1, pairs + len(prompt_lengths)
    if made:
        log.info("tokenised %d of %d %s shards (%d pairs) in %.1f s into %s", made, len(files), split, pairs,
                 time.monotonic() - started, directory)
    barrier()
    missing = [files[i] for i in range(len(files)) if not _part_paths(directory, i)[1].is_file()]
    if missing:
        raise RuntimeError(f"{directory}: no tokens for {len(missing)} shard(s) (first: {missing[0]}) after every "
                           "rank tokenised its share; --output must be a filesystem every node sees")
    return load_split(directory, len(files))


def load_split(directory: Path, num_parts: int) -> TokenizedSplit:
    tokens, offsets, prompt_lengths = [], [], []
    for index in range(num_parts):
        tokens_path, index_path = _part_paths(directory, index)
        tokens.append(np.load(tokens_path, mmap_mode="r"))
        with np.load(index_path) as part:
            offsets.append(part["offsets"])
            prompt_lengths.append(part["prompt_lengths"])
    starts = np.zeros(num_parts + 1, dtype=np.int64)
    np.cumsum([len(p) for p in prompt_lengths], out=starts[1:])
    return TokenizedSplit(tokens=tokens, offsets=offsets, starts=starts, directory=directory,
                          lengths=np.concatenate([np.diff(o) for o in offsets]) if offsets else np.zeros(0, np.int64),
                          prompt_lengths=np.concatenate(prompt_lengths) if prompt_lengths else np.zeros(0, np.int32))
