"""Error report: one self-contained HTML page to look at a ranking's mistakes.

:func:`write_report` ranks the queries against the gallery with the very code ``whalesub submit``
uses (:func:`whalesub.ranking.rank.rank_queries`), scores with the code of ``whalesub score``
(:func:`whalesub.ranking.submission.score_submission`, :mod:`whalesub.ranking.metric`) and sweeps the
threshold
with the code of ``whalesub tune`` (:func:`whalesub.ranking.threshold.grid_search`). The page holds:

- MAP@5 overall, for known and new animals, and per species (truth's species: the truth
  individual's species in ``train.csv`` by :func:`whalesub.data.contract.individual_species`, the
  rule per-species thresholds use; for new animals the truth file's ``species`` column
  when it has one, as ``oof_labels.csv`` and ``test_truth_full.csv`` do, else ``unknown``);
- MAP@5 against the threshold with the chosen threshold marked, and histograms of the top-1
  cosine for known and new animals;
- the worst queries (lowest AP@5, then the most confidently wrong): the query thumbnail beside
  its predictions; each individual is shown by its best-matching gallery image with its score,
  ``new_individual`` where it ranked, the correct one outlined, and the truth's own best image
  when it was missed;
- the equivalent ``whalesub report`` command and its inputs.

Without a truth file the page shows candidates and scores only (for eyeballing a test set),
for the queries whose top-1 cosine lies closest to the threshold.

The predictions are the submission's rows when one is given, else the ranking with
``new_individual`` inserted at the threshold. The threshold is ``threshold`` when given, else
inferred from the submission (the interval of thresholds that reproduce its ``new_individual``
positions), else the best of the grid. Size: at most ``max_queries`` rows with up to 7 JPEG
thumbnails of at most ``thumb_px`` pixels each (about 2-5 KB each at 96 px), so the page stays
well under 3 MB at the defaults, whatever the number of queries.
"""

from __future__ import annotations

import logging
import os
import shlex
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import ConfigError, DataError, first_few
from whalesub.data.contract import NEW_INDIVIDUAL, individual_species, read_table, read_train_csv
from whalesub.ranking.metric import score_breakdown, scores_at_5
from whalesub.ranking.rank import (
    NEW,
    PAD,
    TOP,
    check_threshold,
    decode_labels,
    insert_new_individual,
    rank_queries,
)
from whalesub.ranking.submission import read_submission, score_submission
from whalesub.ranking.threshold import grid_search, parse_grid, truth_codes
from whalesub.report.render import render_report
from whalesub.workflows.decision import FILE as DECISION_FILE
from whalesub.workflows.decision import describe_rule, read_decision, resolve
from whalesub.workflows.predict import check_gallery, decision_thresholds, rank_by_decision
from whalesub.workflows.submit import load_ranking_inputs, read_truth_for

log = logging.getLogger(__name__)

DEFAULT_GRID = "0.0:1.0:0.02"


def read_predictions(submission, query_ids: list[str]) -> list[list[str]]:
    """The submission's labels for each query, in query order; every query needs exactly one row."""
    rows = read_submission(submission)
    problems = []
    if missing := [i for i in query_ids if i not in rows]:
        problems.append(f"{len(missing)} query images have no submission row: {first_few(missing)}")
    if extra := sorted(set(rows) - set(query_ids)):
        problems.append(f"{len(extra)} submission rows name images that are not among the queries: "
                        f"{first_few(extra)}")
    if problems:
        raise DataError(f"submission {str(submission)!r} does not match the queries:", problems)
    return [rows[i] for i in query_ids]


def read_labelled_truth(truth, query_ids: list[str], queries) -> tuple[list[str], list[str] | None]:
    """Truth ids [Q] in query order and, when the file has a ``species`` column, species [Q]."""
    labels = read_truth_for(truth, query_ids, queries)  # checks the file and that it matches the queries
    full, _ = read_table(truth, ("image",), "truth")
    species = None
    if "species" in full.columns:
        species_of = dict(zip(full["image"], full["species"], strict=True))
        species = [species_of[i] for i in query_ids]
    return labels, species


def infer_threshold(cand_labels: np.ndarray, cand_scores: np.ndarray, pred_codes: np.ndarray):
    """Thresholds that reproduce the ``new_individual`` positions of ``pred_codes``: ``(lo, hi, n)``.

    ``cand_labels``/``cand_scores`` [Q, 5] from :func:`~whalesub.ranking.rank.rank_queries`, ``pred_codes``
    [Q, 5] the predictions as codes (NEW, PAD, class index; -3 for a label outside the gallery).
    Every threshold t with lo < t <= hi gives the same rows (comparisons in float32, as in
    :func:`~whalesub.ranking.rank.insert_new_individual`); ``n`` counts the rows used: those whose
    individuals are the ranking's candidates in order. ``None`` when no such row exists.
    """
    is_new = pred_codes == NEW
    pos = np.where(is_new.any(axis=1), is_new.argmax(axis=1), TOP)
    others = np.where(is_new, PAD, pred_codes)
    same = np.array([[c for c in row if c != PAD] == [c for c in cand[:TOP] if c != PAD][:TOP - (p < TOP)]
                     for row, cand, p in zip(others, cand_labels, pos, strict=True)], dtype=bool)
    if not same.any():
        return None
    s = cand_scores[same, :TOP].astype(np.float64)
    p = pos[same]
    rows = np.arange(p.size)
    below = s[rows, np.minimum(p, TOP - 1)]  # the first candidate after new_individual: < t
    above = s[rows, np.maximum(p - 1, 0)]  # the last candidate before it: >= t
    lo = float(np.max(below[(p < TOP) & np.isfinite(below)], initial=-np.inf))
    hi = float(np.min(above[p > 0], initial=np.inf))
    return lo, hi, int(same.sum())


def choose_threshold(threshold, preds, labels, scores, classes, search) -> dict:
    """The threshold marked in the report: ``value``, ``source``, and ``lo``/``hi`` when inferred."""
    if threshold is not None:
        return {"value": check_threshold(threshold), "source": "given (--threshold)"}
    if preds is not None:
        index = {c: i for i, c in enumerate(classes.tolist())}
        codes = np.full((len(preds), TOP), PAD, dtype=np.int64)
        for r, row in enumerate(preds):
            for j, label in enumerate(row[:TOP]):
                codes[r, j] = NEW if label == NEW_INDIVIDUAL else index.get(label, -3)
        found = infer_threshold(labels, scores, codes)
        if found is not None and found[0] < found[1]:
            lo, hi, n = found
            value = float(np.float32((max(lo, -1.0) + min(hi, 1.0)) / 2))  # compared in float32
            value = value if value > lo else hi
            return {"value": value, "lo": lo, "hi": hi,
                    "source": f"inferred from the submission ({n} of {len(preds)} rows match the ranking)"}
        log.warning("no single threshold reproduces the submission's new_individual positions")
    if search is not None:
        return {"value": search.best_threshold, "source": "best of the grid (no --threshold given)"}
    raise ConfigError("the report needs a threshold: pass --threshold, or a --submission made from these "
                      "embeddings, or a --truth file (then the best threshold of the grid is used)")


def species_table(preds, truth, species) -> list[dict]:
    """MAP@5 breakdown (:func:`whalesub.ranking.metric.score_breakdown`) per species, largest first."""
    groups: dict[str, list[int]] = {}
    for r, s in enumerate(species):
        groups.setdefault(s, []).append(r)
    out = []
    for name, rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        res = score_breakdown([preds[r] for r in rows], [truth[r] for r in rows])
        out.append({"species": name, **res})
    return out


def truth_species(truth: list[str], file_species, species_of: dict) -> list[str]:
    """Species per query: the truth individual's in train.csv, else the truth file's, else unknown."""
    out = []
    for r, t in enumerate(truth):
        own = file_species[r] if file_species is not None and file_species[r] else None
        out.append(species_of.get(t) or own or ("unknown (new)" if t == NEW_INDIVIDUAL else "unknown"))
    return out


def pick_rows(ap, top1: np.ndarray, threshold: float, n: int) -> np.ndarray:
    """Rows to show: lowest AP@5 first, then highest top-1 cosine (confidently wrong); without
    truth (``ap`` None) the rows whose top-1 cosine is closest to the threshold."""
    t1 = np.where(np.isfinite(top1), top1, -2.0)
    order = np.lexsort((-t1, np.asarray(ap))) if ap is not None else np.argsort(np.abs(t1 - threshold),
                                                                                kind="stable")
    return order[:n]


def write_report(out, gallery, queries, train_csv, *, submission=None, truth=None, images_dir=None,
                 gallery_images_dir=None, threshold: float | None = None, grid=DEFAULT_GRID, k: int = 100,
                 max_queries: int = 50, thumb_px: int = 96, command: str | None = None,
                 use_gpu: bool | None = None, progress: bool = True, decision=None) -> dict:
    """Write the HTML error report to ``out`` (atomically) and return its numbers as a dict.

    ``gallery``/``queries``: embedding files; ``train_csv``: gallery image -> individual_id and
    species; ``submission``: the predictions to analyse (else the ranking at the threshold);
    ``truth``: ``image,individual_id[,species]`` (omit for candidates and scores only);
    ``images_dir``: query images, ``gallery_images_dir``: gallery images (default ``images_dir``;
    without either the page has no thumbnails); ``grid``: thresholds as for ``whalesub tune``
    (a string or a list of floats); ``max_queries``: rows in the gallery of worst queries;
    ``thumb_px``: longest thumbnail side in pixels. ``decision``: a ``decision.json``
    (:mod:`whalesub.workflows.decision`): rank with its scoring (kNN or the centre blend) and ``k``,
    and place new_individual by its rule, i.e. analyse exactly the submitted ranking; ``gallery``
    and ``train_csv`` may then be None (the decision's own). Keys of the result: ``n``, ``threshold``,
    ``scores`` (``whalesub score``'s breakdown), ``species``, ``curve``, ``shown``, ``out``, ...
    """
    if not 0 <= max_queries <= 1000:
        raise ConfigError(f"--max-queries {max_queries} must be within [0, 1000] (it caps the page size)")
    if not 16 <= thumb_px <= 512:
        raise ConfigError(f"--thumb-px {thumb_px} must be within [16, 512]")
    if k < 1:
        raise ConfigError(f"--k {k} must be at least 1 (number of neighbours searched per query)")
    if Path(out).is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {Path(out) / 'report.html'}")
    thresholds = parse_grid(grid if isinstance(grid, str) else ",".join(str(float(x)) for x in grid))
    decided = None
    if decision is not None:
        if threshold is not None:
            raise ConfigError("give --decision or --threshold, not both (the decision places new_individual)")
        decided = read_decision(decision)
        decision = Path(decision) / DECISION_FILE if Path(decision).is_dir() else Path(decision)
        k = int(decided["k"])
        gallery = gallery if gallery is not None else check_gallery(decided, decision)
        train_csv = train_csv if train_csv is not None else resolve(decision, decided["gallery"]["labels"])
    if gallery is None or train_csv is None:
        raise ConfigError("the report needs --gallery and --train-csv (or a --decision naming them)")
    data = load_ranking_inputs(gallery, queries, train_csv)
    ids, classes = data["query_ids"].tolist(), data["classes"]
    train = read_train_csv(train_csv)
    species_of = individual_species(train).to_dict()  # the one species rule (thresholds use it too)
    preds = read_predictions(submission, ids) if submission is not None else None  # checked before the
    search = truth_list = species = None  # search, which is the long part
    if truth is not None:
        truth_list, file_species = read_labelled_truth(truth, ids, queries)
    if decided is None:
        labels, scores = rank_queries(data["gallery"], data["gallery_labels"], data["queries"], k,
                                      use_gpu=use_gpu, progress=progress)
    else:
        labels, scores = rank_by_decision(data, decided, decision, use_gpu=use_gpu, progress=progress)
    result: dict = {"n": len(ids), "k": int(k), "has_truth": truth is not None, "submission": submission}
    if truth is not None:
        search = grid_search(labels, scores, truth_codes(truth_list, classes), thresholds)
    row_thr = None
    if decided is None:
        thr = choose_threshold(threshold, preds, labels, scores, classes, search)
    else:
        row_thr = decision_thresholds(decided, labels, scores, data["class_species"])
        per_row = np.ndim(row_thr) > 0
        thr = {"value": float(decided["new_individual"]["default"]) if per_row else float(row_thr),
               "source": f"decision {decision}: {describe_rule(decided)}"
               + (" (per-species thresholds; the default is marked)" if per_row else "")}
        result["scoring"] = decided["scoring"]
    if preds is None:
        preds = decode_labels(insert_new_individual(labels, scores, thr["value"] if row_thr is None
                                                    else row_thr), classes)
    ap = None
    if truth is not None:
        result["scores"] = (score_submission(submission, truth) if submission is not None
                            else score_breakdown(preds, truth_list))
        species = truth_species(truth_list, file_species, species_of)
        result["species"] = species_table(preds, truth_list, species)
        result["curve"] = search.table()
        if row_thr is not None and np.ndim(row_thr) > 0:  # per species: MAP@5 of the rows it gives
            ranked = decode_labels(insert_new_individual(labels, scores, row_thr), classes)
            thr["map5"] = float(score_breakdown(ranked, truth_list)["map5"])
        else:
            at = grid_search(labels, scores, truth_codes(truth_list, classes), np.array([thr["value"]]))
            thr["map5"] = float(at.map5[0])
        ap = scores_at_5(preds, truth_list)
    result["threshold"] = thr
    result["top1"] = scores[:, 0].astype(np.float64)
    result["is_new"] = None if truth_list is None else np.array([t == NEW_INDIVIDUAL for t in truth_list])
    result["pred_new_first"] = float(np.mean([bool(p) and p[0] == NEW_INDIVIDUAL for p in preds]))
    shown = pick_rows(ap, result["top1"], thr["value"], max_queries)
    result["rows"] = [describe_row(int(q), data, labels, scores, preds, truth_list, species, ap,
                                   species_of) for q in shown]
    result["shown"] = len(shown)
    result["command"] = command or equivalent_command(
        out, gallery, queries, train_csv, submission=submission, truth=truth, images_dir=images_dir,
        gallery_images_dir=gallery_images_dir, threshold=threshold, grid=grid, k=k,
        max_queries=max_queries, thumb_px=thumb_px, decision=decision)
    result["inputs"] = describe_inputs(gallery=gallery, queries=queries, train_csv=train_csv,
                                       submission=submission, truth=truth)
    query_dir = Path(images_dir) if images_dir is not None else None
    gallery_dir = Path(gallery_images_dir) if gallery_images_dir is not None else query_dir
    html = render_report(result, query_dir, gallery_dir, thumb_px, progress=progress)
    atomic_write_text(out, html)
    result["out"], result["bytes"] = str(out), len(html.encode("utf-8"))
    log.info("wrote %s: %d queries, %d shown, %.0f KB", out, len(ids), len(shown), result["bytes"] / 1024)
    return result


def describe_row(q, data, labels, scores, preds, truth, species, ap, species_of) -> dict:
    """One row of the worst-queries gallery: the query and a cell per predicted label.

    An individual's cell shows its best-matching gallery image (highest cosine among its vectors)
    and its score from the ranking (``ranked`` False when the submission names an individual that
    is not among the ranking's candidates: then the cosine of that best image is shown).
    """
    index = {c: i for i, c in enumerate(data["classes"].tolist())}
    cand = {int(c): float(s) for c, s in zip(labels[q], scores[q], strict=True) if c != PAD}
    t = None if truth is None else truth[q]

    def cell(label: str) -> dict:
        if label == NEW_INDIVIDUAL:
            return {"label": label, "image": None, "score": None, "ranked": True, "correct": t == label}
        code = index.get(label)
        if code is None:
            return {"label": label, "image": None, "score": None, "ranked": False, "correct": t == label,
                    "note": "not in the gallery"}
        rows = np.flatnonzero(data["gallery_labels"] == code)
        sims = data["gallery"][rows] @ data["queries"][q]
        best = int(np.argmax(sims))
        ranked = code in cand
        return {"label": label, "image": str(data["gallery_ids"][rows[best]]), "correct": t == label,
                "score": cand[code] if ranked else float(sims[best]), "ranked": ranked,
                "species": species_of.get(label)}

    cells = [cell(x) for x in preds[q][:TOP]]
    missed = None
    if t is not None and t != NEW_INDIVIDUAL and t not in preds[q][:TOP]:
        missed = cell(t)
    return {"image": data["query_ids"][q], "truth": t, "species": None if species is None else species[q],
            "ap": None if ap is None else ap[q], "top1": float(scores[q, 0]), "cells": cells,
            "missed": missed}


def equivalent_command(out, gallery, queries, train_csv, **options) -> str:
    """The ``whalesub report`` command line that writes this report."""
    parts = ["whalesub", "report", "--gallery", str(gallery), "--queries", str(queries), "--train-csv",
             str(train_csv)]
    for key, value in options.items():
        if value is None:
            continue
        if key == "grid" and not isinstance(value, str):
            value = ",".join(f"{float(x):g}" for x in value)
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(parts + ["--out", str(out)])


def describe_inputs(**paths) -> list[dict]:
    """Name, path, size and modification time of each input file given."""
    out = []
    for name, path in paths.items():
        if path is None:
            continue
        st = os.stat(path)
        out.append({"name": name, "path": str(path), "bytes": st.st_size,
                    "modified": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds")})
    return out
