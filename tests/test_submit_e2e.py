"""`whalesub submit` / `whalesub tune` through the CLI: bad input on tiny files, then whole sets
(the synthetic set, and the real nyala set when present)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.store import save_embeddings

runner = CliRunner()


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def tiny(tmp_path):
    """12 train images of 6 individuals (two views each), 5 test images, sample and truth files."""
    rng = np.random.default_rng(0)
    train = [(f"t{i}.jpg", "sp", f"ind{i % 6}") for i in range(12)]
    _write_csv(tmp_path / "train.csv", ["image", "species", "individual_id"], train)
    g_ids = [name for name, _, _ in train for _ in range(2)]
    save_embeddings(tmp_path / "gallery.npz", g_ids, _unit(rng, 24, 8), {"fingerprint": "fp"})
    q_ids = [f"q{i}.jpg" for i in range(5)]
    save_embeddings(tmp_path / "queries.npz", q_ids, _unit(rng, 5, 8), {"fingerprint": "fp"})
    _write_csv(tmp_path / "sample.csv", ["image", "predictions"],
               [(x, NEW_INDIVIDUAL) for x in reversed(q_ids)])
    _write_csv(tmp_path / "truth.csv", ["image", "individual_id"],
               [(x, f"ind{i}" if i < 3 else NEW_INDIVIDUAL) for i, x in enumerate(q_ids)])
    return tmp_path


def _submit(d, *extra, queries="queries.npz", gallery="gallery.npz", threshold="0.3"):
    args = ["submit", "--gallery", str(d / gallery), "--queries", str(d / queries), "--train-csv",
            str(d / "train.csv"), "--threshold", threshold, "--out", str(d / "sub.csv"), *extra]
    return runner.invoke(app, args)


def test_submit_writes_rows_in_sample_order(tiny):
    res = _submit(tiny, "--sample", str(tiny / "sample.csv"))
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(open(tiny / "sub.csv")))
    assert rows[0] == ["image", "predictions"]
    assert [r[0] for r in rows[1:]] == [f"q{i}.jpg" for i in reversed(range(5))]
    assert all(len(set(r[1].split())) == 5 for r in rows[1:])
    assert "5 rows" in res.output


@pytest.mark.parametrize("share, n_new_first", [(0.0, 0), (0.4, 2), (1.0, 5)])
def test_submit_new_share_sets_the_threshold_from_the_queries(tiny, share, n_new_first):
    args = ["submit", "--gallery", str(tiny / "gallery.npz"), "--queries", str(tiny / "queries.npz"),
            "--train-csv", str(tiny / "train.csv"), "--new-share", str(share), "--out", str(tiny / "sub.csv")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tiny / "sub.csv")))
    assert sum(r["predictions"].split()[0] == NEW_INDIVIDUAL for r in rows) == n_new_first


def _assert_fails(res, tiny, *needles):
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and "Traceback" not in res.output
    for needle in needles:
        assert needle in res.output, res.output
    assert not (tiny / "sub.csv").exists()
    assert [p.name for p in tiny.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_nan_in_an_embedding_is_named(tiny):
    v = _unit(np.random.default_rng(1), 5, 8)
    v[3, 2] = np.nan
    np.savez(tiny / "nan.npz", ids=np.array([f"q{i}.jpg" for i in range(5)]), embeddings=v)
    _assert_fails(_submit(tiny, queries="nan.npz"), tiny, "nan.npz", "row 3 (q3.jpg)")


def test_dimensions_that_differ(tiny):
    save_embeddings(tiny / "q4d.npz", ["q0.jpg"], np.ones((1, 4), np.float32), {"fingerprint": "fp"})
    _assert_fails(_submit(tiny, queries="q4d.npz"), tiny, "dimension mismatch", "D=8", "D=4")


def test_fingerprints_that_differ(tiny):
    v = _unit(np.random.default_rng(2), 1, 8)
    save_embeddings(tiny / "qfp.npz", ["q0.jpg"], v, {"fingerprint": "other"})
    _assert_fails(_submit(tiny, queries="qfp.npz"), tiny, "fingerprint mismatch", "'fp'", "'other'")


@pytest.mark.parametrize("threshold", ["1.5", "-1.01", "nan"])
def test_threshold_outside_minus_one_one(tiny, threshold):
    _assert_fails(_submit(tiny, threshold=threshold), tiny, "--threshold", "[-1, 1]")


def test_threshold_and_new_share_exclude_each_other(tiny):
    _assert_fails(_submit(tiny, "--new-share", "0.2"), tiny, "exactly one of --threshold")


def test_gallery_images_missing_from_train_csv_are_named(tiny):
    save_embeddings(tiny / "g2.npz", ["t0.jpg", "stray.jpg"], _unit(np.random.default_rng(3), 2, 8),
                    {"fingerprint": "fp"})
    _assert_fails(_submit(tiny, gallery="g2.npz"), tiny, "1 gallery images", "'stray.jpg'", "train.csv")


def test_queries_that_do_not_match_the_sample(tiny):
    _write_csv(tiny / "sample2.csv", ["image", "predictions"], [("q0.jpg", "x"), ("zzz.jpg", "x")])
    res = _submit(tiny, "--sample", str(tiny / "sample2.csv"))
    _assert_fails(res, tiny, "'zzz.jpg'", "missing from the queries", "not in the sample")


def test_tune_json_reports_the_best_threshold(tiny):
    args = ["tune", "--gallery", str(tiny / "gallery.npz"), "--queries", str(tiny / "queries.npz"),
            "--train-csv", str(tiny / "train.csv"), "--truth", str(tiny / "truth.csv"),
            "--grid", "-1:1:0.5", "--target-new-share", "0.4", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert [row["threshold"] for row in r["table"]] == [-1, -0.5, 0, 0.5, 1]
    # at threshold 1 every row gets new_individual first: MAP@5 = share of truly new rows (2 of 5) + ...
    assert r["table"][-1]["new_share"] == 1.0 and r["table"][-1]["map5_new"] == 1.0
    assert r["best"]["map5"] == max(row["map5"] for row in r["table"])
    assert r["target"]["new_share"] == 0.4


def test_tune_truth_that_does_not_match_the_queries(tiny):
    _write_csv(tiny / "truth2.csv", ["image", "individual_id"], [("q0.jpg", "ind0"), ("nope.jpg", "ind1")])
    args = ["tune", "--gallery", str(tiny / "gallery.npz"), "--queries", str(tiny / "queries.npz"),
            "--train-csv", str(tiny / "train.csv"), "--truth", str(tiny / "truth2.csv")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and res.output.startswith("error:"), res.output
    assert "4 query images have no truth row" in res.output and "'nope.jpg'" in res.output


# --- a whole set: the synthetic one, and the real nyala set when present ------------------------


def _raw_pixels(folder, names, flip=False):
    """16x16 RGB pixels per image, centred and L2-normalised: [N, 768] float32."""
    from PIL import Image, ImageOps

    out = []
    for name in names:
        with Image.open(folder / name) as im:
            im.draft("RGB", (64, 64))
            im = im.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
            if flip:
                im = ImageOps.mirror(im)
            out.append(np.asarray(im, dtype=np.float32).ravel())
    x = np.stack(out)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _independent_map5(submission, truth):
    preds = {r["image"]: r["predictions"].split() for r in csv.DictReader(open(submission))}
    aps = []
    for r in csv.DictReader(open(truth)):
        p = preds[r["image"]][:5]
        aps.append(1 / (p.index(r["individual_id"]) + 1) if r["individual_id"] in p else 0.0)
    return sum(aps) / len(aps)


def test_end_to_end_submit_validate_score(photo_set, tmp_path):
    train = list(csv.DictReader(open(photo_set / "train.csv")))
    tests = [r["image"] for r in csv.DictReader(open(photo_set / "sample_submission.csv"))]
    names = [r["image"] for r in train]
    gallery = np.vstack([_raw_pixels(photo_set / "train_images", names),
                         _raw_pixels(photo_set / "train_images", names, flip=True)])
    meta = {"fingerprint": "raw16", "tta": ["orig", "hflip"]}
    save_embeddings(tmp_path / "g.npz", names + names, gallery, meta)
    queries = _raw_pixels(photo_set / "test_images", tests)
    save_embeddings(tmp_path / "q.npz", tests, queries, {"fingerprint": "raw16"})
    common = ["--gallery", str(tmp_path / "g.npz"), "--queries", str(tmp_path / "q.npz"),
              "--train-csv", str(photo_set / "train.csv")]
    res = runner.invoke(app, ["tune", *common, "--truth", str(photo_set / "test_truth.csv"), "--json"])
    assert res.exit_code == 0, res.output
    best = json.loads(res.stdout)["best"]
    sub = tmp_path / "submission.csv"
    res = runner.invoke(app, ["submit", *common, "--threshold", str(best["threshold"]), "--out", str(sub),
                              "--sample", str(photo_set / "sample_submission.csv")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", str(sub), "--sample", str(photo_set / "sample_submission.csv"),
                              "--train-csv", str(photo_set / "train.csv")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["score", str(sub), "--truth", str(photo_set / "test_truth.csv"), "--json"])
    assert res.exit_code == 0, res.output
    scored = json.loads(res.stdout)
    want = _independent_map5(sub, photo_set / "test_truth.csv")
    assert scored["map5"] == pytest.approx(want, abs=1e-12)
    assert scored["map5"] == pytest.approx(best["map5"], abs=1e-12)  # tune's closed form agrees
    baseline = json.loads((photo_set / "stats.json").read_text())["test_new_frac"]  # all-new_individual
    assert scored["n"] == len(tests) and want > baseline + 0.02  # beats the sample submission clearly
