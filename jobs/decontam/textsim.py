"""Text similarity maths for decontamination: pure functions, no Spark.

Everything works on *normalised words*: lower case, punctuation removed, whitespace collapsed.
A word n-gram is hashed to 64 bits from the hashes of its words (a polynomial over the word
hashes, then a MurmurHash3 finaliser that also mixes in n), so that every n-gram of a whole batch
of texts is computed with a handful of numpy operations instead of one Python call per n-gram.

MinHash follows datasketch's default "affine32" scheme bit for bit: the 32-bit shingle hash goes
through datasketch's fmix32 pre-mix, then `a_k * h + b_k` in uint32 with datasketch's own
permutations for (num_perm, seed). `shingle_hash32` is the same shingle hash as a datasketch
`hashfunc`, so `datasketch.MinHash(num_perm, seed=seed, hashfunc=shingle_hash32)` updated with
`shingles(text, n)` has exactly the signature `minhash_signatures` computes.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_APOSTROPHES = re.compile(r"['\u2019\u2018`]")
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
# The same two rules restricted to ASCII text (lowered first), for Arrow's RE2 kernels.
_ASCII_APOSTROPHES = "['`]"
_ASCII_NON_WORD = "[^a-z0-9]+"
_ARROW_MIN_TEXTS = 32

_P = np.uint64(0x100000001B3)           # odd multiplier of the n-gram polynomial
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # mixes n into the n-gram hash
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_MASK32 = np.uint64(0xFFFFFFFF)


# ---------------------------------------------------------------------------------------------
# Normalisation and n-grams


def normalize(text: str | None) -> str:
    """Lower case, apostrophes dropped ("don't" -> "dont"), every other run of punctuation,
    symbols, underscores or whitespace turned into one space; NFKC first so look-alike Unicode
    characters compare equal."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = _APOSTROPHES.sub("", text)
    return _NON_WORD.sub(" ", text).strip()


def words(text: str | None) -> list[str]:
    return normalize(text).split()


def ngrams(tokens: Sequence[str], n: int) -> list[str]:
    """Word n-grams as space-joined strings; a text shorter than n gives itself as its one n-gram,
    an empty text none (the usual MinHash shingling convention)."""
    if not tokens:
        return []
    if len(tokens) < n:
        return [" ".join(tokens)]
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def shingles(text: str | None, n: int) -> list[str]:
    return ngrams(words(text), n)


# ---------------------------------------------------------------------------------------------
# Hashing


def word_hashes(tokens: Sequence[str] | np.ndarray) -> np.ndarray:
    """64-bit hash of every word (pandas' SipHash with its fixed key: stable across processes)."""
    arr = np.asarray(tokens, dtype=object)
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint64)
    return pd.util.hash_array(arr, categorize=False)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> _S33)
    h = h * _M1
    h = h ^ (h >> _S33)
    h = h * _M2
    return h ^ (h >> _S33)


def _finish(h: np.ndarray, n: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _fmix64(h + np.uint64(n) * _GOLDEN)


def window_hashes(lengths: np.ndarray, wh: np.ndarray, sizes: Iterable[int],
                  whole: Iterable[int] = ()) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Hashes of every word window of each size in `sizes`, for a batch of texts at once.

    `lengths[t]` is the number of words of text t and `wh` the hashes of all their words,
    concatenated. Returns `{size: (text_index, position, hash)}` for the windows that lie wholly
    inside one text; for the sizes in `whole` only the windows that are a whole text (position
    0 of a text of exactly that many words). One pass of the polynomial serves all sizes (the
    hash of a window of size k+1 extends that of size k)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    whole = {int(s) for s in whole}
    sizes = sorted(set(int(s) for s in sizes) | whole)
    total = int(lengths.sum())
    out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if total == 0 or not sizes:
        empty = np.zeros(0, dtype=np.int64)
        return {k: (empty, empty, np.zeros(0, dtype=np.uint64)) for k in sizes}
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    text_of = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(total) - np.repeat(starts, lengths)
    room = lengths[text_of] - pos          # words from this position to the end of its text
    h = wh.astype(np.uint64).copy()
    with np.errstate(over="ignore"):
        for k in range(1, sizes[-1] + 1):
            if k > 1:
                m = total - k + 1
                if m <= 0:
                    break
                h[:m] = h[:m] * _P + wh[k - 1:]
            if k in whole:
                idx = starts[lengths == k]
                out[k] = (text_of[idx], pos[idx], _finish(h[idx], k))
            elif k in sizes:
                ok = room[: total - k + 1] >= k
                idx = np.nonzero(ok)[0]
                out[k] = (text_of[idx], pos[idx], _finish(h[idx], k))
    for k in sizes:
        if k not in out:
            empty = np.zeros(0, dtype=np.int64)
            out[k] = (empty, empty, np.zeros(0, dtype=np.uint64))
    return out


def flatten_words(texts: Iterable[str | None]) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Normalised words of each text: (lengths, hashes of all words concatenated, all words as
    one Arrow string array). Exactly `words()` of each text, but ASCII texts (NFKC leaves them
    as they are) are normalised and split by Arrow kernels over the whole batch at once, and
    each distinct word is hashed once."""
    # A few texts (one query, one candidate) are quicker one by one than through Arrow's kernels.
    texts = texts if isinstance(texts, (list, pd.Series, np.ndarray, pa.Array, pa.ChunkedArray)) else list(texts)
    arr = _as_arrow_strings(texts) if len(texts) > _ARROW_MIN_TEXTS else None
    if arr is None:  # not all strings, or few: the per-text path
        if isinstance(texts, (pa.Array, pa.ChunkedArray)):
            texts = texts.to_pylist()
        toks = [words(t) for t in texts]
        lengths = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
        flat_words = [w for t in toks for w in t]
        return lengths, word_hashes(flat_words), pa.array(flat_words, pa.large_string())
    is_ascii = pc.fill_null(pc.string_is_ascii(arr), True).to_numpy(zero_copy_only=False)
    fast = arr if is_ascii.all() else arr.filter(pa.array(is_ascii))
    lowered = pc.ascii_lower(fast)
    cleaned = pc.replace_substring_regex(pc.replace_substring_regex(lowered, _ASCII_APOSTROPHES, ""),
                                         _ASCII_NON_WORD, " ")
    split = pc.split_pattern(cleaned, " ")
    flat = pc.list_flatten(split)
    parent = pc.list_parent_indices(split).to_numpy(zero_copy_only=False)
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    flat, parent = flat.filter(pa.array(keep)), parent[keep]
    rows = np.nonzero(is_ascii)[0]
    parent = rows[parent]
    if not is_ascii.all():
        others = np.nonzero(~is_ascii)[0]
        toks = [words(arr[int(i)].as_py()) for i in others]
        flat = pa.concat_arrays([flat, pa.array([w for t in toks for w in t], flat.type)])
        parent = np.concatenate([parent, np.repeat(others, [len(t) for t in toks])])
        order = np.argsort(parent, kind="stable")
        flat, parent = flat.take(pa.array(order)), parent[order]
    lengths = np.bincount(parent, minlength=len(arr)).astype(np.int64)
    if len(flat) == 0:
        return lengths, np.zeros(0, dtype=np.uint64), flat
    encoded = pc.dictionary_encode(flat)
    vocab = word_hashes(encoded.dictionary.to_numpy(zero_copy_only=False))
    return lengths, vocab[encoded.indices.to_numpy(zero_copy_only=False)], flat


def _as_arrow_strings(texts: Iterable[str | None]) -> pa.Array | None:
    """The texts as one Arrow large_string array; None when some value is not a string."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if isinstance(texts, pa.Array):
        return texts.cast(pa.large_string()) if texts.type != pa.large_string() else texts
    values = texts if isinstance(texts, (list, pd.Series, np.ndarray)) else list(texts)
    try:
        return pa.array(values, pa.large_string(), from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def shingle_hashes_batch(lengths: np.ndarray, wh: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the MinHash shingles of a batch: every word n-gram, or the whole text for
    a text shorter than n words. Returns (text_index, hash), grouped by text in order."""
    short_sizes = {int(x) for x in np.unique(lengths[(lengths > 0) & (lengths < n)])}
    wins = window_hashes(lengths, wh, {n}, whole=short_sizes)
    rows, hashes = [wins[n][0]], [wins[n][2]]
    for k in short_sizes:
        rows.append(wins[k][0])
        hashes.append(wins[k][2])
    row = np.concatenate(rows)
    hv = np.concatenate(hashes)
    order = np.argsort(row, kind="stable")
    return row[order], hv[order]


def ngram_hashes(text: str | None, n: int) -> np.ndarray:
    """Sorted unique 64-bit hashes of the word n-grams of one text (short text: the whole text)."""
    lengths, wh, _ = flatten_words([text])
    _, hv = shingle_hashes_batch(lengths, wh, n)
    return np.unique(hv)


def shingle_hash32(data: bytes) -> int:
    """The 32-bit shingle hash as a datasketch `hashfunc`: `data` is one shingle from `shingles`
    (normalised words joined by single spaces), encoded as UTF-8."""
    tokens = data.decode("utf-8").split(" ")
    wins = window_hashes(np.array([len(tokens)]), word_hashes(tokens), [len(tokens)])
    return int(wins[len(tokens)][2][0] & _MASK32)


# ---------------------------------------------------------------------------------------------
# Hash sets


class HashSet:
    """A set of 64-bit hashes for membership tests of many values at once: the sorted values, and
    in front of them a bitmap indexed by each hash's top bits (about 40 bits per member), so that
    the ~98% of the values that are not members skip the binary search (which costs a cache miss
    per step). The hashes must be well mixed in their top bits, as the n-gram and band hashes are."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.unique(np.asarray(values).astype(np.int64))
        n = max(len(self.values), 1)
        self.bits = int(min(max(int(np.ceil(np.log2(n))) + 5, 10), 30))
        shift = np.uint64(64 - self.bits)
        self.bitmap = np.zeros(1 << (self.bits - 3), dtype=np.uint8)
        slot = self.values.view(np.uint64) >> shift
        np.bitwise_or.at(self.bitmap, slot >> np.uint64(3), np.left_shift(1, slot & np.uint64(7)).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.values)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `hashes` (int64 or uint64) are in the set."""
        hashes = np.asarray(hashes)
        if len(self.values) == 0 or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=bool)
        slot = hashes.view(np.uint64) >> np.uint64(64 - self.bits)
        maybe = ((self.bitmap[slot >> np.uint64(3)] >> (slot & np.uint64(7)).astype(np.uint8)) & 1).astype(bool)
        where = np.nonzero(maybe)[0]
        candidates = hashes[where].view(np.int64)
        idx = np.searchsorted(self.values, candidates)
        idx[idx == len(self.values)] = 0
        out = np.zeros(len(hashes), dtype=bool)
        out[where] = self.values[idx] == candidates
        return out


# ---------------------------------------------------------------------------------------------
# MinHash and LSH


@functools.lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own (a, b) permutation parameters for the default affine32 scheme."""
    from datasketch import MinHash  # heavy (it loads scipy, ~0.5 s), and needed once per process

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def minhash_signatures(row: np.ndarray, hv64: np.ndarray, num_rows: int, num_perm: int, seed: int = 1,
                       chunk: int = 8192) -> np.ndarray:
    """MinHash signatures (num_rows x num_perm, uint32) of shingle hashes grouped by `row`
    (sorted). Rows without shingles get datasketch's empty value (all 0xFFFFFFFF)."""
    a, b = permutations(num_perm, seed)
    # permutations x shingles: the per-row minimum then runs along contiguous memory
    sig = np.full((num_perm, num_rows), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    if len(row) == 0:
        return sig.T.copy()
    hv = _fmix32((hv64 & _MASK32).astype(np.uint32))
    with np.errstate(over="ignore"):
        for lo in range(0, len(hv), chunk):
            hi = min(lo + chunk, len(hv))
            r = row[lo:hi]
            phv = a[:, None] * hv[None, lo:hi]
            phv += b[:, None]
            starts = np.concatenate([[0], np.nonzero(np.diff(r))[0] + 1])
            mins = np.minimum.reduceat(phv, starts, axis=1)
            rows = r[starts]
            sig[:, rows] = np.minimum(sig[:, rows], mins)
    return sig.T.copy()


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One signed 64-bit key per band (num_rows x bands): a hash of the band's `rows` values and
    its index, so equal keys mean the same band of equal values (datasketch's bucket, modulo a
    2^-64 collision)."""
    n = sig.shape[0]
    out = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(n, np.uint64(band + 1) * _GOLDEN, dtype=np.uint64)
            for j in range(band * rows, (band + 1) * rows):
                h = _fmix64(h ^ sig[:, j].astype(np.uint64)) * _P
            out[:, band] = _fmix64(h)
    return out.view(np.int64)


def _gauss_legendre(lo: float, hi: float, f, points: int = 96) -> np.ndarray:
    x, w = np.polynomial.legendre.leggauss(points)
    s = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
    return 0.5 * (hi - lo) * np.tensordot(f(s), w, axes=([-1], [0]))


def lsh_error(threshold: float, bands: np.ndarray, rows: np.ndarray,
              fp_weight: float, fn_weight: float) -> np.ndarray:
    """Weighted LSH error of each (bands, rows): fp_weight times the false-positive area
    (integral over s in [0, t] of the probability 1 - (1 - s^r)^b that a pair of Jaccard s shares a
    band) plus fn_weight times the false-negative area (integral over [t, 1] of (1 - s^r)^b)."""
    b = np.asarray(bands, dtype=float)[..., None]
    r = np.asarray(rows, dtype=float)[..., None]
    fp = _gauss_legendre(0.0, threshold, lambda s: 1.0 - (1.0 - s ** r) ** b)
    fn = _gauss_legendre(threshold, 1.0, lambda s: (1.0 - s ** r) ** b)
    return fp * fp_weight + fn * fn_weight


def optimal_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5,
                       fn_weight: float = 0.5) -> tuple[int, int]:
    """The (bands, rows) with bands * rows <= num_perm that minimise `lsh_error`: the same
    optimum as datasketch's `MinHashLSH` (`_optimal_param`), computed for all candidates at once.
    Ties go to the smallest bands, then the smallest rows, as in datasketch's loop."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold} must be between 0 and 1")
    if num_perm < 1:
        raise ValueError(f"num_perm={num_perm} must be >= 1")
    bs, rs = [], []
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            bs.append(b)
            rs.append(r)
    err = lsh_error(threshold, np.array(bs), np.array(rs), fp_weight, fn_weight)
    best = int(np.argmin(err))
    return bs[best], rs[best]


# ---------------------------------------------------------------------------------------------
# Exact set similarity


def jaccard(a: np.ndarray | set, b: np.ndarray | set) -> float:
    """|A & B| / |A | B|; 0 for two empty sets."""
    a, b = set(np.asarray(list(a)).tolist()), set(np.asarray(list(b)).tolist())
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def containment(part: np.ndarray | set, whole: np.ndarray | set) -> float:
    """|P & W| / |P|: how much of `part` lies inside `whole`; 0 when `part` is empty."""
    part, whole = set(np.asarray(list(part)).tolist()), set(np.asarray(list(whole)).tolist())
    return len(part & whole) / len(part) if part else 0.0


def jaccard_sorted(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Jaccard, containment of a in b) of two sorted unique hash arrays, vectorised."""
    if len(a) == 0:
        return 0.0, 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter), inter / len(a)
