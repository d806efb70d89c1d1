"""Faults lose nothing: SIGKILL at chosen points of `whalesub embed / export / submit / tune` and of
training, then a rerun of the same command ends with the uninterrupted run's output; a full disk
(a file-size limit, or a tiny tmpfs when this user may mount one) is one named error, exit 2, no
traceback, and the previous file under the final name stays as it was.

Every command runs as a child process (tests/fault_hooks.py) that kills itself with SIGKILL at a
point of its own sequence of writes: in the middle of writing a temporary file (after a number of
bytes drawn from a seeded generator) or just before the rename onto a final name. The points are
therefore the same on every machine and the tests cannot be flaky. Data: a generated set of 12
animals; models: test_efficientnet at 32-48 px.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fault_hooks import run
from test_export import export_tiny, make_checkpoint
from test_train import assert_same_tensors, base_args, run_inprocess, state_dicts

from whalesub.core.errors import WhalesubError
from whalesub.embedding.embed import EmbedOptions, run_embed
from whalesub.models.export import export_model
from whalesub.ranking.store import load_embeddings, save_embeddings
from whalesub.workflows.submit import submit_files, tune_files

SEED = 7  # the byte offsets of the mid-write kills are drawn from it
pytestmark = pytest.mark.usefixtures("restore_torch_state")  # in-process training sets global state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from whalesub.synth import make_dataset

    out = tmp_path_factory.mktemp("faults") / "data"  # 42 train images of 12 animals, 15 test images
    make_dataset(out, seed=3, n_individuals=12, singleton_share=0.3, progress=False)
    return out


@pytest.fixture(scope="module")
def vectors(data, tmp_path_factory) -> dict:
    """Gallery (train images) and query (test images) files of seeded random unit vectors."""
    root = tmp_path_factory.mktemp("vectors")
    rng = np.random.default_rng(SEED)
    out = {}
    for name, csv in (("gallery", "train.csv"), ("queries", "sample_submission.csv")):
        ids = pd.read_csv(data / csv, dtype=str)["image"].tolist()
        v = rng.standard_normal((len(ids), 16)).astype(np.float32)
        out[name] = save_embeddings(root / f"{name}.npz", ids, v / np.linalg.norm(v, axis=1, keepdims=True),
                                    {"fingerprint": "random-16"})
    return out


def killed(fault: dict, target: str, *args) -> None:
    """Run under ``fault`` and check that the process really died by SIGKILL at that point."""
    r = run(fault, target, *args)
    assert r.returncode == -signal.SIGKILL, (
        f"{fault} was not reached (exit {r.returncode}): {r.stderr[-2000:]}")


def finished(target: str, *args, fsize: int | None = None) -> subprocess.CompletedProcess:
    r = run(None, target, *args, fsize=fsize)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def out_of_disk(target: str, *args, fsize: int, names: Path) -> str:
    """Run with writes limited to ``fsize`` bytes a file; expect one error naming ``names``, exit 2."""
    r = run(None, target, *args, fsize=fsize)
    assert r.returncode == 2, f"exit {r.returncode}: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert f"cannot write {names}" in errors[0] and "File too large" in errors[0], errors[0]
    return errors[0]


def offset(size: int) -> int:
    """A seeded byte offset inside a file of ``size`` bytes: where a mid-write kill strikes."""
    return int(np.random.default_rng([SEED, size]).integers(1, size))


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_embeddings(a: Path, b: Path) -> None:
    """Bit-identical ids and vectors, same meta apart from the creation time."""
    x, y = load_embeddings(a), load_embeddings(b)
    assert x.ids.tolist() == y.ids.tolist()
    assert x.vectors.dtype == y.vectors.dtype and np.array_equal(x.vectors, y.vectors)
    x.meta.pop("created"), y.meta.pop("created")
    assert x.meta == y.meta


def test_next_write_removes_only_the_temporaries_of_gone_writers_on_this_host(tmp_path):
    from whalesub.core.atomic import _host_tag, atomic_write_text

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = _host_tag()
    stale = f".a.csv.{gone.pid}@{host}.abcdefgh.tmp.csv"
    kept = [f".a.csv.{os.getpid()}@{host}.abcdefgh.tmp.csv",  # a live writer (this process)
            f".a.csv.{gone.pid}@00000000.abcdefgh.tmp.csv",  # another host's writer: cannot tell
            f".b.csv.{gone.pid}@{host}.abcdefgh.tmp.csv",  # another file's temporary
            ".a.csv.parts", "a.csv.bak"]
    for name in [stale, *kept]:
        (tmp_path / name).write_text("x")
    atomic_write_text(tmp_path / "a.csv", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "a.csv"])


# --- submit and tune ----------------------------------------------------------------------------------
def test_submit_killed_or_out_of_disk_keeps_old_file_and_rerun_is_identical(data, vectors, tmp_path):
    out = tmp_path / "sub" / "submission.csv"
    common = dict(sample=data / "sample_submission.csv", progress=False)
    ref = submit_files(vectors["gallery"], vectors["queries"], data / "train.csv", 0.2, tmp_path / "ref.csv",
                       **common)["out"]
    submit_files(vectors["gallery"], vectors["queries"], data / "train.csv", 0.9, out, **common)  # older one
    old, want = out.read_bytes(), Path(ref).read_bytes()
    assert old != want
    args = ["submit", "--gallery", vectors["gallery"], "--queries", vectors["queries"], "--train-csv",
            data / "train.csv", "--threshold", "0.2", "--out", out, "--sample",
            data / "sample_submission.csv"]
    killed({"kind": "write", "name": out.name, "bytes": offset(len(want))}, "whalesub", *args)
    assert out.read_bytes() == old  # the torn temporary file never took the final name
    killed({"kind": "replace", "name": out.name}, "whalesub", *args)
    assert out.read_bytes() == old
    # one hidden temporary left: the second writer removed the first one's when it began; the killed
    # writer's lock file stays too (the next writer takes it over and removes it when done)
    assert sorted(p.name.endswith(".lock") for p in out.parent.iterdir()) == [False, False, True]
    out_of_disk("whalesub", *args, fsize=len(want) // 2, names=out)
    assert out.read_bytes() == old
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # stale and own temporaries removed
    finished("whalesub", *args)
    assert out.read_bytes() == want
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_tune_killed_then_rerun_prints_the_same_and_writes_nothing(data, vectors, tmp_path):
    truth = data / "test_truth.csv"
    args = ["tune", "--gallery", vectors["gallery"], "--queries", vectors["queries"], "--train-csv",
            data / "train.csv", "--truth", truth, "--json", "--target-new-share", "0.2"]
    killed({"kind": "call", "name": "whalesub.workflows.submit.tune_arrays"}, "whalesub", *args)
    want = tune_files(vectors["gallery"], vectors["queries"], data / "train.csv", truth,
                      target_new_share=0.2, progress=False)
    # tune writes no file: with every write limited to 0 bytes it still succeeds
    r = finished("whalesub", *args, fsize=0)
    assert json.loads(r.stdout) == json.loads(json.dumps(want))


def test_submit_on_a_full_tmpfs_keeps_old_file(data, vectors, tmp_path):
    """A real full file system (ENOSPC) where this user may mount a tmpfs (root); skipped otherwise."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: cannot make a tiny tmpfs")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        out = mnt / "submission.csv"
        submit_files(vectors["gallery"], vectors["queries"], data / "train.csv", 0.9, out,
                     sample=data / "sample_submission.csv", progress=False)
        old = out.read_bytes()
        filler = mnt / "filler.bin"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk up
            while True:
                os.write(fd, b"\0" * 512)
        except OSError:
            pass
        finally:
            os.close(fd)
        r = run(None, "whalesub", "submit", "--gallery", vectors["gallery"], "--queries", vectors["queries"],
                "--train-csv", data / "train.csv", "--threshold", "0.2", "--out", out)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"cannot write {out}" in r.stderr and "No space left on device" in r.stderr, r.stderr
        assert out.read_bytes() == old and sorted(p.name for p in mnt.iterdir()) == ["filler.bin", out.name]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- embed ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("model")
    a = make_checkpoint(root / "a" / "best.pt", "test_efficientnet", 48, seed=0)
    b = make_checkpoint(root / "b" / "best.pt", "test_efficientnet", 48, seed=1)
    return {"a": a, "b": b, "export_a": export_tiny(a, root / "export_a")}


def test_embed_killed_at_every_stage_then_rerun_is_identical(data, exported, tmp_path):
    out = tmp_path / "emb" / "train.npz"
    parts = out.parent / (out.name + ".parts")
    ref = run_embed([exported["export_a"]], tmp_path / "ref" / "train.npz",
                    EmbedOptions(device="cpu", batch_size=4, chunk=8, workers=0),
                    images=data / "train_images", listing=data / "train.csv")
    save_embeddings(out, ["x.jpg"], np.eye(1, 4, dtype=np.float32), {"fingerprint": "older"})
    old = out.read_bytes()
    args = ["embed", "--model", exported["export_a"], "--list", data / "train.csv", "--images",
            data / "train_images", "--out", out, "--device", "cpu", "--batch-size", "4", "--chunk", "8",
            "--workers", "1"]  # 42 images: chunks 0-5 of 8 images

    def chunks() -> list[str]:
        names = sorted(p.name for p in parts.glob("chunk_*.npz"))
        for name in names:  # every chunk under its final name is complete
            with np.load(parts / name, allow_pickle=False) as z:
                assert 0 < len(z["positions"]) == len(z["vectors"]) <= 8
        return names

    killed({"kind": "write", "name": "chunk_000003.npz", "bytes": offset(1000)}, "whalesub", *args)
    assert chunks() == [f"chunk_00000{i}.npz" for i in range(3)] and out.read_bytes() == old
    killed({"kind": "write", "name": out.name, "bytes": offset(ref.stat().st_size)}, "whalesub", *args)
    assert len(chunks()) == 6 and out.read_bytes() == old
    out_of_disk("whalesub", *args, fsize=ref.stat().st_size // 2, names=out)
    assert len(chunks()) == 6 and out.read_bytes() == old  # the chunks stay for the rerun
    r = finished("whalesub", *args)
    assert "resuming" in r.stderr and not parts.exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporaries left behind
    same_embeddings(out, ref)


# --- export ---------------------------------------------------------------------------------------------
def test_export_killed_or_out_of_disk_keeps_old_export_and_rerun_is_identical(data, exported, tmp_path):
    out = tmp_path / "models" / "fold0"
    ref = export_model(exported["a"], tmp_path / "ref")
    export_model(exported["b"], out)  # an older export of other weights
    old, want = files(out), files(tmp_path / "ref")
    assert old["model.onnx"] != want["model.onnx"] and ref["fingerprint"] not in old["export.json"].decode()
    args = ["export", exported["a"], "--out", out]
    out_of_disk("whalesub", *args, fsize=len(want["model.onnx"]) // 2, names=f"the export folder {out}")
    assert files(out) == old
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary folders left behind
    # killed while moving the files in: every file under a final name is complete (new or old), and
    # without its export.json the half-updated folder is refused rather than used
    killed({"kind": "replace", "name": "export.json", "nth": 2}, "whalesub", *args)
    now = files(out)
    assert "export.json" not in now and all(v in (old.get(k), want[k]) for k, v in now.items())
    with pytest.raises(WhalesubError, match="not an export folder"):
        run_embed([out], tmp_path / "x.npz", EmbedOptions(device="cpu", workers=0),
                  images=data / "test_images")
    finished("whalesub", *args)
    assert files(out) == want
    assert [p.name for p in out.parent.iterdir()] == [out.name]


# --- training -------------------------------------------------------------------------------------------
def test_training_killed_or_out_of_disk_then_rerun_is_identical(data, tmp_path):
    """SIGKILL in the middle of a checkpoint write, a full disk at the next checkpoint (the previous one
    stays byte for byte), SIGKILL after the last checkpoint but before the final metrics.csv; the rerun
    ends with the uninterrupted run's weights, metrics, OOF files and folds."""
    # one epoch of 3 steps, last.pt after each step; no epoch-0 validation and no flip views (time)
    argv = base_args(data, tmp_path / "out", "r", save_every_steps=1, epochs=1, val_before_train="false",
                     tta_flip="false")
    assert run_inprocess(argv) == 0
    (tmp_path / "out").rename(tmp_path / "ref")  # the reruns use the same paths (kept in config.yaml)
    ref, fold = tmp_path / "ref" / "r", tmp_path / "out" / "r" / "fold0"
    checkpoint = (ref / "fold0" / "last.pt").stat().st_size
    small = max(p.stat().st_size for p in ref.rglob("*") if p.is_file() and p.suffix != ".pt")
    assert small * 20 < checkpoint, (small, checkpoint)  # room for train.log to grow over the reruns

    killed({"kind": "write", "name": "last.pt", "nth": 2, "bytes": offset(checkpoint)}, "train", *argv)
    assert not (fold / "best.pt").exists()
    assert state_dicts(fold / "last.pt")  # the first mid-epoch checkpoint, complete
    before = files(fold)
    out_of_disk("train", *argv, fsize=checkpoint // 2, names=fold / "last.pt")
    after = files(fold)
    assert after["last.pt"] == before["last.pt"] and "best.pt" not in after  # the previous one, unchanged
    assert not [k for k in after if k.startswith(".")]  # the killed writer's torn temporary was removed
    killed({"kind": "replace", "name": "metrics.csv"}, "train", *argv)  # after the final last.pt
    assert not (fold / "metrics.csv").exists()
    finished("train", *argv)

    for name in ("folds.csv", "config.yaml", "command.txt"):
        assert (fold.parent / name).read_bytes() == (ref / name).read_bytes(), name
    for name in ("metrics.csv", "oof_labels.csv", "model_spec.json", "config.yaml"):
        assert (fold / name).read_bytes() == (ref / "fold0" / name).read_bytes(), name
    for name in ("oof_embeddings.npz", "oof_gallery.npz"):
        same_embeddings(fold / name, ref / "fold0" / name)
    for name in ("last.pt", "best.pt"):
        assert_same_tensors(state_dicts(fold / name), state_dicts(ref / "fold0" / name))
    assert not [p for p in fold.rglob(".*")]  # no temporaries left behind
