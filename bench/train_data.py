"""Memory and time of getting an export's train split ready to train on, side by side in one run.

- lists: the way jobs/train.py did it before the tokenised cache: every rank read all questions
  and answers into Python lists and kept one `Example` (two lists of ints) per pair.
- cold: jobs/training/tokenized.py on an empty cache (tokenise every shard, write the parts, map them).
- warm: the same on a full cache (a resumed run, or ranks 1..N-1 of a node reading what the
  others wrote): map the parts, nothing is tokenised.

Each runs in its own process, then reads every example once (as an epoch does). Reported per
process: peak resident memory (VmHWM, file pages of the mapped tokens included), private memory at
the end (RssAnon: what each rank adds on a node; mapped tokens are shared file pages), and
seconds. The data are synthetic pairs (about 60 question and 300 answer words from a 5,000-word
vocabulary) in export-shaped shards; the tokenizer is word-level, made on the fly.
Run: python bench/train_data.py [--pairs 100000]
The last line is `private_memory_ratio=<lists RssAnon / warm RssAnon>`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 5000
PAIRS_PER_SHARD = 20_000


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", "Question:", "Answer:"]
                                        + [f"w{i}" for i in range(VOCAB)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_export(root: Path, pairs: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    shards, files = [], []
    for index, start in enumerate(range(0, pairs, PAIRS_PER_SHARD)):
        n = min(PAIRS_PER_SHARD, pairs - start)
        words = lambda low, high: [" ".join(f"w{w}" for w in rng.integers(0, VOCAB, rng.integers(low, high)))
                                   for _ in range(n)]
        path = f"data/train-{index:05d}.parquet"
        pq.write_table(pa.table({"question": words(30, 90), "answer": words(150, 450)}), root / path)
        shards.append({"path": path, "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest()})
        files.append(path)
    manifest = {"shards": shards, "splits": {"train": {"files": files, "num_rows": pairs}}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def memory() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmHWM", "RssAnon")}


def run_mode(mode: str, export: Path, cache: Path) -> dict[str, float]:
    """One mode in this process: prepare, read every example once, report."""
    import pyarrow.parquet as pq

    from jobs.training.tokenized import prepare_split
    from jobs.training.recipe import join_prompt_answer, prompt_text
    from jobs.train import load_manifest

    tokenizer = make_tokenizer()
    started = time.perf_counter()
    manifest, root = load_manifest(str(export))
    if mode == "lists":
        questions, answers = [], []
        for relative in manifest["splits"]["train"]["files"]:
            table = pq.read_table(export / relative, columns=["question", "answer"])
            questions += table.column("question").to_pylist()
            answers += table.column("answer").to_pylist()
        examples = []  # the former jobs/train.py tokenize_pairs: batched calls, 4,096 pairs at a time
        for start in range(0, len(questions), 4096):
            prompts = tokenizer([prompt_text(tokenizer, q) for q in questions[start:start + 4096]],
                                add_special_tokens=False)["input_ids"]
            replies = tokenizer(answers[start:start + 4096], add_special_tokens=False)["input_ids"]
            examples += [join_prompt_answer(p, a, tokenizer.eos_token_id, 2048) for p, a in zip(prompts, replies)]
        lengths = [len(e) for e in examples]
        get = examples.__getitem__
    else:
        data = prepare_split(manifest, root, "train", tokenizer, max_len=2048, system_prompt=None, cache_root=cache)
        lengths = data.lengths
        get = data.example
    ready = time.perf_counter() - started
    tokens = sum(len(get(i).input_ids) for i in range(len(lengths)))
    return {"mode": mode, "ready_s": ready, "epoch_read_s": time.perf_counter() - started - ready,
            "tokens": tokens, **memory()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "EXPORT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, export, cache = args.child
        print(json.dumps(run_mode(mode, Path(export), Path(cache))))
        return

    work = Path(tempfile.mkdtemp(prefix="glan-bench-train-data-"))
    make_export(work / "export", args.pairs)
    results = {}
    for mode in ("lists", "cold", "warm"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(work / "export"), str(work / "cache")],
                             check=True, capture_output=True, text=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:5s}: ready {r['ready_s']:6.1f} s, epoch read {r['epoch_read_s']:5.1f} s, "
              f"peak {r['VmHWM']:7.0f} MiB, private {r['RssAnon']:7.0f} MiB, {r['tokens']:,} tokens")
    assert len({r["tokens"] for r in results.values()}) == 1, "the modes disagree on the tokens"
    cache_mib = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file()) / 2**20
    print(f"pairs={args.pairs} cache_on_disk_mib={cache_mib:.0f}")
    print(f"peak_memory_ratio={results['lists']['VmHWM'] / results['warm']['VmHWM']:.2f}")
    print(f"warm_vs_lists_ready_speedup={results['lists']['ready_s'] / results['warm']['ready_s']:.1f}")
    print(f"private_memory_ratio={results['lists']['RssAnon'] / results['warm']['RssAnon']:.2f}")


if __name__ == "__main__":
    main()
