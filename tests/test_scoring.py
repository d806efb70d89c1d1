"""One score scale for every individual (gallery-mean centre fill), tuning on the scoring that
submit uses, and the scoring stamp of threshold files (whalesub.workflows.scorefiles)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import ConfigError, DataError
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.centres import fill_centres, rank_with_centres
from whalesub.ranking.store import Embeddings, combined_fingerprint, load_embeddings, save_embeddings
from whalesub.ranking.submission import score_submission
from whalesub.workflows.oof import tune_folds
from whalesub.workflows.scorefiles import (
    check_scoring,
    dumps_json,
    load_centres,
    read_thresholds,
    scoring_stamp,
    write_thresholds,
)
from whalesub.workflows.submit import tune_files

runner = CliRunner()
D = 8  # per model


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class _Fp:
    def __init__(self, fingerprint):
        self.fingerprint = fingerprint


def _no_nan(text):
    def bad(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=bad)


@pytest.fixture
def two_models(tmp_path):
    """Two 'models' of D=8 side by side (D=16, combined like embed); model fa's centre file lacks
    individuals 0-3, model fb's lacks 2-5 (so 0-5 lack a centre in some model)."""
    rng = np.random.default_rng(11)
    n_ind, gal, que = 14, [], []
    labels = np.concatenate([np.arange(n_ind), rng.integers(0, n_ind, 30)])
    pick = rng.integers(0, n_ind, 20)
    heads = []
    for _ in range(2):
        c = _unit(rng.standard_normal((n_ind, D)))
        gal.append(_unit(c[labels] + 0.7 * rng.standard_normal((labels.size, D))))
        que.append(_unit(c[pick] + 0.7 * rng.standard_normal((pick.size, D))))
        heads.append(c)
    ids = np.array([f"ind{i:02d}" for i in range(n_ind)])
    fp = combined_fingerprint([_Fp("fa"), _Fp("fb")])
    gallery = (np.hstack(gal) / np.sqrt(2)).astype(np.float32)
    queries = (np.hstack(que) / np.sqrt(2)).astype(np.float32)
    images = [f"g{j}.jpg" for j in range(labels.size)]
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "species", "individual_id"),
                                  *[(im, "sp", ids[c]) for im, c in zip(images, labels, strict=True)]])
    save_embeddings(tmp_path / "gallery.npz", images, gallery, {"fingerprint": fp})
    qids = [f"q{j}.jpg" for j in range(pick.size)]
    save_embeddings(tmp_path / "queries.npz", qids, queries, {"fingerprint": fp})
    # truth: the first 15 queries are their individual, the last 5 are labelled new
    truth = [ids[c] for c in pick[:15]] + [NEW_INDIVIDUAL] * 5
    with open(tmp_path / "truth.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "individual_id"), *zip(qids, truth, strict=True)])
    missing = {"fa": [0, 1, 2, 3], "fb": [2, 3, 4, 5]}
    for name, c in zip(("fa", "fb"), heads, strict=True):
        keep = np.setdiff1d(np.arange(n_ind), missing[name])
        save_embeddings(tmp_path / f"centres_{name}.npz", ids[keep], c[keep].astype(np.float32),
                        {"fingerprint": name, "kind": "class_centres"})
    return {"dir": tmp_path, "labels": labels, "gallery": gallery, "queries": queries, "heads": heads,
            "missing": missing, "ids": ids, "qids": qids, "truth": truth}


def _oracle_scores(case, r):
    """Blended score of every query x individual, float64 loops, straight from the definition."""
    g, q, labels = (case["gallery"].astype(np.float64), case["queries"].astype(np.float64), case["labels"])
    n_ind = case["ids"].size
    centre = np.zeros((n_ind, 2 * D))
    for m, name in enumerate(("fa", "fb")):
        for c in range(n_ind):
            if c in case["missing"][name]:
                rows = g[labels == c, m * D:(m + 1) * D]
                mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(axis=0)
                centre[c, m * D:(m + 1) * D] = mean / np.linalg.norm(mean)
            else:
                centre[c, m * D:(m + 1) * D] = case["heads"][m][c]
    centre /= np.sqrt(2)
    out = np.zeros((q.shape[0], n_ind))
    for i, x in enumerate(q):
        for c in range(n_ind):
            out[i, c] = r * (g[labels == c] @ x).max() + (1 - r) * centre[c] @ x
    return out


def _inputs(d, queries="queries.npz"):
    return ["--gallery", str(d / "gallery.npz"), "--queries", str(d / queries),
            "--train-csv", str(d / "train.csv")]


def _submit(d, *extra, out="sub.csv"):
    return runner.invoke(app, ["submit", *_inputs(d), "--out", str(d / out), *extra])


def _centres(d):
    return ["--centres", str(d / "centres_fa.npz"), "--centres", str(d / "centres_fb.npz")]


# --- 1. one scale: the gallery-mean fill ------------------------------------------------------------


def test_centre_less_individuals_are_scored_by_the_blend_formula(two_models):
    d = two_models["dir"]
    res = _submit(d, "--new-share", "0.2", *_centres(d), "--knn-ratio", "0.4",
                  "--candidates-out", str(d / "cand.csv"), "--candidates-n", "14")
    assert res.exit_code == 0, res.output
    want = _oracle_scores(two_models, 0.4)
    got = np.full_like(want, np.nan)
    col = {name: c for c, name in enumerate(two_models["ids"])}
    row = {name: i for i, name in enumerate(two_models["qids"])}
    for rec in csv.DictReader(open(d / "cand.csv")):
        got[row[rec["image"]], col[rec["individual_id"]]] = float(rec["score"])
    assert not np.isnan(got).any()  # every individual scored, none dropped
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fill_centres_keeps_head_rows_and_fills_per_model_slice(two_models):
    case = two_models
    classes = case["ids"]
    queries = Embeddings(np.array(case["qids"]), case["queries"],
                         {"fingerprint": combined_fingerprint([_Fp("fa"), _Fp("fb")])})
    paths = [case["dir"] / "centres_fa.npz", case["dir"] / "centres_fb.npz"]
    centres, has = load_centres(paths, classes, queries, case["gallery"], case["labels"])
    assert has.all()
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1.0, atol=1e-6)
    # individual 7 has both head centres: untouched; individual 0 lacks fa's only: fb's head kept
    np.testing.assert_allclose(centres[7, :D] * np.sqrt(2), case["heads"][0][7], atol=1e-6)
    np.testing.assert_allclose(centres[0, D:] * np.sqrt(2), case["heads"][1][0], atol=1e-6)
    _, old_has = load_centres(paths, classes, queries)  # without the gallery: the old gaps
    assert np.flatnonzero(~old_has).tolist() == [0, 1, 2, 3, 4, 5]


def _shift_case(seed=3, n_ind=200, d=16):
    """One model whose head centres are exactly each individual's normalised gallery mean, so a
    filled centre equals the head centre it replaces."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(n_ind), rng.integers(0, n_ind, n_ind)])
    true = _unit(rng.standard_normal((n_ind, d)))
    gallery = _unit(true[labels] + 0.8 * rng.standard_normal((labels.size, d))).astype(np.float32)
    pick = rng.integers(0, n_ind, 400)
    queries = _unit(true[pick] + 0.8 * rng.standard_normal((400, d))).astype(np.float32)
    head = np.zeros((n_ind, d))
    np.add.at(head, labels, gallery.astype(np.float64))
    head = _unit(head).astype(np.float32)
    dropped = rng.permutation(n_ind)[: n_ind // 2]
    present = np.ones(n_ind, bool)
    present[dropped] = False
    return gallery, labels, queries, head, present


def test_top1_share_of_centre_less_individuals_no_longer_shifts():
    gallery, labels, queries, head, present = _shift_case()
    n_ind = head.shape[0]
    everyone = np.ones(n_ind, bool)
    full_l, full_s = rank_with_centres(gallery, labels, queries, head, everyone, 0.5, k=50)
    filled, flags = fill_centres([np.where(present[:, None], head, 0)], [present], gallery, labels)
    assert flags[:, 0].tolist() == (~present).tolist()
    fill_l, fill_s = rank_with_centres(gallery, labels, queries, filled, everyone, 0.5, k=50)
    gap_l, _ = rank_with_centres(gallery, labels, queries, head, present, 0.5, k=50)

    def share(top):
        return float(np.mean(~present[top[:, 0]]))

    knn_l, _ = rank_with_centres(gallery, labels, queries, head, everyone, 1 - 1e-7, k=50)
    assert (fill_l == full_l).all()  # the fill is the head centre here: the very same ranking
    np.testing.assert_allclose(fill_s, full_s, atol=1e-6)
    assert abs(share(fill_l) - share(knn_l)) < 0.1  # about the share kNN alone gives them
    assert share(gap_l) > share(fill_l) + 0.2  # without the fill, kNN-only scores win top-1 picks


# --- 2. tune on the scoring submit uses -------------------------------------------------------------


def test_blended_tune_table_equals_scoring_blended_submissions(two_models):
    d = two_models["dir"]
    grid = "0.2,0.4,0.5,0.6,0.7,0.9"
    res = runner.invoke(app, ["tune", *_inputs(d), "--truth", str(d / "truth.csv"),
                              "--grid", grid, "--json", *_centres(d), "--knn-ratio", "0.5"])
    assert res.exit_code == 0, res.output
    tuned = _no_nan(res.stdout)
    assert tuned["scoring"] == {"kind": "blend", "knn_ratio": 0.5, "centre_k": 100, "k": 100}
    for row in tuned["table"]:
        t = row["threshold"]
        sub = _submit(d, "--threshold", str(t), "--threshold-knn-ratio", "0.5", *_centres(d),
                      "--knn-ratio", "0.5", out=f"s{t}.csv")
        assert sub.exit_code == 0, sub.output
        scored = score_submission(d / f"s{t}.csv", d / "truth.csv")
        assert row["map5"] == pytest.approx(scored["map5"], abs=1e-12)
    knn = tune_files(d / "gallery.npz", d / "queries.npz", d / "train.csv", d / "truth.csv", grid,
                     progress=False)
    assert knn["scoring"]["kind"] == "knn"
    assert [r["new_share"] for r in knn["table"]] != [r["new_share"] for r in tuned["table"]]


def _fold(tmp_path, case, name="fold0"):
    """A fold folder with out-of-fold files (no checkpoint: every centre is a gallery mean)."""
    fold = tmp_path / "run" / name
    fold.mkdir(parents=True)
    g, q = load_embeddings(case["dir"] / "gallery.npz"), load_embeddings(case["dir"] / "queries.npz")
    fa = {"fingerprint": "fold-model"}
    save_embeddings(fold / "oof_gallery.npz", g.ids, g.vectors[:, :D], fa)
    save_embeddings(fold / "oof_embeddings.npz", q.ids, q.vectors[:, :D], fa)
    with open(fold / "oof_labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "individual_id", "true_individual_id", "species"),
                                  *[(i, t, t, "sp") for i, t in zip(case["qids"], case["truth"],
                                                                    strict=True)]])
    return fold


def test_oof_blend_without_head_uses_gallery_means(two_models, tmp_path):
    case = two_models
    fold = _fold(tmp_path, case)
    grid = "0.1:0.9:0.1"
    got = tune_folds([fold], case["dir"] / "train.csv", grid, knn_ratio=0.25)
    assert got["scoring"]["kind"] == "blend" and got["folds"][0]["centres"] == {"head": 0, "filled": 14}
    # oracle: the same fold tuned on files, with a centres file of independently computed means
    g = load_embeddings(fold / "oof_gallery.npz").vectors.astype(np.float64)
    means = np.stack([_unit(g[case["labels"] == c]).mean(axis=0) for c in range(case["ids"].size)])
    save_embeddings(tmp_path / "means.npz", case["ids"], _unit(means).astype(np.float32),
                    {"fingerprint": "fold-model"})
    want = tune_files(fold / "oof_gallery.npz", fold / "oof_embeddings.npz", case["dir"] / "train.csv",
                      fold / "oof_labels.csv", grid, progress=False, centres=[tmp_path / "means.npz"],
                      knn_ratio=0.25)
    for a, b in zip(got["table"], want["table"], strict=True):
        assert a["map5"] == pytest.approx(b["map5"], abs=1e-12)
        assert a["new_share"] == pytest.approx(b["new_share"], abs=1e-12)
    with pytest.raises(ConfigError, match="drop --centres"):
        from whalesub.workflows.oof import tune_runs_or_files

        tune_runs_or_files([tmp_path / "run"], None, None, None, case["dir"] / "train.csv", grid=grid,
                           target_new_share=None, k=100, centres=[tmp_path / "means.npz"], knn_ratio=0.5)


# --- 3. the scoring stamp ----------------------------------------------------------------------------


def test_scoring_stamp_and_check():
    assert scoring_stamp(1.0, 7, 50) == {"kind": "knn", "knn_ratio": 1.0, "centre_k": None, "k": 50}
    assert scoring_stamp(0.5, None, 50) == {"kind": "blend", "knn_ratio": 0.5, "centre_k": 50, "k": 50}
    check_scoring(None, scoring_stamp(1.0), "f.json")  # no stamp: plain kNN
    check_scoring(scoring_stamp(0.5, 10, 20), scoring_stamp(0.5, 100, 100), "f.json")  # k, centre_k free
    with pytest.raises(ConfigError) as err:
        check_scoring(None, scoring_stamp(0.5), "th.json")
    msg = str(err.value)
    assert "\n" not in msg and "th.json" in msg and "knn_ratio 1" in msg and "knn_ratio 0.5" in msg
    with pytest.raises(ConfigError, match="knn_ratio 0.25"):
        check_scoring(scoring_stamp(0.25), scoring_stamp(0.5), "th.json")
    bads = ({"kind": "knn", "knn_ratio": 0.5}, {"kind": "mix", "knn_ratio": 0.5}, "knn", {"kind": "blend"})
    for bad in bads:
        with pytest.raises(DataError, match="scoring"):
            check_scoring(bad, scoring_stamp(0.5), "th.json")


def test_threshold_file_tuned_on_another_scoring_is_refused(two_models):
    d = two_models["dir"]
    res = runner.invoke(app, ["tune", *_inputs(d), "--truth", str(d / "truth.csv"),
                              "--per-species", str(d / "th.json"), *_centres(d), "--knn-ratio", "0.5"])
    assert res.exit_code == 0, res.output
    assert json.loads((d / "th.json").read_text())["scoring"]["knn_ratio"] == 0.5
    bad = _submit(d, "--thresholds", str(d / "th.json"))  # requested: kNN
    assert bad.exit_code == 2 and bad.output.startswith("error:") and "th.json" in bad.output
    assert "blended scores (knn_ratio 0.5)" in bad.output and "kNN scores (knn_ratio 1)" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (d / "sub.csv").exists()
    ok = _submit(d, "--thresholds", str(d / "th.json"), *_centres(d), "--knn-ratio", "0.5")
    assert ok.exit_code == 0, ok.output
    # an unstamped (older / hand-written) file is plain kNN
    (d / "old.json").write_text(json.dumps({"global": 0.5}))
    assert _submit(d, "--thresholds", str(d / "old.json"), out="o.csv").exit_code == 0
    assert read_thresholds(d / "old.json", scoring=scoring_stamp(1.0)) == (0.5, {})
    res = _submit(d, "--thresholds", str(d / "old.json"), *_centres(d), "--knn-ratio", "0.5", out="o2.csv")
    assert res.exit_code == 2 and "old.json" in res.output and not (d / "o2.csv").exists()


def test_bare_threshold_with_blend_needs_the_ratio_it_was_tuned_at(two_models):
    d = two_models["dir"]
    res = _submit(d, "--threshold", "0.5", *_centres(d), "--knn-ratio", "0.5")
    assert res.exit_code == 2 and "--threshold-knn-ratio 0.5" in res.output and not (d / "sub.csv").exists()
    res = _submit(d, "--threshold", "0.5", "--threshold-knn-ratio", "0.75", *_centres(d),
                  "--knn-ratio", "0.5")
    assert res.exit_code == 2 and "knn_ratio 0.75" in res.output
    res = _submit(d, "--threshold", "0.5", "--threshold-knn-ratio", "0.5")  # tuned blended, used on kNN
    assert res.exit_code == 2 and not (d / "sub.csv").exists()
    res = _submit(d, "--new-share", "0.2", "--threshold-knn-ratio", "0.5")
    assert res.exit_code == 2 and "only with --threshold" in res.output
    assert _submit(d, "--threshold", "0.5", "--threshold-knn-ratio", "0.5", *_centres(d),
                   "--knn-ratio", "0.5").exit_code == 0
    assert _submit(d, "--threshold", "0.5", out="k.csv").exit_code == 0  # kNN as before


def test_write_thresholds_stamps_plain_knn_by_default(tmp_path):
    write_thresholds(tmp_path / "t.json", {"global": 0.4, "species": {}})
    assert json.loads((tmp_path / "t.json").read_text())["scoring"] == scoring_stamp(1.0)


# --- 4. never NaN in JSON ----------------------------------------------------------------------------


def test_tune_json_writes_null_not_nan(two_models):
    d = two_models["dir"]
    qids = two_models["qids"][:15]  # only known animals: MAP@5new is undefined
    save_embeddings(d / "known.npz", qids, two_models["queries"][:15],
                    {"fingerprint": combined_fingerprint([_Fp("fa"), _Fp("fb")])})
    with open(d / "known.csv", "w", newline="") as fh:
        rows = zip(qids, two_models["truth"][:15], strict=True)
        csv.writer(fh).writerows([("image", "individual_id"), *rows])
    res = runner.invoke(app, ["tune", *_inputs(d, "known.npz"), "--truth", str(d / "known.csv"), "--json",
                              "--grid", "0.3,0.6"])
    assert res.exit_code == 0, res.output
    doc = _no_nan(res.stdout)
    assert all(row["map5_new"] is None and row["map5_known"] is not None for row in doc["table"])
    assert _no_nan(dumps_json({"a": [float("nan"), np.float32(np.inf), 1.5]})) == {"a": [None, None, 1.5]}


def test_predict_refuses_another_scoring_before_any_work(tmp_path):
    from whalesub.workflows.predict import predict

    write_thresholds(tmp_path / "th.json", {"global": 0.4, "species": {}}, scoring=scoring_stamp(0.5))
    args = ([tmp_path / "no_such_run"], tmp_path / "train.csv", tmp_path / "tr", tmp_path / "te",
            tmp_path / "out")
    with pytest.raises(ConfigError, match="th.json.*knn_ratio 0.5"):
        predict(*args, thresholds=tmp_path / "th.json")
    with pytest.raises(ConfigError, match="--threshold-knn-ratio 0.5"):
        predict(*args, threshold=0.4, knn_ratio=0.5)
    with pytest.raises(ConfigError, match="only with --threshold"):
        predict(*args, new_share=0.2, threshold_knn_ratio=0.5)
    assert not (tmp_path / "out").exists()
