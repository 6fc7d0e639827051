"""The pure similarity maths: normalisation, n-gram hashes, MinHash (bit-equal to datasketch),
the LSH bands/rows optimum and exact set similarity."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from jobs.decontam import textsim as ts


@pytest.mark.parametrize("raw, expected", [
    ("Hello,   World!", "hello world"),
    ("  Don't STOP\n\tbelieving.", "dont stop believing"),
    ("x=2; y_3 = (4)", "x 2 y 3 4"),
    ("Ｆｕｌｌｗｉｄｔｈ text", "fullwidth text"),
    ("", ""),
    (None, ""),
])
def test_normalize(raw, expected):
    assert ts.normalize(raw) == expected


def test_ngrams_short_text_is_one_gram_and_empty_text_none():
    assert ts.ngrams(["a", "b"], 3) == ["a b"]
    assert ts.ngrams([], 3) == []
    assert ts.ngrams(list("abcd"), 3) == ["a b c", "b c d"]


def test_batch_window_hashes_match_single_text_hashes_and_ignore_text_boundaries():
    texts = ["one two three four five", "six seven", "", "eight nine ten eleven"]
    lengths, wh, _ = ts.flatten_words(texts)
    wins = ts.window_hashes(lengths, wh, [2, 3])
    rows, pos, hashes = wins[3]
    assert rows.tolist() == [0, 0, 0, 3, 3]      # no window spans two texts
    assert pos.tolist() == [0, 1, 2, 0, 1]
    single = ts.ngram_hashes("one two three four five", 3)
    assert sorted(hashes[rows == 0].tolist()) == sorted(single.tolist())
    # the same words give the same hash wherever they are; windows of another size another hash
    assert set(ts.ngram_hashes("one two three", 3)) <= set(ts.ngram_hashes("zero one two three", 3))
    assert not set(ts.ngram_hashes("one two three", 2)) & set(ts.ngram_hashes("one two three four", 3))


def test_minhash_signature_is_datasketchs_bit_for_bit():
    texts = ["The quick brown fox jumps over the lazy dog, again and again!", "short one", "",
             "Solve for x: 3x + 5 = 20. What is x?"]
    lengths, wh, _ = ts.flatten_words(texts)
    row, hv = ts.shingle_hashes_batch(lengths, wh, 3)
    sig = ts.minhash_signatures(row, hv, len(texts), 64, seed=7, chunk=5)
    for i, text in enumerate(texts):
        m = MinHash(num_perm=64, seed=7, hashfunc=ts.shingle_hash32)
        m.update_batch([s.encode("utf-8") for s in ts.shingles(text, 3)])
        assert np.array_equal(m.hashvalues, sig[i]), text


def test_band_keys_equal_exactly_when_the_band_is_equal():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [5, 2, 3, 4]], dtype=np.uint32)
    keys = ts.band_keys(sig, bands=2, rows=2)
    assert keys.dtype == np.int64
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] != keys[1, 1]
    assert keys[0, 1] == keys[2, 1] and keys[0, 0] != keys[2, 0]
    assert keys[0, 0] != ts.band_keys(sig[:, [2, 3, 0, 1]], 2, 2)[0, 1]  # band index is in the key


@pytest.mark.parametrize("threshold", [0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.3, 0.7), (0.9, 0.1)])
def test_optimal_bands_rows_is_datasketchs_optimum(threshold, weights):
    assert ts.optimal_bands_rows(threshold, 128, *weights) == _optimal_param(threshold, 128, *weights)


def test_optimal_bands_rows_known_values_and_shape():
    assert ts.optimal_bands_rows(0.5, 128) == (25, 5)
    assert ts.optimal_bands_rows(0.8, 128) == (9, 13)
    b, r = ts.optimal_bands_rows(0.7, 256)
    assert b * r <= 256
    # a higher threshold needs longer bands
    assert ts.optimal_bands_rows(0.9, 128)[1] > ts.optimal_bands_rows(0.3, 128)[1]
    with pytest.raises(ValueError, match="threshold"):
        ts.optimal_bands_rows(1.0, 128)


def test_lsh_error_is_the_weighted_area():
    # b=1, r=1: P(candidate | s) = s, so FP area = t^2/2 and FN area = (1-t)^2/2
    err = ts.lsh_error(0.4, np.array([1]), np.array([1]), 1.0, 0.0)
    assert err[0] == pytest.approx(0.08)
    err = ts.lsh_error(0.4, np.array([1]), np.array([1]), 0.0, 1.0)
    assert err[0] == pytest.approx(0.18)


def test_jaccard_and_containment():
    assert ts.jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert ts.jaccard(set(), set()) == 0.0
    assert ts.containment({1, 2}, {1, 2, 3, 4}) == 1.0
    assert ts.containment(set(), {1}) == 0.0
    a, b = np.array([1, 2, 3]), np.array([2, 3, 4, 5])
    assert ts.jaccard_sorted(a, b) == pytest.approx((2 / 5, 2 / 3))


def test_flatten_words_is_words_of_each_text_for_ascii_unicode_and_missing_text():
    texts = ["Hello,   World!", None, "", "  Don't STOP\n\tbelieving.", "Ｆｕｌｌｗｉｄｔｈ text",
             "x=2; y_3 = (4)", "caf\u00e9 it\u2019s `quoted` _ok_", "ΣΟΦΙΑ İstanbul", "__ -- ''"] * 5
    assert np.array_equal(ts.flatten_words(texts[:3])[1], ts.flatten_words(texts)[1][:2])  # few: one by one
    lengths, wh, flat = ts.flatten_words(texts)  # many: Arrow kernels
    expected = [ts.words(t) for t in texts]
    assert lengths.tolist() == [len(w) for w in expected]
    assert flat.to_pylist() == [w for ws in expected for w in ws]
    assert np.array_equal(wh, ts.word_hashes([w for ws in expected for w in ws]))


def test_whole_windows_are_the_texts_of_exactly_that_many_words():
    lengths, wh, _ = ts.flatten_words(["a b c", "d e", "f g h i", "j k l"])
    wins = ts.window_hashes(lengths, wh, [4], whole=[3])
    rows, pos, hashes = wins[3]
    assert rows.tolist() == [0, 3] and pos.tolist() == [0, 0]
    assert hashes.tolist() == [ts.ngram_hashes("a b c", 3)[0], ts.ngram_hashes("j k l", 3)[0]]
    assert wins[4][0].tolist() == [2]


def test_hash_set_membership_matches_isin():
    rng = np.random.default_rng(1)
    members = rng.integers(-2**63, 2**63 - 1, 5000, dtype=np.int64)
    queries = np.concatenate([members[:300], rng.integers(-2**63, 2**63 - 1, 20000, dtype=np.int64)])
    found = ts.HashSet(members).contains(queries)
    assert np.array_equal(found, np.isin(queries, members)) and found[:300].all()
    assert not ts.HashSet([]).contains(queries).any()
    assert ts.HashSet(members).contains(np.zeros(0, np.int64)).shape == (0,)
