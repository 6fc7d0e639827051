"""Concept combinations: counts against brute force, no repeats, strategies, determinism, the stream."""

from __future__ import annotations

import itertools

import pytest

from jobs.glan.combinations import (
    CombinationsConfig,
    combination_id,
    count_basic,
    count_challenging,
    count_syllabus,
    iter_combinations,
    sample_combinations,
    stream_seed,
)


def concepts(*sizes: int) -> list[list[str]]:
    return [[f"s{s}c{c}" for c in range(m)] for s, m in enumerate(sizes)]


def brute_basic(m: int, min_k: int, max_k: int) -> set[tuple[int, ...]]:
    return {c for k in range(min_k, max_k + 1) for c in itertools.combinations(range(m), k)}


def brute_challenging(m1: int, m2: int, min_k: int, max_k: int) -> set[tuple[int, ...]]:
    # Concepts 0..m1-1 are the first session's, m1..m1+m2-1 the second's.
    union = range(m1 + m2)
    return {c for k in range(min_k, max_k + 1) for c in itertools.combinations(union, k)
            if any(i < m1 for i in c) and any(i >= m1 for i in c)}


def brute_syllabus(sizes, bmin=1, bmax=5, cmin=2, cmax=5) -> set[str]:
    keys = set()
    for s, m in enumerate(sizes):
        for c in brute_basic(m, bmin, bmax):
            keys.add(f"{s}:{'-'.join(map(str, c))}")
    for (s1, m1), (s2, m2) in itertools.combinations(list(enumerate(sizes)), 2):
        for c in brute_challenging(m1, m2, cmin, cmax):
            a = "-".join(str(i) for i in c if i < m1)
            b = "-".join(str(i - m1) for i in c if i >= m1)
            keys.add(f"{s1}:{a}|{s2}:{b}")
    return keys


# --- counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("m", range(0, 10))
@pytest.mark.parametrize("min_k, max_k", [(1, 5), (1, 1), (2, 3), (3, 7)])
def test_count_basic_equals_brute_force(m, min_k, max_k):
    assert count_basic(m, min_k, max_k) == len(brute_basic(m, min_k, max_k))


@pytest.mark.parametrize("m1, m2", [(0, 0), (0, 3), (1, 1), (1, 5), (2, 2), (3, 4), (5, 5), (6, 2), (8, 7)])
@pytest.mark.parametrize("min_k, max_k", [(2, 5), (2, 2), (3, 4)])
def test_count_challenging_equals_brute_force(m1, m2, min_k, max_k):
    assert count_challenging(m1, m2, min_k, max_k) == len(brute_challenging(m1, m2, min_k, max_k))


def test_paper_formulas_by_hand():
    assert count_basic(5) == 5 + 10 + 10 + 5 + 1
    # Two sessions of 5: C(10, i) - 2 C(5, i) for i = 2..5.
    assert count_challenging(5, 5) == (45 - 20) + (120 - 20) + (210 - 10) + (252 - 2)


@pytest.mark.parametrize("sizes", [[3], [3, 0, 2, 1], [5, 5, 5], [0, 0], [], [4, 1, 6]])
def test_count_syllabus_equals_brute_force(sizes):
    counts = count_syllabus(sizes)
    expected = brute_syllabus(sizes)
    assert counts.total == len(expected)
    assert counts.basic == sum(1 for k in expected if "|" not in k)


# --- sampling --------------------------------------------------------------------------------

LARGE = concepts(*([5] * 20), 7, 3, 0, 4)


def test_no_combination_is_drawn_twice():
    drawn = sample_combinations(LARGE, 5000, 0.5, seed=3, syllabus_id="big")
    assert len(drawn) == 5000
    assert len({c.key for c in drawn}) == 5000
    assert len({combination_id("big", c) for c in drawn}) == 5000
    assert [c.index for c in drawn] == list(range(5000))


def test_challenging_combinations_draw_from_two_sessions():
    drawn = [c for c in sample_combinations(LARGE, 1000, 0.5, seed=1) if c.strategy == "challenging"]
    assert len(drawn) == 500
    sizes = set()
    for c in drawn:
        assert len(c.sessions) == 2 and c.sessions[0] < c.sessions[1]
        assert all(len(cs) >= 1 for cs in c.concepts)  # both sessions contribute
        for s, cs in zip(c.sessions, c.concepts):
            assert list(cs) == sorted(set(cs)) and all(0 <= i < len(LARGE[s]) for i in cs)
        sizes.add(sum(len(cs) for cs in c.concepts))
        assert c.learned_up_to == c.sessions[1]
    assert sizes == {2, 3, 4, 5}
    assert 22 not in {s for c in drawn for s in c.sessions}  # the session without concepts


def test_basic_combinations_use_one_session_and_one_to_five_concepts():
    drawn = [c for c in sample_combinations(LARGE, 1000, 0.5, seed=1) if c.strategy == "basic"]
    assert len(drawn) == 500
    assert {len(c.concepts[0]) for c in drawn} == {1, 2, 3, 4, 5}
    for c in drawn:
        assert len(c.sessions) == 1 and c.learned_up_to == c.sessions[0]
        assert list(c.concepts[0]) == sorted(set(c.concepts[0]))
    assert {c.sessions[0] for c in drawn} == set(range(24)) - {22}


def test_size_ranges_are_settings():
    drawn = sample_combinations(LARGE, 400, 0.5, seed=1, basic_min=2, basic_max=3, challenging_min=4,
                                challenging_max=4)
    assert {sum(map(len, c.concepts)) for c in drawn if c.strategy == "basic"} == {2, 3}
    assert {sum(map(len, c.concepts)) for c in drawn if c.strategy == "challenging"} == {4}


def test_concept_names_map_back_to_the_syllabus():
    sessions = concepts(3, 2)
    (c,) = [c for c in sample_combinations(sessions, 30, 1.0, seed=0) if c.key == "0:0-2|1:1"]
    assert c.concept_names(sessions) == [["s0c0", "s0c2"], ["s1c1"]]


def test_the_same_inputs_give_the_same_stream():
    first = sample_combinations(LARGE, 300, 0.4, seed=11, syllabus_id="a")
    assert sample_combinations(LARGE, 300, 0.4, seed=11, syllabus_id="a") == first
    assert sample_combinations(LARGE, 300, 0.4, seed="11", syllabus_id="a") == first
    assert sample_combinations(LARGE, 300, 0.4, seed=12, syllabus_id="a") != first
    assert sample_combinations(LARGE, 300, 0.4, seed=11, syllabus_id="b") != first


def test_the_stream_is_the_same_on_every_machine():
    # Pinned values: a change here means earlier runs' combinations would be drawn again.
    assert stream_seed("syl-1", 7) == int.from_bytes(
        __import__("hashlib").sha256(b"glan.combinations\x1fsyl-1\x1f7").digest()[:8], "big")
    drawn = sample_combinations(concepts(4, 3, 0, 5), 4, 0.5, seed=7, syllabus_id="syl-1")
    assert [c.key for c in drawn] == ["3:1", "1:0-1|3:0", "1:1", "1:0|3:1-2-4"]
    assert combination_id("syl-1", drawn[0]) == "7c4dde31f2490df6"


@pytest.mark.parametrize("sizes", [[5] * 12, [3, 0, 2, 1], [2, 2]])
def test_asking_for_more_repeats_the_first_ones_then_adds_new(sizes):
    sessions = concepts(*sizes)
    ten = sample_combinations(sessions, 10, 0.5, seed=5, syllabus_id="s")
    twenty = sample_combinations(sessions, 20, 0.5, seed=5, syllabus_id="s")
    assert twenty[:10] == ten
    assert not {c.key for c in twenty[10:]} & {c.key for c in ten}
    everything = sample_combinations(sessions, 10_000, 0.5, seed=5, syllabus_id="s")
    assert everything[:len(twenty)] == twenty


@pytest.mark.parametrize("sizes", [[3, 0, 2, 1], [5, 5, 5], [6], [1, 1, 1, 1], [9, 2]])
def test_exhaustion_returns_every_combination_once_and_stops(sizes):
    total = count_syllabus(sizes).total
    drawn = sample_combinations(concepts(*sizes), total + 50, 0.5, seed=2, syllabus_id="x")
    assert len(drawn) == total
    assert {c.key for c in drawn} == brute_syllabus(sizes)


def test_a_syllabus_with_one_session_gets_only_basic_combinations():
    drawn = sample_combinations(concepts(0, 6, 0), 40, 0.9, seed=0)
    assert len(drawn) == 40
    assert {c.strategy for c in drawn} == {"basic"}
    assert {c.sessions for c in drawn} == {(1,)}


def test_no_concepts_no_combinations():
    assert sample_combinations(concepts(0, 0), 10, 0.5, seed=0) == []
    assert sample_combinations([], 10, 0.5, seed=0) == []
    assert sample_combinations(concepts(3), 0, 0.5, seed=0) == []


@pytest.mark.parametrize("share", [0.0, 0.3, 0.5, 1.0])
def test_every_prefix_holds_the_share_of_challenging_ones(share):
    drawn = sample_combinations(LARGE, 200, share, seed=4)
    for n in (1, 7, 10, 100, 200):
        challenging = sum(c.strategy == "challenging" for c in drawn[:n])
        assert abs(challenging - share * n) < 1


def test_when_one_strategy_is_used_up_the_other_takes_its_places():
    sizes = [1, 1, 1]  # 3 basic combinations and 3 challenging pairs
    drawn = sample_combinations(concepts(*sizes), 10, 0.0, seed=0)
    assert [c.strategy for c in drawn] == ["basic"] * 3 + ["challenging"] * 3


def test_iter_combinations_is_lazy():
    stream = iter_combinations(concepts(*([5] * 30)), 0.5, seed=0)
    assert next(stream).index == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"share_challenging": 1.5}, "share_challenging=1.5"),
    ({"basic_min": 0}, "basic_min_concepts=0"),
    ({"basic_min": 4, "basic_max": 3}, "basic_min_concepts=4"),
    ({"challenging_min": 1}, "challenging_min_concepts=1"),
])
def test_bad_settings_are_refused(kwargs, message):
    args = {"share_challenging": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_combinations(concepts(3, 3), 5, seed=0, **args)


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, start", [
    ({"questions_per_syllabus": 0}, "questions_per_syllabus=0 must be >= 1"),
    ({"share_challenging": -0.1}, "share_challenging=-0.1 must be within 0..1"),
    ({"basic_min_concepts": 0}, "basic_min_concepts=0 must be >= 1"),
    ({"basic_max_concepts": 0}, "basic_min_concepts=1 must be >= 1 and <= basic_max_concepts=0"),
    ({"challenging_min_concepts": 1}, "challenging_min_concepts=1 must be >= 2"),
    ({"challenging_max_concepts": 1}, "challenging_min_concepts=2 must be >= 2"),
    ({"seed": " "}, "seed= must not be empty"),
])
def test_config_errors_start_with_a_field_name(kwargs, start):
    with pytest.raises(ValueError) as err:
        CombinationsConfig(**kwargs)
    assert str(err.value).startswith(start)


def test_config_samples_with_its_settings():
    cfg = CombinationsConfig(questions_per_syllabus=12, share_challenging=0.25, seed="s")
    sessions = concepts(5, 4, 3)
    drawn = cfg.sample(sessions, "syl")
    assert drawn == sample_combinations(sessions, 12, 0.25, "s", syllabus_id="syl")
    assert sum(c.strategy == "challenging" for c in drawn) == 3
    assert len(cfg.sample(sessions, "syl", n=30)) == 30
    assert cfg.count(sessions) == count_syllabus([5, 4, 3])
