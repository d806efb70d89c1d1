"""FAISS exact search against numpy brute force, tie order, batching and k clamping."""

from __future__ import annotations

import numpy as np
import pytest

from whalesub.core.errors import WhalesubError
from whalesub.ranking.index import FlatIndex, search, sort_ties


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_force(g, q, k):
    """Top-k by (-score, index) from the full float64 score matrix."""
    s = q.astype(np.float64) @ g.T.astype(np.float64)
    idx = np.stack([np.lexsort((np.arange(len(g)), -row))[:k] for row in s])
    return np.take_along_axis(s, idx, axis=1), idx


def test_topk_equals_numpy_brute_force_on_random_unit_vectors():
    rng = np.random.default_rng(0)
    g, q = _unit(rng, 600, 24), _unit(rng, 70, 24)
    scores, idx = search(g, q, 25, batch_size=16)
    want_s, want_i = _brute_force(g, q, 25)
    assert scores.shape == idx.shape == (70, 25) and scores.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_allclose(scores, want_s, atol=1e-5)
    # index sets equal; the ranking too wherever consecutive scores are not float-close
    assert all(set(a) == set(b) for a, b in zip(idx, want_i, strict=True))
    separated = np.abs(np.diff(want_s, axis=1)).min(axis=1) > 1e-5
    np.testing.assert_array_equal(idx[separated], want_i[separated])
    # every returned score is the true score of the returned neighbour
    np.testing.assert_allclose(scores, np.take_along_axis(q @ g.T, idx, axis=1), atol=1e-5)


def test_ties_come_out_in_gallery_order():
    rng = np.random.default_rng(1)
    g = _unit(rng, 40, 8)
    dup = g[5].copy()
    for i in (31, 12, 5, 27):
        g[i] = dup
    scores, idx = search(g, dup[None, :], 6)
    assert idx[0, :4].tolist() == [5, 12, 27, 31]
    assert np.allclose(scores[0, :4], 1.0, atol=1e-5) and (scores[0, 4:] < scores[0, 3] - 1e-4).all()


def test_sort_ties_hand_worked():
    s = np.array([[0.5, 0.9, 0.5, -3.4e38], [0.1, 0.1, 0.2, 0.1]], np.float32)
    i = np.array([[7, 4, 2, -1], [9, 3, 8, 1]], np.int64)
    s2, i2 = sort_ties(s, i)
    assert i2.tolist() == [[4, 2, 7, -1], [8, 1, 3, 9]]
    assert s2[0, :3].tolist() == pytest.approx([0.9, 0.5, 0.5]) and s2[0, 3] == -np.inf


def test_batches_do_not_change_results_and_k_is_clamped():
    rng = np.random.default_rng(2)
    g, q = _unit(rng, 30, 8), _unit(rng, 50, 8)
    index = FlatIndex(g.astype(np.float16))  # float16 accepted, converted to float32
    a = index.search(q, 100, batch_size=7)
    b = index.search(q, 100, batch_size=1000)
    assert a[0].shape == (50, 30)  # k clamped to the gallery size
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert (np.sort(a[1], axis=1) == np.arange(30)).all()  # k = N returns the whole gallery


def test_bad_shapes_and_k_raise():
    g = np.ones((4, 3), np.float32)
    with pytest.raises(WhalesubError, match="Q x 3"):
        search(g, np.ones((2, 5), np.float32), 2)
    with pytest.raises(WhalesubError, match="at least 1"):
        search(g, np.ones((2, 3), np.float32), 0)
    with pytest.raises(WhalesubError, match="non-empty"):
        search(np.ones((0, 3), np.float32), np.ones((2, 3), np.float32), 1)


@pytest.mark.gpu
def test_gpu_index_matches_cpu():
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("FAISS sees no GPU")
    rng = np.random.default_rng(3)
    g, q = _unit(rng, 5000, 64), _unit(rng, 300, 64)
    cs, ci = search(g, q, 50, use_gpu=False)
    gs, gi = search(g, q, 50, use_gpu=True)
    np.testing.assert_allclose(gs, cs, atol=1e-4)
    assert np.mean([len(set(a) & set(b)) / 50 for a, b in zip(ci, gi, strict=True)]) > 0.999
