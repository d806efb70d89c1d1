"""Pseudo-labels: confident test predictions become extra training rows of a second round.

A test image is taken when its best individual scores at least ``min_score`` (cosine) AND beats
the second-best individual by at least ``min_margin``; both guard against the two ways a kNN label
goes wrong (a weak match, and two animals that look alike). The result is a CSV in ``train.csv``
format plus ``score`` and ``margin`` columns, which ``python -m train --pseudo_csv=...`` adds to the
training part of every fold (never to a validation part).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import NEW_INDIVIDUAL, read_truth
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


def pseudo_label_files(gallery_path, queries_path, train_csv, out, *, min_score: float = 0.8,
                       min_margin: float = 0.05, truth: str | os.PathLike | None = None, k: int = 100,
                       use_gpu: bool | None = None) -> dict:
    """Rank the test queries against the gallery and write the confident ones to ``out``.

    ``out`` gets ``image,species,individual_id,score,margin`` (species: the individual's most
    frequent species in ``train_csv``, as :func:`whalesub.workflows.submit.load_ranking_inputs` gives it).
    With ``truth`` (``image,individual_id``, e.g. synthetic data) the summary holds the precision
    of the chosen labels (a new animal given a known label counts as wrong).
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'pseudo.csv'}")
    data = load_ranking_inputs(gallery_path, queries_path, train_csv)
    labels, scores = rank_queries(data["gallery"], data["gallery_labels"], data["queries"], k,
                                  n_max=2, use_gpu=use_gpu)
    sel = select_confident(labels, scores, min_score, min_margin)
    keep = sel["keep"]
    ids = data["classes"][sel["label"][keep]]
    table = pd.DataFrame({"image": data["query_ids"][keep],
                          "species": data["class_species"][sel["label"][keep]],
                          "individual_id": ids, "score": sel["score"][keep], "margin": sel["margin"][keep]})
    clash = sorted(set(data["query_ids"].tolist()) & set(data["gallery_ids"].tolist()))
    if clash:
        raise DataError(f"{len(clash)} query images are also train images ({first_few(clash)}); pseudo-label "
                        "test images only (a train image would get a second label)")
    summary = {"out": str(out), "queries": int(keep.size), "selected": int(keep.sum()),
               "share": float(keep.mean()) if keep.size else 0.0, "min_score": min_score,
               "min_margin": min_margin}
    if truth is not None:
        t = read_truth(truth)
        truth_of = dict(zip(t["image"], t["individual_id"], strict=True))
        missing = [i for i in table["image"] if i not in truth_of]
        if missing:
            raise DataError(f"truth {truth} has no row for {len(missing)} selected images: "
                            f"{first_few(missing)}")
        right = np.array([truth_of[i] == lab for i, lab in zip(table["image"], ids, strict=True)], dtype=bool)
        summary.update(precision=float(right.mean()) if right.size else None, correct=int(right.sum()),
                       selected_new=int(sum(truth_of[i] == NEW_INDIVIDUAL for i in table["image"])))
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6f"))
    log.info("pseudo-labels: %d of %d test images (%.1f%%) with score >= %g and margin >= %g -> %s%s",
             summary["selected"], summary["queries"], 100 * summary["share"], min_score, min_margin, out,
             f"; precision {summary['precision']:.3f}" if summary.get("precision") is not None else "")
    return summary
