"""Exact and near-duplicate detection on crafted pairs at known Jaccard values; LSH parameters; leakage."""

from __future__ import annotations

import numpy as np
import pytest

from tunesmith.data import dedup

WORDS = [f"word{i}" for i in range(40)]  # 40 distinct words -> 36 word 5-shingles


def _pair_with_changed_tail(m: int) -> tuple[str, str]:
    """Replacing the last m words changes exactly the last m shingles: J = (36 - m) / (36 + m)."""
    changed = WORDS[:-m] + [f"new{i}" for i in range(m)]
    return " ".join(WORDS), " ".join(changed)


def test_crafted_jaccard_values():
    a, b = _pair_with_changed_tail(4)
    assert dedup.jaccard(dedup.shingles(a), dedup.shingles(b)) == pytest.approx(32 / 40)
    a, b = _pair_with_changed_tail(5)
    assert dedup.jaccard(dedup.shingles(a), dedup.shingles(b)) == pytest.approx(31 / 41)


@pytest.mark.parametrize("threshold,expected", [(0.79, 1), (0.80, 1), (0.81, 0)])
def test_near_duplicate_just_above_and_below_threshold(threshold, expected):
    a, b = _pair_with_changed_tail(4)  # J = 0.8 exactly
    unrelated = " ".join(f"other{i}" for i in range(40))
    found = dedup.near_duplicates([a, unrelated, b], threshold=threshold)
    assert len(found) == expected
    if expected:
        assert (found[0].index, found[0].kept, found[0].reason) == (2, 0, "near")
        assert found[0].similarity == pytest.approx(0.8)


def test_near_pair_below_default_threshold_is_kept():
    a, b = _pair_with_changed_tail(5)  # J = 0.756 < 0.8
    assert dedup.near_duplicates([a, b], threshold=0.8) == []
    assert len(dedup.near_duplicates([a, b], threshold=0.75)) == 1


def test_exact_dedup_normalises_case_whitespace_and_unicode():
    texts = ["Hello  World", "hello world", "ＨＥＬＬＯ world", "Hello, World", "hello world\n"]
    removed = dedup.exact_duplicates(texts)
    assert [(d.index, d.kept) for d in removed] == [(1, 0), (2, 0), (4, 0)]  # the comma makes index 3 differ


def test_clusters_keep_one_representative():
    base = " ".join(WORDS)
    variants = [base] + [" ".join(WORDS[:-1] + [f"end{i}"]) for i in range(4)]  # each J >= 35/37 with base
    found = dedup.near_duplicates(variants, threshold=0.8)
    assert sorted(d.index for d in found) == [1, 2, 3, 4]
    assert {d.kept for d in found} == {0}


def test_shingle_hashes_match_string_shingles():
    texts = ["a b", "", "A b c d e f g, ünï “q” ß", "x y z w v", "one two three four five six seven eight"]
    hashes, offsets = dedup.shingle_hashes(texts, 5)
    assert offsets.tolist()[0] == 0 and offsets.size == len(texts) + 1
    for i, text in enumerate(texts):
        assert len(set(hashes[offsets[i]:offsets[i + 1]].tolist())) == len(dedup.shingles(text, 5))
    # a record's hashes do not depend on its neighbours or on chunking
    again, again_offsets = dedup.shingle_hashes(texts[::-1], 5, chunk=2)
    last = len(texts) - 1
    assert np.array_equal(again[again_offsets[last]:again_offsets[last + 1]], hashes[offsets[0]:offsets[1]])


def test_lsh_params_favour_recall():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = dedup.lsh_params(threshold, 128)
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands >= 0.999


def test_leakage_pairs_cross_only():
    a, b = _pair_with_changed_tail(2)
    train = [a, " ".join(f"t{i}" for i in range(30))]
    other = [" ".join(f"v{i}" for i in range(30)), b]
    leaks = dedup.leakage_pairs(train, other)
    assert [(o, t) for o, t, _ in leaks] == [(1, 0)]
    assert leaks[0][2] == pytest.approx(34 / 38)


def test_both_signature_backends_find_the_same_pairs(monkeypatch):
    a, b = _pair_with_changed_tail(3)
    texts = [a, " ".join(f"u{i}" for i in range(40)), b]
    rensa_pairs = dedup.near_pairs(texts)
    monkeypatch.setattr(dedup, "backend", lambda: "datasketch")
    assert [p[:2] for p in dedup.near_pairs(texts)] == [p[:2] for p in rensa_pairs] == [(0, 2)]
