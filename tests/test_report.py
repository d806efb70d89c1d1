"""`whalesub report`: its numbers against `whalesub score` / `whalesub tune`, self-containment, size cap,
no-truth mode, bad input, and the training hook. The browser checks are in test_report_browser.py."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from oracles import assert_scores_match, map5_by_hand
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.rank import NEW, PAD
from whalesub.ranking.store import save_embeddings
from whalesub.report.build import infer_threshold, write_report

runner = CliRunner()
THRESHOLD = 0.5


def noisy_centres(names, who, noise: float, seed: int, dim: int = 32) -> np.ndarray:
    """One random unit centre per individual (seeded by its name), plus Gaussian noise per image."""
    rows = []
    for name, w in zip(names, who, strict=True):
        centre = np.random.default_rng([seed, zlib.crc32(w.encode())]).normal(size=dim)
        noise_v = np.random.default_rng([seed, zlib.crc32(name.encode()), 1]).normal(size=dim)
        rows.append(centre + noise * noise_v)
    x = np.stack(rows)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_embeddings(data: Path, noise: float = 1.0, seed: int = 0) -> tuple[Path, Path]:
    train = pd.read_csv(data / "train.csv", dtype=str)
    truth = pd.read_csv(data / "test_truth_full.csv", dtype=str)
    g, q = data / "gallery.npz", data / "queries.npz"
    save_embeddings(g, train["image"], noisy_centres(train["image"], train["individual_id"], noise, seed),
                    {"fingerprint": "test"})
    vectors = noisy_centres(truth["image"], truth["true_individual_id"], noise, seed)
    save_embeddings(q, truth["image"], vectors, {"fingerprint": "test"})
    return g, q


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    from whalesub.synth import make_dataset

    data = tmp_path_factory.mktemp("report") / "data"
    make_dataset(data, seed=5, n_individuals=40, n_species=3, n_test=60, progress=False)
    g, q = make_embeddings(data, noise=1.6)
    sub = data / "submission.csv"
    res = runner.invoke(app, ["submit", "--gallery", str(g), "--queries", str(q), "--train-csv",
                              str(data / "train.csv"), "--threshold", str(THRESHOLD), "--out", str(sub)])
    assert res.exit_code == 0, res.output
    return {"data": data, "gallery": g, "queries": q, "train": data / "train.csv", "sub": sub,
            "truth": data / "test_truth_full.csv"}


@pytest.fixture(scope="module")
def report(synth, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report_out") / "report.html"
    res = runner.invoke(app, [
        "report", "--gallery", str(synth["gallery"]), "--queries", str(synth["queries"]),
        "--train-csv", str(synth["train"]), "--submission", str(synth["sub"]), "--truth", str(synth["truth"]),
        "--images-dir", str(synth["data"] / "test_images"),
        "--gallery-images-dir", str(synth["data"] / "train_images"), "--max-queries", "12",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout
    r = write_report(out.with_name("api.html"), synth["gallery"], synth["queries"], synth["train"],
                     submission=synth["sub"], truth=synth["truth"], images_dir=synth["data"] / "test_images",
                     gallery_images_dir=synth["data"] / "train_images", max_queries=12, progress=False)
    return {"html": out.read_text(encoding="utf-8"), "result": r, "path": out}


def cli_json(*args) -> dict:
    res = runner.invoke(app, [*map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def html_table_row(html: str, first_cell: str) -> list[str]:
    """The cells of the scores table row that starts with ``first_cell``."""
    m = re.search(rf"<tr><td>{re.escape(first_cell)}</td>(.*?)</tr>", html)
    assert m, f"no table row {first_cell!r}"
    return re.findall(r"<td>(.*?)</td>", m.group(1))


def test_overall_numbers_equal_whalesub_score(synth, report):
    want = cli_json("score", synth["sub"], "--truth", synth["truth"])
    got = report["result"]["scores"]
    assert got == want  # the report and `whalesub score` agree (they share score_submission) ...
    assert_scores_match(got, map5_by_hand(synth["sub"], synth["truth"]))  # ... and both are right
    cells = html_table_row(report["html"], "all")
    assert cells[:4] == [str(want["n"]), f"{want['map5']:.4f}", f"{want['map5_known']:.4f}",
                         f"{want['map5_new']:.4f}"]
    assert 0 < want["map5"] < 1 and want["n_new"] > 0  # a test set with mistakes and new animals


def test_per_species_numbers_equal_whalesub_score_on_each_species_subset(synth, report, tmp_path):
    truth = pd.read_csv(synth["truth"], dtype=str)
    sub = pd.read_csv(synth["sub"], dtype=str)
    rows = {r["species"]: r for r in report["result"]["species"]}
    assert set(rows) == set(truth["species"]) and len(rows) == 3
    for species, part in truth.groupby("species"):
        part[["image", "individual_id"]].to_csv(tmp_path / "t.csv", index=False)
        sub[sub["image"].isin(part["image"])].to_csv(tmp_path / "s.csv", index=False)
        want = cli_json("score", tmp_path / "s.csv", "--truth", tmp_path / "t.csv")
        got = {k: v for k, v in rows[species].items() if k != "species"}
        assert got == want, species
        assert_scores_match(got, map5_by_hand(synth["sub"], synth["truth"], set(part["image"])))
        assert html_table_row(report["html"], f"species: {species}")[1] == f"{want['map5']:.4f}"


def test_threshold_curve_equals_tune_and_threshold_is_inferred_from_the_submission(synth, report):
    tuned = cli_json("tune", "--gallery", synth["gallery"], "--queries", synth["queries"], "--train-csv",
                     synth["train"], "--truth", synth["truth"])
    r = report["result"]
    assert r["curve"] == tuned["table"]
    thr = r["threshold"]
    assert thr["lo"] < THRESHOLD <= thr["hi"] and thr["lo"] < thr["value"] <= thr["hi"]
    assert "inferred from the submission" in thr["source"]
    # MAP@5 at the marked threshold is the submission's own score
    assert thr["map5"] == pytest.approx(r["scores"]["map5"], abs=1e-12)


def test_worst_queries_show_the_submission_rows_with_ranked_scores(synth, report):
    r = report["result"]
    sub = {row["image"]: row["predictions"].split() for row in csv.DictReader(open(synth["sub"]))}
    truth = {row["image"]: row["individual_id"] for row in csv.DictReader(open(synth["truth"]))}
    g = np.load(synth["gallery"])
    q = np.load(synth["queries"])
    train = pd.read_csv(synth["train"], dtype=str).set_index("image")["individual_id"]
    g_ids = g["ids"].tolist()
    q_vec = dict(zip(q["ids"].tolist(), q["embeddings"], strict=True))
    assert len(r["rows"]) == 12
    aps = [row["ap"] for row in r["rows"]]
    assert aps == sorted(aps) and aps[0] == 0.0
    for row in r["rows"]:
        assert [c["label"] for c in row["cells"]] == sub[row["image"]]
        assert row["truth"] == truth[row["image"]]
        for c in row["cells"]:
            assert c["correct"] == (c["label"] == row["truth"])
            if c["label"] == NEW_INDIVIDUAL:
                continue
            # brute force: the individual's best gallery vector and its cosine
            sims = [(float(g["embeddings"][i] @ q_vec[row["image"]]), g_ids[i]) for i in range(len(g_ids))
                    if train[g_ids[i]] == c["label"]]
            best = max(sims)
            assert c["ranked"] and c["image"] == best[1] and c["score"] == pytest.approx(best[0], abs=1e-5)
        if row["truth"] != NEW_INDIVIDUAL and row["truth"] not in sub[row["image"]]:
            assert row["missed"]["label"] == row["truth"]
    for img in re.findall(r"<b>([0-9a-f]+\.jpg)</b>", report["html"])[:3]:
        assert img in {row["image"] for row in r["rows"]}


def test_report_is_self_contained_and_every_image_decodes(report):
    from PIL import Image

    html = report["html"]
    assert not re.search(r"(src|href)\s*=\s*\"(?!data:)", html), "external reference in the report"
    assert "<link" not in html and "<script" not in html and "url(" not in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) >= 2 + 12  # two plots and at least one thumbnail per shown query
    for src in srcs:
        head, data = src.split(",", 1)
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
            assert min(im.size) > 0
    assert "whalesub report --gallery" in html and "--submission" in html


def test_size_is_capped_whatever_the_number_of_queries(synth, tmp_path):
    train = pd.read_csv(synth["train"], dtype=str)
    many = [f"q{i:05d}.jpg" for i in range(3000)]
    who = train["individual_id"].sample(3000, replace=True, random_state=0).tolist()
    q = save_embeddings(tmp_path / "many.npz", many, noisy_centres(many, who, 1.2, 0),
                        {"fingerprint": "test"})
    sizes = {}
    for cap in (5, 20):
        r = write_report(tmp_path / f"r{cap}.html", synth["gallery"], q, synth["train"], threshold=THRESHOLD,
                         images_dir=synth["data"] / "test_images",
                         gallery_images_dir=synth["data"] / "train_images", max_queries=cap, progress=False)
        html = (tmp_path / f"r{cap}.html").read_text()
        assert r["n"] == 3000 and r["shown"] == cap and html.count('<div class="row">') == cap
        # query images do not exist: placeholders, never broken <img>; gallery thumbnails do
        assert html.count('<div class="ph">q') == cap
        sizes[cap] = r["bytes"]
    per_row = (sizes[20] - sizes[5]) / 15
    assert per_row < 7 * 6000  # at most 6 thumbnails per row, each a few KB at 96 px
    assert sizes[5] < 250_000  # fixed part: two plots and tables, independent of the 3000 queries


def test_no_truth_mode_shows_the_ranking_at_the_threshold_closest_first(synth, tmp_path):
    out = tmp_path / "test.html"
    r = write_report(out, synth["gallery"], synth["queries"], synth["train"], threshold=THRESHOLD,
                     images_dir=synth["data"] / "test_images", max_queries=8, progress=False)
    html = out.read_text()
    assert "scores" not in r and 'id="scores"' not in html and "No truth file" in html
    sub = {row["image"]: row["predictions"].split() for row in csv.DictReader(open(synth["sub"]))}
    for row in r["rows"]:
        assert [c["label"] for c in row["cells"]] == sub[row["image"]]
    gaps = [abs(row["top1"] - THRESHOLD) for row in r["rows"]]
    assert gaps == sorted(gaps)
    shown = {row["image"] for row in r["rows"]}
    ids = np.load(synth["queries"])["ids"].tolist()
    rest = [abs(t - THRESHOLD) for t, i in zip(r["top1"], ids, strict=True) if i not in shown]
    assert len(shown) == 8 and min(rest) >= gaps[-1] - 1e-7
    assert r["threshold"]["source"].startswith("given")


def test_cli_errors_exit_2_with_one_message(synth, tmp_path):
    base = ["report", "--gallery", str(synth["gallery"]), "--queries", str(synth["queries"]),
            "--train-csv", str(synth["train"])]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "needs a threshold" in res.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("image,predictions\nnot_a_query.jpg,new_individual\n")
    res = runner.invoke(app, [*base, "--submission", str(bad), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "not_a_query.jpg" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, [*base, "--threshold", "0.5", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in res.stderr
    res = runner.invoke(app, [*base, "--threshold", "0.5", "--max-queries", "-1",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--max-queries" in res.stderr
    assert not list(tmp_path.glob("*.html"))  # nothing half-written


def test_infer_threshold_hand_worked():
    labels = np.array([[0, 1, 2, 3, 4], [5, 6, 7, PAD, PAD]])
    scores = np.array([[0.9, 0.8, 0.6, 0.5, 0.4], [0.7, 0.3, 0.2, -np.inf, -np.inf]], dtype=np.float32)
    # row 0: new after 2 candidates -> 0.6 < t <= 0.8; row 1: new after 1 -> 0.3 < t <= 0.7
    preds = np.array([[0, 1, NEW, 2, 3], [5, NEW, 6, 7, PAD]])
    lo, hi, n = infer_threshold(labels, scores, preds)
    assert (lo, hi, n) == (pytest.approx(0.6), pytest.approx(0.7), 2)
    # a row whose individuals differ from the ranking is not used
    lo, hi, n = infer_threshold(labels, scores, np.array([[0, 1, NEW, 2, 3], [6, NEW, 5, 7, PAD]]))
    assert (lo, hi, n) == (pytest.approx(0.6), pytest.approx(0.8), 1)
    # new_individual absent: t <= the fifth score
    lo, hi, _ = infer_threshold(labels[:1], scores[:1], labels[:1])
    assert lo == -np.inf and hi == pytest.approx(0.4)


@pytest.mark.slow
def test_training_writes_a_fold_report_with_the_validation_score(tmp_path):
    from train.fit import main
    from whalesub.synth import make_dataset

    data = tmp_path / "data"
    make_dataset(data, seed=3, n_individuals=12, singleton_share=0.3, progress=False)
    args = {"train_csv": data / "train.csv", "image_dir": data / "train_images",
            "backbone": "test_efficientnet", "image_size": 32, "embed_dim": 16, "batch_size": 8, "epochs": 1,
            "num_workers": 0, "device": "cpu", "n_folds": 3, "fold": 0, "out_dir": tmp_path / "runs",
            "run_name": "r", "val_before_train": "false", "report": "true"}
    assert main([f"--{k}={v}" for k, v in args.items()]) == 0
    fold = tmp_path / "runs" / "r" / "fold0"
    html = (fold / "report.html").read_text()
    metrics = pd.read_csv(fold / "metrics.csv")
    best = metrics.loc[metrics["improved"] == 1, "val_map5"].iloc[-1]
    cells = html_table_row(html, "all")
    assert cells[1] == f"{best:.4f}"  # the report's MAP@5 at the grid's best = training's validation MAP@5
    assert html.count('<img src="data:image/jpeg') > 0
