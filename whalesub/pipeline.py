"""Pipelines over files: load and check embedding files and CSVs, rank, write.

The array modules (:mod:`whalesub.rank`, :mod:`whalesub.threshold`, :mod:`whalesub.metric`) take and
return numpy arrays and know nothing of paths; this module is the one place that reads the
``.npz`` / CSV inputs of ``whalesub submit`` and ``whalesub tune``, checks them against each other,
calls the array code and writes the result atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from whalesub.data import read_test_listing, read_train_csv, read_truth
from whalesub.errors import ConfigError, DataError, first_few
from whalesub.rank import (
    NEW,
    check_threshold,
    decode_labels,
    encode_labels,
    insert_new_individual,
    rank_queries,
)
from whalesub.store import average_views, check_compatible, load_embeddings, unit_float32
from whalesub.submission import write_submission
from whalesub.threshold import parse_grid, threshold_for_new_share, tune_arrays

log = logging.getLogger(__name__)


def load_ranking_inputs(gallery_path, queries_path, train_csv) -> dict:
    """Load and check gallery, queries and labels for ranking.

    Returns a dict: ``gallery`` [N, D] f32 unit rows, ``gallery_labels`` [N] int64 codes,
    ``classes`` [n_ind] str, ``query_ids`` [Q] str (unique; views averaged), ``queries`` [Q, D] f32.
    """
    gallery, queries = load_embeddings(gallery_path), load_embeddings(queries_path)
    check_compatible(gallery, queries)
    train = read_train_csv(train_csv)
    label_of = dict(zip(train["image"].astype(str), train["individual_id"].astype(str), strict=True))
    missing = sorted({i for i in gallery.ids.tolist() if i not in label_of})
    if missing:
        raise DataError(
            f"{len(missing)} gallery images in {str(gallery_path)!r} are not in {str(train_csv)!r}: "
            f"{first_few(missing)}; embed the gallery from that train.csv's images or add their rows to it")
    queries = average_views(queries)
    codes, classes = encode_labels([label_of[i] for i in gallery.ids.tolist()])
    log.info("gallery: %d vectors of %d images, %d individuals; queries: %d images",
             len(gallery), np.unique(gallery.ids).size, classes.size, len(queries))
    return {"gallery": unit_float32(gallery), "gallery_labels": codes, "classes": classes,
            "query_ids": queries.ids, "queries": unit_float32(queries)}


def _check_against_sample(query_ids: np.ndarray, sample, queries_path) -> list[str]:
    images = [str(i) for i in read_test_listing(sample)]
    have, want = set(query_ids.tolist()), set(images)
    problems = []
    if want - have:
        problems.append(f"{len(want - have)} images of the sample are missing from the queries: "
                        f"{first_few(sorted(want - have))} (embed every test image)")
    if have - want:
        problems.append(f"{len(have - want)} query images are not in the sample: "
                        f"{first_few(sorted(have - want))} (embed exactly the test images of the sample)")
    if problems:
        raise DataError(f"queries {str(queries_path)!r} do not match the sample {str(sample)!r}:", problems)
    return images


def submit_files(gallery_path, queries_path, train_csv, threshold: float | None, out, k: int = 100,
                 sample=None, *, new_share: float | None = None, use_gpu: bool | None = None,
                 progress: bool = True) -> dict:
    """Rank the queries against the gallery and write a validated submission CSV to ``out``.

    Give exactly one of ``threshold`` (a cosine in [-1, 1]) or ``new_share``: the threshold is
    then chosen on these queries so that that share of rows get ``new_individual`` first
    (:func:`whalesub.threshold.threshold_for_new_share`; 1st place used ~0.165). Rows follow the
    sample's order when ``sample`` (sample_submission.csv or an image folder) is given, else the
    queries' order. Returns counts: rows, new_first, new_any, individuals, threshold, ...
    """
    if (threshold is None) == (new_share is None):
        raise ConfigError("give exactly one of --threshold (a cosine in [-1, 1]) and --new-share "
                          "(share of rows to get new_individual first, e.g. 0.165)")
    if threshold is not None:
        threshold = check_threshold(threshold)
    elif not 0.0 <= new_share <= 1.0:
        raise ConfigError(f"--new-share {new_share} must be within [0, 1] (e.g. 0.165)")
    if k < 1:
        raise ConfigError(f"--k {k} must be at least 1 (number of neighbours searched per query)")
    if Path(out).is_dir():  # fail before the (long) search, not when writing
        raise ConfigError(f"--out {out} is a folder; give a file name such as {Path(out) / 'submission.csv'}")
    data = load_ranking_inputs(gallery_path, queries_path, train_csv)
    query_ids = data["query_ids"]
    images = _check_against_sample(query_ids, sample, queries_path) if sample is not None else None
    labels, scores = rank_queries(data["gallery"], data["gallery_labels"], data["queries"], k,
                                  use_gpu=use_gpu, progress=progress)
    if threshold is None:
        threshold = threshold_for_new_share(scores, new_share)
        log.info("threshold %.6f puts new_individual first in %.1f%% of the queries", threshold,
                 100 * new_share)
    codes = insert_new_individual(labels, scores, threshold)
    preds = decode_labels(codes, data["classes"])
    if images is None:
        images = query_ids.tolist()
    else:
        row_of = {name: r for r, name in enumerate(query_ids.tolist())}
        preds = [preds[row_of[name]] for name in images]
    # Checked against the sample and the train ids before anything is written.
    write_submission(out, images, preds, sample_images=images if sample is not None else None,
                     train_ids=data["classes"].tolist())
    summary = {"out": str(out), "rows": len(images), "new_first": int((codes[:, 0] == NEW).sum()),
               "new_any": int((codes == NEW).any(axis=1).sum()), "individuals": int(data["classes"].size),
               "gallery_vectors": int(data["gallery"].shape[0]), "threshold": threshold, "k": int(k)}
    log.info("wrote %(out)s: %(rows)d rows, new_individual first in %(new_first)d, present in %(new_any)d",
             summary)
    return summary


def tune_files(gallery_path, queries_path, train_csv, truth_csv, grid: str = "0.0:1.0:0.02",
               target_new_share: float | None = None, k: int = 100, *, use_gpu: bool | None = None,
               progress: bool = True) -> dict:
    """:func:`tune_arrays` on embedding files, ``train.csv`` and a truth CSV.

    ``truth_csv``: ``image,individual_id`` for every query image (``new_individual`` for animals
    not in the gallery); images missing on either side are an error naming them.
    """
    thresholds = parse_grid(grid)
    if target_new_share is not None and not 0.0 <= target_new_share <= 1.0:
        raise ConfigError(f"--target-new-share {target_new_share} must be within [0, 1] (e.g. 0.165)")
    data = load_ranking_inputs(gallery_path, queries_path, train_csv)
    truth = match_truth(data["query_ids"], truth_csv, queries_path)
    return tune_arrays(data["gallery"], data["classes"][data["gallery_labels"]], data["queries"],
                       truth, thresholds, target_new_share, k, use_gpu=use_gpu, progress=progress)


def match_truth(query_ids: np.ndarray, truth_csv, queries_path) -> list[str]:
    """The truth label of every query id [Q] from ``truth_csv`` (image,individual_id); images
    missing on either side are one error naming them."""
    truth_df = read_truth(truth_csv)
    truth_of = dict(zip(truth_df["image"].astype(str), truth_df["individual_id"].astype(str), strict=True))
    ids = query_ids.tolist()
    problems = []
    if missing := [i for i in ids if i not in truth_of]:
        problems.append(f"{len(missing)} query images have no truth row: {first_few(missing)}")
    if extra := sorted(set(truth_of) - set(ids)):
        problems.append(f"{len(extra)} truth images are not among the queries: {first_few(extra)}")
    if problems:
        raise DataError(f"truth {str(truth_csv)!r} does not match queries {str(queries_path)!r}:", problems)
    return [truth_of[i] for i in ids]
