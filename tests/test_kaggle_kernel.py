"""Offline rehearsal of the Kaggle kernel: fake /kaggle/input trees, no network, whalesub from its wheel.

The kernel script runs as a subprocess under ``unshare -n`` (no network at all, loopback down),
installs whalesub only from the built wheel into a ``--target`` folder, and must write the very
submission that ``whalesub embed`` + ``submit`` give in this process on the same inputs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from whalesub.kaggle.kernel_script import find_inputs, pick_input

SLUG = "happy-whale-and-dolphin"
# mount layouts seen on Kaggle (KAGGLE.md): where the competition and each dataset land
LAYOUTS = {
    "flat": {"competition": SLUG, "models": "whalesub-models", "wheels": "whalesub-wheels",
             "boxes": "whalesub-boxes"},
    "nested": {"competition": f"competitions/{SLUG}", "models": "datasets/someone/whalesub-models",
               "wheels": "datasets/someone/whalesub-wheels", "boxes": "someone/whalesub-boxes"},
}


def _unshare_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    proc = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"unshare -n is refused here: {proc.stderr.strip()}"


def mount(root: Path, layout: dict, data: Path, build: Path, skip: tuple[str, ...] = ()) -> Path:
    """A fake /kaggle/input: the competition files and the build's datasets in ``layout``."""
    sources = {"competition": data, **{k: build / k for k in ("models", "wheels", "boxes")}}
    for key, rel in layout.items():
        if key not in skip:
            hidden = shutil.ignore_patterns("test_truth*", "stats.json", "dataset-metadata.json")
            shutil.copytree(sources[key], root / rel, ignore=hidden)
    return root


def run_kernel_script(script: Path, root: Path, working: Path, target: Path, offline: bool = True):
    env = {"PATH": os.environ["PATH"], "HOME": str(working.parent), "LANG": "C.UTF-8",
           "WHALESUB_KAGGLE_INPUT": str(root), "WHALESUB_KAGGLE_WORKING": str(working),
           "WHALESUB_KAGGLE_TARGET": str(target), "PYTHONNOUSERSITE": "1"}  # no PYTHONPATH: no source tree
    cmd = (["unshare", "-n"] if offline else []) + [sys.executable, str(script)]
    return subprocess.run(cmd, cwd=working.parent, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_find_inputs_in_every_layout(kaggle_build, tmp_path, layout):
    root = mount(tmp_path / "input", LAYOUTS[layout], kaggle_build["data"], kaggle_build["build"])
    found = find_inputs(root)
    for key, kind in (("competition", "competition"), ("models", "whalesub-models"),
                      ("wheels", "whalesub-wheels"), ("boxes", "whalesub-boxes")):
        assert found[kind] == [root / LAYOUTS[layout][key]]


def test_missing_input_names_it_and_the_layouts(kaggle_build, tmp_path):
    root = mount(tmp_path / "input", LAYOUTS["nested"], kaggle_build["data"], kaggle_build["build"],
                 skip=("wheels",))
    with pytest.raises(Exception, match="wheels dataset") as err:
        pick_input(find_inputs(root), "whalesub-wheels", root)
    assert "<root>/datasets/<owner>/<slug>/" in str(err.value) and "competitions/" in str(err.value)
    # the script itself: exit 1 and one message (no install, no traceback)
    working = tmp_path / "working"
    proc = run_kernel_script(kaggle_build["build"] / "kernel" / "whalesub_kernel.py", root, working,
                             tmp_path / "site", offline=False)
    assert proc.returncode == 1 and "wheels dataset" in proc.stderr and "Traceback" not in proc.stderr
    assert not (working / "submission.csv").exists()


def test_two_copies_of_a_dataset_are_refused(kaggle_build, tmp_path):
    root = mount(tmp_path / "input", LAYOUTS["flat"], kaggle_build["data"], kaggle_build["build"])
    shutil.copytree(root / "whalesub-models", root / "someone" / "whalesub-models")
    with pytest.raises(Exception, match="mounted 2 times"):
        pick_input(find_inputs(root), "whalesub-models", root)


@pytest.mark.parametrize("layout, build", [("flat", "build"), ("nested", "build_gallery")])
def test_offline_kernel_writes_the_same_submission(kaggle_build, tmp_path, layout, build):
    """No network, whalesub from its wheel, two layouts; with and without a packaged gallery."""
    reason = _unshare_works()
    if reason:
        pytest.skip(f"offline rehearsal needs a network namespace: {reason}")
    root = mount(tmp_path / "input", LAYOUTS[layout], kaggle_build["data"], kaggle_build[build])
    working, target = tmp_path / "working", tmp_path / "site"
    proc = run_kernel_script(kaggle_build[build] / "kernel" / "whalesub_kernel.py", root, working, target)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # whalesub came from the wheel installed into the target folder, not from the source tree
    (line,) = [x for x in proc.stdout.splitlines() if "whalesub_path:" in x]
    assert line.split("whalesub_path:")[1].strip().startswith(str(target))
    steps = ["find inputs", "install wheels", "check models", "environment", "embed test images", "submit",
             "validate"] + (["embed train images"] if build == "build" else [])
    for step in steps:
        assert re.search(rf"\[whalesub\] {step}[^\n]*: \d+\.\d s", proc.stdout), step  # timed
    if build == "build_gallery":
        assert "embed train images" not in proc.stdout and "fingerprint" in proc.stdout
    assert "ort_active: ['CPUExecutionProvider']" in proc.stdout  # what the session really uses
    got = pd.read_csv(working / "submission.csv", dtype=str, keep_default_na=False)
    want = pd.read_csv(kaggle_build["reference"] / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(kaggle_build["data"] / "sample_submission.csv", dtype=str)
    assert got["image"].tolist() == sample["image"].tolist()
    new_first = want["predictions"].str.startswith("new_individual")
    assert 0 < new_first.sum() < len(want)  # the threshold matters on these rows
    pd.testing.assert_frame_equal(got, want)


def test_the_boxes_dataset_is_checked_like_the_models(kaggle_build, tmp_path):
    """A changed box table, or a boxes dataset of another build, stops the kernel before embedding."""
    import json

    from whalesub.core.errors import WhalesubError
    from whalesub.kaggle.kernel import check_boxes

    models = json.loads((kaggle_build["build"] / "models" / "manifest.json").read_text())
    version = models["whalesub_version"]
    assert models["boxes_sha256"]  # recorded by the build
    boxes = tmp_path / "boxes"
    shutil.copytree(kaggle_build["build"] / "boxes", boxes)
    assert check_boxes(boxes, models, have=version) == boxes / models["boxes_file"]
    with pytest.raises(WhalesubError, match="packaged for whalesub"):
        check_boxes(boxes, models, have="0.0.1")
    table = boxes / models["boxes_file"]
    table.write_text(table.read_text() + "\n")  # one byte more
    with pytest.raises(WhalesubError) as err:
        check_boxes(boxes, models, have=version)
    msg = str(err.value)
    assert "not the box table the models were packaged with" in msg and "does not match its sha256" in msg
    table.unlink()
    with pytest.raises(WhalesubError, match="is missing"):
        check_boxes(boxes, models, have=version)


def test_a_missing_module_is_one_line(monkeypatch, tmp_path, capsys):
    """A dependency missing on Kaggle's image (e.g. FAISS with --no-extra-wheels) names the module
    and the fix, exit status 1, no traceback."""
    from whalesub.kaggle import kernel_script

    monkeypatch.setenv("WHALESUB_KAGGLE_INPUT", str(tmp_path))
    monkeypatch.setenv("WHALESUB_KAGGLE_WORKING", str(tmp_path / "working"))
    monkeypatch.setattr(kernel_script, "find_inputs", lambda root: {"whalesub-wheels": [root]})
    monkeypatch.setattr(kernel_script, "pick_input", lambda found, kind, root, required: root)
    monkeypatch.setattr(kernel_script, "install_wheels", lambda folder, target: None)

    def no_faiss(name):
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    monkeypatch.setattr(kernel_script.importlib, "import_module", no_faiss)
    assert kernel_script.main() == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "faiss" in err and "--package" in err and "Traceback" not in err
