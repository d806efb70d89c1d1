"""Submission files: ``image,predictions`` with up to five space-separated labels per row.

:func:`write_submission` checks everything before it writes and writes atomically, so a
submission file on disk is always complete and valid. :func:`validate_submission` checks a file
(or frame) against the test listing the way Kaggle would, plus the mistakes Kaggle accepts
silently but that cost score (unknown ids, repeated labels), and reports all problems at once
with the CSV line of each (header = line 1). :func:`score_submission` scores a file against a
truth file with :func:`whalesub.ranking.metric.score_breakdown`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from whalesub.core.atomic import atomic_write_text
from whalesub.core.errors import DataError, first_few
from whalesub.data.contract import (
    NEW_INDIVIDUAL,
    find_duplicate_images,
    read_table,
    read_test_listing,
    read_train_csv,
    read_truth,
)
from whalesub.ranking.metric import score_breakdown

COLUMNS = ("image", "predictions")
MAX_LABELS = 5


def _labels(cell: Sequence[str] | str) -> list[str]:
    return cell.split() if isinstance(cell, str) else [str(x) for x in cell]


def _where(entries: Sequence, n: int = 5) -> str:
    """Render line numbers, or (line, detail) pairs, for messages: first ``n`` then a count."""
    shown = [f"{e[0]} ({e[1]})" if isinstance(e, tuple) else str(e) for e in entries]
    more = len(shown) - n
    return ", ".join(shown[:n]) + (f" and {more} more" if more > 0 else "")


def check_rows(labels: Sequence[list[str]], lines: Sequence, train_ids: Iterable[str] | None = None,
               unit: str = "line") -> list[str]:
    """Problems with parsed prediction rows: empty, more than five labels, repeats, unknown labels.

    ``lines[i]`` names row ``i`` in messages (a file line or a row number, described by ``unit``).
    With ``train_ids``, every label must be one of them or ``new_individual``.
    """
    empty, too_many, repeats, unknown = [], [], [], []
    allowed = None if train_ids is None else set(train_ids) | {NEW_INDIVIDUAL}
    for row, line in zip(labels, lines, strict=True):
        if not row:
            empty.append(line)
        if len(row) > MAX_LABELS:
            too_many.append((line, f"{len(row)} labels"))
        dup = sorted({x for x in row if row.count(x) > 1})
        if dup:
            repeats.append((line, " ".join(dup)))
        if allowed is not None:
            bad = [x for x in row if x not in allowed]
            if bad:
                unknown.append((line, " ".join(bad)))
    problems = []
    if empty:
        problems.append(f"{len(empty)} row(s) with empty predictions on {unit} {_where(empty)}; "
                        f"predict at least one label (e.g. {NEW_INDIVIDUAL!r})")
    if too_many:
        problems.append(f"{len(too_many)} row(s) with more than {MAX_LABELS} labels on {unit} "
                        f"{_where(too_many)}; only the first {MAX_LABELS} are scored, keep {MAX_LABELS}")
    if repeats:
        problems.append(f"{len(repeats)} row(s) repeat a label on {unit} {_where(repeats)}; "
                        "a repeated label wastes a rank, predict distinct labels")
    if unknown:
        problems.append(f"{len(unknown)} row(s) with labels that are neither a train individual_id nor "
                        f"{NEW_INDIVIDUAL!r} on {unit} {_where(unknown)}")
    return problems


def check_coverage(images: Sequence[str], lines: Sequence[int], sample_images: Sequence[str],
                   unit: str = "line") -> list[str]:
    """Problems: test images without a row, and rows naming images outside the test listing."""
    expected, got = set(sample_images), set(images)
    problems = []
    missing = [x for x in sample_images if x not in got]
    if missing:
        problems.append(f"{len(missing)} test image(s) have no row: {first_few(missing)}; "
                        "every test image needs exactly one row")
    extra = [(line, x) for line, x in zip(lines, images, strict=True) if x not in expected]
    if extra:
        problems.append(f"{len(extra)} row(s) name images not in the test listing, on {unit} "
                        f"{_where(extra)}; remove them")
    return problems


def write_submission(path: str | os.PathLike, images: Sequence[str],
                     predictions: Sequence[Sequence[str] | str], *,
                     sample_images: Sequence[str] | None = None,
                     train_ids: Iterable[str] | None = None) -> Path:
    """Check, then atomically write ``image,predictions`` (labels joined by single spaces).

    ``predictions[i]`` is the list of labels for ``images[i]``, best first (1-5 distinct labels
    without whitespace; a space-separated string is split). With ``sample_images`` the file is
    also checked to cover exactly the test images. Nothing is written if any check fails.
    """
    path = Path(path)
    if len(images) != len(predictions):
        raise DataError(f"cannot write {path}: {len(images)} images but {len(predictions)} prediction rows.")
    labels = [_labels(p) for p in predictions]
    rows = list(range(1, len(labels) + 1))
    problems = check_rows(labels, rows, train_ids, unit="row")
    spaced = [r for r, row in zip(rows, labels, strict=True)
              if any(not x or any(ch.isspace() for ch in x) for x in row)]
    if spaced:
        problems.append(f"labels that are empty or contain whitespace in row {_where(spaced)}")
    names = pd.Series([str(x).strip() for x in images])
    problems += find_duplicate_images(names, np.asarray(rows), unit="rows")
    if (names == "").any():
        problems.append(f"empty image names in row {_where(list(np.flatnonzero(names == '') + 1))}")
    if sample_images is not None:
        problems += check_coverage(names.tolist(), rows, sample_images, unit="row")
    frame = pd.DataFrame({"image": names, "predictions": [" ".join(r) for r in labels]})
    if problems:
        raise DataError(f"refusing to write submission {path}; {len(problems)} problem(s):", problems)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(frame.itertuples(index=False, name=None))
    atomic_write_text(path, buf.getvalue())
    return path


def _load(submission: str | os.PathLike | pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, str, list[str]]:
    """(frame with stripped str columns, file lines, display name, header problems)."""
    if isinstance(submission, pd.DataFrame):
        missing = [c for c in COLUMNS if c not in submission.columns]
        if missing:
            raise DataError(f"submission frame lacks column(s) {', '.join(missing)}; "
                            f"it needs exactly {', '.join(COLUMNS)}.")
        frame = submission.reset_index(drop=True).fillna("").astype(str).apply(lambda s: s.str.strip())
        return frame, np.arange(len(frame)) + 2, "submission", []
    path = Path(submission)
    frame, lines = read_table(path, COLUMNS, "submission")
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        header = [h.strip() for h in next(csv.reader([fh.readline()]), [])]
    problems = []
    if header != list(COLUMNS):
        problems.append(f"header is {','.join(header)!r}; Kaggle expects exactly {','.join(COLUMNS)!r}")
    return frame, lines, str(path), problems


def read_submission(path: str | os.PathLike | pd.DataFrame) -> dict[str, list[str]]:
    """Parse a submission into ``{image: [labels, best first]}`` (file order kept).

    Raises :class:`DataError` for missing columns, empty image names and duplicate images
    (which a dict would silently merge). Label problems are left to :func:`validate_submission`.
    """
    frame, lines, name, _ = _load(path)
    problems = find_duplicate_images(frame["image"], lines)
    empty = (frame["image"] == "").to_numpy()
    if empty.any():
        problems.append(f"{int(empty.sum())} row(s) without an image name on line "
                        f"{_where(lines[empty].tolist())}")
    if problems:
        raise DataError(f"cannot read submission {name}:", problems)
    return {img: p.split() for img, p in zip(frame["image"], frame["predictions"], strict=True)}


def validate_submission(submission: str | os.PathLike | pd.DataFrame, sample_images: Sequence[str],
                        train_ids: Iterable[str] | None = None) -> dict:
    """Check a submission against the test listing; raise :class:`DataError` with every problem.

    Checks: header exactly ``image,predictions``; every image of ``sample_images`` exactly once
    (missing, extra and duplicate images reported with counts and names/lines); 1-5
    space-separated labels per row, no repeats; with ``train_ids``, each label a train
    ``individual_id`` or ``new_individual``. Returns a summary: ``n_rows``, ``n_labels``
    (distinct), ``n_full`` (rows with five labels), ``n_new_at1``, ``new_share_at1``.
    """
    frame, lines, name, problems = _load(submission)
    extra_cols = [c for c in frame.columns if c not in COLUMNS]
    if extra_cols:
        problems.append(f"unexpected column(s) {', '.join(map(repr, extra_cols))}; "
                        "keep only image,predictions")
    problems += find_duplicate_images(frame["image"], lines)
    problems += check_coverage(frame["image"].tolist(), lines.tolist(), sample_images)
    labels = [p.split() for p in frame["predictions"]]
    problems += check_rows(labels, [int(x) for x in lines], train_ids)
    spacing = [int(line) for line, p, row in zip(lines, frame["predictions"], labels, strict=True)
               if row and p != " ".join(row)]
    if spacing:
        problems.append(f"{len(spacing)} row(s) separate labels by something other than single spaces, on "
                        f"line {_where(spacing)}; Kaggle splits on ' ', so a tab or double space makes "
                        "a wrong label")
    if problems:
        raise DataError(f"submission {name} has {len(problems)} problem(s):", problems)
    n_new = sum(1 for row in labels if row[0] == NEW_INDIVIDUAL)
    return {"n_rows": len(frame), "n_labels": len({x for row in labels for x in row}),
            "n_full": sum(len(row) == MAX_LABELS for row in labels), "n_new_at1": n_new,
            "new_share_at1": n_new / len(frame) if len(frame) else 0.0}


def check_submission_file(submission: str | os.PathLike, sample: str | os.PathLike,
                          train_csv: str | os.PathLike | None = None) -> dict:
    """:func:`validate_submission` with the listing read from ``sample`` (a CSV or an image folder)
    and, if given, the allowed ids from ``train_csv``."""
    sample_images = read_test_listing(sample)
    train_ids = None if train_csv is None else set(read_train_csv(train_csv)["individual_id"])
    return validate_submission(submission, sample_images, train_ids)


def score_submission(submission: str | os.PathLike, truth: str | os.PathLike) -> dict:
    """Score a submission file against a truth file ``image,individual_id``.

    Both must name the same images; otherwise :class:`DataError` names the images each lacks.
    Returns :func:`whalesub.ranking.metric.score_breakdown` in the truth file's row order.
    """

    preds = read_submission(submission)
    truth_frame = read_truth(truth)
    truth_images = truth_frame["image"].tolist()
    problems = []
    not_in_sub = [x for x in truth_images if x not in preds]
    if not_in_sub:
        problems.append(f"{len(not_in_sub)} image(s) of truth file {truth} are not in the submission: "
                        f"{first_few(not_in_sub)}")
    truth_set = set(truth_images)
    unknown = [x for x in preds if x not in truth_set]
    if unknown:
        problems.append(f"{len(unknown)} image(s) of the submission are not in truth file {truth}: "
                        f"{first_few(unknown)}")
    if problems:
        raise DataError(f"cannot score {submission} against {truth}: they must list the same images "
                        "(is the truth file for this test set?).", problems)
    return score_breakdown([preds[x] for x in truth_images], truth_frame["individual_id"].tolist())
