"""Independent oracles for the tests: plain-Python re-derivations that share no code with whalesub.

``map5_by_hand``: MAP@5 of a submission file against a truth file, read with the csv module and
scored by the competition's rule (1/rank of the first correct label among the first five, else 0),
overall and split into rows whose truth is a known animal or ``new_individual``.
"""

from __future__ import annotations

import csv
from pathlib import Path

NEW = "new_individual"


def _ap5(predicted: list[str], truth: str) -> float:
    top = predicted[:5]
    return 1.0 / (top.index(truth) + 1) if truth in top else 0.0


def map5_by_hand(submission: Path, truth: Path, images: set[str] | None = None) -> dict:
    """{"map5", "map5_known", "map5_new", "n", "n_known", "n_new"} (None for an empty split);
    ``images``: score only these truth rows."""
    with open(submission, newline="") as fh:
        preds = {r["image"]: r["predictions"].split() for r in csv.DictReader(fh)}
    with open(truth, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if images is None or r["image"] in images]
    aps = [(_ap5(preds[r["image"]], r["individual_id"]), r["individual_id"] == NEW) for r in rows]
    known, new = [ap for ap, is_new in aps if not is_new], [ap for ap, is_new in aps if is_new]
    return {
        "map5": (sum(known) + sum(new)) / len(rows),
        "map5_known": sum(known) / len(known) if known else None,
        "map5_new": sum(new) / len(new) if new else None,
        "n": len(rows),
        "n_known": len(known),
        "n_new": len(new),
    }


def assert_scores_match(got: dict, want: dict, tol: float = 1e-12) -> None:
    """``got`` (a whalesub score dict) agrees with ``want`` (:func:`map5_by_hand`) on every key of
    ``want``: counts exactly, MAP@5 values within ``tol`` (sums of 1/r in another order)."""
    for key, value in want.items():
        if value is None or isinstance(value, int):
            assert got[key] == value, (key, got[key], value)
        else:
            assert abs(got[key] - value) <= tol, (key, got[key], value)
