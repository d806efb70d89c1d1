"""Per-species thresholds: tune --per-species writes a file that submit --thresholds applies.

Constructed case: every gallery image is one basis vector (its individual); a query is
a x (basis of an individual) + sqrt(1 - a^2) x noise orthogonal to the gallery, so its best
cosine is exactly a. Species A: known queries a in [0.75, 0.9], new ones (look-alikes) in
[0.5, 0.6]; species B: known [0.4, 0.5], new [0.15, 0.25]. One global threshold cannot separate
both; one per species can. Species C has 3 queries only and must stay near the global threshold.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import DataError
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.rank import encode_labels, rank_queries
from whalesub.ranking.store import save_embeddings
from whalesub.ranking.submission import score_submission
from whalesub.ranking.threshold import row_thresholds, truth_codes, tune_per_species
from whalesub.workflows.scorefiles import read_thresholds

runner = CliRunner()
D = 64
SPECIES = {"sa": range(0, 10), "sb": range(10, 20), "sc": range(20, 22)}
RANGES = {"sa": ((0.75, 0.9), (0.5, 0.6)), "sb": ((0.4, 0.5), (0.15, 0.25)),
          "sc": ((0.97, 0.98), (0.92, 0.93))}


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def _gallery(d):
    train = [(f"g{i}.jpg", sp, f"ind{i:02d}") for sp, ids in SPECIES.items() for i in ids]
    _write_csv(d / "train.csv", ["image", "species", "individual_id"], train)
    save_embeddings(d / "gallery.npz", [t[0] for t in train], np.eye(22, D, dtype=np.float32),
                    {"fingerprint": "f"})


def _queries(d, name, seed, n_per_species=40, n_c=3):
    """Queries of each species (half new) with controlled best cosines; writes NAME.npz and NAME_truth.csv."""
    rng = np.random.default_rng(seed)
    ids, vecs, truth = [], [], []
    for sp, inds in SPECIES.items():
        n = n_c if sp == "sc" else n_per_species
        for j in range(n):
            new = j % 2 == 1
            lo, hi = RANGES[sp][new]
            a = rng.uniform(lo, hi)
            ind = int(rng.choice(list(inds)))
            noise = np.zeros(D)
            noise[32:] = rng.standard_normal(D - 32)
            v = np.zeros(D)
            v[ind] = a
            v += np.sqrt(1 - a * a) * noise / np.linalg.norm(noise)
            ids.append(f"{name}{len(ids)}.jpg")
            vecs.append(v)
            truth.append(NEW_INDIVIDUAL if new else f"ind{ind:02d}")
    save_embeddings(d / f"{name}.npz", ids, np.array(vecs, np.float32), {"fingerprint": "f"})
    _write_csv(d / f"{name}_truth.csv", ["image", "individual_id"], list(zip(ids, truth, strict=True)))
    _write_csv(d / f"{name}_sample.csv", ["image", "predictions"], [(i, NEW_INDIVIDUAL) for i in ids])
    return np.array(vecs, np.float32), truth


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("species")
    _gallery(d)
    _queries(d, "oof", seed=1)
    _queries(d, "test", seed=2)
    return d


def _tune(d, *extra):
    args = ["tune", "--gallery", str(d / "gallery.npz"), "--queries", str(d / "oof.npz"), "--train-csv",
            str(d / "train.csv"), "--truth", str(d / "oof_truth.csv"), "--grid", "0:1:0.01", "--json", *extra]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _submit_map5(d, *threshold_args):
    out = d / "sub.csv"
    args = ["submit", "--gallery", str(d / "gallery.npz"), "--queries", str(d / "test.npz"), "--train-csv",
            str(d / "train.csv"), "--out", str(out), "--sample", str(d / "test_sample.csv"), *threshold_args]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return score_submission(out, d / "test_truth.csv")["map5"]


def test_per_species_thresholds_beat_the_best_global_one_on_held_out_queries(case):
    r = _tune(case, "--per-species", str(case / "th.json"), "--k0", "1")
    g, by_species = read_thresholds(case / "th.json")
    assert g == r["best"]["threshold"]
    assert 0.55 <= by_species["sa"] <= 0.75 and 0.2 <= by_species["sb"] <= 0.4
    per_species = _submit_map5(case, "--thresholds", str(case / "th.json"))
    best_global = _submit_map5(case, "--threshold", str(g))
    assert per_species > 0.95  # nearly every query of both species right on a held-out draw
    assert best_global < per_species - 0.08  # one species' known or new queries lose half their AP


def test_a_species_with_few_queries_stays_near_the_global_threshold(case):
    r = _tune(case, "--per-species", str(case / "th.json"), "--k0", "20")["per_species"]
    sc, g = r["species"]["sc"], r["global"]
    assert sc["n"] == 3 and sc["raw_threshold"] > 0.9  # its own queries alone would push it far up
    assert abs(sc["threshold"] - g) < 0.2 * abs(sc["raw_threshold"] - g)
    sa = r["species"]["sa"]  # n = 40: keeps more of its own threshold than sc does
    assert abs(sa["threshold"] - g) > 0.5 * abs(sa["raw_threshold"] - g) > 0
    no_shrink = _tune(case, "--per-species", str(case / "th0.json"), "--k0", "0")["per_species"]
    assert no_shrink["species"]["sc"]["threshold"] == no_shrink["species"]["sc"]["raw_threshold"]


def test_in_memory_tuning_groups_queries_by_the_top_candidates_species(case):
    vecs, truth = _queries(case, "mem", seed=3, n_per_species=10, n_c=2)
    codes, classes = encode_labels([f"ind{i:02d}" for i in range(22)])
    species = np.array([sp for sp, ids in SPECIES.items() for _ in ids])
    labels, scores = rank_queries(np.eye(22, D, dtype=np.float32), codes, vecs, k=5)
    res = tune_per_species(labels, scores, truth_codes(truth, classes), species, np.arange(0, 1.01, 0.01),
                           k0=0)
    assert {s: v["n"] for s, v in res["species"].items()} == {"sa": 10, "sb": 10, "sc": 2}
    assert res["map5_per_species"] > res["map5_global"]


def test_row_thresholds_fall_back_to_the_global_one():
    labels = np.array([[0, 1], [1, 0], [2, 0], [-1, -1]])
    got = row_thresholds(labels, np.array(["a", "b", "zz"]), {"a": 0.1, "b": 0.2}, 0.5)
    assert got.tolist() == [0.1, 0.2, 0.5, 0.5]


@pytest.mark.parametrize("text, needle", [("[1, 2]", "'global'"), ('{"global": 2}', "'global' must"),
                                          ('{"global": 0.5, "species": {"x": "hi"}}', "species 'x'"),
                                          ("{nope", "not JSON")])
def test_bad_threshold_files_are_named(tmp_path, text, needle):
    (tmp_path / "t.json").write_text(text)
    with pytest.raises(DataError, match=needle):
        read_thresholds(tmp_path / "t.json")


def test_submit_refuses_two_threshold_sources(case):
    res = runner.invoke(app, ["submit", "--gallery", str(case / "gallery.npz"), "--queries",
                              str(case / "test.npz"), "--train-csv", str(case / "train.csv"), "--out",
                              str(case / "x.csv"),
                              "--threshold", "0.5", "--thresholds", str(case / "th.json")])
    assert res.exit_code == 2 and "exactly one of" in res.output
    assert not (case / "x.csv").exists()


def test_tune_prints_the_per_species_summary(case):
    args = ["tune", "--gallery", str(case / "gallery.npz"), "--queries", str(case / "oof.npz"), "--train-csv",
            str(case / "train.csv"), "--truth", str(case / "oof_truth.csv"), "--per-species",
            str(case / "th_text.json")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "per species (3 species, k0=20)" in res.stdout and (case / "th_text.json").is_file()
