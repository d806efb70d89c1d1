"""whalesub.ranking.vectors against independent oracles, and every caller using the one rule.

Oracles: per-row Python ``math.fsum`` sums and ``math.sqrt`` norms (float64, computed in another
order than numpy), rounded to float32 once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from whalesub.embedding.embed import EmbedOptions, embed_batch
from whalesub.ranking.store import Embeddings, average_views
from whalesub.ranking.vectors import average_groups, sub_centre_means, unit_rows, zero_rows
from whalesub.ranking.vectors import average_views as average_view_array


def _oracle_unit(row) -> list[float]:
    norm = math.sqrt(math.fsum(float(v) * float(v) for v in row))
    return [float(v) / norm if norm >= 1e-12 else 0.0 for v in row]


def _oracle_mean_direction(rows) -> np.ndarray:
    sums = [math.fsum(float(r[j]) for r in rows) for j in range(len(rows[0]))]
    return np.array(_oracle_unit(sums), dtype=np.float32)


def test_unit_rows_hand_worked_and_random():
    hand = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]), np.float64)
    np.testing.assert_array_equal(hand, [[0.6, 0.8], [0, 0]])
    x = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32) * 30
    want = np.array([_oracle_unit(r) for r in x], dtype=np.float32)
    np.testing.assert_allclose(unit_rows(x), want, rtol=0, atol=6e-8)
    assert unit_rows(x).dtype == np.float32 and unit_rows(x, np.float64).dtype == np.float64
    assert zero_rows(np.array([[0.0, 0.0], [1e-20, 0.0], [0.1, 0.0]])).tolist() == [True, True, False]


def test_average_groups_and_views_equal_the_per_group_oracle():
    rng = np.random.default_rng(1)
    x = unit_rows(rng.standard_normal((40, 6)))
    groups = rng.integers(0, 9, size=40)
    groups[groups == 4] = 5  # group 4 gets no rows: a zero row
    got = average_groups(x, groups, 9)
    for g in range(9):
        rows = x[groups == g]
        want = _oracle_mean_direction(rows) if len(rows) else np.zeros(6, np.float32)
        np.testing.assert_allclose(got[g], want, rtol=0, atol=6e-8)
    views = x[:36].reshape(12, 3, 6)
    want = np.stack([_oracle_mean_direction(v) for v in views])
    np.testing.assert_allclose(average_view_array(views), want, rtol=0, atol=6e-8)
    with pytest.raises(ValueError, match=r"\[N, V, D\]"):
        average_view_array(x)


def test_float64_accumulation_keeps_a_near_tie_that_float32_would_break():
    """Many small views of one direction plus one large one: float32 sums lose the small ones' tilt."""
    big = np.array([1.0, 0.0], np.float32)
    small = np.array([0.0, 1e-4], np.float32)
    views = np.stack([big] + [small] * 4000)[None]  # [1, 4001, 2]
    want = _oracle_mean_direction(views[0])
    np.testing.assert_allclose(average_view_array(views)[0], want, rtol=0, atol=1e-7)


def test_store_embed_and_training_share_the_averaging_rule():
    """The query path (store.average_views), embed's flip TTA and training's validation agree bit for bit."""
    rng = np.random.default_rng(2)
    views = np.stack([unit_rows(rng.standard_normal((8, 5))), unit_rows(rng.standard_normal((8, 5)))], axis=1)
    oracle = np.stack([_oracle_mean_direction(v) for v in views])
    # the query file: ids repeated per view, views interleaved (image-major, as --flip-views writes)
    emb = Embeddings(ids=np.repeat([f"q{i}.jpg" for i in range(8)], 2), vectors=views.reshape(16, 5),
                     meta={})
    from_store = average_views(emb).vectors
    np.testing.assert_allclose(from_store, oracle, rtol=0, atol=6e-8)

    class FlipModel:  # returns the original views then the flipped ones, like the backends
        def __call__(self, x, flip):
            assert flip
            return np.concatenate([views[:, 0], views[:, 1]])

    from_embed = embed_batch([FlipModel()], [np.zeros((8, 3, 4, 4), np.float32)], [0], EmbedOptions())
    import train.loop as loop

    assert loop.average_views is average_view_array  # training's validation scores through it
    np.testing.assert_array_equal(from_store, from_embed)
    np.testing.assert_array_equal(from_store, average_view_array(views))


def test_class_centres_oracle_and_torch_head_agree():
    from train.heads import ArcMarginHead

    rng = np.random.default_rng(3)
    w = rng.standard_normal((4 * 3, 6)) * rng.uniform(0.1, 5, size=(12, 1))  # k = 3 sub-centres
    want = np.stack([_oracle_mean_direction([_oracle_unit(r) for r in w[c * 3:c * 3 + 3]]) for c in range(4)])
    np.testing.assert_allclose(sub_centre_means(w, 4), want, rtol=0, atol=6e-8)
    with pytest.raises(ValueError, match="does not split into 5 classes"):
        sub_centre_means(w, 5)
    head = ArcMarginHead(6, 4, k=3)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
    np.testing.assert_array_equal(head.class_centres().numpy(), sub_centre_means(w.astype(np.float32), 4))
