"""One score scale for every individual (every centre from one source: --centres-from gallery | head),
tuning on the scoring that submit uses, and the scoring stamp of threshold files
(whalesub.workflows.scorefiles)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import ConfigError, DataError
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.centres import gallery_centres, model_slices, rank_with_centres
from whalesub.ranking.store import combined_fingerprint, load_embeddings, save_embeddings
from whalesub.ranking.submission import score_submission
from whalesub.workflows.oof import tune_folds
from whalesub.workflows.scorefiles import (
    blend_centres,
    check_scoring,
    dumps_json,
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
    """Two 'models' of D=8 side by side (D=16, combined like embed, meta naming both models); model
    fa's centre file lacks individuals 0-3, model fb's lacks 2-5 (so 0-5 lack a centre in some
    model); full_fa / full_fb hold every individual's head centre."""
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
    meta = {"fingerprint": fp, "models": [{"fingerprint": "fa"}, {"fingerprint": "fb"}]}
    save_embeddings(tmp_path / "gallery.npz", images, gallery, meta)
    qids = [f"q{j}.jpg" for j in range(pick.size)]
    save_embeddings(tmp_path / "queries.npz", qids, queries, meta)
    # truth: the first 15 queries are their individual, the last 5 are labelled new
    truth = [ids[c] for c in pick[:15]] + [NEW_INDIVIDUAL] * 5
    with open(tmp_path / "truth.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "individual_id"), *zip(qids, truth, strict=True)])
    missing = {"fa": [0, 1, 2, 3], "fb": [2, 3, 4, 5]}
    for name, c in zip(("fa", "fb"), heads, strict=True):
        keep = np.setdiff1d(np.arange(n_ind), missing[name])
        save_embeddings(tmp_path / f"centres_{name}.npz", ids[keep], c[keep].astype(np.float32),
                        {"fingerprint": name, "kind": "class_centres"})
        save_embeddings(tmp_path / f"full_{name}.npz", ids, c.astype(np.float32),
                        {"fingerprint": name, "kind": "class_centres"})
    return {"dir": tmp_path, "labels": labels, "gallery": gallery, "queries": queries, "heads": heads,
            "missing": missing, "ids": ids, "qids": qids, "truth": truth}


def _oracle_scores(case, r, source="gallery"):
    """Blended score of every query x individual, float64 loops, straight from the definition: the
    centre of every individual is its per-model normalised gallery mean ("gallery") or the heads'."""
    g, q, labels = (case["gallery"].astype(np.float64), case["queries"].astype(np.float64), case["labels"])
    n_ind = case["ids"].size
    centre = np.zeros((n_ind, 2 * D))
    for m in range(2):
        for c in range(n_ind):
            if source == "gallery":
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


def _centres(d, prefix="centres"):
    return ["--centres", str(d / f"{prefix}_fa.npz"), "--centres", str(d / f"{prefix}_fb.npz")]


def _head(d):
    """--centres-from head with the heads that hold every individual."""
    return ["--centres-from", "head", *_centres(d, "full")]


def _candidate_scores(case, path):
    col = {name: c for c, name in enumerate(case["ids"])}
    row = {name: i for i, name in enumerate(case["qids"])}
    got = np.full((len(case["qids"]), case["ids"].size), np.nan)
    for rec in csv.DictReader(open(path)):
        got[row[rec["image"]], col[rec["individual_id"]]] = float(rec["score"])
    return got


# --- 1. one scale: every centre from one source --------------------------------------------------------


@pytest.mark.parametrize("r", [0.0, 0.4])
def test_gallery_blend_equals_a_float64_brute_force_loop(two_models, r):
    d = two_models["dir"]
    res = _submit(d, "--new-share", "0.2", "--knn-ratio", str(r), "--candidates-n", "14",
                  "--candidates-out", str(d / "cand.csv"))
    assert res.exit_code == 0, res.output  # --centres-from gallery is the default: no centre file needed
    got = _candidate_scores(two_models, d / "cand.csv")
    assert not np.isnan(got).any()  # every individual scored, none dropped
    np.testing.assert_allclose(got, _oracle_scores(two_models, r), atol=1e-5)


def test_head_blend_equals_the_brute_force_loop_when_every_individual_has_a_centre(two_models):
    d = two_models["dir"]
    res = _submit(d, "--new-share", "0.2", "--knn-ratio", "0.4", *_head(d), "--candidates-n", "14",
                  "--candidates-out", str(d / "cand.csv"))
    assert res.exit_code == 0, res.output
    got = _candidate_scores(two_models, d / "cand.csv")
    np.testing.assert_allclose(got, _oracle_scores(two_models, 0.4, "head"), atol=1e-5)
    assert np.abs(got - _oracle_scores(two_models, 0.4)).max() > 1e-3  # the two sources do differ here


def test_head_blend_with_missing_centres_is_refused(two_models):
    d = two_models["dir"]
    res = _submit(d, "--new-share", "0.2", "--knn-ratio", "0.5", "--centres-from", "head", *_centres(d))
    assert res.exit_code == 2 and res.output.startswith("error:")
    assert len(res.output.strip().splitlines()) == 1 and not (d / "sub.csv").exists()
    msg = res.output
    assert "4 of 14" in msg and "centres_fa.npz" in msg and "'ind00'" in msg
    assert "--centres-from gallery" in msg
    # the same through tune, and the scorefile helper itself
    res = runner.invoke(app, ["tune", *_inputs(d), "--truth", str(d / "truth.csv"), "--knn-ratio", "0.5",
                              "--centres-from", "head", *_centres(d)])
    assert res.exit_code == 2 and "4 of 14" in res.output
    with pytest.raises(ConfigError, match="needs the heads' class centres"):
        blend_centres({}, "head", [])


def test_model_slices_finds_blocks_of_unequal_width():
    rng = np.random.default_rng(0)
    widths = [5, 8, 3]
    rows = np.hstack([_unit(rng.standard_normal((40, w))) for w in widths]) / np.sqrt(3)
    assert model_slices(rows.astype(np.float32), 3) == widths
    assert model_slices(rows, 1) == [16]
    with pytest.raises(DataError, match="not 2 model blocks"):
        model_slices(_unit(rng.standard_normal((40, 16))), 2)
    # gallery_centres: per block the normalised mean, then / sqrt(M)
    labels = np.arange(40) % 4
    got = gallery_centres(rows.astype(np.float32), labels, 4, widths)
    lo = 0
    for w in widths:
        block = rows[:, lo:lo + w]
        for c in range(4):
            mean = _unit(block[labels == c]).mean(axis=0)
            np.testing.assert_allclose(got[c, lo:lo + w], mean / np.linalg.norm(mean) / np.sqrt(3), atol=1e-6)
        lo += w


def _shift_case(seed=3, n_ind=200, d=16):
    """One model whose head centres are the true directions while the gallery and queries scatter
    around them: a query sits closer to a gallery mean than to a head row (the two scales)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(n_ind), rng.integers(0, n_ind, n_ind)])
    true = _unit(rng.standard_normal((n_ind, d)))
    gallery = _unit(true[labels] + 0.8 * rng.standard_normal((labels.size, d))).astype(np.float32)
    pick = rng.integers(0, n_ind, 400)
    queries = _unit(true[pick] + 0.8 * rng.standard_normal((400, d))).astype(np.float32)
    head = _unit(true + 0.6 * rng.standard_normal((n_ind, d))).astype(np.float32)
    present = np.ones(n_ind, bool)
    present[rng.permutation(n_ind)[: n_ind // 2]] = False  # "without a head centre"
    return gallery, labels, queries, head, present


def test_top1_share_of_headless_individuals_does_not_move_with_r_under_gallery():
    gallery, labels, queries, head, present = _shift_case()
    n_ind = head.shape[0]
    everyone = np.ones(n_ind, bool)
    means = gallery_centres(gallery, labels, n_ind)
    mixed = np.where(present[:, None], head, means)  # the old per-individual fill: two scales

    def share(centres, r):
        top, _ = rank_with_centres(gallery, labels, queries, centres, everyone, r, k=50)
        return float(np.mean(~present[top[:, 0]]))

    knn = share(means, 1 - 1e-7)  # about kNN alone: no centre term, the share the data gives them
    one_scale = [share(means, r) for r in (0.0, 0.25, 0.5, 0.75)]
    assert all(abs(x - knn) < 0.1 for x in one_scale), (knn, one_scale)
    assert share(mixed, 0.5) > knn + 0.2  # the mix (the old fill) hands top-1 picks to the filled ones


# --- 2. tune on the scoring submit uses -------------------------------------------------------------


def test_blended_tune_table_equals_scoring_blended_submissions(two_models):
    d = two_models["dir"]
    grid = "0.2,0.4,0.5,0.6,0.7,0.9"
    res = runner.invoke(app, ["tune", *_inputs(d), "--truth", str(d / "truth.csv"),
                              "--grid", grid, "--json", "--knn-ratio", "0.5"])
    assert res.exit_code == 0, res.output
    tuned = _no_nan(res.stdout)
    assert tuned["scoring"] == {"kind": "blend", "knn_ratio": 0.5, "centre_k": 100, "k": 100,
                                "centres_from": "gallery"}
    for row in tuned["table"]:
        t = row["threshold"]
        sub = _submit(d, "--threshold", str(t), "--threshold-knn-ratio", "0.5", "--knn-ratio", "0.5",
                      out=f"s{t}.csv")
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


def test_oof_blend_uses_the_same_centre_source(two_models, tmp_path):
    case = two_models
    fold = _fold(tmp_path, case)
    grid = "0.1:0.9:0.1"
    got = tune_folds([fold], case["dir"] / "train.csv", grid, knn_ratio=0.25)
    assert got["scoring"]["centres_from"] == "gallery"
    assert got["folds"][0]["centres"] == {"centres_from": "gallery", "n": 14}
    # oracle: the same fold tuned on files, with a head file of independently computed means
    g = load_embeddings(fold / "oof_gallery.npz").vectors.astype(np.float64)
    means = np.stack([_unit(g[case["labels"] == c]).mean(axis=0) for c in range(case["ids"].size)])
    save_embeddings(tmp_path / "means.npz", case["ids"], _unit(means).astype(np.float32),
                    {"fingerprint": "fold-model"})
    want = tune_files(fold / "oof_gallery.npz", fold / "oof_embeddings.npz", case["dir"] / "train.csv",
                      fold / "oof_labels.csv", grid, progress=False, centres=[tmp_path / "means.npz"],
                      knn_ratio=0.25, centres_from="head")
    for a, b in zip(got["table"], want["table"], strict=True):
        assert a["map5"] == pytest.approx(b["map5"], abs=1e-12)
        assert a["new_share"] == pytest.approx(b["new_share"], abs=1e-12)
    with pytest.raises(ConfigError, match="drop --centres"):
        from whalesub.workflows.oof import tune_runs_or_files

        tune_runs_or_files([tmp_path / "run"], None, None, None, case["dir"] / "train.csv", grid=grid,
                           target_new_share=None, k=100, centres=[tmp_path / "means.npz"], knn_ratio=0.5)
    # "head" needs the fold's checkpoint (none here): refused, never a silent gallery-mean fill
    with pytest.raises(ConfigError, match="--centres-from gallery"):
        tune_folds([fold], case["dir"] / "train.csv", grid, knn_ratio=0.25, centres_from="head")


# --- 3. the scoring stamp ----------------------------------------------------------------------------


def test_scoring_stamp_and_check():
    assert scoring_stamp(1.0, 7, 50) == {"kind": "knn", "knn_ratio": 1.0, "centre_k": None, "k": 50}
    assert scoring_stamp(0.5, None, 50) == {"kind": "blend", "knn_ratio": 0.5, "centre_k": 50, "k": 50,
                                            "centres_from": "gallery"}
    assert scoring_stamp(0.5, None, 50, "head")["centres_from"] == "head"
    with pytest.raises(ConfigError, match="--centres-from"):
        scoring_stamp(0.5, centres_from="mean")
    check_scoring(None, scoring_stamp(1.0), "f.json")  # no stamp: plain kNN
    check_scoring(scoring_stamp(0.5, 10, 20), scoring_stamp(0.5, 100, 100), "f.json")  # k, centre_k free
    with pytest.raises(ConfigError) as err:
        check_scoring(None, scoring_stamp(0.5), "th.json")
    msg = str(err.value)
    assert "\n" not in msg and "th.json" in msg and "knn_ratio 1" in msg and "knn_ratio 0.5" in msg
    with pytest.raises(ConfigError, match="knn_ratio 0.25"):
        check_scoring(scoring_stamp(0.25), scoring_stamp(0.5), "th.json")
    # the centre source: a threshold tuned with one is refused for the other
    with pytest.raises(ConfigError, match="centres from head.*centres from gallery.*--centres-from gallery"):
        check_scoring(scoring_stamp(0.5, centres_from="head"), scoring_stamp(0.5), "th.json")
    with pytest.raises(ConfigError, match="--centres-from head"):
        check_scoring(scoring_stamp(0.5), scoring_stamp(0.5, centres_from="head"), "th.json")
    old = {"kind": "blend", "knn_ratio": 0.5, "centre_k": 100, "k": 100}  # written before the option
    check_scoring(old, scoring_stamp(0.5, centres_from="head"), "old.json")  # reads as "head"
    with pytest.raises(ConfigError, match="centres from head"):
        check_scoring(old, scoring_stamp(0.5), "old.json")
    bads = ({"kind": "knn", "knn_ratio": 0.5}, {"kind": "mix", "knn_ratio": 0.5}, "knn", {"kind": "blend"},
            {"kind": "blend", "knn_ratio": 0.5, "centres_from": "mean"})
    for bad in bads:
        with pytest.raises(DataError, match="scoring"):
            check_scoring(bad, scoring_stamp(0.5), "th.json")


def test_threshold_file_tuned_on_another_scoring_is_refused(two_models):
    d = two_models["dir"]
    res = runner.invoke(app, ["tune", *_inputs(d), "--truth", str(d / "truth.csv"),
                              "--per-species", str(d / "th.json"), "--knn-ratio", "0.5"])
    assert res.exit_code == 0, res.output
    stamp = json.loads((d / "th.json").read_text())["scoring"]
    assert stamp["knn_ratio"] == 0.5 and stamp["centres_from"] == "gallery"
    bad = _submit(d, "--thresholds", str(d / "th.json"))  # requested: kNN
    assert bad.exit_code == 2 and bad.output.startswith("error:") and "th.json" in bad.output
    assert "blended scores (knn_ratio 0.5" in bad.output and "kNN scores (knn_ratio 1)" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (d / "sub.csv").exists()
    bad = _submit(d, "--thresholds", str(d / "th.json"), "--knn-ratio", "0.5", *_head(d))  # other source
    assert bad.exit_code == 2 and "centres from gallery" in bad.output and "centres from head" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (d / "sub.csv").exists()
    ok = _submit(d, "--thresholds", str(d / "th.json"), "--knn-ratio", "0.5")
    assert ok.exit_code == 0, ok.output
    # an unstamped (older / hand-written) file is plain kNN
    (d / "old.json").write_text(json.dumps({"global": 0.5}))
    assert _submit(d, "--thresholds", str(d / "old.json"), out="o.csv").exit_code == 0
    assert read_thresholds(d / "old.json", scoring=scoring_stamp(1.0)) == (0.5, {})
    res = _submit(d, "--thresholds", str(d / "old.json"), "--knn-ratio", "0.5", out="o2.csv")
    assert res.exit_code == 2 and "old.json" in res.output and not (d / "o2.csv").exists()


def test_bare_threshold_with_blend_needs_the_ratio_it_was_tuned_at(two_models):
    d = two_models["dir"]
    res = _submit(d, "--threshold", "0.5", "--knn-ratio", "0.5")
    assert res.exit_code == 2 and "--threshold-knn-ratio 0.5" in res.output and not (d / "sub.csv").exists()
    res = _submit(d, "--threshold", "0.5", "--threshold-knn-ratio", "0.75", "--knn-ratio", "0.5")
    assert res.exit_code == 2 and "knn_ratio 0.75" in res.output
    res = _submit(d, "--threshold", "0.5", "--threshold-knn-ratio", "0.5")  # tuned blended, used on kNN
    assert res.exit_code == 2 and not (d / "sub.csv").exists()
    res = _submit(d, "--new-share", "0.2", "--threshold-knn-ratio", "0.5")
    assert res.exit_code == 2 and "only with --threshold" in res.output
    ok = _submit(d, "--threshold", "0.5", "--threshold-knn-ratio", "0.5", "--knn-ratio", "0.5")
    assert ok.exit_code == 0, ok.output
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
    with pytest.raises(ConfigError, match="centres from gallery.*--centres-from head"):
        predict(*args, thresholds=tmp_path / "th.json", knn_ratio=0.5, centres_from="head")
    with pytest.raises(ConfigError, match="--centres-from 'mean'"):
        predict(*args, new_share=0.2, knn_ratio=0.5, centres_from="mean")
    assert not (tmp_path / "out").exists()
