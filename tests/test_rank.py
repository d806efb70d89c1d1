"""Ranking: per-individual max, tie rules, the new_individual column, filling, memory O(Q x k)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.index import search
from whalesub.ranking.rank import (
    NEW,
    PAD,
    decode_labels,
    encode_labels,
    exact_candidates,
    individual_candidates,
    insert_new_individual,
    predict_top5,
    rank_queries,
)

A, B, C, D, E, F = range(6)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _oracle_top5(g, labels, q, threshold):
    """Straightforward reference: a dict of best cosines per individual, sorted, new_individual inserted."""
    out = []
    for row in q.astype(np.float64) @ g.T.astype(np.float64):
        best: dict[str, float] = {}
        for s, lab in zip(row, labels, strict=True):
            best[lab] = max(best.get(lab, -np.inf), s)
        ranked = sorted(best, key=lambda lab: (-best[lab], lab))
        n_above = sum(best[lab] >= threshold for lab in ranked)
        ranked.insert(n_above, NEW_INDIVIDUAL)
        out.append(ranked[:5])
    return out


def test_best_score_per_individual_hand_worked():
    # neighbours in no particular order; A has two vectors (e.g. an image and its flip)
    scores = np.array([[0.6, 0.9, 0.7, 0.8, 0.75]], np.float32)
    indices = np.array([[3, 0, 2, 1, 4]])
    gallery_labels = np.array([A, A, B, C, A])  # index -> individual
    labels, s = individual_candidates(scores, indices, gallery_labels)
    assert labels.tolist() == [[A, B, C, PAD, PAD]]
    np.testing.assert_allclose(s[0, :3], [0.9, 0.7, 0.6])
    assert np.isneginf(s[0, 3:]).all()


def test_equal_scores_rank_by_label_string():
    codes, classes = encode_labels(["zeta", "alpha", "mid"])
    assert classes.tolist() == ["alpha", "mid", "zeta"]  # codes follow string order
    scores = np.array([[0.5, 0.5, 0.5]], np.float32)
    labels, _ = individual_candidates(scores, np.array([[0, 1, 2]]), codes)
    assert classes[labels[0, :3]].tolist() == ["alpha", "mid", "zeta"]


CANDS = np.array([[A, B, C, D, E]]), np.array([[0.9, 0.7, 0.5, 0.3, 0.1]], np.float32)


@pytest.mark.parametrize(
    "threshold, expected",
    [
        (0.95, [NEW, A, B, C, D]),  # above every score: new_individual first
        (1.0, [NEW, A, B, C, D]),
        (0.05, [A, B, C, D, E]),  # below every score: absent
        (-1.0, [A, B, C, D, E]),
        (0.6, [A, B, NEW, C, D]),  # in between: where its score ranks
        (0.2, [A, B, C, D, NEW]),
        (0.7, [A, B, NEW, C, D]),  # equal to B's score: the individual ranks first
        (0.1, [A, B, C, D, E]),  # equal to the fifth score: pushed out
    ],
)
def test_threshold_semantics(threshold, expected):
    assert insert_new_individual(*CANDS, threshold).tolist() == [expected]


def test_insert_with_short_candidate_rows():
    labels = np.array([[A, B, PAD, PAD, PAD], [C, PAD, PAD, PAD, PAD]])
    scores = np.array([[0.8, 0.4, -np.inf, -np.inf, -np.inf], [0.3, -np.inf, -np.inf, -np.inf, -np.inf]],
                      np.float32)
    out = insert_new_individual(labels, scores, 0.5)
    assert out.tolist() == [[A, NEW, B, PAD, PAD], [NEW, C, PAD, PAD, PAD]]
    rows = decode_labels(out, np.array(["a", "b", "c"]))
    assert rows == [["a", NEW_INDIVIDUAL, "b"], [NEW_INDIVIDUAL, "c"]]


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.25, 0.45, 1.0])
def test_predict_top5_matches_brute_force_oracle(threshold):
    rng = np.random.default_rng(0)
    # long tail: individual i has 1 + i // 8 images, each with two views (original, "flipped")
    names = [f"id{i:02d}" for i in range(40) for _ in range(1 + i // 8)]
    labels = np.repeat(names, 2)
    g, q = _unit(rng, labels.size, 6), _unit(rng, 80, 6)
    got = predict_top5(g, labels, q, threshold, k=12)
    want = _oracle_top5(g, labels, q, threshold)
    assert got == want
    assert all(len(row) == 5 == len(set(row)) for row in got)


def test_rows_with_few_individuals_in_topk_are_filled_from_the_next_neighbours():
    rng = np.random.default_rng(1)
    d = 8
    query = _unit(rng, 1, d)
    # "big" crowds the query's neighbourhood with 30 vectors; six others lie further away
    big = query + 0.05 * rng.standard_normal((30, d)).astype(np.float32)
    others = _unit(rng, 12, d)
    g = np.vstack([big / np.linalg.norm(big, axis=1, keepdims=True), others])
    labels = np.array(["big"] * 30 + [f"o{i}" for i in range(6)] * 2)
    codes, classes = encode_labels(labels)
    lab, _ = individual_candidates(*search(g, query, 10), codes)
    assert (lab != PAD).sum() == 1  # the top 10 hold a single individual
    got = predict_top5(g, labels, query, -1.0, k=10)
    assert got == _oracle_top5(g, labels, query, -1.0)
    assert got[0][0] == "big" and len(set(got[0])) == 5


@pytest.mark.parametrize("threshold, expected", [(-1.0, ["a", "b", NEW_INDIVIDUAL]),
                                                 (0.0, ["a", NEW_INDIVIDUAL, "b"]),
                                                 (0.7, [NEW_INDIVIDUAL, "a", "b"])])
def test_gallery_with_fewer_than_five_individuals_gives_shorter_rows(threshold, expected):
    """Two individuals: every row holds both, plus new_individual (nothing can push it out)."""
    g = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    labels = np.array(["a", "a", "b"])
    q = np.array([[0.6, -0.8]], np.float32)  # cos: a = max(0.6, -0.28) = 0.6, b = -0.8
    assert predict_top5(g, labels, q, threshold, k=100) == [expected]


def test_exact_candidates_equal_topk_candidates_with_k_equal_to_the_gallery():
    rng = np.random.default_rng(4)
    g, q = _unit(rng, 90, 5), _unit(rng, 21, 5)
    codes = rng.integers(0, 12, size=90)
    codes[:3] = 11  # the same vector under one individual twice, and tied with another individual
    g[1] = g[0]
    g[2] = g[0]
    codes[2] = 3
    want = individual_candidates(*search(g, q, 90), codes)
    got = exact_candidates(g, codes, q, budget_bytes=90 * 4 * 4)  # batches of 4 queries
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


def test_chunked_inputs_give_the_same_candidates():
    rng = np.random.default_rng(2)
    g, q = _unit(rng, 200, 8), _unit(rng, 33, 8)
    codes = rng.integers(0, 25, size=200)
    whole = rank_queries(g, codes, q, k=20, batch_size=10_000)
    chunked = rank_queries(g, codes, q, k=20, batch_size=4)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a, b)
    s, i = search(g, q, 20)
    parts = [individual_candidates(s[a:a + 5], i[a:a + 5], codes) for a in range(0, 33, 5)]
    np.testing.assert_array_equal(np.vstack([p[0] for p in parts]), whole[0])


def test_candidates_memory_is_proportional_to_queries_times_k():
    """2,000 queries over a million individuals: a dense Q x individuals matrix would need 8 GB."""
    rng = np.random.default_rng(3)
    q, k, n = 2000, 10, 1_000_000
    gallery_labels = np.arange(n, dtype=np.int64)
    scores = rng.random((q, k), dtype=np.float32)
    indices = rng.integers(0, n, size=(q, k))
    tracemalloc.start()
    labels, s = individual_candidates(scores, indices, gallery_labels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert labels.shape == s.shape == (q, 5)
    assert peak < 40 * q * k * 8  # a few [Q, k] int64 arrays, nothing of size n
