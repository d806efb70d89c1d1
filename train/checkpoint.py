"""Training checkpoints: the full state of a run, written atomically, readable with ``weights_only=True``.

A checkpoint is a plain ``dict`` (tensors, numbers, strings, lists, dicts only; no pickled
objects), so ``torch.load(path, weights_only=True)`` reads it:

- ``format`` ("whalesub.train_checkpoint"), ``format_version`` (1)
- ``model``: state dict of the unwrapped :class:`whalesub.models.network.EmbeddingNet` (loads with
  ``whalesub.models.network.load_embedding_net``); ``spec``: its ModelSpec as a dict
- ``heads``: state dict of the margin heads (individual and optional species); ``classes``,
  ``species_classes``: the label strings of the head rows
- ``optimizer``, ``scheduler``, ``scaler``: state dicts
- ``epoch`` (epochs fully done), ``batch_in_epoch`` (batches done in the current epoch; 0 at an
  epoch end), ``global_step`` (optimizer steps), ``loss_sum``/``loss_count`` of the current epoch
- ``rng``: python / numpy / torch (CPU and CUDA) generator states
- ``early_stopping``: best score, best epoch, epochs without improvement
- ``history``: every metrics.csv row so far (metrics.csv is rewritten from it, so a resumed run's
  file equals an uninterrupted run's)
- ``config``: the resolved training config as plain data; ``command``: the command line

``model_spec.json`` is written beside ``last.pt`` / ``best.pt``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from whalesub.core.atomic import atomic_open, atomic_path
from whalesub.core.errors import DataError
from whalesub.models.spec import SPEC_FILENAME

FORMAT = "whalesub.train_checkpoint"
FORMAT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"


def capture_rng() -> dict[str, Any]:
    """Generator states of python, numpy and torch (CPU + every CUDA device) as plain data."""
    import torch

    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], spec=None) -> Path:
    """Write ``state`` (plain data + tensors) to ``path`` atomically; ``spec`` -> model_spec.json."""
    import torch

    path = Path(path)
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    with atomic_open(path, "wb") as fh:  # a file object: a full disk raises an OSError naming the file
        torch.save(state, fh)
    if spec is not None:
        spec.save(path.parent / SPEC_FILENAME)
    return path


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Atomic copy (``last.pt`` -> ``best.pt``): the destination is either old or complete."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``; ``mmap``
    maps tensors lazily (cheap when only the config and counters are read)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist; train first (python -m train --config ...)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                        "delete it to start the run again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"checkpoint {path} is not a whalesub training checkpoint (format "
                        f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    return state
