"""``whalesub blend``: combine candidate tables of several models or runs into one submission.

Each table is ``submit --candidates-out``'s (image, rank, individual_id, score). Per query image,
the candidates are the union of every table's; a candidate's blended score is
``sum_t w_t x score_t`` with the weights normalised to sum 1. A candidate missing from table t
(outside its kept top n) takes **that table's lowest kept score for that image**: the highest it
could have had there, since it was not kept (keep more per query with ``--candidates-n`` to make
this bound tighter). Candidates are ranked by (-score, individual_id); ``new_individual`` is then
inserted exactly as ``submit`` does (constant threshold, or one chosen for a share of rows), and
the submission is validated and written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import read_train_csv
from whalesub.ranking.rank import NEW, PAD, TOP, check_threshold, decode_labels, insert_new_individual
from whalesub.ranking.submission import write_submission
from whalesub.ranking.threshold import threshold_for_new_share
from whalesub.workflows.scorefiles import check_output_path, read_candidates, write_candidates
from whalesub.workflows.submit import check_against_sample

log = logging.getLogger(__name__)


def blend_tables(tables: list[pd.DataFrame], weights, names=None) -> pd.DataFrame:
    """Blend candidate tables (image, individual_id, score): -> image, individual_id, score, ranked.

    Every table must list the same images; ``weights`` (> 0) are normalised to sum 1. Rows are
    sorted by image (first table's order), then -score, then individual_id.
    """
    names = names or [f"table {i + 1}" for i in range(len(tables))]
    w = np.asarray(weights, dtype=np.float64)
    if len(tables) == 0 or w.size != len(tables):
        raise ConfigError(f"give one --weight per --table ({len(tables)} tables, {w.size} weights)")
    if not np.isfinite(w).all() or (w <= 0).any():
        raise ConfigError(f"--weight values must be finite and > 0, got {w.tolist()}")
    w = w / w.sum()
    images = pd.unique(tables[0]["image"])
    for name, t in zip(names[1:], tables[1:], strict=True):
        have, want = set(t["image"]), set(images)
        if have != want:
            raise DataError(f"{name} and {names[0]} do not cover the same images: "
                            f"{len(want - have)} missing ({first_few(sorted(want - have))}), "
                            f"{len(have - want)} extra ({first_few(sorted(have - want))}); blend runs of "
                            "the same test set")
    pairs = pd.concat([t[["image", "individual_id"]] for t in tables]).drop_duplicates()
    total = np.zeros(len(pairs))
    for wt, t in zip(w, tables, strict=True):
        lowest = t.groupby("image")["score"].min()
        s = pairs.merge(t, on=["image", "individual_id"], how="left")["score"].to_numpy(np.float64, copy=True)
        missing = np.isnan(s)
        s[missing] = lowest.reindex(pairs["image"].to_numpy()[missing]).to_numpy()
        total += wt * s
    out = pairs.assign(score=total.astype(np.float32))
    order = {name: i for i, name in enumerate(images)}
    out = out.assign(_img=out["image"].map(order)).sort_values(["_img", "score", "individual_id"],
                                                               ascending=[True, False, True], kind="stable")
    return out.drop(columns="_img").reset_index(drop=True)


def candidate_arrays(blended: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Ranked blended rows -> (images [Q], labels [Q, m] codes, scores [Q, m] f32, classes [n_ind])."""
    classes, codes = np.unique(blended["individual_id"].to_numpy(dtype=str), return_inverse=True)
    images, row = np.unique(blended["image"].to_numpy(dtype=str), return_inverse=True)
    first = pd.unique(blended["image"])  # the blended order
    col = blended.groupby("image", sort=False).cumcount().to_numpy()
    m = max(int(col.max()) + 1, TOP)
    labels = np.full((images.size, m), PAD, dtype=np.int64)
    scores = np.full((images.size, m), -np.inf, dtype=np.float32)
    labels[row, col], scores[row, col] = codes, blended["score"].to_numpy(np.float32)
    order = np.searchsorted(images, first.astype(str))
    return first.astype(str).tolist(), labels[order], scores[order], classes


def blend_files(tables, weights, out, *, threshold: float | None = None, new_share: float | None = None,
                sample=None, train_csv=None, candidates_out=None) -> dict:
    """Blend candidate table files and write a validated submission; returns counts like submit's."""
    if (threshold is None) == (new_share is None):
        raise ConfigError("give exactly one of --threshold (a score in [-1, 1]) and --new-share "
                          "(share of rows to get new_individual first, e.g. 0.165)")
    if threshold is not None:
        threshold = check_threshold(threshold)
    elif not 0.0 <= new_share <= 1.0:
        raise ConfigError(f"--new-share {new_share} must be within [0, 1] (e.g. 0.165)")
    check_output_path(out, "--out")
    check_output_path(candidates_out, "--candidates-out")
    frames = [read_candidates(p) for p in tables]
    blended = blend_tables(frames, weights, [f"candidate table {str(p)!r}" for p in tables])
    images, labels, scores, classes = candidate_arrays(blended)
    rows = check_against_sample(np.asarray(images), sample, tables[0]) if sample is not None else images
    if threshold is None:
        threshold = threshold_for_new_share(scores, new_share)
    codes = insert_new_individual(labels, scores, threshold)
    preds = dict(zip(images, decode_labels(codes, classes), strict=True))
    train_ids = None if train_csv is None else read_train_csv(train_csv)["individual_id"].unique().tolist()
    write_submission(out, rows, [preds[i] for i in rows], sample_images=rows if sample is not None else None,
                     train_ids=train_ids)
    if candidates_out is not None:
        write_candidates(candidates_out, images, labels, scores, classes)
    summary = {"out": str(Path(out)), "rows": len(rows), "tables": len(tables),
               "new_first": int((codes[:, 0] == NEW).sum()), "new_any": int((codes == NEW).any(axis=1).sum()),
               "threshold": float(threshold)}
    log.info("blended %(tables)d tables into %(out)s: %(rows)d rows, new_individual first in %(new_first)d",
             summary)
    return summary
