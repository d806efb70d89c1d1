"""whalesub catalogue: the on-disk index, adds without re-embedding, decisions and undo, calibration,
grouping of new animals, a round trip on the synthetic set, crashes (SIGKILL) and the lock.

Vector-level tests use clustered random unit vectors (an animal = a random centre, its photos =
centre + noise), added through :func:`whalesub.catalogue.add.add_vectors` (no network); the round
trip uses the suite's synthetic Happywhale set and a tiny exported timm model (pretrained=False).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from whalesub.catalogue import decisions as dec
from whalesub.catalogue import index_file
from whalesub.catalogue.add import NewPhoto, add_vectors
from whalesub.catalogue.calibrate import reliability_table
from whalesub.catalogue.identify import calibration_of, identify_vectors, load_gallery
from whalesub.catalogue.store import INDEX, Catalogue, CatalogueError
from whalesub.cli import app

REPO = Path(__file__).resolve().parents[1]
D = 24


def animals(rng, n_animals: int, dim: int = D):
    return rng.normal(size=(n_animals, dim))


def photos_of(rng, centres, animal: int, n: int, noise: float) -> np.ndarray:
    x = centres[animal] + noise * np.sqrt(1.0 / centres.shape[1]) * np.linalg.norm(
        centres[animal]
    ) * rng.normal(size=(n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def new_photos(vectors: np.ndarray, names: list[str], ids: list[str | None]) -> list[NewPhoto]:
    return [
        NewPhoto(n, hashlib.sha256(v.tobytes()).hexdigest(), individual_id=i)
        for n, v, i in zip(names, vectors, ids, strict=True)
    ]


def labelled_catalogue(
    folder: Path, rng, centres, n_animals: int, per_animal: int, noise: float
) -> Catalogue:
    cat = Catalogue.create(folder, "fp-test", centres.shape[1], {})
    vecs, names, ids = [], [], []
    for a in range(n_animals):
        vecs.append(photos_of(rng, centres, a, per_animal, noise))
        names += [f"a{a}_{j}.jpg" for j in range(per_animal)]
        ids += [f"ind{a}"] * per_animal
    vecs = np.concatenate(vecs)
    add_vectors(cat, new_photos(vecs, names, ids), vecs, "tester")
    return cat


# ---- the index file ------------------------------------------------------------------------------
def test_index_file_appends_in_place_and_faiss_reads_it(tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    p = tmp_path / "x.faiss"
    index_file.write_index(p, a)
    ref = tmp_path / "ref.faiss"
    ix = faiss.IndexFlatIP(8)
    ix.add(a)
    faiss.write_index(ix, str(ref))
    assert p.read_bytes() == ref.read_bytes()  # the same bytes FAISS itself writes
    index_file.append_rows(p, b, 5)
    got = faiss.read_index(str(p))
    assert got.ntotal == 8 and np.array_equal(got.reconstruct_n(0, 8), np.concatenate([a, b]))
    assert index_file.read_header(p, 8) == 8
    with open(p, "r+b") as fh:  # a kill between the data and the header: torn
        fh.truncate(p.stat().st_size - 4)
    assert index_file.read_header(p, 8) is None
    assert index_file.read_header(p, 9) is None and index_file.read_header(tmp_path / "none", 8) is None


def test_index_lagging_or_torn_is_repaired_from_the_database(tmp_path):
    rng = np.random.default_rng(1)
    cat = labelled_catalogue(tmp_path / "c", rng, animals(rng, 4), 4, 3, 0.3)
    want = np.array(cat.vectors())
    cat.close()
    path = tmp_path / "c" / INDEX
    index_file.write_index(path, want[:7])  # lags by 5 rows
    with Catalogue.open(tmp_path / "c") as cat:
        assert np.array_equal(cat.vectors(), want)
    index_file.write_index(path, want[::-1])  # right count, wrong rows
    with Catalogue.open(tmp_path / "c") as cat:
        assert np.array_equal(cat.vectors(), want)
    path.write_bytes(path.read_bytes()[:-10])  # torn
    with Catalogue.open(tmp_path / "c") as cat:
        assert cat.sync_index() == "ok" and np.array_equal(cat.vectors(), want)


# ---- adding --------------------------------------------------------------------------------------
def test_add_skips_held_photos_renames_clashes_and_refuses_label_conflicts(tmp_path):
    rng = np.random.default_rng(2)
    v = photos_of(rng, animals(rng, 2), 0, 4, 0.5)
    cat = Catalogue.create(tmp_path / "c", "fp", D, {})
    r = add_vectors(cat, new_photos(v[:2], ["a.jpg", "b.jpg"], ["x", None]), v[:2], "t")
    assert (r["added"], r["labelled"]) == (2, 1)
    # b.jpg renamed copy of b + a new photo also called a.jpg + a duplicate within the batch
    batch = new_photos(v[[1, 2, 2]], ["copy_of_b.jpg", "a.jpg", "a.jpg"], ["y", None, None])
    r = add_vectors(cat, batch, v[[1, 2, 2]], "t")
    assert (r["added"], r["skipped"], r["renamed"], r["labelled"]) == (1, 2, 1, 1)
    names = [n for (n,) in cat.db.execute("SELECT name FROM photos ORDER BY row")]
    assert names == ["a.jpg", "b.jpg", f"a-{batch[1].sha256[:8]}.jpg"]
    assert list(cat.labels()) == ["x", "y", None]  # the unlabelled copy got its label
    before = cat.size
    with pytest.raises(CatalogueError, match="carry another id"):
        add_vectors(cat, new_photos(v[[0, 3]], ["a.jpg", "d.jpg"], ["z", None]), v[[0, 3]], "t")
    assert cat.size == before and np.array_equal(cat.vectors(), np.array(v[:3]))


# ---- decisions -----------------------------------------------------------------------------------
def test_decisions_undo_history_and_export_equal_the_decisions(tmp_path):
    rng = np.random.default_rng(3)
    cat = labelled_catalogue(tmp_path / "c", rng, animals(rng, 3), 3, 2, 0.3)
    v = photos_of(rng, animals(rng, 1), 0, 3, 0.3)
    add_vectors(cat, new_photos(v, ["q0.jpg", "q1.jpg", "q2.jpg"], [None] * 3), v, "t")
    expect = {f"a{a}_{j}.jpg": f"ind{a}" for a in range(3) for j in range(2)}
    snapshots = [dict(expect)]
    dec.confirm(cat, "q0.jpg", "ind1", "ann")
    expect["q0.jpg"] = "ind1"
    snapshots.append(dict(expect))
    r = dec.new(cat, "q1.jpg", None, "bob")
    assert r["id"] == "cat-00001"
    expect["q1.jpg"] = "cat-00001"
    snapshots.append(dict(expect))
    dec.new(cat, "q2.jpg", "orca-7", "bob")
    expect["q2.jpg"] = "orca-7"
    snapshots.append(dict(expect))
    dec.merge(cat, "ind0", "ind2", "ann")
    expect.update({k: "ind0" for k, x in expect.items() if x == "ind2"})
    snapshots.append(dict(expect))
    dec.split(cat, "ind0", ["a2_0.jpg", "a2_1.jpg"], "ind2b", "ann")
    expect.update({"a2_0.jpg": "ind2b", "a2_1.jpg": "ind2b"})

    def current():
        return {n: i for n, _, i in dec.labelled_rows(cat)}

    assert current() == expect
    out = tmp_path / "train.csv"
    assert dec.export(cat, out) == len(expect)
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["image", "species", "individual_id"]
    assert dict(zip(frame["image"], frame["individual_id"], strict=True)) == expect
    hist = dec.history(cat)
    assert [h["kind"] for h in hist] == ["add", "labels", "add", "confirm", "new", "new", "merge", "split"]
    assert {h["who"] for h in hist[3:]} == {"ann", "bob"}
    for snap in reversed(snapshots):  # every decision undone, newest first
        dec.undo(cat, "ann")
        assert current() == snap
    dec.undo(cat, "ann")  # and the label import itself
    assert current() == {}
    with pytest.raises(CatalogueError, match="no decision left"):
        dec.undo(cat, "ann")
    kinds = [h["kind"] for h in dec.history(cat)]
    assert kinds.count("undo") == 6 and all(
        h["undone_by"] for h in dec.history(cat) if h["kind"] in dec.UNDOABLE
    )


def test_bad_photos_and_ids_are_clear_errors(tmp_path):
    rng = np.random.default_rng(4)
    cat = labelled_catalogue(tmp_path / "c", rng, animals(rng, 2), 2, 2, 0.3)
    with pytest.raises(CatalogueError, match="'nope.jpg' is not in catalogue"):
        dec.confirm(cat, "nope.jpg", "ind0", "t")
    with pytest.raises(CatalogueError, match="'ind9' is not an individual"):
        dec.confirm(cat, "a0_0.jpg", "ind9", "t")
    with pytest.raises(CatalogueError, match="already belongs"):
        dec.confirm(cat, "a0_0.jpg", "ind0", "t")
    with pytest.raises(CatalogueError, match="already an individual"):
        dec.new(cat, "a0_0.jpg", "ind1", "t")
    for bad in ("a,b", " x", "new_individual", ""):
        with pytest.raises(CatalogueError, match="not a usable individual id"):
            dec.new(cat, "a0_0.jpg", bad, "t")
    with pytest.raises(CatalogueError, match="not of ind0"):
        dec.split(cat, "ind0", ["a1_0.jpg"], None, "t")
    with pytest.raises(CatalogueError, match="the same"):
        dec.merge(cat, "ind0", "ind0", "t")
    assert [h["kind"] for h in dec.history(cat)] == ["add", "labels"]  # nothing recorded
    with pytest.raises(CatalogueError, match="is not a catalogue"):
        Catalogue.open(tmp_path / "elsewhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "catalogue.sqlite").write_bytes(b"this is no database" * 100)
    with pytest.raises(CatalogueError, match="not a readable catalogue database"):
        Catalogue.open(tmp_path / "junk")
    with pytest.raises(CatalogueError, match="already holds a catalogue"):
        Catalogue.create(tmp_path / "c", "fp", D, {})


# ---- calibration and grouping ----------------------------------------------------------------------
def test_reliability_table_hand_worked():
    rows, ece = reliability_table(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0, 1, 1, 1]))
    assert [(r["bin"], r["pairs"]) for r in rows] == [("0.0-0.1", 2), ("0.9-1.0", 2)]
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)


def expected_calibration_error(p, y, bins: int = 10) -> float:
    """Independent ECE: equal-width bins, |mean p - mean y| weighted by the bin's share of pairs."""
    p, y = np.asarray(p), np.asarray(y, float)
    total = 0.0
    for lo in np.linspace(0, 1, bins, endpoint=False):
        m = (p >= lo) & ((p < lo + 1 / bins) if lo + 1 / bins < 1 else (p <= 1))
        if m.any():
            total += m.mean() * abs(p[m].mean() - y[m].mean())
    return total


def test_calibration_error_on_held_out_pairs(tmp_path):
    """Probabilities fitted on the catalogue's own out-of-fold pairs hold on fresh photos: a batch of
    80% known animals (1 photo each) and 20% new ones; ECE within 0.06 (about 1,800 pairs)."""
    rng = np.random.default_rng(5)
    n_known, n_new, noise = 150, 40, 1.1
    centres = animals(rng, n_known + n_new)
    cat = labelled_catalogue(tmp_path / "c", rng, centres, n_known, 3, noise)
    gallery = load_gallery(cat)
    calib, why = calibration_of(cat, gallery, new_share=0.2)
    assert calib is not None, why
    known = rng.choice(n_known, 160)
    truth = [f"ind{a}" for a in known] + [None] * n_new
    q = np.concatenate(
        [photos_of(rng, centres, a, 1, noise) for a in known]
        + [photos_of(rng, centres, n_known + a, 1, noise) for a in range(n_new)]
    )
    res = identify_vectors(gallery, q, np.full(len(q), -1), top=12, calibration=calib)
    p_ind = [c["p"] for r in res for c in r["individuals"]]
    y_ind = [c["id"] == t for r, t in zip(res, truth, strict=True) for c in r["individuals"]]
    p_img = [c["p"] for r in res for c in r["images"]]
    y_img = [c["id"] == t for r, t in zip(res, truth, strict=True) for c in r["images"]]
    p_new = [r["p_new"] for r in res]
    y_new = [t is None for t in truth]
    ece = {
        "individual": expected_calibration_error(p_ind, y_ind),
        "image": expected_calibration_error(p_img, y_img),
        "new": expected_calibration_error(p_new, y_new),
    }
    print("held-out ECE", {k: round(v, 4) for k, v in ece.items()}, "out-of-fold", calib.ece)
    assert 0.1 < np.mean(y_ind) * 12 < 0.95  # a task with both outcomes, not a trivial one
    assert ece["individual"] < 0.06 and ece["image"] < 0.06
    assert ece["new"] < 0.1  # 200 queries only: a looser bound
    hit = np.mean([t in [c["id"] for c in r["individuals"]] for r, t in zip(res, truth, strict=True) if t])
    assert hit > 0.5


def test_new_animals_of_a_batch_are_grouped_among_themselves(tmp_path):
    rng = np.random.default_rng(6)
    centres = animals(rng, 23)
    cat = labelled_catalogue(tmp_path / "c", rng, centres, 20, 3, 0.5)
    gallery = load_gallery(cat)
    calib, why = calibration_of(cat, gallery)
    assert calib is not None, why
    # two known photos, then new animals 20 (3 photos), 21 (2), 22 (1), interleaved
    parts = [(4, 1), (20, 2), (21, 1), (7, 1), (22, 1), (21, 1), (20, 1)]
    q = np.concatenate([photos_of(rng, centres, a, n, 0.5) for a, n in parts])
    who = [a for a, n in parts for _ in range(n)]
    res = identify_vectors(gallery, q, np.full(len(q), -1), top=5, calibration=calib)
    groups = [r["group"] for r in res]
    assert [g is None for g in groups] == [a < 20 for a in who]
    truth_partition = {frozenset(i for i, a in enumerate(who) if a == b) for b in (20, 21, 22)}
    got_partition = {frozenset(i for i, g in enumerate(groups) if g == x) for x in set(groups) - {None}}
    assert got_partition == truth_partition
    assert groups[1] == "batch-1"  # numbered in order of first appearance
    # cosine rules instead of the calibration give the same groups here
    res2 = identify_vectors(gallery, q, np.full(len(q), -1), top=5, new_below=0.6, link_above=0.6)
    assert [r["group"] for r in res2] == groups


def test_query_already_in_the_catalogue_never_matches_itself(tmp_path):
    rng = np.random.default_rng(7)
    cat = labelled_catalogue(tmp_path / "c", rng, animals(rng, 5), 5, 2, 0.3)
    gallery = load_gallery(cat)
    v = np.array(cat.vectors()[:1])
    res = identify_vectors(gallery, v, np.array([0]), top=3)
    assert "a0_0.jpg" not in [c["photo"] for c in res[0]["images"]]
    assert res[0]["images"][0]["photo"] == "a0_1.jpg" and res[0]["individuals"][0]["id"] == "ind0"
    brute = np.sort(np.array(cat.vectors()[1:]) @ v[0])[::-1][:3]
    assert np.allclose([c["cos"] for c in res[0]["images"]], brute, atol=1e-5)


# ---- crash and lock (subprocesses) ------------------------------------------------------------------
ADD_SNIPPET = """
import hashlib, os, signal, sys
import numpy as np
from pathlib import Path
sys.path.insert(0, {repo!r})
from whalesub.catalogue import add, index_file
from whalesub.catalogue.store import Catalogue
kill = {kill!r}
if kill == "in_transaction":  # after the photo rows are inserted, before the commit
    real = add.record
    def record(cat, kind, *a, **k):
        if kind == "labels":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(cat, kind, *a, **k)
    add.record = record
elif kill == "after_commit":  # the database has the photos, the index file does not
    def append_rows(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    index_file.append_rows = append_rows
v = np.random.default_rng({seed}).normal(size=({n}, {dim})).astype(np.float32)
photos = [add.NewPhoto(f"{prefix}{{i}}.jpg", hashlib.sha256(x.tobytes()).hexdigest(),
                       individual_id=f"k{{i % 3}}") for i, x in enumerate(v)]
with Catalogue.open(Path({folder!r})) as cat:
    add.add_vectors(cat, photos, v, "proc")
"""


def run_add(folder: Path, kill: str | None, seed: int, n: int = 6, prefix: str = "p", wait: bool = True):
    code = ADD_SNIPPET.format(
        repo=str(REPO), kill=kill, seed=seed, n=n, dim=D, prefix=prefix, folder=str(folder)
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if wait:
        proc.communicate(timeout=120)
    return proc


def state(folder: Path) -> dict:
    with Catalogue.open(folder) as cat:
        integrity = cat.db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = cat.db.execute(
            "SELECT p.row, name, individual_id, vector FROM photos p JOIN vectors v ON p.row = v.row "
            "ORDER BY p.row"
        ).fetchall()
        db_vectors = np.array([np.frombuffer(r[3], np.float32) for r in rows]).reshape(len(rows), D)
        assert integrity == "ok"
        assert np.array_equal(np.array(cat.vectors()), db_vectors), "index file != database"
        return {"photos": [r[1:3] for r in rows], "history": [h["kind"] for h in dec.history(cat)]}


@pytest.mark.parametrize("kill", ["in_transaction", "after_commit"])
def test_sigkill_during_add_leaves_a_consistent_catalogue(tmp_path, kill):
    ref, folder = tmp_path / "ref", tmp_path / "c"
    for f in (ref, folder):
        Catalogue.create(f, "fp", D, {}).close()
    assert run_add(ref, None, seed=1).returncode == 0
    done = state(ref)
    proc = run_add(folder, kill, seed=1)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    after = state(folder)
    assert after == ({"photos": [], "history": []} if kill == "in_transaction" else done)
    assert run_add(folder, None, seed=1).returncode == 0  # re-running finishes the job (or skips it)
    final = state(folder)
    assert final["photos"] == done["photos"]


def test_sigkill_during_a_decision_changes_nothing(tmp_path):
    rng = np.random.default_rng(8)
    labelled_catalogue(tmp_path / "c", rng, animals(rng, 2), 2, 2, 0.3).close()
    before = state(tmp_path / "c")
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from whalesub.catalogue import decisions
        from whalesub.catalogue.store import Catalogue
        cat = Catalogue.open(Path({str(tmp_path / "c")!r}))
        cat.bump_labels = lambda: os.kill(os.getpid(), signal.SIGKILL)  # after the updates, before COMMIT
        decisions.merge(cat, "ind0", "ind1", "proc")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert state(tmp_path / "c") == before


def test_two_processes_are_serialised_by_the_lock(tmp_path):
    folder = tmp_path / "c"
    Catalogue.create(folder, "fp", D, {}).close()
    holder = Catalogue.open(folder)  # this process holds the catalogue
    r = CliRunner().invoke(app, ["catalogue", "undo", "-c", str(folder), "--lock-timeout", "0.3"])
    assert r.exit_code == 2 and "is busy" in r.output and f"pid {os.getpid()}" in r.output
    procs = [run_add(folder, None, seed=s, n=40, prefix=f"s{s}_", wait=False) for s in (1, 2)]
    holder.close()  # both writers now go, one after the other
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    got = state(folder)
    assert len(got["photos"]) == 80 and got["history"].count("add") == 2
    assert {n for n, _ in got["photos"]} == {f"s{s}_{i}.jpg" for s in (1, 2) for i in range(40)}


# ---- the round trip on the synthetic set, through the CLI ------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from test_export import export_tiny, make_checkpoint

    root = tmp_path_factory.mktemp("cat_models")
    a = make_checkpoint(root / "run_a" / "best.pt", "test_efficientnet", 64, seed=0)
    b = make_checkpoint(root / "run_b" / "best.pt", "test_efficientnet", 64, seed=1)
    return export_tiny(a, root / "a"), export_tiny(b, root / "b")


def cli(*args) -> str:
    r = CliRunner().invoke(app, ["catalogue", *map(str, args)])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.slow
def test_round_trip_on_the_synthetic_set(tiny_models, synth_set, tmp_path):
    folder = tmp_path / "cat"
    cli("init", folder, "--model", tiny_models[0])
    out = cli("add", synth_set / "train_images", "-c", folder, "--labels", synth_set / "train.csv")
    train = pd.read_csv(synth_set / "train.csv")
    assert f"added {len(train)} photo(s), 0 already held, {len(train)} labelled" in out
    # a renamed copy is recognised by content and not embedded again
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "renamed.jpg").write_bytes(
        (synth_set / "train_images" / train.image[0]).read_bytes()
    )
    assert "added 0 photo(s), 1 already held" in cli("add", tmp_path / "again", "-c", folder)

    truth = pd.read_csv(synth_set / "test_truth_full.csv")
    csv_out, page = tmp_path / "cand.csv", tmp_path / "review.html"
    cli("identify", synth_set / "test_images", "-c", folder, "--top", 12, "--out", csv_out, "--html", page)
    cand = pd.read_csv(csv_out, keep_default_na=False)
    assert set(cand["query"]) == set(truth["image"])
    ind = cand[cand.kind == "individual"]
    assert ind.groupby("query")["rank"].max().max() <= 12
    known = truth[~truth.is_new.astype(bool)]
    hits = [
        t in set(ind.loc[ind["query"] == q, "individual_id"])
        for q, t in zip(known.image, known.individual_id, strict=True)
    ]
    n_ids = train.individual_id.nunique()
    print(
        f"top-12 hit rate on known test animals: {np.mean(hits):.3f} "
        f"({len(hits)} photos, {n_ids} individuals)"
    )
    html = page.read_text()
    assert html.count('class="cell query"') == len(truth) and "data:image/jpeg" in html

    # the batch joins the catalogue (unlabelled); its stored vectors give, by brute force, the same
    # candidates as identify did: same embedding, same ranking
    cli("add", synth_set / "test_images", "-c", folder)
    with Catalogue.open(folder) as cat:
        vecs, labels = np.array(cat.vectors()), cat.labels()
        row_of = {n: r for r, n in cat.db.execute("SELECT row, name FROM photos")}
    gal = np.flatnonzero(labels != None)  # noqa: E711 - an object array
    for q in truth.image:
        cos = vecs[gal] @ vecs[row_of[q]]
        best = pd.Series(cos).groupby(labels[gal]).max().sort_values(ascending=False, kind="stable")[:12]
        got = ind[ind["query"] == q]
        assert np.allclose(got.cosine.to_numpy(), best.to_numpy(), atol=1e-4)
        assert set(got.individual_id[np.abs(got.cosine.to_numpy() - best.iloc[-1]) > 1e-4]) <= set(best.index)

    # a person decides; the export is exactly the train labels plus those decisions
    expect = dict(zip(train.image, train.individual_id, strict=True))
    for row in truth.itertuples():
        if row.is_new:
            if row.true_individual_id in set(expect.values()):
                cli("confirm", row.image, row.true_individual_id, "-c", folder, "--who", "ann")
            else:
                cli("new", row.image, "--id", row.true_individual_id, "-c", folder, "--who", "ann")
        else:
            cli("confirm", row.image, row.individual_id, "-c", folder, "--who", "bob")
        expect[row.image] = row.true_individual_id
    cli("export", tmp_path / "next_train.csv", "-c", folder)
    got = pd.read_csv(tmp_path / "next_train.csv")
    assert dict(zip(got.image, got.individual_id, strict=True)) == expect
    assert (folder / "photos" / got.image[0]).is_file()
    stats = json.loads(cli("stats", "-c", folder, "--json"))
    assert stats["unlabelled"] == 0 and stats["labelled"] == len(expect)
    hist = cli("history", "-c", folder)
    assert "confirm" in hist and "ann" in hist and "bob" in hist
    assert "undid" in cli("undo", "-c", folder)


def test_the_model_is_pinned_until_a_rebuild(tiny_models, synth_set, tmp_path):
    folder = tmp_path / "cat"
    cli("init", folder, "--model", tiny_models[0])
    names = sorted(p.name for p in (synth_set / "train_images").iterdir())[:6]
    cli("add", *[synth_set / "train_images" / n for n in names], "-c", folder)
    cli("new", names[0], "--id", "solo", "-c", folder)
    before = np.array(Catalogue.open(folder).vectors())
    other = tmp_path / "more"
    other.mkdir()
    (other / "x.jpg").write_bytes(
        (
            synth_set / "test_images" / sorted(p.name for p in (synth_set / "test_images").iterdir())[0]
        ).read_bytes()
    )
    r = CliRunner().invoke(
        app, ["catalogue", "add", str(other), "-c", str(folder), "--model", str(tiny_models[1])]
    )
    assert r.exit_code == 2 and "catalogue rebuild" in r.output and "Traceback" not in r.output
    assert "rebuilt 6 photos" in cli("rebuild", "--model", tiny_models[1], "-c", folder)
    with Catalogue.open(folder) as cat:
        after = np.array(cat.vectors())
        assert dec.labelled_rows(cat) == [(names[0], "", "solo")]
    assert after.shape == before.shape and not np.allclose(after, before)
    cli("add", other, "-c", folder)  # the new model is now the pinned one


def test_an_undecodable_photo_is_named_and_nothing_is_added(tiny_models, tmp_path, synth_set):
    folder = tmp_path / "cat"
    cli("init", folder, "--model", tiny_models[0])
    photos = tmp_path / "batch"
    photos.mkdir()
    good = sorted((synth_set / "train_images").iterdir())[0]
    (photos / "good.jpg").write_bytes(good.read_bytes())
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    r = CliRunner().invoke(app, ["catalogue", "add", str(photos), "-c", str(folder)])
    assert r.exit_code == 2 and "broken.jpg" in r.output and "Traceback" not in r.output
    assert json.loads(cli("stats", "-c", folder, "--json"))["photos"] == 0


def test_calibration_is_cached_until_the_labelled_photos_change_by_more_than_5_percent(tmp_path, monkeypatch):
    import whalesub.catalogue.identify as ident

    rng = np.random.default_rng(9)
    centres = animals(rng, 60)
    cat = labelled_catalogue(tmp_path / "c", rng, centres, 40, 3, 0.8)
    fits = []
    real = ident.fit_calibration
    monkeypatch.setattr(ident, "fit_calibration", lambda *a, **k: fits.append(1) or real(*a, **k))
    first, _ = calibration_of(cat, load_gallery(cat))
    dec.new(cat, "a0_0.jpg", None, "t")  # one decision: the cached fit stays
    again, _ = calibration_of(cat, load_gallery(cat))
    assert len(fits) == 1 and again.to_json() == first.to_json()
    calibration_of(cat, load_gallery(cat), new_share=0.3)  # another prior: refit
    v = np.concatenate([photos_of(rng, centres, a, 3, 0.8) for a in range(40, 60)])
    add_vectors(
        cat,
        new_photos(v, [f"n{i}.jpg" for i in range(len(v))], [f"new{i // 3}" for i in range(len(v))]),
        v,
        "t",
    )  # 60 more labelled photos (+50%): refit
    calibration_of(cat, load_gallery(cat), new_share=0.3)
    assert len(fits) == 3
