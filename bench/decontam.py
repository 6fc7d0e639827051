"""Benchmark: decontamination of synthetic generated pairs against the full default benchmark set.

Compares `jobs.decontam.detect.decontaminate` (Spark, local[*]) with a plain single-process datasketch
loop (a MinHashLSH built over the benchmark items, one query per pair, candidates confirmed by the
same exact Jaccard) on the same pairs, and the recall of each on the same planted items.

Run: .venv/bin/python bench/decontam.py [--pairs 100000] [--scale-pairs 200000] [--planted 300]
The last line is `speedup=<x>` (Spark rows/s over the plain loop's rows/s at --pairs).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLANT_KINDS = ("verbatim", "embedded", "noisy", "edited")
_SEED = REPO.parent / "shared" / "seed"


class Prose:
    """Deterministic prose with a realistic word distribution: a word-bigram Markov chain over
    the seed documents (and the test LLM's sentences when that module is there)."""

    def __init__(self, seed: int = 0) -> None:
        text = " ".join(p.read_text(errors="ignore") for p in sorted(_SEED.glob("*.txt")))
        rng = random.Random(seed)
        try:
            from udfs.servers.fake_llm import free_text
            text += " " + " ".join(free_text(rng) for _ in range(200))
        except Exception:  # the test server module is optional here
            pass
        tokens = re.findall(r"[A-Za-z][A-Za-z'-]*|\d+|[.,;:?!]", text)
        self.next: dict[str, list[str]] = defaultdict(list)
        for a, b in zip(tokens, tokens[1:]):
            self.next[a].append(b)
        self.starts = [b for a, b in zip(tokens, tokens[1:]) if a == "." and b[:1].isupper()] or tokens[:50]

    def text(self, rng: random.Random, num_words: int) -> str:
        word, out = rng.choice(self.starts), []
        for _ in range(num_words):
            out.append(word)
            choices = self.next.get(word)
            word = rng.choice(choices) if choices else rng.choice(self.starts)
        s = " ".join(out)
        return re.sub(r" ([.,;:?!])", r"\1", s)


def noisy(text: str, rng: random.Random) -> str:
    """Case, punctuation and whitespace changes only."""
    out = []
    for tok in re.split(r"(\s+)", text):
        if tok.isspace():
            out.append(rng.choice([" ", "  ", "\n", "\t "]))
            continue
        r = rng.random()
        tok = tok.upper() if r < 0.15 else tok.lower() if r < 0.5 else tok
        if rng.random() < 0.15:
            tok += rng.choice([",", ";", " -", "!"])
        if rng.random() < 0.1:
            tok = tok.strip(".,?!;:")
        out.append(tok)
    return "".join(out)


def edited(text: str, rng: random.Random, prose: "Prose") -> str:
    """A few words or numbers changed: 2 (3 in items over 60 words)."""
    toks = text.split(" ")
    k = 3 if len(toks) > 60 else 2
    spots = [i for i, t in enumerate(toks) if re.search(r"\w", t)]
    for i in rng.sample(spots, min(k, len(spots))):
        if re.search(r"\d", toks[i]):
            toks[i] = re.sub(r"\d+", lambda m: str(int(m.group()) + rng.randint(1, 9)), toks[i])
        else:
            toks[i] = prose.text(rng, 1).rstrip(".,;:?!").lower() or "word"
    return " ".join(toks)


def plant(text: str, kind: str, rng: random.Random, prose: Prose) -> str:
    if kind == "verbatim":
        return text
    if kind == "embedded":
        return f"{prose.text(rng, rng.randint(10, 40))} {text} {prose.text(rng, rng.randint(10, 40))}"
    if kind == "noisy":
        return noisy(text, rng)
    return edited(text, rng, prose)


def plantable(items: list[tuple[str, str, str, str]], min_words: int) -> list[tuple[str, str, str, str]]:
    from jobs.decontam.textsim import words
    return [it for it in items if len(words(it[3])) >= min_words]


def make_pairs(num_pairs: int, items: list[tuple[str, str, str, str]], num_planted: int, seed: int = 7,
               min_words: int = 8):
    """(pairs, planted): pairs as dicts pair_id/question/answer/discipline; planted maps pair_id to
    (kind, benchmark, item_id). Planted items go into the question (half) or the answer."""
    rng = random.Random(seed)
    prose = Prose(seed)
    pool = plantable(items, min_words)
    chosen = rng.sample(pool, num_planted)
    where = sorted(rng.sample(range(num_pairs), num_planted))
    planted, pairs = {}, []
    spot = dict(zip(where, chosen))
    for i in range(num_pairs):
        pid = f"p{i:07d}"
        q = prose.text(rng, rng.randint(12, 60))
        a = prose.text(rng, rng.randint(40, 160))
        if i in spot:
            bench, _split, item_id, text = spot[i]
            kind = PLANT_KINDS[len(planted) % len(PLANT_KINDS)]
            t = plant(text, kind, rng, prose)
            if rng.random() < 0.5:
                q = t
            else:
                a = t
            planted[pid] = (kind, bench, item_id)
        pairs.append({"pair_id": pid, "question": q, "answer": a, "discipline": f"d{i % 50}"})
    return pairs, planted


def plain_loop(items, pairs, mh, text_cols=("question", "answer")):
    """The plain single-process way: datasketch MinHashLSH over the items, one query per text,
    candidates confirmed by the same exact Jaccard/containment rule. Returns {pair_id: {benchmarks}}."""
    from datasketch import MinHash, MinHashLSH
    from jobs.decontam import textsim as ts

    lsh = MinHashLSH(threshold=mh.threshold, num_perm=mh.num_perm, weights=(mh.fp_weight, mh.fn_weight))
    grams = {}
    with lsh.insertion_session() as session:
        for bench, _split, item_id, text in items:
            sh = ts.shingles(text, mh.ngram)
            if not sh:
                continue
            m = MinHash(num_perm=mh.num_perm, seed=mh.seed)
            m.update_batch([s.encode("utf-8") for s in sh])
            session.insert((bench, item_id), m, check_duplication=False)
            grams[(bench, item_id)] = text
    found = defaultdict(set)
    for pair in pairs:
        for col in text_cols:
            sh = ts.shingles(pair[col], mh.ngram)
            if not sh:
                continue
            m = MinHash(num_perm=mh.num_perm, seed=mh.seed)
            m.update_batch([s.encode("utf-8") for s in sh])
            mine = None
            for key in lsh.query(m):
                mine = mine if mine is not None else ts.ngram_hashes(pair[col], mh.ngram)
                j, c = ts.jaccard_sorted(ts.ngram_hashes(grams[key], mh.ngram), mine)
                if j >= mh.threshold or c >= mh.containment_threshold:
                    found[pair["pair_id"]].add(key[0])
    return found


def recall(found: dict, planted: dict) -> dict[str, float]:
    out = {}
    for kind in PLANT_KINDS:
        cases = [(pid, b) for pid, (k, b, _) in planted.items() if k == kind]
        out[kind] = sum(b in found.get(pid, ()) for pid, b in cases) / max(len(cases), 1)
    out["all"] = sum(b in found.get(pid, ()) for pid, (_, b, _) in planted.items()) / max(len(planted), 1)
    return out


def main(argv: list[str] | None = None) -> None:
    import pandas as pd

    from jobs.config.loader import load_config
    from jobs.spark.session import get_spark
    from jobs.decontam.detect import build_benchmark_items, decontaminate

    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--scale-pairs", type=int, default=200_000)
    parser.add_argument("--planted", type=int, default=300)
    parser.add_argument("--master", default="local[*]")
    args = parser.parse_args(argv)
    cfg = load_config(sets=[f"decontam.benchmarks_dir={REPO.parent / 'shared' / 'benchmarks'}"]).decontam
    spark = get_spark("bench-decontam", master=args.master, shuffle_partitions=8, run_root="/tmp/glan-bench")

    items_df = build_benchmark_items(spark, cfg).cache()
    items = [tuple(r) for r in items_df.collect()]
    print(f"benchmark items: {len(items)}")

    def spark_run(num_pairs: int):
        pairs, planted = make_pairs(num_pairs, items, args.planted)
        frame = spark.createDataFrame(pd.DataFrame(pairs)).repartition(8).cache()
        frame.count()
        started = time.perf_counter()
        instructions, contamination, _ = decontaminate(frame, items_df, cfg, near_dup=False)
        rows = contamination.select("pair_id", "benchmark").collect()
        kept = instructions.count()
        seconds = time.perf_counter() - started
        found = defaultdict(set)
        for r in rows:
            found[r["pair_id"]].add(r["benchmark"])
        frame.unpersist()
        return pairs, planted, seconds, found, kept

    pairs, planted, spark_s, spark_found, kept = spark_run(args.pairs)
    started = time.perf_counter()
    loop_found = plain_loop(items, pairs, cfg.minhash)
    loop_s = time.perf_counter() - started
    spark_rate, loop_rate = args.pairs / spark_s, args.pairs / loop_s
    r_spark, r_loop = recall(spark_found, planted), recall(loop_found, planted)
    print(f"{'':34}{'spark (ngram+minhash)':>24}{'plain datasketch loop':>24}")
    print(f"{'seconds, ' + str(args.pairs) + ' pairs':34}{spark_s:>24.1f}{loop_s:>24.1f}")
    print(f"{'rows per second':34}{spark_rate:>24.0f}{loop_rate:>24.0f}")
    for kind in (*PLANT_KINDS, "all"):
        print(f"{'recall ' + kind:34}{r_spark[kind]:>24.3f}{r_loop[kind]:>24.3f}")
    false_spark = len(set(spark_found) - set(planted))
    false_loop = len(set(loop_found) - set(planted))
    print(f"{'flagged clean pairs':34}{false_spark:>24}{false_loop:>24}")
    print(f"clean pairs kept by spark: {kept}")
    print("both timings are cold: they include hashing all benchmark items (Spark's index, the loop's "
          "MinHashLSH); reading the benchmark files is left out of both")
    if args.scale_pairs:
        _, _, scale_s, _, _ = spark_run(args.scale_pairs)
        print(f"spark, {args.scale_pairs} pairs: {scale_s:.1f}s ({args.scale_pairs / scale_s:.0f} rows/s; "
              f"x{scale_s / spark_s:.2f} the time for x{args.scale_pairs / args.pairs:.1f} the pairs)")
    print(f"speedup={spark_rate / loop_rate:.2f}")


if __name__ == "__main__":
    main()
