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

Blended scoring (``knn_ratio`` < 1, :mod:`whalesub.ranking.centres`), from the same centre source
as ``submit --centres-from``: "gallery" (default): every individual's centre is the normalised
mean of its vectors in the fold's own gallery; "head": the fold's own ArcFace head (read from the
fold's checkpoint, used only when its model fingerprint equals the out-of-fold files'), refused
when the checkpoint is gone, stale or headless, or lacks an individual of the fold's gallery. So
the threshold is tuned on the scores ``submit --knn-ratio r --centres-from S`` produces.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from whalesub.core.errors import ConfigError, DataError, WhalesubError, first_few
from whalesub.data.contract import NEW_INDIVIDUAL, read_truth
from whalesub.ranking.centres import check_centre_source, check_ratio, gallery_centres, rank_with_centres
from whalesub.ranking.rank import NEW, rank_queries
from whalesub.ranking.store import load_embeddings
from whalesub.ranking.threshold import grid_search, parse_grid, threshold_for_new_share, truth_codes
from whalesub.workflows.scorefiles import scoring_stamp
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


def unique_folds(folds) -> list[Path]:
    """``folds`` in order, each fold folder once (compared resolved: ``runs/x`` + ``runs/x/fold0`` or a
    symlink name the same fold); a fold pooled twice would count its queries twice."""
    seen, out = set(), []
    for fold in map(Path, folds):
        key = fold.resolve()
        if key in seen:
            log.warning("%s is given more than once (directly or through its run folder): counted once", fold)
            continue
        seen.add(key)
        out.append(fold)
    return out


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


def fold_head_centres(fold_dir: Path, fingerprint: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids [C] str, centres [C, D] f32) of a fold's checkpoint head, or None (logged why).

    None when the checkpoint is missing or unreadable, has no ArcFace head, or its model
    fingerprint differs from ``fingerprint`` (the out-of-fold files'): its centres would not be
    on the scale of those vectors.
    """
    try:
        from whalesub.models.export import model_fingerprint
        from whalesub.models.sources import class_centres, load_source

        src = load_source(fold_dir)
        if fingerprint is not None and model_fingerprint(src.net, src.spec) != fingerprint:
            log.warning("%s: checkpoint %s is not the model of the out-of-fold files (fingerprints differ): "
                        "its head centres are not used", fold_dir, src.path)
            return None
        found = class_centres(src)
    except (WhalesubError, ImportError, OSError) as exc:
        log.warning("%s: no head centres (%s)", fold_dir, exc)
        return None
    return None if found is None else (found[0], found[1])


def fold_centres(fold_dir: Path, data: dict, centres_from: str = "gallery") -> tuple[np.ndarray, dict]:
    """Centres [n_ind, D] of a fold's individuals, all from ``centres_from``, and a summary.

    "gallery": the mean of each individual's vectors in the fold's gallery (one model: an
    out-of-fold file holds one fold's vectors). "head": the fold's head; ConfigError when it is
    unusable or lacks an individual (no per-individual substitute: that would mix scales).
    """
    classes = data["classes"]
    if check_centre_source(centres_from) == "gallery":
        log.info("%s: class centres: the mean of each individual's gallery vectors (%d individuals)",
                 fold_dir, classes.size)
        return (gallery_centres(data["gallery"], data["gallery_labels"], classes.size),
                {"centres_from": "gallery", "n": int(classes.size)})
    head = fold_head_centres(fold_dir, data["queries_file"].fingerprint)
    if head is None:
        raise ConfigError(f"{fold_dir}: --centres-from head needs the fold's checkpoint with its head "
                          "(see the warning above); use --centres-from gallery")
    if head[1].shape[1] != data["gallery"].shape[1]:
        raise ConfigError(f"{fold_dir}: head centres have D={head[1].shape[1]} but the out-of-fold vectors "
                          f"D={data['gallery'].shape[1]}; use --centres-from gallery")
    block = np.zeros((classes.size, data["gallery"].shape[1]), dtype=np.float32)
    present = np.zeros(classes.size, dtype=bool)
    pos = np.searchsorted(classes, head[0]).clip(0, classes.size - 1)
    known = classes[pos] == head[0]
    block[pos[known]], present[pos[known]] = head[1][known], True
    if (~present).any():
        lacking = classes[~present].tolist()
        raise ConfigError(f"{fold_dir}: --centres-from head: {len(lacking)} of {classes.size} individuals "
                          f"of the fold's gallery have no centre in its head (e.g. {first_few(lacking)}); "
                          "use --centres-from gallery")
    log.info("%s: class centres from the fold's head for all %d individuals", fold_dir, classes.size)
    return block, {"centres_from": "head", "n": int(classes.size)}


def fold_candidates(fold_dir: Path, train_csv, k: int = 100, *, use_gpu: bool | None = None,
                    progress: bool = False, knn_ratio: float = 1.0, centre_k: int | None = None,
                    info: dict | None = None,
                    centres_from: str = "gallery") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fold ranked against its own gallery: candidate labels [Q, 5] int64, scores [Q, 5] f32 and
    truth codes [Q] (indices into that fold's own individual table, NEW or UNREACHABLE).

    ``knn_ratio`` < 1: blended with the fold's centres from ``centres_from`` (:func:`fold_centres`;
    their summary goes into ``info`` when given)."""
    fold_dir = Path(fold_dir)
    queries_path = fold_dir / "oof_embeddings.npz"
    data = load_ranking_inputs(fold_dir / "oof_gallery.npz", queries_path, train_csv)
    truth = read_truth_for(fold_dir / "oof_labels.csv", data["query_ids"].tolist(), queries_path)
    if check_ratio(knn_ratio) < 1:
        centres, counts = fold_centres(fold_dir, data, centres_from)
        if info is not None:
            info.update(counts)
        labels, scores = rank_with_centres(data["gallery"], data["gallery_labels"], data["queries"], centres,
                                           np.ones(centres.shape[0], bool), knn_ratio, k, centre_k=centre_k,
                                           use_gpu=use_gpu, progress=progress)
    else:
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
               progress: bool = False, knn_ratio: float = 1.0, centre_k: int | None = None,
               centres_from: str = "gallery") -> dict:
    """Pooled OOF threshold search over ``fold_dirs``.

    Returns the keys of :func:`whalesub.ranking.threshold.tune_arrays` (``n``, ``n_new``, ``k``, ``table``,
    ``best`` with threshold, map5 and new_share; ``target`` with ``target_new_share``) for the
    pooled rows, plus ``folds``: per fold its folder, model fingerprint, rows, truly new rows and
    its own best (threshold, map5, new_share), and ``scoring``
    (:func:`whalesub.workflows.scorefiles.scoring_stamp`). ``knn_ratio`` < 1 ranks each fold blended
    with its own centres from ``centres_from`` (the module docstring); each fold then also reports
    ``centres``: the source and how many individuals.
    """
    thresholds = parse_grid(grid)
    if target_new_share is not None and not 0.0 <= target_new_share <= 1.0:
        raise ConfigError(f"--target-new-share {target_new_share} must be within [0, 1] (e.g. 0.165)")
    if not fold_dirs:
        raise ConfigError("no fold with out-of-fold files to tune on")
    if k < 1:
        raise ConfigError(f"--k {k} must be at least 1 (number of neighbours searched per query)")
    if centre_k is not None and centre_k < 1:
        raise ConfigError(f"--centre-k {centre_k} must be at least 1")
    stamp = scoring_stamp(check_ratio(knn_ratio), centre_k, k, centres_from)
    parts, folds = [], []
    for fold_dir in unique_folds(fold_dirs):
        counts = {}
        labels, scores, truth = fold_candidates(fold_dir, train_csv, k, use_gpu=use_gpu, progress=progress,
                                                knn_ratio=knn_ratio, centre_k=centre_k, info=counts,
                                                centres_from=centres_from)
        own, _ = _best(labels, scores, truth, thresholds)
        folds.append({"fold": str(fold_dir), "fingerprint": fold_fingerprint(fold_dir), "n": int(truth.size),
                      "n_new": int((truth == NEW).sum()), "best": own,
                      **({"centres": counts} if counts else {})})
        parts.append((labels, scores, truth))
        log.info("%s: %d queries, best threshold %.4f (MAP@5 %.4f, new first in %.1f%%)", fold_dir,
                 truth.size, own["threshold"], own["map5"], 100 * own["new_share"])
    labels, scores, truth = (np.concatenate(a) for a in zip(*parts, strict=True))
    best, found = _best(labels, scores, truth, thresholds)
    result = {"n": int(truth.size), "n_new": int((truth == NEW).sum()), "k": int(k), "table": found.table(),
              "best": best, "folds": folds, "scoring": stamp}
    if target_new_share is not None:
        t = threshold_for_new_share(scores, target_new_share)
        one = grid_search(labels, scores, truth, np.array([t]))
        result["target"] = {"new_share": float(one.new_share[0]), "threshold": t, "map5": float(one.map5[0])}
    log.info("pooled over %d folds: %d queries, best threshold %.4f MAP@5 %.4f, new_individual first in "
             "%.1f%%", len(folds), truth.size, best["threshold"], best["map5"], 100 * best["new_share"])
    return result


def tune_runs_or_files(runs: list[Path] | None, gallery, queries, truth, train_csv, *, grid: str,
                       target_new_share: float | None, k: int, per_species_out=None,
                       k0: float = 20.0, centres=None, knn_ratio: float = 1.0,
                       centre_k: int | None = None,
                       centres_from: str = "gallery") -> dict:
    """``whalesub tune``: pooled over the folds of ``runs``, or one gallery/queries/truth triple.

    ``knn_ratio``, ``centre_k``, ``k``, ``centres_from`` (and ``centres`` for the triple) choose the
    scoring, as for ``whalesub submit``; with ``runs`` each fold uses its own centres (:func:`fold_centres`).
    """
    single = {"--gallery": gallery, "--queries": queries, "--truth": truth}
    if runs:
        if given := [name for name, v in single.items() if v is not None]:
            raise ConfigError(f"--run pools each fold's own out-of-fold files; drop {', '.join(given)}")
        if per_species_out is not None:
            raise ConfigError("--per-species tunes on one gallery/queries/truth triple (e.g. a fold's "
                              "oof_gallery.npz, oof_embeddings.npz, oof_labels.csv), not on --run")
        if centres:
            raise ConfigError("--run blends each fold with its own centres (its gallery means, or its head's "
                              "with --centres-from head); drop --centres, which is for "
                              "--gallery/--queries/--truth")
        folds = unique_folds(f for run in runs for f in find_oof_folds(run))
        return tune_folds(folds, train_csv, grid, target_new_share, k, progress=True,
                          knn_ratio=knn_ratio, centre_k=centre_k, centres_from=centres_from)
    if missing := [name for name, v in single.items() if v is None]:
        raise ConfigError(f"give --run runs/NAME (pooled out-of-fold tuning), or all of --gallery, --queries "
                          f"and --truth; missing: {', '.join(missing)}")
    return tune_files(gallery, queries, train_csv, truth, grid=grid, target_new_share=target_new_share, k=k,
                      per_species_out=per_species_out, k0=k0, centres=centres, knn_ratio=knn_ratio,
                      centre_k=centre_k, centres_from=centres_from)
