"""MAP@5: hand-worked cases and agreement with independent implementations on random rows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.metric import average_precision_at_5, format_breakdown, map_at_5, score_breakdown

NEW = NEW_INDIVIDUAL


def kaggle_map_per_image(label, predictions):
    """The competition's reference (the popular Happywhale notebook), verbatim semantics."""
    try:
        return 1 / (predictions[:5].index(label) + 1)
    except ValueError:
        return 0.0


def numpy_map5(predictions, truths):
    """A vectorised formula: pad to 5 columns, match matrix, first hit by argmax."""
    padded = np.array([(list(p) + [None] * 5)[:5] for p in predictions], dtype=object)
    hits = padded == np.array(truths, dtype=object)[:, None]
    first = hits.argmax(axis=1)
    return float(np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0).mean())


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_hit_at_each_rank_scores_one_over_rank(rank):
    pred = ["a", "b", "c", "d", "e"]
    truth = pred[rank - 1]
    assert average_precision_at_5(pred, truth) == pytest.approx(1 / rank)


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_new_individual_at_each_rank(rank):
    pred = ["a", "b", "c", "d"]
    pred.insert(rank - 1, NEW)
    assert average_precision_at_5(pred, NEW) == pytest.approx(1 / rank)
    # the same row for a known animal that is not predicted scores nothing
    assert average_precision_at_5(pred, "zz") == 0.0


def test_miss_and_hit_beyond_rank_five_score_zero():
    assert average_precision_at_5(["a", "b", "c", "d", "e"], "x") == 0.0
    assert average_precision_at_5(["a", "b", "c", "d", "e", "x"], "x") == 0.0
    assert average_precision_at_5([], "x") == 0.0


def test_repeats_after_the_hit_change_nothing_but_before_it_occupy_ranks():
    assert average_precision_at_5(["t", "t", "t"], "t") == 1.0
    assert average_precision_at_5(["a", "t", "t", "a"], "t") == 0.5
    # a wrong label repeated before the hit still takes a rank (competition's list.index semantics)
    assert average_precision_at_5(["a", "a", "t"], "t") == pytest.approx(1 / 3)
    assert average_precision_at_5(["a", "a", "a", "a", "a", "t"], "t") == 0.0


def test_fewer_than_five_labels():
    assert average_precision_at_5(["t"], "t") == 1.0
    assert average_precision_at_5(["a", "t"], "t") == 0.5
    assert average_precision_at_5(["a", "b"], "t") == 0.0


def test_space_separated_string_is_split_not_iterated():
    assert average_precision_at_5("a b new_individual", NEW) == pytest.approx(1 / 3)
    assert average_precision_at_5("abc", "a") == 0.0  # not character 'a' at rank 1


def test_map_is_the_mean_hand_worked():
    preds = [["t1", "x"], ["x", "t2"], ["x", "y", "z", "w", "v"], [NEW, "t4"]]
    truths = ["t1", "t2", "t3", "t4"]
    assert map_at_5(preds, truths) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


def test_map_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="pair up"):
        map_at_5([["a"]], ["a", "b"])
    with pytest.raises(ValueError, match="zero rows"):
        map_at_5([], [])


def random_rows(rng: random.Random, n: int):
    vocab = ["a", "b", "c", "d", "e", "f", "g", NEW]
    preds = [[rng.choice(vocab) for _ in range(rng.randint(0, 7))] for _ in range(n)]
    truths = [rng.choice(vocab[:7] + [NEW, NEW]) for _ in range(n)]
    return preds, truths


def test_agrees_with_independent_implementations_on_random_rows():
    rng = random.Random(0)
    for _ in range(200):
        preds, truths = random_rows(rng, rng.randint(1, 30))
        reference = [kaggle_map_per_image(t, p) for p, t in zip(preds, truths, strict=True)]
        mine = [average_precision_at_5(p, t) for p, t in zip(preds, truths, strict=True)]
        assert mine == pytest.approx(reference)
        assert map_at_5(preds, truths) == pytest.approx(np.mean(reference))
        assert map_at_5(preds, truths) == pytest.approx(numpy_map5(preds, truths))


def test_breakdown_hand_worked():
    preds = [
        [NEW, "a"],        # truth new, new first -> 1; a true positive for new@1
        ["b", NEW],        # truth new at rank 2 -> 0.5; a missed new@1
        [NEW, "c"],        # truth c at rank 2 -> 0.5; a false positive for new@1
        ["d", "e"],        # truth d at rank 1 -> 1
        ["x", "y"],        # truth e missing -> 0
    ]
    truths = [NEW, NEW, "c", "d", "e"]
    b = score_breakdown(preds, truths)
    assert b["n"] == 5 and b["n_new"] == 2 and b["n_known"] == 3 and b["n_pred_new_at1"] == 2
    assert b["map5"] == pytest.approx((1 + 0.5 + 0.5 + 1 + 0) / 5)
    assert b["map5_new"] == pytest.approx(0.75)
    assert b["map5_known"] == pytest.approx(0.5)
    assert b["new_precision_at1"] == pytest.approx(0.5)
    assert b["new_recall_at1"] == pytest.approx(0.5)
    assert b["pred_new_share_at1"] == pytest.approx(0.4)
    assert b["top1_known"] == pytest.approx(1 / 3)
    assert b["hits_at_rank"] == [2, 2, 0, 0, 0, 1]
    json.dumps(b)  # JSON-ready
    table = format_breakdown(b)
    assert "MAP@5" in table and "0.6000" in table


def test_breakdown_zero_denominators_are_none():
    only_known = score_breakdown([["a"], ["b"]], ["a", "c"])
    assert only_known["n_new"] == 0 and only_known["map5_new"] is None
    assert only_known["new_recall_at1"] is None and only_known["new_precision_at1"] is None
    assert only_known["map5_known"] == pytest.approx(0.5)
    only_new = score_breakdown([[NEW], ["a", NEW]], [NEW, NEW])
    assert only_new["map5_known"] is None and only_new["top1_known"] is None
    assert only_new["map5_new"] == pytest.approx(0.75)
    assert "n/a" in format_breakdown(only_new)


def test_breakdown_parts_recombine_on_random_rows():
    rng = random.Random(1)
    for _ in range(100):
        preds, truths = random_rows(rng, rng.randint(1, 40))
        b = score_breakdown(preds, truths)
        parts = [(b["map5_known"] or 0.0) * b["n_known"], (b["map5_new"] or 0.0) * b["n_new"]]
        assert b["map5"] == pytest.approx(sum(parts) / b["n"])
        hits = b["hits_at_rank"]
        assert sum(hits) == b["n"]
        assert sum(h / r for r, h in enumerate(hits[:5], start=1)) == pytest.approx(b["map5"] * b["n"])
        new_rows = [p for p, t in zip(preds, truths, strict=True) if t == NEW]
        if new_rows:
            recall = np.mean([bool(p) and p[0] == NEW for p in new_rows])
            assert b["new_recall_at1"] == pytest.approx(recall)
        pred_new = [t for p, t in zip(preds, truths, strict=True) if p and p[0] == NEW]
        if pred_new:
            assert b["new_precision_at1"] == pytest.approx(np.mean([t == NEW for t in pred_new]))
