"""Shared test fixtures: the real data set (when present), synthetic photos that stand in for it,
and GPU detection.

Every behaviour tested on the real nyala photos also has a test on images generated here
(``synth_photos``, ``synth_big_jpeg``, ``synth_set``), so the suite proves it without the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NYALA = REPO.parent / "shared" / "data" / "nyala"
NYALA_SKIP = (f"real data set 'nyala' not found at {NYALA} (needs ../shared/data/nyala/train.csv); "
              "this real-photo check is skipped, its synthetic twin still runs")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing or broken
        return False


def pytest_report_header(config) -> str:
    found = (NYALA / "train.csv").is_file()
    return f"real data set nyala: {'found at ' + str(NYALA) if found else 'absent: its tests skip (see -ra)'}"


@pytest.fixture(scope="session")
def nyala() -> Path:
    """The real nyala set (../shared/data/nyala); tests using it skip, with the reason, when it is absent."""
    if not (NYALA / "train.csv").is_file():
        pytest.skip(NYALA_SKIP)
    return NYALA


def textured_image(width: int, height: int, seed: int) -> np.ndarray:
    """A photo-like RGB uint8 [height, width, 3]: smooth colour fields, sharp-edged shapes at several
    scales (an animal's outline, marks) and sensor noise (sigma 4 grey levels)."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(30, 220, (max(2, height // 300), max(2, width // 300), 3)).astype(np.float32)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    scale = min(width, height)
    for _ in range(14):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.uniform(0.03, 0.3) * scale), int(rng.uniform(0.02, 0.15) * scale))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    for _ in range(10):  # thin lines: fine detail that a downscaled decode must keep
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.line(img, p1, p2, colour, max(1, scale // 200), cv2.LINE_AA)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def save_jpeg(img: np.ndarray, path: Path, quality: int = 90, orientation: int | None = None) -> Path:
    """Write RGB uint8 as a JPEG, with the EXIF orientation tag (0x0112) when given."""
    from PIL import Image

    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    Image.fromarray(img).save(path, quality=quality, **kw)
    return path


#: (width, height) of the synthetic stand-ins for real photos: the first is landscape (so a missed
#: EXIF rotation changes the shape), portrait and square ones follow, all >= 256 px on each side.
SYNTH_PHOTO_SIZES = [(512, 366), (512, 486), (446, 512), (600, 400), (384, 512), (512, 512)]


@pytest.fixture(scope="session")
def synth_photos(tmp_path_factory) -> list[Path]:
    """Six photo-sized textured JPEGs (quality 90) standing in for the real photos."""
    root = tmp_path_factory.mktemp("synth_photos")
    return [save_jpeg(textured_image(w, h, seed=i), root / f"photo_{i}.jpg")
            for i, (w, h) in enumerate(SYNTH_PHOTO_SIZES)]


@pytest.fixture(scope="session")
def synth_big_jpeg(tmp_path_factory) -> Path:
    """A native 3600x2400 textured JPEG with noise (the Happywhale frame size; quality 90)."""
    return save_jpeg(textured_image(3600, 2400, seed=99), tmp_path_factory.mktemp("synth_big") / "big.jpg")


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> Path:
    """A small synthetic Happywhale-format set (train/test images, train.csv, truth files, sample
    submission, boxes.csv), the stand-in for nyala: 16 animals, none with a single photo."""
    from whalesub.synth import make_dataset

    out = tmp_path_factory.mktemp("synth_set") / "set"
    make_dataset(out, seed=5, n_individuals=16, singleton_share=0.0, max_images=8, progress=False)
    return out


@pytest.fixture(scope="session", params=["synthetic", "nyala"])
def photo_set(request) -> Path:
    """A Happywhale-format set (train_images/, test_images/, train.csv, test_truth.csv,
    test_truth_full.csv, sample_submission.csv): ``synth_set``, then nyala when it is present."""
    return request.getfixturevalue("synth_set" if request.param == "synthetic" else "nyala")


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A tiny synthetic training set (12 animals, 30% singletons) for end-to-end training runs."""
    from whalesub.synth import make_dataset

    out = tmp_path_factory.mktemp("train_synth") / "data"
    make_dataset(out, seed=3, n_individuals=12, singleton_share=0.3, progress=False)
    return out


@pytest.fixture
def restore_torch_state():
    """Undo what an in-process training run sets globally (deterministic algorithms, log level)."""
    import logging

    import torch

    level = logging.getLogger().level
    yield
    torch.use_deterministic_algorithms(False)
    logging.getLogger().setLevel(level)


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)



@pytest.fixture(scope="session")
def kaggle_build(tmp_path_factory):
    """A tiny exported model (FP32 + FP16, class centres), a small synthetic competition, the
    submission ``whalesub embed`` + ``submit`` make from them in this process (``reference``; the
    threshold puts new_individual first in half of the rows), and two Kaggle builds with that
    threshold (whalesub's wheel only, no downloads; body boxes): ``build`` (the kernel embeds the
    gallery) and ``build_gallery`` (made from the run folder, which the build exports itself, with
    the reference gallery packaged)."""
    from test_export import make_checkpoint

    from whalesub.embedding.embed import EmbedOptions, run_embed
    from whalesub.kaggle.package import BuildOptions, build_package
    from whalesub.models.export import export_model
    from whalesub.synth import make_dataset
    from whalesub.workflows.submit import submit_files

    root = tmp_path_factory.mktemp("kaggle")
    make_checkpoint(root / "run" / "best.pt", head=(["a", "b", "c"], 2))
    export, data, ref = root / "export", root / "data", root / "reference"
    export_model(root / "run", export, fp16=True)
    make_dataset(data, seed=3, n_individuals=14, n_species=2, max_images=4, progress=False)
    common = {"box_type": "body", "batch_size": 8}
    run_embed([export], ref / "gallery.npz", EmbedOptions(tta="none", flip_views=True, **common),
              images=data / "train_images", listing=data / "train.csv", boxes=data / "boxes.csv")
    run_embed([export], ref / "test.npz", EmbedOptions(tta="flip", **common), images=data / "test_images",
              listing=data / "sample_submission.csv", boxes=data / "boxes.csv")
    s = submit_files(ref / "gallery.npz", ref / "test.npz", data / "train.csv", None, ref / "submission.csv",
                     k=100, sample=data / "sample_submission.csv", new_share=0.5)
    opts = BuildOptions(owner="someone", threshold=s["threshold"], packages=[], box_type="body",
                        boxes=data / "boxes.csv", batch_size=8)
    build_package([export], root / "build", opts)
    wheel = next((root / "build" / "wheels").glob("*.whl"))
    opts_g = BuildOptions(**{**opts.__dict__, "gallery": ref / "gallery.npz", "whalesub_wheel": wheel})
    build_package([root / "run"], root / "build_gallery", opts_g)  # a run: exported by the build
    return {"export": export, "data": data, "build": root / "build", "build_gallery": root / "build_gallery",
            "reference": ref, "threshold": s["threshold"], "root": root}
