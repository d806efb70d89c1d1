"""whalesub: identify individual animals in photographs (Kaggle Happywhale format).

The packages, lowest first. The order is :data:`LAYERS` below, and it is the import rule: a module
imports only from its own package and from packages earlier in the list (``tests/test_structure.py``
derives every module's layer from its package and enforces this; a new module needs no table edit).
``train/`` (training, run from a checkout) sits above all of them; ``whalesub`` never imports it.

1. ``core``: errors and atomic file writes; nothing of whalesub below it.
2. ``data``: the data contract (train.csv, test listings, truth, sample submission), image decoding
   and crops, box tables and public box files.
3. ``synth``: the synthetic Happywhale-format set (the demo and the tests' data).
4. ``ranking``: pure arrays (vectors, FAISS index, ranking, class centres, thresholds, MAP@5) and the
   files whose rules they define (embedding files, submission files).
5. ``models``: the model spec, the network, ONNX export and FP16, weight sources, ONNX Runtime
   sessions and the inference backends.
6. ``embedding``: image loaders, ``embed`` (TTA, several models), shards.
7. ``workflows``: the file-level commands: submit and tune, out-of-fold tuning, blends, pseudo-labels,
   ``predict``.
8. ``report``: the HTML error report of a submission.
9. ``catalogue``: a persistent catalogue of known animals: add photos, identify, record decisions.
10. ``kaggle``: datasets, wheels, the offline kernel, upload and submit.
11. ``cli``: the typer app (``whalesub``), one thin command per workflow.

This file itself (the version and this order) is below everything and imports nothing when imported:
``__version__`` is computed on first use (:func:`_find_version`), so ``import whalesub`` stays cheap.
"""

UNKNOWN_VERSION = "0+unknown"


def _find_version() -> str:
    """whalesub's version: from git in a source checkout, else the installed distribution's.

    A checkout (``.git`` and ``pyproject.toml`` beside this package) asks setuptools-scm, exactly as
    the wheel build does, so an editable install reports the current commit, not the one it was
    installed at (its metadata is frozen then). Otherwise the version in the metadata of the
    distribution this very file belongs to (an installed wheel). Never raises: ``0+unknown``.
    """
    import warnings
    from pathlib import Path

    here = Path(__file__).resolve()
    root = here.parents[1]
    if (root / ".git").exists() and (root / "pyproject.toml").is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from setuptools_scm import get_version

                return get_version(root=str(root))
        except Exception:  # noqa: BLE001 - no setuptools-scm, no git, a broken repository: fall back
            pass
    try:
        from importlib.metadata import distribution

        dist = distribution("whalesub")
        located = Path(dist.locate_file("whalesub/__init__.py"))
        if located.exists() and located.resolve() != here:
            return UNKNOWN_VERSION  # another whalesub's metadata (this copy is not installed)
        return dist.version or UNKNOWN_VERSION
    except Exception:  # noqa: BLE001 - not installed, or unreadable metadata
        return UNKNOWN_VERSION


def __getattr__(name: str):
    """``whalesub.__version__``, computed once on first access (PEP 562)."""
    if name == "__version__":
        globals()["__version__"] = version = _find_version()
        return version
    raise AttributeError(f"module 'whalesub' has no attribute {name!r}")


LAYERS = ("core", "data", "synth", "ranking", "models", "embedding", "workflows", "report", "catalogue",
          "kaggle", "cli")
