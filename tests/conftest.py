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
