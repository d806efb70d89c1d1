"""Pipelines over files: load and check embedding files and CSVs, rank, write.

The array modules (:mod:`whalesub.ranking.rank`, :mod:`whalesub.ranking.threshold`,
:mod:`whalesub.ranking.metric`) take and
return numpy arrays and know nothing of paths; this module is the one place that reads the
``.npz`` / CSV inputs of ``whalesub submit`` and ``whalesub tune``, checks them against each other,
calls the array code and writes the result atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import individual_species, read_test_listing, read_train_csv, read_truth
from whalesub.ranking.centres import check_centre_source, check_ratio, rank_with_centres
from whalesub.ranking.rank import (
    NEW,
    TOP,
    check_threshold,
    decode_labels,
    encode_labels,
    insert_new_individual,
    rank_queries,
)
from whalesub.ranking.store import average_views, check_compatible, load_embeddings, unit_float32
from whalesub.ranking.submission import write_submission
from whalesub.ranking.threshold import (
    check_new_share,
    parse_grid,
    row_thresholds,
    threshold_for_new_share,
    truth_codes,
    tune_arrays,
    tune_candidates,
)
from whalesub.workflows.scorefiles import (
    blend_centres,
    check_output_path,
    check_threshold_scoring,
    load_centres,
    read_thresholds,
    scoring_stamp,
    write_candidates,
    write_thresholds,
)

log = logging.getLogger(__name__)


def load_ranking_inputs(gallery_path, queries_path, train_csv) -> dict:
    """Load and check gallery, queries and labels for ranking.

    Returns a dict: ``gallery`` [N, D] f32 unit rows, ``gallery_labels`` [N] int64 codes,
    ``classes`` [n_ind] str, ``query_ids`` [Q] str (unique; views averaged), ``queries`` [Q, D] f32,
    ``gallery_ids`` [N] str (the image of each gallery vector), ``class_species`` [n_ind] str (each
    individual's most frequent species in train.csv) and ``queries_file`` (the
    :class:`~whalesub.ranking.store.Embeddings` read, for its meta).
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
            "query_ids": queries.ids, "queries": unit_float32(queries), "gallery_ids": gallery.ids,
            "queries_file": queries, "class_species": _class_species(train, classes)}


def _class_species(train, classes: np.ndarray) -> np.ndarray:
    """[n_ind] str: each individual's species (:func:`~whalesub.data.contract.individual_species`),
    "" if not in train."""
    return individual_species(train).reindex(classes).fillna("").to_numpy(dtype=str)


def check_against_sample(query_ids: np.ndarray, sample, queries_path) -> list[str]:
    """The sample's images in its order; DataError unless they are exactly ``query_ids``."""
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
                 progress: bool = True, thresholds=None, centres=None, knn_ratio: float = 1.0,
                 centre_k: int | None = None, candidates_out=None, candidates_n: int = TOP,
                 threshold_knn_ratio: float | None = None, centres_from: str = "gallery") -> dict:
    """Rank the queries against the gallery and write a validated submission CSV to ``out``.

    Give exactly one of ``threshold`` (a cosine in [-1, 1]) or ``new_share``: the threshold is
    then chosen on these queries so that that share of rows get ``new_individual`` first
    (:func:`whalesub.ranking.threshold.threshold_for_new_share`; 1st place used ~0.165). Rows follow the
    sample's order when ``sample`` (sample_submission.csv or an image folder) is given, else the
    queries' order. Returns counts: rows, new_first, new_any, individuals, threshold, ...

    ``thresholds``: instead, a per-species threshold file (:mod:`whalesub.workflows.scorefiles`): each row
    takes the threshold of its top candidate's species. ``knn_ratio`` r < 1: individuals scored
    r x kNN + (1 - r) x centre cosine (:mod:`whalesub.ranking.centres`, ``centre_k`` centres searched
    per query, default ``k``), every centre from ``centres_from``: "gallery" (the mean of the
    individual's gallery vectors) or "head" (``centres``: class_centres.npz paths, one per model,
    holding every individual); r = 1 is today's kNN ranking, unchanged. ``candidates_out``: also
    write every query's best ``candidates_n`` candidates with their scores (a table for ``whalesub blend``).

    A threshold only fits the scores it was tuned on: a ``thresholds`` file tuned on another
    scoring (its ``"scoring"`` stamp; none = plain kNN) is refused, and so is a bare ``threshold``
    with ``knn_ratio`` < 1 unless ``threshold_knn_ratio`` (the ratio it was tuned at) equals it
    (:mod:`whalesub.workflows.scorefiles`). ``new_share`` needs no such check.
    """
    if sum(x is not None for x in (threshold, new_share, thresholds)) != 1:
        raise ConfigError("give exactly one of --threshold (a cosine in [-1, 1]), --new-share "
                          "(share of rows to get new_individual first, e.g. 0.165) and --thresholds "
                          "(a per-species file from `whalesub tune --per-species`)")
    if threshold is not None:
        threshold = check_threshold(threshold)
    elif new_share is not None:
        check_new_share(new_share, "--new-share")
    if k < 1:
        raise ConfigError(f"--k {k} must be at least 1 (number of neighbours searched per query)")
    if Path(out).is_dir():  # fail before the (long) search, not when writing
        raise ConfigError(f"--out {out} is a folder; give a file name such as {Path(out) / 'submission.csv'}")
    check_output_path(candidates_out, "--candidates-out")
    check_centre_inputs(knn_ratio, centres_from, centres)
    if candidates_n < 1:
        raise ConfigError(f"--candidates-n {candidates_n} must be at least 1")
    wanted, by_species = check_threshold_inputs(threshold, thresholds, knn_ratio, centre_k, k,
                                                threshold_knn_ratio, centres_from)
    data = load_ranking_inputs(gallery_path, queries_path, train_csv)
    query_ids = data["query_ids"]
    images = check_against_sample(query_ids, sample, queries_path) if sample is not None else None
    labels, scores = _rank(data, k, max(TOP, candidates_n) if candidates_out else TOP, centres, knn_ratio,
                           centre_k, centres_from, use_gpu=use_gpu, progress=progress)
    if by_species is not None:
        threshold = row_thresholds(labels, data["class_species"], by_species[1], by_species[0])
        log.info("per-species thresholds from %s: %d species, global %.4f", thresholds, len(by_species[1]),
                 by_species[0])
    elif threshold is None:
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
    if candidates_out is not None:
        write_candidates(candidates_out, query_ids.tolist(), labels, scores, data["classes"])
    if by_species is not None:
        threshold = by_species[0]
    summary = {"out": str(out), "rows": len(images), "new_first": int((codes[:, 0] == NEW).sum()),
               "new_any": int((codes == NEW).any(axis=1).sum()), "individuals": int(data["classes"].size),
               "gallery_vectors": int(data["gallery"].shape[0]), "threshold": threshold, "k": int(k),
               "knn_ratio": float(knn_ratio), "scoring": wanted}
    log.info("wrote %(out)s: %(rows)d rows, new_individual first in %(new_first)d, present in %(new_any)d",
             summary)
    return summary


def check_centre_inputs(knn_ratio: float, centres_from: str, centres) -> None:
    """ConfigError for centre options that do not fit (cheap: before long work): ``--centres`` with
    ``--centres-from gallery`` (a blend), or ``--centres-from head`` at r < 1 without ``--centres``."""
    check_centre_source(centres_from)
    if check_ratio(knn_ratio) < 1 and centres_from == "head" and not centres:
        raise ConfigError(f"--knn-ratio {knn_ratio} with --centres-from head needs the heads' class centres: "
                          "pass --centres class_centres.npz (one per model, from `whalesub export`), or use "
                          "--centres-from gallery (no head needed)")
    if knn_ratio < 1 and centres_from == "gallery" and centres:
        raise ConfigError("--centres-from gallery builds every centre from the gallery: drop --centres, or "
                          "pass --centres-from head to blend with those class_centres.npz")


def check_threshold_inputs(threshold, thresholds, knn_ratio: float, centre_k: int | None, k: int,
                           threshold_knn_ratio: float | None, centres_from: str = "gallery"):
    """The scoring stamp requested and the threshold file read (or None), refusing a threshold tuned
    on another scoring (:func:`whalesub.workflows.scorefiles.check_scoring`,
    :func:`~whalesub.workflows.scorefiles.check_threshold_scoring`). Cheap: run it before long work."""
    wanted = scoring_stamp(check_ratio(knn_ratio), centre_k, k, centres_from)
    if threshold is not None:
        check_threshold_scoring(None if threshold_knn_ratio is None else check_ratio(threshold_knn_ratio),
                                wanted)
    elif threshold_knn_ratio is not None:
        raise ConfigError("--threshold-knn-ratio states the scoring a --threshold number was tuned on; "
                          "give it only with --threshold")
    return wanted, (read_thresholds(thresholds, scoring=wanted) if thresholds is not None else None)


def _rank(data: dict, k: int, n_max: int, centres, knn_ratio: float, centre_k: int | None,
          centres_from: str = "gallery", *, use_gpu: bool | None,
          progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Candidates [Q, n_max]: kNN (:func:`rank_queries`) at r = 1, else blended with every individual's
    centre from ``centres_from`` (:func:`whalesub.workflows.scorefiles.blend_centres`)."""
    if knn_ratio == 1.0:
        if centres:
            load_centres(centres, data["classes"], data["queries_file"])
            log.info("--knn-ratio 1: the class centres are checked but not used (kNN only)")
        return rank_queries(data["gallery"], data["gallery_labels"], data["queries"], k, n_max,
                            use_gpu=use_gpu, progress=progress)
    if centre_k is not None and centre_k < 1:
        raise ConfigError(f"--centre-k {centre_k} must be at least 1")
    mat = blend_centres(data, centres_from, centres)
    return rank_with_centres(data["gallery"], data["gallery_labels"], data["queries"], mat,
                             np.ones(mat.shape[0], dtype=bool), knn_ratio, k, n_max, centre_k=centre_k,
                             use_gpu=use_gpu, progress=progress)


def tune_files(gallery_path, queries_path, train_csv, truth_csv, grid: str = "0.0:1.0:0.02",
               target_new_share: float | None = None, k: int = 100, *, use_gpu: bool | None = None,
               progress: bool = True, per_species_out=None, k0: float = 20.0, centres=None,
               knn_ratio: float = 1.0, centre_k: int | None = None, centres_from: str = "gallery") -> dict:
    """:func:`tune_arrays` on embedding files, ``train.csv`` and a truth CSV.

    ``truth_csv``: ``image,individual_id`` for every query image (``new_individual`` for animals
    not in the gallery); images missing on either side are an error naming them.
    ``per_species_out``: also tune per-species thresholds (shrinkage ``k0``) and write that file.
    ``centres``, ``knn_ratio``, ``centre_k``, ``k``, ``centres_from``: the scoring, as for
    :func:`submit_files`, so that blended scores are tuned on blended scores; the result (and the
    per-species file) carries its :func:`whalesub.workflows.scorefiles.scoring_stamp` under ``"scoring"``.
    """
    thresholds = parse_grid(grid)
    check_output_path(per_species_out, "--per-species")
    if target_new_share is not None:
        check_new_share(target_new_share, "--target-new-share")
    if k < 1:
        raise ConfigError(f"--k {k} must be at least 1 (number of neighbours searched per query)")
    check_centre_inputs(knn_ratio, centres_from, centres)
    stamp = scoring_stamp(knn_ratio, centre_k, k, centres_from)
    data = load_ranking_inputs(gallery_path, queries_path, train_csv)
    truth = read_truth_for(truth_csv, data["query_ids"].tolist(), queries_path)
    species = data["class_species"] if per_species_out is not None else None
    if knn_ratio == 1.0 and not centres:
        result = tune_arrays(data["gallery"], data["classes"][data["gallery_labels"]], data["queries"],
                             truth, thresholds, target_new_share, k, use_gpu=use_gpu, progress=progress,
                             k0=k0, class_species=species)
    else:
        labels, scores = _rank(data, k, TOP, centres, knn_ratio, centre_k, centres_from, use_gpu=use_gpu,
                               progress=progress)
        result = tune_candidates(labels, scores, truth_codes(truth, data["classes"]), thresholds,
                                 target_new_share, k, class_species=species, k0=k0)
    result["scoring"] = stamp
    if per_species_out is not None:
        write_thresholds(per_species_out, result["per_species"], scoring=stamp)
    return result


def read_truth_for(truth_csv, query_ids: list[str], queries_path) -> list[str]:
    """The truth ``individual_id`` of each query, in query order (:func:`whalesub.data.contract.read_truth`).

    Query images without a truth row and truth rows naming no query are one error naming them.
    """
    truth_df = read_truth(truth_csv)
    truth_of = dict(zip(truth_df["image"].astype(str), truth_df["individual_id"].astype(str), strict=True))
    problems = []
    if missing := [i for i in query_ids if i not in truth_of]:
        problems.append(f"{len(missing)} query images have no truth row: {first_few(missing)}")
    if extra := sorted(set(truth_of) - set(query_ids)):
        problems.append(f"{len(extra)} truth images are not among the queries: {first_few(extra)}")
    if problems:
        raise DataError(f"truth {str(truth_csv)!r} does not match queries {str(queries_path)!r}:", problems)
    return [truth_of[i] for i in query_ids]
