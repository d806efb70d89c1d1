"""Shared test fixtures: paths to the real data set and GPU detection."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NYALA = REPO.parent / "shared" / "data" / "nyala"


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing or broken
        return False


@pytest.fixture(scope="session")
def nyala() -> Path:
    """The real nyala set (../shared/data/nyala); tests using it skip when it is absent."""
    if not (NYALA / "train.csv").is_file():
        pytest.skip(f"real data set not found at {NYALA}")
    return NYALA


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

    from whalesub.embed import EmbedOptions, run_embed
    from whalesub.export import export_model
    from whalesub.kaggle.package import BuildOptions, build_package
    from whalesub.pipeline import submit_files
    from whalesub.synth import make_dataset

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
