"""Shared test fixtures: paths to the real data set, GPU detection, the small training set."""

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
