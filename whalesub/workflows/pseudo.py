"""Pseudo-labels: confident test predictions become extra training rows of a second round.

A test image is taken when its best individual scores at least ``min_score`` (cosine) AND beats
the second-best individual by at least ``min_margin``; both guard against the two ways a kNN label
goes wrong (a weak match, and two animals that look alike). The result is a CSV in ``train.csv``
format plus ``score`` and ``margin`` columns, which ``python -m train --pseudo_csv=...`` adds to the
training part of every fold (never to a validation part).

Per fold (``folds``: the run's ``folds.csv``, columns ``image`` and ``fold``): a pseudo row meant for
fold k may only come from fold k's training part. Ranked against every train image, a test image
that nearly duplicates one of fold k's *validation* images takes that image's label and joins fold
k's training, so fold k's MAP@5 and the pooled out-of-fold share turn optimistic. With ``folds`` the
test set is ranked once per fold against a gallery without that fold's validation images, and the
CSV gets a ``fold`` column: rows with fold k are for fold k's training only; rows with fold -1 come
from the whole gallery and are for full-data training (``--fold=-1``). A test image can appear once
per fold.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import NEW_INDIVIDUAL, describe_lines, read_table, read_truth
from whalesub.ranking.rank import PAD, rank_queries
from whalesub.workflows.submit import load_ranking_inputs

log = logging.getLogger(__name__)


def select_confident(cand_labels: np.ndarray, cand_scores: np.ndarray, min_score: float,
                     min_margin: float) -> dict[str, np.ndarray]:
    """Which queries to pseudo-label.

    ``cand_labels`` [Q, C] int64 individual codes (PAD = -1 where fewer) and ``cand_scores`` [Q, C]
    f32, ranked best first (:func:`whalesub.ranking.rank.rank_queries`). Returns ``keep`` [Q] bool,
    ``label`` [Q] int64 (best code), ``score`` [Q] and ``margin`` [Q] float64 (best minus second
    best; +inf when the gallery offers a single individual).
    """
    if not -1.0 <= min_score <= 1.0:
        raise ConfigError(f"--min-score {min_score} must be a cosine in [-1, 1] (e.g. 0.8)")
    if not 0.0 <= min_margin <= 2.0:
        raise ConfigError(f"--min-margin {min_margin} must be within [0, 2] (e.g. 0.05)")
    best = cand_scores[:, 0].astype(np.float64)
    second = np.where(cand_labels[:, 1] != PAD, cand_scores[:, 1], -np.inf).astype(np.float64) \
        if cand_labels.shape[1] > 1 else np.full(best.shape, -np.inf)
    margin = best - second
    keep = (cand_labels[:, 0] != PAD) & (best >= min_score) & (margin >= min_margin)
    return {"keep": keep, "label": cand_labels[:, 0], "score": best, "margin": margin}


def read_fold_of(folds_csv: str | os.PathLike) -> dict[str, int]:
    """image -> fold (int; -1 = always in training) from a run's ``folds.csv``."""
    frame, lines = read_table(folds_csv, ("image", "fold"), "folds")
    fold = pd.to_numeric(frame["fold"], errors="coerce")
    bad = (fold.isna() | (fold != fold.round()) | (fold < -1)).to_numpy()
    if bad.any():
        raise DataError(f"folds file {folds_csv}: column 'fold' must hold integers >= -1; "
                        f"{int(bad.sum())} bad value(s) on {describe_lines(lines[bad])}; pass the run's "
                        "folds.csv (runs/NAME/folds.csv, written by python -m train)")
    if (dup := frame["image"].duplicated()).any():
        raise DataError(f"folds file {folds_csv}: duplicate images {first_few(frame['image'][dup])}")
    return dict(zip(frame["image"], fold.astype(int), strict=True))


def _gallery_parts(gallery_ids: np.ndarray, folds_csv) -> list[tuple[int | None, np.ndarray]]:
    """(fold, gallery mask) pairs: [(None, all)] without folds; else each fold k >= 0 with the gallery
    vectors outside fold k (its training part), then (-1, all) for full-data training."""
    everything = np.ones(len(gallery_ids), dtype=bool)
    if folds_csv is None:
        return [(None, everything)]
    fold_of = read_fold_of(folds_csv)
    if missing := sorted({i for i in gallery_ids.tolist() if i not in fold_of}):
        raise DataError(f"{len(missing)} gallery images are not in the folds file {folds_csv}: "
                        f"{first_few(missing)}; pass the folds.csv of the run the gallery was trained for")
    fold = np.array([fold_of[i] for i in gallery_ids.tolist()], dtype=np.int64)
    return [(k, fold != k) for k in sorted(set(fold_of.values()) - {-1})] + [(-1, everything)]


def pseudo_label_files(gallery_path, queries_path, train_csv, out, *, min_score: float = 0.8,
                       min_margin: float = 0.05, truth: str | os.PathLike | None = None, k: int = 100,
                       use_gpu: bool | None = None, folds: str | os.PathLike | None = None) -> dict:
    """Rank the test queries against the gallery and write the confident ones to ``out``.

    ``out`` gets ``image,species,individual_id,score,margin`` (species: the individual's most
    frequent species in ``train_csv``, as :func:`whalesub.workflows.submit.load_ranking_inputs` gives it),
    plus ``fold`` with ``folds`` (a run's folds.csv; see the module docstring): one ranking per fold
    against the gallery minus that fold's validation images, and one against the whole gallery (fold -1).
    With ``truth`` (``image,individual_id``, e.g. synthetic data) the summary holds the precision
    of the chosen labels (a new animal given a known label counts as wrong), and per fold with ``folds``.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'pseudo.csv'}")
    data = load_ranking_inputs(gallery_path, queries_path, train_csv)
    clash = sorted(set(data["query_ids"].tolist()) & set(data["gallery_ids"].tolist()))
    if clash:
        raise DataError(f"{len(clash)} query images are also train images ({first_few(clash)}); pseudo-label "
                        "test images only (a train image would get a second label)")
    truth_of = None
    if truth is not None:
        t = read_truth(truth)
        truth_of = dict(zip(t["image"], t["individual_id"], strict=True))
    tables, per_fold = [], []
    for fold, mask in _gallery_parts(data["gallery_ids"], folds):
        labels, scores = rank_queries(data["gallery"][mask], data["gallery_labels"][mask], data["queries"], k,
                                      n_max=2, use_gpu=use_gpu)
        sel = select_confident(labels, scores, min_score, min_margin)
        keep = sel["keep"]
        best = sel["label"][keep]
        table = pd.DataFrame({"image": data["query_ids"][keep], "species": data["class_species"][best],
                              "individual_id": data["classes"][best], "score": sel["score"][keep],
                              "margin": sel["margin"][keep]})
        part = {"fold": fold, "gallery": int(mask.sum()), "selected": int(keep.sum())}
        if truth_of is not None:
            part.update(_precision(table, truth_of, truth))
        if fold is not None:
            table["fold"] = fold
            log.info("pseudo-labels for fold %d: %d of %d test images against %d gallery vectors%s", fold,
                     part["selected"], keep.size, part["gallery"],
                     f"; precision {part['precision']:.3f}" if part.get("precision") is not None else "")
        tables.append(table)
        per_fold.append(part)
    table = pd.concat(tables, ignore_index=True)
    main = per_fold[-1]  # without folds the only ranking; with folds the whole gallery (fold -1)
    n = len(data["query_ids"])
    summary = {"out": str(out), "queries": n, "selected": main["selected"],
               "share": main["selected"] / n if n else 0.0, "min_score": min_score, "min_margin": min_margin,
               **{key: main[key] for key in ("precision", "correct", "selected_new") if key in main}}
    if folds is not None:
        summary.update(folds=str(folds), per_fold=per_fold, rows=len(table))
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6f"))
    log.info("pseudo-labels: %d of %d test images (%.1f%%) with score >= %g and margin >= %g -> %s%s",
             summary["selected"], summary["queries"], 100 * summary["share"], min_score, min_margin, out,
             f"; precision {summary['precision']:.3f}" if summary.get("precision") is not None else "")
    return summary


def _precision(table: pd.DataFrame, truth_of: dict, truth) -> dict:
    """precision, correct and selected_new of the chosen labels against the truth."""
    missing = [i for i in table["image"] if i not in truth_of]
    if missing:
        raise DataError(f"truth {truth} has no row for {len(missing)} selected images: {first_few(missing)}")
    pairs = zip(table["image"], table["individual_id"], strict=True)
    right = np.array([truth_of[i] == lab for i, lab in pairs], dtype=bool)
    return {"precision": float(right.mean()) if right.size else None, "correct": int(right.sum()),
            "selected_new": int(sum(truth_of[i] == NEW_INDIVIDUAL for i in table["image"]))}
