"""Pseudo-labels: confident test predictions, checked against a dense brute-force oracle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import ConfigError, DataError
from whalesub.ranking.store import save_embeddings
from whalesub.workflows.pseudo import pseudo_label_files, select_confident


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """12 individuals of 2 species, 3 gallery photos each; 40 test images: clear, ambiguous and new."""
    d = tmp_path_factory.mktemp("pseudo")
    rng = np.random.default_rng(3)
    dim, n_ind = 32, 12
    centres = unit(rng.standard_normal((n_ind, dim)))
    ids = [f"ind{i:02d}" for i in range(n_ind)]
    g_names, g_vecs, rows = [], [], []
    for i in range(n_ind):
        for j in range(3):
            g_names.append(f"g{i}_{j}.jpg")
            g_vecs.append(centres[i] + 0.25 * rng.standard_normal(dim) / np.sqrt(dim))
            rows.append((g_names[-1], "beluga" if i % 2 else "orca", ids[i]))
    train = pd.DataFrame(rows, columns=["image", "species", "individual_id"])
    train.to_csv(d / "train.csv", index=False)
    q_names, q_vecs, truth = [], [], []
    for t in range(40):
        kind = t % 4
        i = int(rng.integers(n_ind))
        if kind in (0, 1):  # clear sighting of a known animal
            v, lab = centres[i] + (0.2 + 0.4 * kind) * rng.standard_normal(dim) / np.sqrt(dim), ids[i]
        elif kind == 2:  # halfway between two animals: small margin
            j = (i + 1) % n_ind
            v, lab = centres[i] + centres[j] + 0.1 * rng.standard_normal(dim) / np.sqrt(dim), ids[i]
        else:  # a new animal
            v, lab = rng.standard_normal(dim), "new_individual"
        q_names.append(f"t{t:02d}.jpg")
        q_vecs.append(v)
        truth.append((q_names[-1], lab))
    pd.DataFrame(truth, columns=["image", "individual_id"]).to_csv(d / "truth.csv", index=False)
    save_embeddings(d / "gallery.npz", g_names, unit(np.array(g_vecs)), {"fingerprint": "m"})
    save_embeddings(d / "test.npz", q_names, unit(np.array(q_vecs)), {"fingerprint": "m"})
    return {"dir": d, "gallery": unit(np.array(g_vecs)), "g_labels": np.repeat(ids, 3),
            "queries": unit(np.array(q_vecs)), "q_names": q_names, "truth": dict(truth), "train": train}


def inputs(world):
    return world["dir"] / "gallery.npz", world["dir"] / "test.npz", world["dir"] / "train.csv"


def cli_inputs(world):
    g, q, t = inputs(world)
    return ["--gallery", str(g), "--queries", str(q), "--train-csv", str(t)]


def _dense_oracle(queries, q_names, gallery, g_labels, min_score, min_margin) -> dict:
    """{query: (label, best, margin)} by plain Python: per-individual max cosine, best vs second."""
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    out = {}
    for q, name in enumerate(q_names):
        per = {}
        for g, lab in enumerate(g_labels):
            per[lab] = max(per.get(lab, -2.0), sims[q, g])
        ranked = sorted(per.items(), key=lambda kv: (-kv[1], kv[0]))
        (best, s1), (_, s2) = ranked[0], ranked[1]
        if s1 >= min_score and s1 - s2 >= min_margin:
            out[name] = (best, s1, s1 - s2)
    return out


def oracle(world, min_score, min_margin):
    """The dense oracle on the module's world."""
    return _dense_oracle(world["queries"], world["q_names"], world["gallery"], world["g_labels"],
                         min_score, min_margin)


@pytest.mark.parametrize("min_score,min_margin", [(0.8, 0.05), (0.6, 0.0), (0.9, 0.2), (1.0, 0.0)])
def test_selection_matches_a_dense_oracle(world, tmp_path, min_score, min_margin):
    out = tmp_path / "pseudo.csv"
    s = pseudo_label_files(*inputs(world),
                           out, min_score=min_score, min_margin=min_margin)
    want = oracle(world, min_score, min_margin)
    got = pd.read_csv(out, dtype={"individual_id": str})
    assert sorted(got["image"]) == sorted(want)
    for r in got.itertuples():
        lab, s1, margin = want[r.image]
        assert r.individual_id == lab
        assert r.score == pytest.approx(s1, abs=1e-5) and r.margin == pytest.approx(margin, abs=1e-5)
        assert r.species == world["train"].set_index("individual_id").loc[lab, "species"].iat[0]
    assert s["selected"] == len(want) and s["queries"] == 40


def test_precision_against_truth_and_thresholds_trade_recall_for_precision(world, tmp_path):
    loose = pseudo_label_files(*inputs(world), tmp_path / "a.csv", min_score=0.0, min_margin=0.0,
                               truth=world["dir"] / "truth.csv")
    strict = pseudo_label_files(*inputs(world), tmp_path / "b.csv", min_score=0.8, min_margin=0.1,
                                truth=world["dir"] / "truth.csv")
    assert loose["selected"] == 40  # every query has a best individual
    # independent count: loose labels every query with its best individual
    want = oracle(world, -1.0, 0.0)
    right = sum(want[n][0] == world["truth"][n] for n in want)
    assert loose["correct"] == right and loose["precision"] == pytest.approx(right / 40)
    assert strict["selected"] < loose["selected"] and strict["precision"] > loose["precision"]
    assert strict["selected_new"] == 0


def test_select_confident_handles_a_single_individual_and_bad_settings():
    labels = np.array([[3, -1], [1, 2]])
    scores = np.array([[0.9, -np.inf], [0.85, 0.84]], np.float32)
    sel = select_confident(labels, scores, 0.8, 0.05)
    assert sel["keep"].tolist() == [True, False] and np.isinf(sel["margin"][0])
    with pytest.raises(ConfigError, match="min-score"):
        select_confident(labels, scores, 1.5, 0.0)
    with pytest.raises(ConfigError, match="min-margin"):
        select_confident(labels, scores, 0.5, -0.1)


def test_refuses_train_images_among_the_queries(world, tmp_path):
    with pytest.raises(DataError, match="also train images"):
        pseudo_label_files(world["dir"] / "gallery.npz", world["dir"] / "gallery.npz",
                           world["dir"] / "train.csv", tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_cli(world, tmp_path):
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["pseudo-label", *cli_inputs(world),
                                 "--out", str(out), "--truth", str(world["dir"] / "truth.csv")])
    assert r.exit_code == 0, r.output
    assert "precision" in r.output and out.is_file()
    r = CliRunner().invoke(app, ["pseudo-label", *cli_inputs(world),
                                 "--out", str(tmp_path), "--min-score", "0.5"])
    assert r.exit_code == 2 and "is a folder" in r.output


# --- per fold: fold k's pseudo rows come from a gallery without fold k's validation images ----------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """8 animals with 2 photos in each of folds 0 and 1; ind00 has one more photo in fold 1 that looks
    unlike its others (another side); the test set holds a near-duplicate of that photo plus ordinary
    sightings of every animal."""
    d = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(21)
    dim, n_ind = 48, 8
    centres = unit(rng.standard_normal((n_ind, dim)))
    rows, vecs = [], []
    for i in range(n_ind):
        for j in range(4):
            rows.append((f"g{i}_{j}.jpg", "orca", f"ind{i:02d}", j % 2))
            vecs.append(centres[i] + 0.2 * rng.standard_normal(dim) / np.sqrt(dim))
    odd = unit(rng.standard_normal((1, dim)))[0]
    rows.append(("odd_side.jpg", "orca", "ind00", 1))
    vecs.append(odd)
    table = pd.DataFrame(rows, columns=["image", "species", "individual_id", "fold"])
    table.drop(columns="fold").to_csv(d / "train.csv", index=False)
    table.to_csv(d / "folds.csv", index=False)
    q_names = ["dup_of_odd_side.jpg"] + [f"t{i}.jpg" for i in range(n_ind)]
    q_vecs = [odd + 0.02 * rng.standard_normal(dim) / np.sqrt(dim)]
    q_vecs += [centres[i] + 0.2 * rng.standard_normal(dim) / np.sqrt(dim) for i in range(n_ind)]
    gallery, queries = unit(np.array(vecs)), unit(np.array(q_vecs))
    save_embeddings(d / "gallery.npz", table["image"].tolist(), gallery, {"fingerprint": "m"})
    save_embeddings(d / "test.npz", q_names, queries, {"fingerprint": "m"})
    return {"dir": d, "table": table, "gallery": gallery, "queries": queries, "q_names": q_names}


def test_a_duplicate_of_a_fold_validation_image_gives_that_fold_no_pseudo_row(planted, tmp_path):
    d, table = planted["dir"], planted["table"]
    args = (d / "gallery.npz", d / "test.npz", d / "train.csv")
    # the old ranking (every train image): the duplicate takes ind00 with a near-1 cosine, and ind00 is in
    # fold 1's training part (its fold-0 photos), so fold 1 would have trained on its own validation photo
    pseudo_label_files(*args, tmp_path / "old.csv", min_score=0.8, min_margin=0.05)
    old = pd.read_csv(tmp_path / "old.csv", dtype=str).set_index("image")["individual_id"]
    assert old["dup_of_odd_side.jpg"] == "ind00"
    assert "ind00" in set(table.loc[table["fold"] != 1, "individual_id"])

    s = pseudo_label_files(*args, tmp_path / "new.csv", min_score=0.8, min_margin=0.05, folds=d / "folds.csv")
    new = pd.read_csv(tmp_path / "new.csv", dtype={"individual_id": str, "image": str})
    fold1 = new[new["fold"] == 1]
    assert not ((fold1["image"] == "dup_of_odd_side.jpg") & (fold1["individual_id"] == "ind00")).any()
    for k in (0, -1):  # the photo is in fold 0's training part and in the full gallery: there it is fair
        part = new[new["fold"] == k].set_index("image")["individual_id"]
        assert part["dup_of_odd_side.jpg"] == "ind00"
    # every fold's rows equal a dense oracle over that fold's training part (fold -1: everything)
    for k in (0, 1, -1):
        keep = (table["fold"] != k).to_numpy()
        want = _dense_oracle(planted["queries"], planted["q_names"], planted["gallery"][keep],
                             table["individual_id"].to_numpy()[keep], 0.8, 0.05)
        got = new[new["fold"] == k]
        assert sorted(got["image"]) == sorted(want), k
        for r in got.itertuples():
            assert r.individual_id == want[r.image][0]
            assert r.score == pytest.approx(want[r.image][1], abs=1e-5)
    assert [p["fold"] for p in s["per_fold"]] == [0, 1, -1] and s["rows"] == len(new)
    assert s["selected"] == int((new["fold"] == -1).sum())
    assert [p["gallery"] for p in s["per_fold"]] == [17, 16, 33]  # fold 0 trains on fold 1's 16 + the odd one


def test_per_fold_cli_and_bad_folds_file(planted, tmp_path):
    d = planted["dir"]
    base = ["pseudo-label", "--gallery", str(d / "gallery.npz"), "--queries", str(d / "test.npz"),
            "--train-csv", str(d / "train.csv")]
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "p.csv"), "--folds", str(d / "folds.csv")])
    assert r.exit_code == 0, r.output
    assert "fold 0:" in r.output and "fold 1:" in r.output
    assert set(pd.read_csv(tmp_path / "p.csv")["fold"]) <= {0, 1, -1}
    planted["table"].head(5).to_csv(tmp_path / "short.csv", index=False)  # gallery images missing
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "q.csv"), "--folds",
                                 str(tmp_path / "short.csv")])
    assert r.exit_code == 2 and "not in the folds file" in r.output and not (tmp_path / "q.csv").exists()
    planted["table"].assign(fold="x").to_csv(tmp_path / "bad.csv", index=False)
    r = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "q.csv"), "--folds",
                                 str(tmp_path / "bad.csv")])
    assert r.exit_code == 2 and "column 'fold' must hold integers" in r.output
