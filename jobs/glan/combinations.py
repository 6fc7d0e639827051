"""Sampling the key concepts a question is about (GLAN step 4), as pure functions.

Two strategies, as in the paper. Basic: one class session with m key concepts, 1 to 5 of them.
Challenging: two different sessions, 2 to 5 concepts from their union with both sessions
contributing. The question prompt tells the model that students have learned every session up to
the latest one sampled (`learned_up_to`).

The samples of one syllabus are a deterministic stream: `iter_combinations` yields the same
sequence for the same (concept counts per session, settings, seed, syllabus id) on every run and
machine (random.Random seeded from SHA-256, never Python's salted `hash()`, and only its integer
methods randrange/sample/shuffle, whose algorithms CPython keeps stable; a test pins the output),
never yields a combination twice, and ends when the space is used up. Asking for n = 10 and later
n = 20 gives the first 10 again plus 10 new ones, so raising `questions_per_syllabus` pays only for
the new ones.
Changing the strategy share, the size ranges or the seed gives a different stream; the job's
anti-join on `combination_id` then still keeps any combination from being asked twice.

Within a strategy a draw picks a session (or pair of sessions) uniformly, then a size uniformly
from those possible, then a subset uniformly among those of that size (for challenging ones, among
those that take at least one concept from each session). That keeps small and large sizes, and
sessions with few or many concepts, equally present, where a uniform draw over all combinations
would be almost all 4- and 5-concept sets from the longest sessions. Once half of a strategy's
space is used (and it is at most ENUMERATE_LIMIT), the rest is enumerated in a seeded shuffled
order, so exhausting a small space costs no rejection loop.

Which position gets which strategy is fixed by the position alone: position i is challenging when
floor((i + 1) * share) > floor(i * share), so every prefix of the stream holds the configured share
(to within one), whatever n is. When one strategy is used up (or impossible: a syllabus with one
session has no challenging combinations) the other one takes its positions.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from udfs.config_checks import SettingError, at_least

Strategy = Literal["basic", "challenging"]

ENUMERATE_LIMIT = 50_000  # a strategy space this small is enumerated once half of it is used
MAX_REPEATS = 200  # consecutive repeated draws before switching to enumeration (or giving up)
ID_HEX_DIGITS = 16


# ---------------------------------------------------------------------------------------------
# Counting


def count_basic(m: int, min_k: int = 1, max_k: int = 5) -> int:
    """Unique basic combinations of one session with m concepts: sum_{i=min_k..max_k} C(m, i)."""
    return sum(math.comb(m, i) for i in range(max(min_k, 0), max_k + 1))


def count_challenging(m1: int, m2: int, min_k: int = 2, max_k: int = 5) -> int:
    """Unique challenging combinations of two sessions (both contribute):
    sum_{i=min_k..max_k} [C(m1 + m2, i) - C(m1, i) - C(m2, i)]."""
    return sum(math.comb(m1 + m2, i) - math.comb(m1, i) - math.comb(m2, i)
               for i in range(max(min_k, 0), max_k + 1))


class CombinationCounts(NamedTuple):
    basic: int
    challenging: int

    @property
    def total(self) -> int:
        return self.basic + self.challenging


def count_syllabus(concept_counts: Sequence[int], *, basic_min: int = 1, basic_max: int = 5,
                   challenging_min: int = 2, challenging_max: int = 5) -> CombinationCounts:
    """Unique combinations of one syllabus: basic over every session, challenging over every
    unordered pair of different sessions."""
    sizes = [m for m in concept_counts if m > 0]
    basic = sum(count_basic(m, basic_min, basic_max) for m in sizes)
    challenging = sum(count_challenging(a, b, challenging_min, challenging_max)
                      for a, b in itertools.combinations(sizes, 2))
    return CombinationCounts(basic, challenging)


# ---------------------------------------------------------------------------------------------
# Combinations


@dataclass(frozen=True)
class Combination:
    """Concepts sampled for one question. Indices are positions in the syllabus's session list and
    in each session's concept list (0-based)."""

    index: int  # position in the syllabus's stream
    strategy: Strategy
    sessions: tuple[int, ...]  # sorted
    concepts: tuple[tuple[int, ...], ...]  # per session in `sessions`, sorted
    learned_up_to: int  # the latest sampled session: students have learned every session up to it

    @property
    def key(self) -> str:
        """Canonical text of the combination, e.g. "3:0-2-4" or "3:0-2|7:1"."""
        return _key(tuple(zip(self.sessions, self.concepts)))

    def concept_names(self, sessions: Sequence[Sequence[str]]) -> list[list[str]]:
        """The sampled concepts' texts, per sampled session."""
        return [[sessions[s][c] for c in cs] for s, cs in zip(self.sessions, self.concepts)]


_Parts = tuple[tuple[int, tuple[int, ...]], ...]  # ((session, (concept, ...)), ...), sorted


def _key(parts: _Parts) -> str:
    return "|".join(f"{s}:{'-'.join(map(str, cs))}" for s, cs in parts)


def combination_id(syllabus_id: str, combination: Combination) -> str:
    """Stable id: the first 16 hex digits of SHA-256 over the syllabus id and the canonical key."""
    text = f"{syllabus_id}\x1f{combination.key}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_HEX_DIGITS]


def stream_seed(syllabus_id: str, seed: int | str) -> int:
    """The random.Random seed of one syllabus's stream: SHA-256 of the ids, the same everywhere.
    `str(seed)`, so that seed 7 from YAML and "7" from the command line agree."""
    digest = hashlib.sha256(f"glan.combinations\x1f{syllabus_id}\x1f{seed}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


class _Space:
    """One strategy's combinations of one syllabus, drawn without repeats."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used: set[_Parts] = set()
        self.pending: list[_Parts] | None = None  # enumeration mode: what is left, next one last

    def draw(self, rng: random.Random) -> _Parts | None:
        if len(self.used) >= self.total:
            return None
        if self.pending is None and 2 * len(self.used) >= self.total and self.total <= ENUMERATE_LIMIT:
            self._start_enumeration(rng)
        if self.pending is None:
            for _ in range(MAX_REPEATS):
                parts = self.random_one(rng)
                if parts not in self.used:
                    self.used.add(parts)
                    return parts
            if self.total > ENUMERATE_LIMIT:
                # Not reachable in practice (it needs most of a huge space used); stop rather than spin.
                return None
            self._start_enumeration(rng)
        assert self.pending is not None
        if not self.pending:
            return None
        parts = self.pending.pop()
        self.used.add(parts)
        return parts

    def _start_enumeration(self, rng: random.Random) -> None:
        rest = [p for p in self.enumerate_all() if p not in self.used]
        rng.shuffle(rest)
        self.pending = rest

    def random_one(self, rng: random.Random) -> _Parts:
        raise NotImplementedError

    def enumerate_all(self) -> Iterator[_Parts]:
        raise NotImplementedError


class _BasicSpace(_Space):
    def __init__(self, sizes: Sequence[int], min_k: int, max_k: int) -> None:
        self.sessions = [(s, m) for s, m in enumerate(sizes) if m >= min_k]
        self.min_k, self.max_k = min_k, max_k
        super().__init__(sum(count_basic(m, min_k, max_k) for _, m in self.sessions))

    def random_one(self, rng: random.Random) -> _Parts:
        s, m = self.sessions[rng.randrange(len(self.sessions))]
        k = rng.randrange(self.min_k, min(self.max_k, m) + 1)
        return ((s, tuple(sorted(rng.sample(range(m), k)))),)

    def enumerate_all(self) -> Iterator[_Parts]:
        for s, m in self.sessions:
            for k in range(self.min_k, min(self.max_k, m) + 1):
                for cs in itertools.combinations(range(m), k):
                    yield ((s, cs),)


class _ChallengingSpace(_Space):
    def __init__(self, sizes: Sequence[int], min_k: int, max_k: int) -> None:
        present = [(s, m) for s, m in enumerate(sizes) if m > 0]
        self.pairs = [(a, b) for a, b in itertools.combinations(present, 2) if a[1] + b[1] >= min_k]
        self.min_k, self.max_k = min_k, max_k
        super().__init__(sum(count_challenging(a[1], b[1], min_k, max_k) for a, b in self.pairs))

    def _splits(self, m1: int, m2: int, k: int) -> range:
        # How many of the k concepts come from the first session; at least one from each.
        return range(max(1, k - m2), min(k - 1, m1) + 1)

    def random_one(self, rng: random.Random) -> _Parts:
        (s1, m1), (s2, m2) = self.pairs[rng.randrange(len(self.pairs))]
        k = rng.randrange(self.min_k, min(self.max_k, m1 + m2) + 1)
        # Weighting each split by its number of subsets makes the subset uniform among valid ones.
        splits = self._splits(m1, m2, k)
        weights = [math.comb(m1, j) * math.comb(m2, k - j) for j in splits]
        pick = rng.randrange(sum(weights))
        for j, w in zip(splits, weights):
            if pick < w:
                break
            pick -= w
        return ((s1, tuple(sorted(rng.sample(range(m1), j)))),
                (s2, tuple(sorted(rng.sample(range(m2), k - j)))))

    def enumerate_all(self) -> Iterator[_Parts]:
        for (s1, m1), (s2, m2) in self.pairs:
            for k in range(self.min_k, min(self.max_k, m1 + m2) + 1):
                for j in self._splits(m1, m2, k):
                    for c1 in itertools.combinations(range(m1), j):
                        for c2 in itertools.combinations(range(m2), k - j):
                            yield ((s1, c1), (s2, c2))


def _check_ranges(share_challenging: float, basic_min: int, basic_max: int,
                  challenging_min: int, challenging_max: int) -> None:
    # The names are CombinationsConfig's fields, which these arguments carry.
    if not 0.0 <= share_challenging <= 1.0:
        raise SettingError("share_challenging", f"share_challenging={share_challenging} must be within 0..1")
    if not 1 <= basic_min <= basic_max:
        message = f"basic_min_concepts={basic_min} must be >= 1 and <= basic_max_concepts={basic_max}"
        raise SettingError("basic_min_concepts", message)
    if not 2 <= challenging_min <= challenging_max:
        message = (f"challenging_min_concepts={challenging_min} must be >= 2 (one concept from each session) "
                   f"and <= challenging_max_concepts={challenging_max}")
        raise SettingError("challenging_min_concepts", message)


def is_challenging_position(i: int, share_challenging: float) -> bool:
    return math.floor((i + 1) * share_challenging) > math.floor(i * share_challenging)


def iter_combinations(sessions: Sequence[Sequence[str]], share_challenging: float, seed: int | str, *,
                      syllabus_id: str = "", basic_min: int = 1, basic_max: int = 5,
                      challenging_min: int = 2, challenging_max: int = 5) -> Iterator[Combination]:
    """The syllabus's stream of distinct combinations (see the module docstring); it ends when both
    strategies are used up. `sessions`: the key concepts of each class session, in syllabus order;
    only their numbers matter, and sessions without concepts are skipped."""
    _check_ranges(share_challenging, basic_min, basic_max, challenging_min, challenging_max)
    sizes = [len(concepts) for concepts in sessions]
    spaces: dict[Strategy, _Space] = {
        "basic": _BasicSpace(sizes, basic_min, basic_max),
        "challenging": _ChallengingSpace(sizes, challenging_min, challenging_max),
    }
    rng = random.Random(stream_seed(syllabus_id, seed))
    for i in itertools.count():
        first: Strategy = "challenging" if is_challenging_position(i, share_challenging) else "basic"
        second: Strategy = "basic" if first == "challenging" else "challenging"
        for strategy in (first, second):
            parts = spaces[strategy].draw(rng)
            if parts is not None:
                break
        else:
            return
        yield Combination(
            index=i,
            strategy=strategy,
            sessions=tuple(s for s, _ in parts),
            concepts=tuple(cs for _, cs in parts),
            learned_up_to=max(s for s, _ in parts),
        )


def sample_combinations(sessions: Sequence[Sequence[str]], n: int, share_challenging: float,
                        seed: int | str, *, syllabus_id: str = "", basic_min: int = 1, basic_max: int = 5,
                        challenging_min: int = 2, challenging_max: int = 5) -> list[Combination]:
    """The first n combinations of the syllabus's stream. Fewer than n when the space is used up:
    `len(result) < n` says so, and `count_syllabus` says how big the space is."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    stream = iter_combinations(sessions, share_challenging, seed, syllabus_id=syllabus_id,
                               basic_min=basic_min, basic_max=basic_max,
                               challenging_min=challenging_min, challenging_max=challenging_max)
    return list(itertools.islice(stream, n))


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class CombinationsConfig:
    """How many questions each syllabus gets and how their concepts are sampled.

    The paper uses both strategies without giving a share; 0.5 asks as many cross-session questions
    as single-session ones. It made 10 million pairs (about 500 per syllabus over ~19,000 syllabi):
    `target_pairs` is that goal for the configured taxonomy, and each syllabus gets
    ceil(target_pairs / syllabi) questions once the syllabi exist (`per_syllabus`).
    `questions_per_syllabus` set instead fixes the number (a first small run: raising it later
    costs only the new questions)."""

    target_pairs: int = 10_000_000
    questions_per_syllabus: int | None = None
    share_challenging: float = 0.5
    basic_min_concepts: int = 1
    basic_max_concepts: int = 5
    challenging_min_concepts: int = 2
    challenging_max_concepts: int = 5
    seed: int | str = 0

    def __post_init__(self) -> None:
        at_least(self, 1, "target_pairs")
        at_least(self, 1, "questions_per_syllabus", optional=True)
        if isinstance(self.seed, str) and not self.seed.strip():
            raise SettingError("seed", "seed= must not be empty")
        _check_ranges(self.share_challenging, self.basic_min_concepts, self.basic_max_concepts,
                      self.challenging_min_concepts, self.challenging_max_concepts)

    def per_syllabus(self, syllabi: float) -> int:
        """Questions per syllabus: `questions_per_syllabus` when set, else the share of
        `target_pairs` of each of `syllabi` (the expected number of syllabi of the taxonomy)."""
        if self.questions_per_syllabus is not None:
            return self.questions_per_syllabus
        return max(1, math.ceil(self.target_pairs / max(syllabi, 1.0)))

    def sample(self, sessions: Sequence[Sequence[str]], syllabus_id: str, n: int | None = None) -> list[Combination]:
        """`sample_combinations` with these settings; n defaults to `questions_per_syllabus`."""
        if n is None and self.questions_per_syllabus is None:
            raise ValueError("combinations.questions_per_syllabus is null: pass n (see per_syllabus)")
        return sample_combinations(
            sessions, self.questions_per_syllabus if n is None else n, self.share_challenging, self.seed,
            syllabus_id=syllabus_id, basic_min=self.basic_min_concepts, basic_max=self.basic_max_concepts,
            challenging_min=self.challenging_min_concepts, challenging_max=self.challenging_max_concepts,
        )

    def count(self, sessions: Sequence[Sequence[str]]) -> CombinationCounts:
        return count_syllabus([len(s) for s in sessions], basic_min=self.basic_min_concepts,
                              basic_max=self.basic_max_concepts, challenging_min=self.challenging_min_concepts,
                              challenging_max=self.challenging_max_concepts)
