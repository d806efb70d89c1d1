"""Pooled out-of-fold threshold tuning over every fold of a training run (``whalesub tune --run``).

Each fold of a run (``runs/NAME/fold<k>/``, written by ``train/session.py``) holds its validation
queries (``oof_embeddings.npz``), its own training part as the gallery (``oof_gallery.npz``) and
the truth (``oof_labels.csv``: ``new_individual`` for animals absent from that fold's training
part). Every fold is ranked against ITS OWN gallery; the candidate arrays of all folds are then
concatenated (codes are only ever compared within a row, so each fold keeps its own label table)
and one grid search runs on the pooled rows (:func:`whalesub.ranking.threshold.grid_search`).

Besides the best threshold, the result gives the share of pooled rows that put
``new_individual`` first at it. That share, not the raw cosine, is what transfers to the test
set: an ensemble of five models with the full training set as gallery has a different cosine
scale than one model against an 80% gallery, while the share of test images showing new animals
is a property of the data (see ``whalesub predict``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from whalesub.core.errors import ConfigError, DataError
from whalesub.data.contract import NEW_INDIVIDUAL, read_truth
from whalesub.ranking.rank import NEW, rank_queries
from whalesub.ranking.store import load_embeddings
from whalesub.ranking.threshold import grid_search, parse_grid, threshold_for_new_share, truth_codes
from whalesub.workflows.submit import load_ranking_inputs, read_truth_for, tune_files

log = logging.getLogger(__name__)

OOF_FILES = ("oof_embeddings.npz", "oof_gallery.npz", "oof_labels.csv")


def has_oof(fold_dir: Path) -> bool:
    """Whether ``fold_dir`` holds the three out-of-fold files of a finished validation."""
    return all((Path(fold_dir) / name).is_file() for name in OOF_FILES)


def find_oof_folds(run_dir: str | Path) -> list[Path]:
    """The ``fold*/`` folders of a run that hold out-of-fold files (a fold folder: itself)."""
    run_dir = Path(run_dir)
    if has_oof(run_dir):
        return [run_dir]
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist: pass runs/NAME (written by python -m train)")
    folds = sorted(p for p in run_dir.glob("fold*") if p.is_dir())
    with_oof = [p for p in folds if has_oof(p)]
    if not with_oof:
        raise DataError(f"{run_dir} has no fold*/ folder with {', '.join(OOF_FILES)}: train with validation "
                        "(n_folds >= 2, fold k or all) and let at least one epoch validate")
    if len(with_oof) < len(folds):
        log.warning("%s: folds without out-of-fold files are left out: %s", run_dir,
                    ", ".join(p.name for p in folds if p not in with_oof))
    return with_oof


def oof_new_counts(fold_dirs: list[Path]) -> dict:
    """How many out-of-fold queries show an animal absent from their fold's training part.

    Reads only each fold's ``oof_labels.csv`` (cheap: no ranking). Returns ``n`` (queries), ``n_new``
    and ``share`` (n_new / n; 0.0 without queries). With ``n_new == 0`` every pooled threshold search
    learns "never predict new_individual first", whatever the test set holds.
    """
    n = n_new = 0
    for fold_dir in fold_dirs:
        truth = read_truth(Path(fold_dir) / "oof_labels.csv")
        n += len(truth)
        n_new += int((truth["individual_id"] == NEW_INDIVIDUAL).sum())
    return {"n": n, "n_new": n_new, "share": n_new / n if n else 0.0}


def no_new_message(counts: dict, n_folds: int) -> str:
    """The warning for out-of-fold queries without a new animal (see :func:`oof_new_counts`)."""
    return (f"the out-of-fold queries of {n_folds} fold(s) hold no new animal ({counts['n']} queries): a "
            "share of new_individual tuned on them says nothing about the test set; retrain with "
            "target_new_share (e.g. 0.165, python -m train --target_new_share=0.165) or pass --new-share")


def fold_fingerprint(fold_dir: Path) -> str:
    """The model fingerprint stored in a fold's ``oof_embeddings.npz`` (the best epoch's weights)."""
    return str(load_embeddings(Path(fold_dir) / "oof_embeddings.npz").meta.get("fingerprint"))


def fold_candidates(fold_dir: Path, train_csv, k: int = 100, *, use_gpu: bool | None = None,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fold ranked against its own gallery: candidate labels [Q, 5] int64, scores [Q, 5] f32 and
    truth codes [Q] (indices into that fold's own individual table, NEW or UNREACHABLE)."""
    fold_dir = Path(fold_dir)
    queries_path = fold_dir / "oof_embeddings.npz"
    data = load_ranking_inputs(fold_dir / "oof_gallery.npz", queries_path, train_csv)
    truth = read_truth_for(fold_dir / "oof_labels.csv", data["query_ids"].tolist(), queries_path)
    labels, scores = rank_queries(data["gallery"], data["gallery_labels"], data["queries"], k,
                                  use_gpu=use_gpu, progress=progress)
    return labels, scores, truth_codes(truth, data["classes"])


def _best(labels, scores, truth, thresholds) -> dict:
    found = grid_search(labels, scores, truth, thresholds)
    best = int(np.argmax(found.map5))
    return {"threshold": found.best_threshold, "map5": found.best_map5,
            "new_share": float(found.new_share[best])}, found


def tune_folds(fold_dirs: list[Path], train_csv, grid: str = "0.0:1.0:0.02",
               target_new_share: float | None = None, k: int = 100, *, use_gpu: bool | None = None,
               progress: bool = False) -> dict:
    """Pooled OOF threshold search over ``fold_dirs``.

    Returns the keys of :func:`whalesub.ranking.threshold.tune_arrays` (``n``, ``n_new``, ``k``, ``table``,
    ``best`` with threshold, map5 and new_share; ``target`` with ``target_new_share``) for the
    pooled rows, plus ``folds``: per fold its folder, model fingerprint, rows, truly new rows and
    its own best (threshold, map5, new_share).
    """
    thresholds = parse_grid(grid)
    if target_new_share is not None and not 0.0 <= target_new_share <= 1.0:
        raise ConfigError(f"--target-new-share {target_new_share} must be within [0, 1] (e.g. 0.165)")
    if not fold_dirs:
        raise ConfigError("no fold with out-of-fold files to tune on")
    parts, folds = [], []
    for fold_dir in fold_dirs:
        labels, scores, truth = fold_candidates(fold_dir, train_csv, k, use_gpu=use_gpu, progress=progress)
        own, _ = _best(labels, scores, truth, thresholds)
        folds.append({"fold": str(fold_dir), "fingerprint": fold_fingerprint(fold_dir), "n": int(truth.size),
                      "n_new": int((truth == NEW).sum()), "best": own})
        parts.append((labels, scores, truth))
        log.info("%s: %d queries, best threshold %.4f (MAP@5 %.4f, new first in %.1f%%)", fold_dir,
                 truth.size, own["threshold"], own["map5"], 100 * own["new_share"])
    labels, scores, truth = (np.concatenate(a) for a in zip(*parts, strict=True))
    best, found = _best(labels, scores, truth, thresholds)
    result = {"n": int(truth.size), "n_new": int((truth == NEW).sum()), "k": int(k), "table": found.table(),
              "best": best, "folds": folds}
    if target_new_share is not None:
        t = threshold_for_new_share(scores, target_new_share)
        one = grid_search(labels, scores, truth, np.array([t]))
        result["target"] = {"new_share": float(one.new_share[0]), "threshold": t, "map5": float(one.map5[0])}
    log.info("pooled over %d folds: %d queries, best threshold %.4f MAP@5 %.4f, new_individual first in "
             "%.1f%%", len(folds), truth.size, best["threshold"], best["map5"], 100 * best["new_share"])
    return result


def tune_runs_or_files(runs: list[Path] | None, gallery, queries, truth, train_csv, *, grid: str,
                       target_new_share: float | None, k: int, per_species_out=None,
                       k0: float = 20.0) -> dict:
    """``whalesub tune``: pooled over the folds of ``runs``, or one gallery/queries/truth triple."""
    single = {"--gallery": gallery, "--queries": queries, "--truth": truth}
    if runs:
        if given := [name for name, v in single.items() if v is not None]:
            raise ConfigError(f"--run pools each fold's own out-of-fold files; drop {', '.join(given)}")
        if per_species_out is not None:
            raise ConfigError("--per-species tunes on one gallery/queries/truth triple (e.g. a fold's "
                              "oof_gallery.npz, oof_embeddings.npz, oof_labels.csv), not on --run")
        folds = [f for run in runs for f in find_oof_folds(run)]
        return tune_folds(folds, train_csv, grid, target_new_share, k, progress=True)
    if missing := [name for name, v in single.items() if v is None]:
        raise ConfigError(f"give --run runs/NAME (pooled out-of-fold tuning), or all of --gallery, --queries "
                          f"and --truth; missing: {', '.join(missing)}")
    return tune_files(gallery, queries, train_csv, truth, grid=grid, target_new_share=target_new_share, k=k,
                      per_species_out=per_species_out, k0=k0)
