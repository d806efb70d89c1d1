"""Class-centre blending (whalesub.ranking.centres) against a dense brute-force oracle on small data."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import ConfigError
from whalesub.ranking.centres import check_ratio, rank_with_centres
from whalesub.ranking.rank import rank_queries
from whalesub.ranking.store import combined_fingerprint, load_embeddings, save_embeddings

runner = CliRunner()


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(seed=0, n_ind=30, d=16, q=40, missing=()):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(n_ind), rng.integers(0, n_ind, 3 * n_ind)]).astype(np.int64)
    centres = _unit(rng.standard_normal((n_ind, d)))
    gallery = _unit(centres[labels] + 0.9 * rng.standard_normal((labels.size, d)))
    queries = _unit(centres[rng.integers(0, n_ind, q)] + 0.9 * rng.standard_normal((q, d)))
    has = np.ones(n_ind, bool)
    has[list(missing)] = False
    return gallery, labels, queries, centres, has


def _oracle(gallery, labels, queries, centres, has, r, top=5):
    """Every query x individual in float64, loops; ties (none expected) by code."""
    out = []
    for x in queries.astype(np.float64):
        cos = gallery.astype(np.float64) @ x
        score = {}
        for c in range(centres.shape[0]):
            knn = cos[labels == c].max()
            score[c] = r * knn + (1 - r) * float(centres[c] @ x) if has[c] else knn
        ranked = sorted(score, key=lambda c: (-score[c], c))[:top]
        out.append((ranked, [score[c] for c in ranked]))
    return out


@pytest.mark.parametrize("r", [0.0, 0.5, 0.999])
@pytest.mark.parametrize("k, kc", [(1, 1), (4, 3), (10, 10), (200, 50)])
def test_blended_ranking_equals_dense_oracle(r, k, kc):
    gallery, labels, queries, centres, has = _data(missing=(3, 7))
    got_l, got_s = rank_with_centres(gallery, labels, queries, centres, has, r, k, centre_k=kc, batch_size=16)
    for row, (want_l, want_s) in enumerate(_oracle(gallery, labels, queries, centres, has, r)):
        assert got_l[row].tolist() == want_l
        np.testing.assert_allclose(got_s[row], want_s, atol=1e-5)


def test_ratio_zero_ranks_by_centre_cosine_only():
    gallery, labels, queries, centres, has = _data(seed=1)
    got, _ = rank_with_centres(gallery, labels, queries, centres, has, 0.0, k=5)
    by_centre = np.argsort(-(queries.astype(np.float64) @ centres.T.astype(np.float64)), axis=1)[:, :5]
    assert (got == by_centre).all()


def test_ratio_near_one_agrees_with_knn_ranking():
    gallery, labels, queries, centres, has = _data(seed=2)
    want, _ = rank_queries(gallery, labels, queries, k=50)
    got, _ = rank_with_centres(gallery, labels, queries, centres, has, 1 - 1e-7, k=50)
    assert (got == want).all()


def test_individuals_absent_from_the_knn_top_k_get_their_exact_knn_term():
    # One query; individual 1 is far in the gallery (never among the top-1 neighbours) but its
    # centre is the query itself: it must be scored 0.5 * its true best cosine + 0.5 * 1.
    gallery = _unit(np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1.0]]))
    labels = np.array([0, 1, 2])
    query = _unit(np.array([[0.9, 0.1, 0.0]]))
    centres = _unit(np.array([[0, 0, 1.0], query[0].tolist(), [0, 0, 1.0]]))
    lab, sc = rank_with_centres(gallery, labels, query, centres, np.ones(3, bool), 0.5, k=1, centre_k=1)
    assert lab[0, 0] == 1
    assert sc[0, 0] == pytest.approx(0.5 * float(gallery[1] @ query[0]) + 0.5, abs=1e-6)


@pytest.mark.parametrize("k, kc, dense", [(1, 1, True), (4, 3, True), (200, 50, False)])
def test_float16_inputs_rank_like_the_same_values_in_float32(k, kc, dense, caplog):
    # The dense re-rank used the caller's dtype (x @ centres.T in float16): scores off by ~1e-4.
    # Oracle: the same float16 values, cast to float32 here before the call.
    gallery, labels, queries, centres, has = _data(seed=3, missing=(3, 7))
    g16, q16, c16 = (a.astype(np.float16) for a in (gallery, queries, centres))
    with caplog.at_level("INFO", logger="whalesub.ranking.centres"):
        got_l, got_s = rank_with_centres(g16, labels, q16, c16, has, 0.5, k, centre_k=kc, batch_size=16)
    assert ("re-ranking them exactly" in caplog.text) == dense  # both paths are covered
    want_l, want_s = rank_with_centres(g16.astype(np.float32), labels, q16.astype(np.float32),
                                       c16.astype(np.float32), has, 0.5, k, centre_k=kc, batch_size=16)
    assert got_s.dtype == np.float32
    assert (got_l == want_l).all()
    np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval_is_refused(bad):
    with pytest.raises(ConfigError, match="--knn-ratio"):
        check_ratio(bad)


# --- through `whalesub submit` ---------------------------------------------------------------------


class _Fp:
    def __init__(self, fingerprint):
        self.fingerprint = fingerprint


@pytest.fixture
def files(tmp_path):
    """Two 'models' of D=8: gallery/queries concatenated (D=16), one centres file per model."""
    rng = np.random.default_rng(5)
    n_ind, blocks = 12, []
    labels = np.concatenate([np.arange(n_ind), rng.integers(0, n_ind, 24)])
    for _ in range(2):
        c = _unit(rng.standard_normal((n_ind, 8)))
        g = _unit(c[labels] + 0.8 * rng.standard_normal((labels.size, 8)))
        q = _unit(c[rng.integers(0, n_ind, 15)] + 0.8 * rng.standard_normal((15, 8)))
        blocks.append((c, g, q))
    fp = combined_fingerprint([_Fp("fa"), _Fp("fb")])
    ids = [f"ind{i:02d}" for i in range(n_ind)]
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "species", "individual_id"),
                                  *[(f"g{j}.jpg", "sp", ids[c]) for j, c in enumerate(labels)]])
    save_embeddings(tmp_path / "gallery.npz", [f"g{j}.jpg" for j in range(labels.size)],
                    _unit(np.hstack([b[1] for b in blocks])), {"fingerprint": fp})
    save_embeddings(tmp_path / "queries.npz", [f"q{j}.jpg" for j in range(15)],
                    _unit(np.hstack([b[2] for b in blocks])), {"fingerprint": fp})
    for name, (c, _, _) in zip(("fa", "fb"), blocks, strict=True):
        save_embeddings(tmp_path / f"centres_{name}.npz", ids, c,
                        {"fingerprint": name, "kind": "class_centres"})
    return tmp_path


def _run(d, *extra, out="sub.csv"):
    args = ["submit", "--gallery", str(d / "gallery.npz"), "--queries", str(d / "queries.npz"),
            "--train-csv", str(d / "train.csv"), "--out", str(d / out), *extra]
    return runner.invoke(app, args)


def _centres_args(d, order=("fa", "fb")):
    return [a for name in order for a in ("--centres", str(d / f"centres_{name}.npz"))]


def test_knn_ratio_one_reproduces_todays_submission_bit_for_bit(files):
    assert _run(files, "--threshold", "0.3", "--candidates-out", str(files / "c0.csv")).exit_code == 0
    res = _run(files, "--threshold", "0.3", *_centres_args(files), "--knn-ratio", "1.0",
               "--candidates-out", str(files / "c1.csv"), out="sub1.csv")
    assert res.exit_code == 0, res.output
    assert (files / "sub.csv").read_bytes() == (files / "sub1.csv").read_bytes()
    assert (files / "c0.csv").read_bytes() == (files / "c1.csv").read_bytes()


def test_knn_ratio_zero_ranks_by_the_mean_per_model_centre_cosine(files):
    res = _run(files, "--threshold", "-1", "--threshold-knn-ratio", "0", *_centres_args(files),
               "--knn-ratio", "0", "--centres-from", "head")
    assert res.exit_code == 0, res.output
    q = load_embeddings(files / "queries.npz").vectors.astype(np.float64)
    cos = np.mean([q[:, 8 * b:8 * b + 8] / np.linalg.norm(q[:, 8 * b:8 * b + 8], axis=1, keepdims=True)
                   @ load_embeddings(files / f"centres_{name}.npz").vectors.T.astype(np.float64)
                   for b, name in enumerate(("fa", "fb"))], axis=0)
    want = [" ".join(f"ind{c:02d}" for c in row) for row in np.argsort(-cos, axis=1)[:, :5]]
    got = [r["predictions"] for r in csv.DictReader(open(files / "sub.csv"))]
    assert got == want


@pytest.mark.parametrize("extra, needle", [
    (["--knn-ratio", "0.5", "--centres-from", "head"], "needs the heads' class centres"),
    (["--knn-ratio", "0.5", "--centres-from", "head", "--centres", "{d}/centres_fb.npz", "--centres",
      "{d}/centres_fa.npz"], "do not come from the models"),
    (["--knn-ratio", "0.5", "--centres-from", "head", "--centres", "{d}/centres_fa.npz"], "D=8"),
    (["--knn-ratio", "0.5", "--centres-from", "head", "--centres", "{d}/gallery.npz"], "gallery.npz"),
    (["--knn-ratio", "2", "--centres-from", "head", "--centres", "{d}/centres_fa.npz"], "--knn-ratio"),
    (["--knn-ratio", "0.5", "--centres", "{d}/centres_fa.npz", "--centres", "{d}/centres_fb.npz"],
     "drop --centres"),  # the default source, gallery, uses no head centres
    (["--knn-ratio", "0.5", "--centres-from", "mean"], "--centres-from 'mean' is not known"),
])
def test_bad_centres_are_one_clear_error(files, extra, needle):
    res = _run(files, "--new-share", "0.2", *[a.format(d=files) for a in extra])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and needle in res.output
    assert not (files / "sub.csv").exists()
