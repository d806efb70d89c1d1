"""The error report in a real browser: Debian's headless Chromium renders it (screenshot not blank) and
loads every image (none broken), on the real nyala set and on suite-made synthetic data.

Skips when Chromium is not installed (`apt-get install chromium`; `.ci/run` installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from whalesub.cli import app
from whalesub.ranking.store import save_embeddings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install "
                                "chromium; .ci/run installs it): the report's browser check cannot run")
runner = CliRunner()
CHECK_IMAGES = ("<script>window.addEventListener('load', () => {const imgs = [...document.images];"
                "document.body.dataset.images = imgs.length;"
                "document.body.dataset.broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;"
                "});</script>")


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def check_in_browser(report: Path, tmp: Path) -> None:
    """Screenshot not blank; after load, every <img> complete with a natural width (none broken)."""
    from PIL import Image

    shot = tmp / "shot.png"
    chromium(tmp, f"--screenshot={shot}", "--window-size=1200,1600", report.resolve().as_uri())
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float32)
    assert grey.shape == (1600, 1200)
    assert grey.std() > 20, f"screenshot looks blank (pixel std {grey.std():.1f})"
    assert (np.abs(grey - np.median(grey)) > 40).mean() > 0.05  # more than a few lines of text

    html = report.read_text(encoding="utf-8")
    n_img = len(re.findall(r"<img\b", html))
    probe = tmp / "probe.html"
    probe.write_text(html.replace("</body>", CHECK_IMAGES + "</body>"), encoding="utf-8")
    dom = chromium(tmp, "--dump-dom", "--virtual-time-budget=10000", probe.resolve().as_uri()).stdout
    m = re.search(r'<body data-images="(\d+)" data-broken="(\d+)"', dom)
    assert m, "the page's load handler did not run"
    assert int(m.group(1)) == n_img > 2  # plots and thumbnails
    assert int(m.group(2)) == 0, f"{m.group(2)} broken images"


def pixel_vectors(folder: Path, names) -> np.ndarray:
    """Cheap embeddings: 16x16 RGB pixels (whalesub's decoder), centred, L2-normalised."""
    from PIL import Image

    from whalesub.data.image import load_image

    rows = [np.asarray(Image.fromarray(load_image(folder / n, target=16)).resize((16, 16)),
                       dtype=np.float32).ravel() for n in names]
    x = np.stack(rows)
    x -= x.mean(axis=1, keepdims=True)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_report_of(data: Path, truth: Path, tmp: Path, threshold: str) -> Path:
    train = pd.read_csv(data / "train.csv", dtype=str)
    tests = pd.read_csv(truth, dtype=str)["image"]
    g = save_embeddings(tmp / "g.npz", train["image"], pixel_vectors(data / "train_images", train["image"]))
    q = save_embeddings(tmp / "q.npz", tests, pixel_vectors(data / "test_images", tests))
    common = ["--gallery", str(g), "--queries", str(q), "--train-csv", str(data / "train.csv")]
    sub, out = tmp / "submission.csv", tmp / "report.html"
    res = runner.invoke(app, ["submit", *common, "--threshold", threshold, "--out", str(sub)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", *common, "--submission", str(sub), "--truth", str(truth),
                              "--images-dir", str(data / "test_images"), "--gallery-images-dir",
                              str(data / "train_images"), "--max-queries", "20", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_report_of_nyala_renders_in_chromium(nyala, tmp_path):
    out = write_report_of(nyala, nyala / "test_truth.csv", tmp_path, "0.9")
    check_in_browser(out, tmp_path)


def test_report_of_synthetic_data_renders_in_chromium(tmp_path):
    from whalesub.synth import make_dataset

    data = tmp_path / "data"
    make_dataset(data, seed=2, n_individuals=25, n_species=2, n_test=30, progress=False)
    out = write_report_of(data, data / "test_truth_full.csv", tmp_path, "0.8")
    check_in_browser(out, tmp_path)
    # the check can fail: one corrupt image is reported broken
    html = out.read_text(encoding="utf-8")
    out.write_text(re.sub(r'src="data:image/jpeg;base64,[^"]+"', 'src="data:image/jpeg;base64,AAAA"', html,
                          count=1), encoding="utf-8")
    with pytest.raises(AssertionError, match="1 broken images"):
        check_in_browser(out, tmp_path)
