"""Issue 14's guards: OOF fingerprints, reuse keyed on image files, stale result files, de-duplicated
folds, one species rule, the per-species plateau rule, degenerate public boxes, one writer per output.

Everything runs on data made here (tiny PNGs, hand-made vectors, one tiny exported network for the
two-process embed tests); no training.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.core.errors import ConfigError, DataError, WriteError
from whalesub.core.locks import BusyError, lock_path, output_lock, read_holder
from whalesub.data.boxes import convert_boxes
from whalesub.data.contract import individual_species, read_boxes, read_train_csv
from whalesub.ranking.rank import NEW
from whalesub.ranking.store import combined_fingerprint, load_embeddings, save_embeddings
from whalesub.ranking.threshold import parse_grid, plateau_choice, tune_per_species
from whalesub.workflows import predict as predict_mod
from whalesub.workflows.oof import tune_runs_or_files
from whalesub.workflows.submit import load_ranking_inputs

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def unit(rng, n: int, d: int = 8) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_pngs(folder: Path, names, seed: int = 0, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)
    return folder


# --- a small hand-made data set: 3 individuals, 6 train images, 4 test images ------------------------------
TRAIN = ["t0.png", "t1.png", "t2.png", "t3.png", "t4.png", "t5.png"]
IDS = ["ida", "ida", "idb", "idb", "idc", "idc"]
TEST = ["q0.png", "q1.png", "q2.png", "q3.png"]


@pytest.fixture
def small(tmp_path) -> SimpleNamespace:
    train_csv = tmp_path / "train.csv"
    pd.DataFrame({"image": TRAIN, "species": ["s"] * 6, "individual_id": IDS}).to_csv(train_csv, index=False)
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"image": TEST, "individual_id": ["ida", "idb", "new_individual", "idc"]}).to_csv(truth,
                                                                                                   index=False)
    return SimpleNamespace(root=tmp_path, train_csv=train_csv, truth=truth,
                           train_images=write_pngs(tmp_path / "train_images", TRAIN, 1),
                           test_images=write_pngs(tmp_path / "test_images", TEST, 2))


def fake_export(folder: Path, fingerprint: str, source: Path | None = None) -> Path:
    """An export folder as predict reads it (only export.json: reused as is, never run here)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "export.json").write_text(json.dumps({"fingerprint": fingerprint,
                                                    "source": str(source or "")}), encoding="utf-8")
    return folder


def fake_fold(fold: Path, fingerprint: str, seed: int = 0) -> Path:
    """A fold folder with the three out-of-fold files (gallery t0-t3, queries t4, t5 = new)."""
    rng = np.random.default_rng(seed)
    fold.mkdir(parents=True, exist_ok=True)
    save_embeddings(fold / "oof_gallery.npz", TRAIN[:4], unit(rng, 4), {"fingerprint": fingerprint})
    save_embeddings(fold / "oof_embeddings.npz", TRAIN[4:], unit(rng, 2), {"fingerprint": fingerprint})
    pd.DataFrame({"image": TRAIN[4:], "individual_id": ["new_individual"] * 2}).to_csv(
        fold / "oof_labels.csv", index=False)
    return fold


def fake_embedding(calls: list):
    """Stand-in for ensure_embedding's run_embed: random vectors of the listed images, counted."""
    from whalesub.embedding.loader import list_images

    def run(models, out, options, images=None, listing=None, boxes=None, runner=None):
        names, _ = list_images(images, listing)
        calls.append((out.name, list(names)))
        fp = combined_fingerprint([SimpleNamespace(fingerprint=predict_mod.export_fingerprint(m))
                                   for m in models])
        ids = np.repeat(names, 2 if options.flip_views else 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_embeddings(out, ids, unit(np.random.default_rng(len(calls)), len(ids)), {"fingerprint": fp})
        return out

    return run


# --- 1. OOF fingerprints -------------------------------------------------------------------------------
def test_predict_refuses_oof_files_of_another_model(small, monkeypatch):
    fold = fake_fold(small.root / "run" / "fold0", "fp-of-the-oof-model")
    export = fake_export(small.root / "exp", "fp-of-the-exported-model", fold / "best.pt")
    args = dict(models=[export], train_csv=small.train_csv, train_images=small.train_images,
                test_images=small.test_images, out=small.root / "out", grid="0:1:0.1")
    with pytest.raises(ConfigError) as err:
        predict_mod.predict(**args)
    msg = str(err.value)
    assert f"fold {fold}" in msg and "fp-of-the-oof-model" in msg and "fp-of-the-exported-model" in msg
    r = runner.invoke(app, ["predict", "--model", str(export), "--train-csv", str(small.train_csv),
                            "--train-images", str(small.train_images), "--test-images",
                            str(small.test_images), "--out", str(small.root / "out")])
    assert r.exit_code == 2 and r.output.startswith("error: fold ") and "Traceback" not in r.output
    # the same fingerprint passes the check and goes on to the embeddings
    fake_export(export, "fp-of-the-oof-model", fold / "best.pt")
    reached = []
    monkeypatch.setattr(predict_mod, "ensure_embedding", lambda *a, **k: reached.append(1) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        predict_mod.predict(**args)
    assert reached == [1]
    # a fixed threshold does not use the OOF files: no check
    fake_export(export, "fp-of-the-exported-model", fold / "best.pt")
    reached.clear()
    with pytest.raises(ZeroDivisionError):
        predict_mod.predict(**args, threshold=0.5)
    assert reached == [1]


# --- 2. reuse keyed on the image files -------------------------------------------------------------------
def test_a_photo_replaced_in_place_is_embedded_again(small, monkeypatch):
    calls: list = []
    monkeypatch.setattr(predict_mod, "run_embed", fake_embedding(calls))
    export = fake_export(small.root / "exp", "fp-a")
    out = small.root / "out" / "gallery.npz"
    options = predict_mod.EmbedOptions(tta="none", flip_views=True)

    def ensure():
        return predict_mod.ensure_embedding([export], out, options, small.train_images, small.train_csv, None)

    ensure()
    ensure()
    assert len(calls) == 1  # unchanged: reused
    photo = small.train_images / "t3.png"
    before = photo.stat()
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(photo)  # another photo under the same name
    os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))  # taken later
    ensure()
    assert len(calls) == 2 and calls[1][1] == TRAIN
    ensure()
    assert len(calls) == 2
    os.utime(photo, ns=(before.st_atime_ns, before.st_mtime_ns + 4_000_000_000))  # same size, touched
    ensure()
    assert len(calls) == 3


# --- 3. stale result files -------------------------------------------------------------------------------
def test_a_rerun_leaves_no_result_file_of_the_previous_run(small, monkeypatch):
    calls: list = []
    monkeypatch.setattr(predict_mod, "run_embed", fake_embedding(calls))
    export = fake_export(small.root / "exp", "fp-a")
    out = small.root / "out"
    common = dict(models=[export], train_csv=small.train_csv, train_images=small.train_images,
                  test_images=small.test_images, out=out, threshold=0.2)
    predict_mod.predict(**common, truth=small.truth)
    score = json.loads((out / "score.json").read_text())
    from whalesub.ranking.submission import score_submission

    assert score["map5"] == pytest.approx(score_submission(out / "submission.csv", small.truth)["map5"],
                                          abs=1e-12)
    for name in ("tune.json", "report.html"):  # as an earlier pooled run with --report left them
        (out / name).write_text("{}", encoding="utf-8")
    predict_mod.predict(**{**common, "threshold": 0.9})  # no truth now, a fixed threshold
    left = sorted(p.name for p in out.iterdir() if p.is_file())
    assert left == ["decision.json", "gallery_labels.csv", "predict.json", "submission.csv"]
    assert len(calls) == 2  # the embeddings were reused


# --- 4. tune --run counts each fold once -----------------------------------------------------------------
def test_tune_run_counts_a_fold_given_twice_once(small):
    run = small.root / "run"
    fake_fold(run / "fold0", "fp0", seed=0)
    fake_fold(run / "fold1", "fp1", seed=1)
    kw = dict(gallery=None, queries=None, truth=None, train_csv=small.train_csv, grid="0:1:0.1",
              target_new_share=None, k=10)
    once = tune_runs_or_files([run], **kw)
    alias = small.root / "alias"
    alias.symlink_to(run / "fold1")
    twice = tune_runs_or_files([run, run / "fold0", alias], **kw)
    assert once["n"] == 4 and twice["n"] == 4  # 2 queries per fold
    assert [f["fold"] for f in twice["folds"]] == [str(run / "fold0"), str(run / "fold1")]
    assert pd.DataFrame(twice["table"]).equals(pd.DataFrame(once["table"]))  # NaN known MAP@5 included


# --- 5. one species rule ---------------------------------------------------------------------------------
def test_individual_species_is_the_most_frequent_with_ties_alphabetical():
    train = pd.DataFrame({"image": [f"{i}.jpg" for i in range(9)],
                          "individual_id": ["x", "x", "x", "y", "y", "z", "z", "z", "w"],
                          "species": ["orca", "orca", "beluga", "minke", "fin", "", "", "sei", ""]})
    got = individual_species(train).to_dict()
    # x: orca 2 vs beluga 1 (its last row says beluga); y: a tie, alphabetical; z: the only named one
    assert got == {"w": "", "x": "orca", "y": "fin", "z": "sei"}


def test_report_and_thresholds_use_the_same_species(small, tmp_path):
    """Individual ida's rows say beluga, beluga, orca (last row orca): both must say beluga."""
    rng = np.random.default_rng(5)
    train = pd.DataFrame({"image": ["a0.png", "a1.png", "a2.png", "b0.png"], "individual_id":
                          ["ida", "ida", "ida", "idb"], "species": ["beluga", "beluga", "orca", "minke"]})
    train_csv = tmp_path / "train2.csv"
    train.to_csv(train_csv, index=False)
    g = unit(rng, 4)
    gallery = save_embeddings(tmp_path / "g.npz", train["image"].tolist(), g, {"fingerprint": "f"})
    queries = save_embeddings(tmp_path / "q.npz", ["qa.png", "qb.png"], g[[0, 3]], {"fingerprint": "f"})
    truth = tmp_path / "truth2.csv"
    pd.DataFrame({"image": ["qa.png", "qb.png"], "individual_id": ["ida", "idb"]}).to_csv(truth, index=False)
    data = load_ranking_inputs(gallery, queries, train_csv)
    assert dict(zip(data["classes"], data["class_species"], strict=True)) == {"ida": "beluga", "idb": "minke"}
    from whalesub.report.build import write_report

    r = write_report(tmp_path / "r.html", gallery, queries, train_csv, truth=truth, threshold=0.5,
                     progress=False)
    assert sorted(s["species"] for s in r["species"]) == ["beluga", "minke"]
    assert read_train_csv(train_csv)["species"].iloc[2] == "orca"  # the last row really says orca


# --- 6. per-species plateau rule -------------------------------------------------------------------------
def plateau_case():
    """Species "a" (30 queries): known, top candidate right at cosine 0.9: MAP@5 1.0 for every
    threshold <= 0.9 (a plateau). Species "b" (10 queries): 5 new animals whose best is 0.31 and 5 known
    at 0.33: only thresholds in (0.31, 0.33] score 1.0, so the global best of grid 0:1:0.02 is 0.32."""
    n_a, n_b = 30, 10
    labels = np.full((n_a + n_b, 5), -1, np.int64)
    scores = np.full((n_a + n_b, 5), -np.inf, np.float32)
    labels[:n_a, :2] = [0, 1]
    scores[:n_a, :2] = [0.9, 0.1]
    labels[n_a:, :2] = [2, 3]
    scores[n_a:n_a + 5, :2] = [0.31, 0.05]
    scores[n_a + 5:, :2] = [0.33, 0.05]
    truth = np.concatenate([np.zeros(n_a, np.int64), np.full(5, NEW), np.full(5, 2)])
    return labels, scores, truth, np.array(["a", "a", "b", "b"])


def test_per_species_plateau_keeps_the_value_nearest_the_global_threshold():
    labels, scores, truth, species = plateau_case()
    res = tune_per_species(labels, scores, truth, species, parse_grid("0:1:0.02"), k0=20.0)
    assert res["global"] == pytest.approx(0.32)
    a, b = res["species"]["a"], res["species"]["b"]
    # hand-worked: "a" scores 1.0 on [0, 0.9] including 0.32, so it stays at the global threshold
    # (the first grid value would give 0.6 * 0.0 + 0.4 * 0.32 = 0.128)
    assert a["raw_threshold"] == pytest.approx(0.32) and a["threshold"] == pytest.approx(0.32)
    assert a["map5_raw"] == 1.0 and a["map5_global"] == 1.0
    assert b["raw_threshold"] == pytest.approx(0.32) and b["map5_raw"] == 1.0
    assert res["map5_per_species"] == pytest.approx(1.0)


def test_plateau_choice_nearest_then_lower():
    t = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    assert plateau_choice([1, 1, 1, 1, 1], t, 0.25) == 2  # 0.2 and 0.3 equally near: the lower
    assert plateau_choice([1, 1, 0.5, 1, 1], t, 0.2) == 1
    assert plateau_choice([0.2, 0.9, 0.5, 0.9 - 1e-15, 0.1], t, 0.3) == 3  # equal within 1e-12
    assert plateau_choice([0.2, 0.9, 0.5, 0.8, 0.1], t, 0.3) == 1  # a real best is kept
    assert plateau_choice([1, 1, 1, 1, 1], t, 5.0) == 4


# --- public box files: degenerate boxes ------------------------------------------------------------------
def charm_file(path: Path, n: int = 40, bad_at: int = 17) -> Path:
    """A backfin_test_charm.csv-like file: n YOLOv5 boxes, the one of row ``bad_at`` has y1 = y2."""
    rows = []
    for i in range(n):
        y2 = 300 if i == bad_at else 400 + i
        rows.append({"bbox": f"[[ {100 + i}  300 {900 + i} {y2}]]", "conf": f"[0.{50 + i}]", "height": 1200,
                     "image": f"{i:04d}.jpg", "image_id": f"{i:04d}", "predictions": "x", "width": 1600})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_degenerate_box_is_reported_and_that_image_embedded_whole(tmp_path, caplog):
    src = charm_file(tmp_path / "backfin_test_charm.csv")
    out = tmp_path / "boxes.csv"
    s = convert_boxes(src, out, "fin")
    assert s["degenerate"] == 1 and s["degenerate_lines"] == [19]  # header line 1, row 17 -> line 19
    table = read_boxes(out)
    assert len(table) == 39 and "0017.jpg" not in set(table["image"])  # no box: embedded whole
    want = {f"{i:04d}.jpg": (100 + i, 300, 900 + i, 400 + i) for i in range(40) if i != 17}
    got = {r.image: (r.x1, r.y1, r.x2, r.y2) for r in table.itertuples()}
    assert got == want
    assert "line 19" in caplog.text
    convert = ["boxes", "convert", str(src), "--box-type", "fin", "--out"]
    r = runner.invoke(app, [*convert, str(tmp_path / "b2.csv")])
    assert r.exit_code == 0 and "1 degenerate (left out, embedded whole; line 19)" in r.output, r.output
    r = runner.invoke(app, [*convert, str(tmp_path / "b3.csv"), "--strict"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "line 19" in r.output
    assert not (tmp_path / "b3.csv").exists()
    with pytest.raises(DataError, match="1 box"):
        convert_boxes(src, tmp_path / "b4.csv", "fin", strict=True)


# --- one writer per output -------------------------------------------------------------------------------
def test_lock_is_reentrant_names_its_holder_and_leaves_nothing(tmp_path):
    out = tmp_path / "x.npz"
    lock = lock_path(out)
    assert lock == tmp_path / ".x.npz.lock"
    with output_lock(out) as held:
        assert held == lock and read_holder(lock)["pid"] == os.getpid()
        assert read_holder(lock)["host"] == socket.gethostname()
        with output_lock(out):  # the same process again (predict's CLI, then predict)
            pass
        assert lock.exists()
    assert not lock.exists()
    with pytest.raises(RuntimeError), output_lock(out):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), output_lock(tmp_path / "new" / "deeper" / "x.npz"):
        raise RuntimeError("bad arguments")  # the folders the lock made for its file go again
    assert list(tmp_path.iterdir()) == []
    with output_lock(tmp_path / "new" / "deeper" / "x.npz"):
        (tmp_path / "new" / "deeper" / "x.npz").write_text("the output")
    assert [p.name for p in (tmp_path / "new" / "deeper").iterdir()] == ["x.npz"]
    (tmp_path / "a_file").write_text("")
    under_a_file = tmp_path / "a_file" / "x.npz"
    with pytest.raises(WriteError, match="cannot write .*a_file/x.npz"), output_lock(under_a_file):
        pass


def test_waiting_for_the_other_writer(tmp_path):
    out = tmp_path / "x.csv"
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = start(HOLDER, out, ready, go, tmp_path=tmp_path)
    try:
        wait_for(ready, holder)
        with pytest.raises(BusyError, match=r"\(waited 0.[0-9] s\)"), output_lock(out, wait=0.3, poll=0.1):
            pass
        go.touch()  # the other writer finishes within the wait
        with output_lock(out, wait=60, poll=0.05):
            assert read_holder(lock_path(out))["pid"] == os.getpid()
    finally:
        go.touch()
        holder.wait(60)
    assert not lock_path(out).exists()


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from whalesub.core.locks import output_lock
    with output_lock(sys.argv[1]):
        Path(sys.argv[2]).touch()
        while not Path(sys.argv[3]).exists():
            time.sleep(0.05)
""")


def child_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def start(script: str, *args, tmp_path: Path) -> subprocess.Popen:
    """Run ``script`` in a child process (the first writer)."""
    path = tmp_path.parent / f"{tmp_path.name}_script_{abs(hash(script)) % 10**8}.py"
    path.write_text(script, encoding="utf-8")
    return subprocess.Popen([sys.executable, str(path), *map(str, args)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the first process ended early: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the first process never got there")
        time.sleep(0.05)


def whalesub_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """The second writer: the real command line in its own process."""
    return subprocess.run([sys.executable, "-m", "whalesub.cli", *map(str, args)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_busy_line(r, pid: int, out: Path) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert f"process {pid} on host {socket.gethostname()}" in errors[0] and str(out) in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("command", [
    ["submit", "--gallery", "g.npz", "--queries", "q.npz", "--train-csv", "t.csv", "--threshold", "0.5"],
    ["predict", "--model", "m", "--train-csv", "t.csv", "--train-images", "i", "--test-images", "j"],
    ["blend", "--table", "c.csv", "--weight", "1", "--threshold", "0.5"],
    ["boxes", "convert", "src.csv", "--box-type", "fin"],
])
def test_a_second_writer_of_the_same_output_stops_with_one_line(tmp_path, command):
    out = tmp_path / "same_output"
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = start(HOLDER, out, ready, go, tmp_path=tmp_path)
    try:
        wait_for(ready, holder)
        r = whalesub_cli(*command, "--out", out)
        assert "lock file" in one_busy_line(r, holder.pid, out)
        with pytest.raises(BusyError, match=f"process {holder.pid} on host"):  # in-process too
            with output_lock(out):
                pass
    finally:
        go.touch()
        holder.wait(60)
    assert holder.returncode == 0
    assert not lock_path(out).exists() and not out.exists()  # nothing left behind by either


PAUSED_EMBED = textwrap.dedent("""
    # `whalesub embed` that pauses just before its first chunk lands: ready file, then waits for go
    import os, sys, time
    ready, go = sys.argv[1], sys.argv[2]
    real = os.replace
    def paused(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == "chunk_000000.npz" and not os.path.exists(go):
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.05)
        return real(src, dst, *a, **k)
    os.replace = paused
    sys.argv = ["whalesub", *sys.argv[3:]]
    from whalesub.cli import app
    app()
""")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    from test_export import export_tiny, make_checkpoint

    root = tmp_path_factory.mktemp("lockmodel")
    return export_tiny(make_checkpoint(root / "a" / "best.pt", "test_efficientnet", 32, seed=0), root / "exp")


def embed_args(model: Path, images: Path, out: Path) -> list:
    return ["embed", "--model", model, "--images", images, "--out", out, "--device", "cpu", "--batch-size",
            "2", "--chunk", "2", "--workers", "0", "--tta", "none"]


def test_two_embeds_on_the_same_out(tiny_export, tmp_path):
    """The second `whalesub embed` stops with one line naming the first; the first finishes untouched."""
    images = write_pngs(tmp_path / "imgs", [f"{i}.png" for i in range(6)], seed=3)
    out = tmp_path / "emb" / "x.npz"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = start(PAUSED_EMBED, ready, go, *embed_args(tiny_export, images, out), tmp_path=tmp_path)
    try:
        wait_for(ready, first)
        second = whalesub_cli(*embed_args(tiny_export, images, out))
        one_busy_line(second, first.pid, out)
        assert "No such file" not in second.stderr
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.npz"]  # no parts, temporaries or lock left
    ref = tmp_path / "ref" / "x.npz"
    assert whalesub_cli(*embed_args(tiny_export, images, ref)).returncode == 0
    a, b = load_embeddings(out), load_embeddings(ref)
    assert a.ids.tolist() == b.ids.tolist() and np.array_equal(a.vectors, b.vectors)


def test_a_killed_writer_lock_is_taken_over_and_a_changed_photo_refuses_its_chunks(tiny_export, tmp_path):
    images = write_pngs(tmp_path / "imgs", [f"{i}.png" for i in range(6)], seed=4)
    out = tmp_path / "emb" / "x.npz"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = start(PAUSED_EMBED, ready, go, *embed_args(tiny_export, images, out), tmp_path=tmp_path)
    wait_for(ready, first)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert lock_path(out).exists() and read_holder(lock_path(out))["pid"] == first.pid  # left by the dead
    photo = images / "1.png"
    st = photo.stat()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photo)
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    r = whalesub_cli(*embed_args(tiny_export, images, out))  # past the dead writer's lock, then the key
    assert r.returncode == 2 and "image_files" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not lock_path(out).exists()
    parts = out.parent / "x.npz.parts"
    import shutil

    shutil.rmtree(parts)
    r = whalesub_cli(*embed_args(tiny_export, images, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.npz"]


def test_a_lock_held_only_by_a_dead_holders_forked_worker_is_taken_over(tmp_path):
    """A killed writer's decoding workers (forked: they inherit the locked descriptor) keep the flock
    until they notice; the holder named in the lock file is dead, so the next writer takes it over."""
    out = tmp_path / "x.npz"
    code = textwrap.dedent(f"""
        import os, sys, time
        from whalesub.core.locks import output_lock
        with output_lock({str(out)!r}):
            child = os.fork()
            if child == 0:  # a worker process: sleeps holding the inherited descriptor
                time.sleep(120)
                os._exit(0)
            print(child, flush=True)
            time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(BusyError, match=str(holder.pid)), output_lock(out):
            pass  # the holder is alive: busy
        holder.kill()
        holder.wait(timeout=30)
        os.kill(child, 0)  # the worker still lives and still holds the flock of the old lock file
        with output_lock(out) as lock:
            assert read_holder(lock)["pid"] == os.getpid()
        assert not lock_path(out).exists()
    finally:
        holder.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
