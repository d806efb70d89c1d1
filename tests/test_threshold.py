"""Threshold search: closed-form MAP@5 per threshold against whalesub.ranking.metric on decoded
predictions."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import ConfigError, DataError
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.metric import map_at_5
from whalesub.ranking.rank import NEW, decode_labels, insert_new_individual, rank_queries
from whalesub.ranking.threshold import (
    MAX_GRID,
    UNREACHABLE,
    average_precision_grid,
    grid_search,
    parse_grid,
    plateau_choice,
    threshold_for_new_share,
    truth_codes,
    tune_per_species,
)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def ranked():
    """Random labelled queries: 30 individuals, some queries near a gallery vector, some new."""
    rng = np.random.default_rng(0)
    g = _unit(rng, 120, 8)
    codes = rng.integers(0, 30, size=120)
    classes = np.array([f"ind{i:02d}" for i in range(30)])
    near = rng.integers(0, 120, size=60)
    q = g[near] + 0.6 * rng.standard_normal((60, 8)).astype(np.float32)
    q = np.vstack([q, _unit(rng, 25, 8)])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth_str = np.concatenate([classes[codes[near]], [NEW_INDIVIDUAL] * 23, ["ghost", "ind05"]])
    labels, scores = rank_queries(g, codes, q, k=20)
    return labels, scores, classes, truth_str


def test_grid_map5_equals_metric_on_decoded_predictions(ranked):
    labels, scores, classes, truth_str = ranked
    truth = truth_codes(truth_str, classes)
    assert (truth == NEW).sum() == 23 and (truth == UNREACHABLE).sum() == 1
    grid = np.r_[-1.0, np.quantile(scores[:, :5], np.linspace(0, 1, 15)), scores[3, 2], 1.0]
    found = grid_search(labels, scores, truth, grid)
    for t, m, share in zip(grid, found.map5, found.new_share, strict=True):
        preds = decode_labels(insert_new_individual(labels, scores, t), classes)
        assert m == pytest.approx(map_at_5(preds, truth_str.tolist()), abs=1e-12)
        assert share == pytest.approx(np.mean([p[0] == NEW_INDIVIDUAL for p in preds]))
    known = truth_str != NEW_INDIVIDUAL
    t = grid[7]
    preds = decode_labels(insert_new_individual(labels, scores, t), classes)
    assert found.map5_known[7] == pytest.approx(map_at_5([p for p, k in zip(preds, known, strict=True) if k],
                                                         truth_str[known].tolist()))
    assert found.best_map5 == found.map5.max() and found.best_threshold == grid[np.argmax(found.map5)]


def test_average_precision_hand_worked():
    labels = np.array([[0, 1, 2, 3, 4]] * 3)
    scores = np.tile(np.array([0.9, 0.7, 0.5, 0.3, 0.1], np.float32), (3, 1))
    truth = np.array([2, NEW, 4])  # known at candidate rank 3, new, known at candidate rank 5
    ap = average_precision_grid(labels, scores, truth, np.array([1.0, 0.6, 0.2, 0.0]))
    # t=1.0: new first -> [N,0,1,2,3]; t=0.6: [0,1,N,2,3]; t=0.2: [0,1,2,3,N]; t=0.0: no new
    np.testing.assert_allclose(ap, [[1 / 4, 1, 0], [1 / 4, 1 / 3, 0], [1 / 3, 1 / 5, 0], [1 / 3, 0, 1 / 5]])


def test_threshold_for_new_share_hits_the_share(ranked):
    _, scores, _, _ = ranked
    for share in (0.0, 0.165, 0.5, 1.0):
        t = threshold_for_new_share(scores, share)
        assert np.mean(scores[:, 0] < t) == pytest.approx(round(share * len(scores)) / len(scores))
    with pytest.raises(ConfigError, match="within"):
        threshold_for_new_share(scores, 1.5)


def test_new_share_of_one_and_zero_hold_with_duplicate_photos_and_rounded_scores():
    """A duplicate photo scores exactly 1.0 (float32 sums may also give one step above 1, or below -1)."""
    eye = np.eye(6, dtype=np.float32)  # gallery rows are the queries themselves: exact 1.0 scores
    labels, scores = rank_queries(eye, np.arange(6), eye[[0, 2, 4]], k=6)
    assert (scores[:, 0] == 1.0).all()
    codes = insert_new_individual(labels, scores, threshold_for_new_share(scores, 1.0))
    assert (codes[:, 0] == NEW).all()
    up, down = np.nextafter(np.float32(1), np.float32(2)), np.nextafter(np.float32(-1), np.float32(-2))
    hand = np.array([[up, 0.5], [1.0, 0.2], [0.3, down], [down, down]], np.float32)
    cand = np.array([[0, 1], [1, 0], [2, 3], [3, 2]])
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):  # the oracle: round(share * Q) rows get new first
        codes = insert_new_individual(cand, hand, threshold_for_new_share(hand, share), top=2)
        assert (codes[:, 0] == NEW).sum() == round(share * 4), share


@pytest.mark.parametrize("share", [-0.01, 1.01, float("nan")])
def test_new_share_outside_zero_one_is_refused_everywhere(share, tmp_path):
    from whalesub.workflows.submit import submit_files, tune_files

    scores = np.zeros((3, 5), np.float32)
    for call in (lambda: threshold_for_new_share(scores, share),
                 lambda: submit_files("g", "q", "t", None, tmp_path / "s.csv", new_share=share),
                 lambda: tune_files("g", "q", "t", "truth", target_new_share=share)):
        with pytest.raises(ConfigError, match=r"must be within \[0, 1\]"):
            call()


def test_parse_grid():
    np.testing.assert_allclose(parse_grid("0.0:1.0:0.25"), [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(parse_grid("0.3,0.5"), [0.3, 0.5])
    assert parse_grid("0.0:1.0:0.02").size == 51
    # float steps that land a hair above 1.0 are still the grid the user asked for
    neg = parse_grid("-0.2:1.0:0.05")
    assert neg.size == 25 and neg[0] == -0.2 and neg[-1] == 1.0
    for bad in ("0:1:0", "1:0:0.1", "a,b", "0:2:0.5"):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)


# NaN or inf anywhere, a step that is not > 0 (NaN: neither), stop < start, not three fields: each the
# one ConfigError naming the text and the expected form (inf used to give [nan], or OverflowError).
NON_FINITE = ["nan", "0.5,nan", "inf", "-inf,0.5", "0:1:inf", "0:inf:0.1", "-inf:0:0.1", "nan:1:0.1",
              "0:1:nan", "0:1:-0.1", "0:1:-0", "0:1:0", "1:0:0.1", "0:1", "0:1:0.1:2", "", "0.5,,0.6"]


@pytest.mark.parametrize("text", NON_FINITE)
def test_parse_grid_refuses_non_finite_and_malformed_grids(text):
    want = f"--grid {text!r} is not start:stop:step (finite numbers, step > 0"
    with pytest.raises(ConfigError, match=re.escape(want)) as err:
        parse_grid(text)
    assert "e.g. 0.0:1.0:0.02" in str(err.value)


@pytest.mark.parametrize("text, count", [("0:1:1e-12", "1,000,000,000,001"), ("0:1:0.00001", "100,001"),
                                         ("0:1:1e-320", "over 1e18"), ("-1e308:1e308:1", "over 1e18")])
def test_parse_grid_refuses_more_than_max_grid_points_before_allocating(text, count):
    # 1e-320 and a 2e308 span overflow (stop - start) / step to inf; none may reach np.arange
    want = f"--grid {text!r} would hold {count} thresholds, more than the 100,000 allowed"
    with pytest.raises(ConfigError, match=re.escape(want)):
        parse_grid(text)


def test_parse_grid_cap_is_inclusive_and_applies_to_comma_lists():
    assert MAX_GRID == 100_000
    at_cap = parse_grid("0:0.99999:0.00001")  # 100,000 thresholds exactly: accepted
    assert at_cap.size == MAX_GRID and at_cap[0] == 0.0 and at_cap[-1] == pytest.approx(0.99999, abs=1e-12)
    assert parse_grid(",".join(["0.5"] * MAX_GRID)).size == MAX_GRID
    with pytest.raises(ConfigError, match="lists 100,001 thresholds, more than the 100,000 allowed"):
        parse_grid(",".join(["0.5"] * (MAX_GRID + 1)))


def test_parse_grid_still_refuses_finite_values_outside_minus_one_one():
    for text in ("0:2:0.5", "-1.5,0.5", "1e300"):
        want = f"--grid {text!r}: thresholds must lie within [-1, 1]"
        with pytest.raises(ConfigError, match=re.escape(want)):
            parse_grid(text)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_grid_search_refuses_a_non_finite_threshold_instead_of_calling_it_best(bad):
    # All-new truth: a NaN threshold put new_individual nowhere... and was reported best with MAP@5 1.0
    labels = np.array([[0, 1, 2, 3, 4]] * 2)
    scores = np.tile(np.array([0.9, 0.7, 0.5, 0.3, 0.1], np.float32), (2, 1))
    truth = np.array([NEW, NEW])
    for call in (lambda: grid_search(labels, scores, truth, np.array([0.5, bad])),
                 lambda: tune_per_species(labels, scores, truth, np.array(["a"] * 5), [0.5, bad])):
        with pytest.raises(ConfigError, match="1 NaN or infinite values; every threshold must be a finite"):
            call()
    assert grid_search(labels, scores, truth, [0.5, 0.95]).best_threshold == 0.95  # finite grids still work


def test_tune_cli_bad_grid_is_one_error_line_not_a_traceback(tmp_path):
    # The grid is parsed before any file is read, so the files need not exist.
    args = ["tune", "--gallery", str(tmp_path / "g.npz"), "--queries", str(tmp_path / "q.npz"),
            "--truth", str(tmp_path / "t.csv"), "--train-csv", str(tmp_path / "train.csv")]
    for text in ("0:inf:0.1", "0.5,nan", "0:1:1e-12"):
        res = CliRunner().invoke(app, [*args, "--grid", text])
        assert res.exit_code == 2, res.output
        assert res.output.startswith("error:") and f"--grid {text!r}" in res.output
        assert "Traceback" not in res.output and not isinstance(res.exception, OverflowError)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_threshold_for_new_share_without_ranked_queries_is_a_data_error(shape):
    with pytest.raises(DataError, match=re.escape(f"no ranked queries (candidate scores of shape {shape})")):
        threshold_for_new_share(np.zeros(shape, np.float32), 0.165)


def test_plateau_choice_accepts_plain_lists():
    # a list used to fail on thresholds[top]; the answer must equal the ndarray one
    t = [0.0, 0.1, 0.2, 0.3, 0.4]
    for map5, anchor, want in (([1, 1, 1, 1, 1], 0.25, 2), ([0.2, 0.9, 0.5, 0.8, 0.1], 0.3, 1)):
        assert plateau_choice(map5, t, anchor) == plateau_choice(np.array(map5), np.array(t), anchor) == want
