"""`whalesub blend`: candidate tables of several runs -> one submission (whalesub.workflows.blend)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.store import save_embeddings

runner = CliRunner()


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


@pytest.fixture
def d(tmp_path):
    rng = np.random.default_rng(3)
    train = [(f"t{i}.jpg", "sp", f"ind{i % 9}") for i in range(27)]
    _write_csv(tmp_path / "train.csv", ["image", "species", "individual_id"], train)
    save_embeddings(tmp_path / "gallery.npz", [t[0] for t in train], _unit(rng.standard_normal((27, 8))))
    q_ids = [f"q{i}.jpg" for i in range(12)]
    save_embeddings(tmp_path / "queries.npz", q_ids, _unit(rng.standard_normal((12, 8))))
    _write_csv(tmp_path / "sample.csv", ["image", "predictions"],
               [(x, NEW_INDIVIDUAL) for x in reversed(q_ids)])
    return tmp_path


def _blend(d, *extra, out="blend.csv"):
    return runner.invoke(app, ["blend", *extra, "--out", str(d / out)])


@pytest.mark.parametrize("how", [["--threshold", "0.3"], ["--new-share", "0.25"]])
def test_one_table_at_weight_one_reproduces_its_submission(d, how):
    res = runner.invoke(app, ["submit", "--gallery", str(d / "gallery.npz"), "--queries",
                              str(d / "queries.npz"), "--train-csv", str(d / "train.csv"), "--out",
                              str(d / "sub.csv"), "--sample",
                              str(d / "sample.csv"), "--candidates-out", str(d / "cand.csv"),
                              "--candidates-n", "7", *how])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(d / "cand.csv")))
    assert len(rows) == 12 * 7 and rows[0]["rank"] == "1"
    res = _blend(d, "--table", str(d / "cand.csv"), "--weight", "1", "--sample", str(d / "sample.csv"),
                 "--train-csv", str(d / "train.csv"), *how)
    assert res.exit_code == 0, res.output
    assert (d / "blend.csv").read_bytes() == (d / "sub.csv").read_bytes()


def _random_table(rng, path, images, ids):
    rows = []
    for image in images:
        kept = rng.choice(ids, size=int(rng.integers(3, 7)), replace=False)
        scores = np.sort(rng.uniform(0, 1, kept.size))[::-1]
        rows += [(image, r + 1, c, f"{s:.6f}") for r, (c, s) in enumerate(zip(kept, scores, strict=True))]
    _write_csv(path, ["image", "rank", "individual_id", "score"], rows)
    return {(i, c): float(s) for i, _, c, s in rows}


def _oracle(tables, weights, images, threshold):
    """Loops: union of candidates, missing = the table's lowest score for the image, weighted mean."""
    w = np.array(weights) / sum(weights)
    preds = []
    for image in images:
        cands = sorted({c for t in tables for (i, c) in t if i == image})
        lows = [min(s for (i, _), s in t.items() if i == image) for t in tables]
        score = {c: sum(wt * t.get((image, c), lo) for wt, t, lo in zip(w, tables, lows, strict=True))
                 for c in cands}
        ranked = sorted(cands, key=lambda c: (-np.float32(score[c]), c))
        new_at = sum(np.float32(score[c]) >= np.float32(threshold) for c in ranked)
        preds.append(" ".join((ranked[:new_at] + [NEW_INDIVIDUAL] + ranked[new_at:])[:5]))
    return preds


def test_two_tables_match_a_brute_force_blend(tmp_path):
    rng = np.random.default_rng(0)
    images = [f"img{i}.jpg" for i in range(20)]
    ids = np.array([f"w{i:02d}" for i in range(10)])
    a = _random_table(rng, tmp_path / "a.csv", images, ids)
    b = _random_table(rng, tmp_path / "b.csv", images[::-1], ids)
    res = _blend(tmp_path, "--table", str(tmp_path / "a.csv"), "--weight", "0.6", "--table",
                 str(tmp_path / "b.csv"), "--weight", "0.4", "--threshold", "0.45")
    assert res.exit_code == 0, res.output
    got = {r["image"]: r["predictions"] for r in csv.DictReader(open(tmp_path / "blend.csv"))}
    assert [got[i] for i in images] == _oracle([a, b], [0.6, 0.4], images, 0.45)


@pytest.mark.parametrize("case, needle", [
    ("weights", "one --weight per --table"),
    ("images", "do not cover the same images"),
    ("nan", "finite number on line 3"),
    ("threshold", "exactly one of"),
])
def test_bad_blend_input_is_one_clear_error(tmp_path, case, needle):
    rng = np.random.default_rng(1)
    ids = np.array([f"w{i}" for i in range(8)])
    _random_table(rng, tmp_path / "a.csv", ["x.jpg", "y.jpg"], ids)
    _random_table(rng, tmp_path / "b.csv", ["x.jpg", "z.jpg" if case == "images" else "y.jpg"], ids)
    if case == "nan":
        lines = open(tmp_path / "b.csv").read().splitlines()
        lines[2] = ",".join(lines[2].split(",")[:3] + ["nan"])
        (tmp_path / "b.csv").write_text("\n".join(lines) + "\n")
    args = ["--table", str(tmp_path / "a.csv"), "--weight", "1", "--table", str(tmp_path / "b.csv")]
    args += [] if case == "weights" else ["--weight", "1"]
    args += ["--threshold", "0.5"] + (["--new-share", "0.2"] if case == "threshold" else [])
    res = _blend(tmp_path, *args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and needle in res.output, res.output
    assert not (tmp_path / "blend.csv").exists()
