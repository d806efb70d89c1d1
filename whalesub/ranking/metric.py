"""MAP@5 with Happywhale's semantics, and a breakdown by known and new animals.

Per image the score is ``1 / rank`` of the first prediction equal to the true id among the first
five, and 0 if it is not among them (the competition's ``map_per_image``:
``1 / (predictions[:5].index(label) + 1)``). Consequences, all tested:

- a label repeated *after* the hit changes nothing; a wrong label repeated *before* it still
  occupies a rank (``[a, a, t]`` scores 1/3);
- more than five predictions: only the first five count; fewer than five: the missing ranks are
  simply misses;
- ``new_individual`` is an ordinary label: it scores for a truly new animal exactly like an id.

MAP@5 is the mean over images. Pure Python: 30,000 rows take a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

from whalesub.data.contract import NEW_INDIVIDUAL

TOP_K = 5


def _as_labels(pred: Sequence[str] | str) -> Sequence[str]:
    # A submission cell is one space-separated string; iterating it would score characters.
    return pred.split() if isinstance(pred, str) else pred


def average_precision_at_5(pred: Sequence[str] | str, truth: str) -> float:
    """Score of one image: ``1 / rank`` of ``truth`` among the first five of ``pred``, else 0.0.

    ``pred`` is a sequence of labels best first, or one space-separated string.
    """
    for rank, label in enumerate(list(_as_labels(pred))[:TOP_K], start=1):
        if label == truth:
            return 1.0 / rank
    return 0.0


def scores_at_5(predictions: Sequence[Sequence[str] | str], truths: Sequence[str]) -> list[float]:
    """Per-image scores (floats in {0, 1/5, 1/4, 1/3, 1/2, 1}), one per row."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} prediction rows but {len(truths)} truths; they must pair up")
    return [average_precision_at_5(p, t) for p, t in zip(predictions, truths, strict=True)]


def map_at_5(predictions: Sequence[Sequence[str] | str], truths: Sequence[str]) -> float:
    """Mean of :func:`average_precision_at_5` over rows. Raises ``ValueError`` for zero rows."""
    scores = scores_at_5(predictions, truths)
    if not scores:
        raise ValueError("MAP@5 of zero rows is undefined")
    return sum(scores) / len(scores)


def _ratio(num: float, den: int) -> float | None:
    return num / den if den else None


def score_breakdown(predictions: Sequence[Sequence[str] | str], truths: Sequence[str]) -> dict:
    """MAP@5 overall and split by known/new animals, plus how well rank-1 ``new_individual`` works.

    Keys (``None`` where the denominator is zero, so the dict is JSON-ready):
    - ``map5``: MAP@5 over all ``n`` rows.
    - ``map5_known``: over the ``n_known`` rows whose truth is an id from train.
    - ``map5_new``: over the ``n_new`` rows whose truth is ``new_individual`` (equal to the share
      of them with ``new_individual`` at rank 1 plus partial credit for ranks 2-5).
    - ``new_precision_at1``: of the ``n_pred_new_at1`` rows predicted ``new_individual`` first,
      the share truly new (``None`` when no row predicts it first).
    - ``new_recall_at1``: of the truly new rows, the share predicted ``new_individual`` first.
    - ``pred_new_share_at1``: ``n_pred_new_at1 / n`` (compare with the expected ~16-20%).
    - ``top1_known``: share of known rows whose first prediction is the right id.
    - ``hits_at_rank``: 6 counts: rows whose first hit is at rank 1, 2, 3, 4, 5, then misses.
    """
    scores = scores_at_5(predictions, truths)
    if not scores:
        raise ValueError("a score breakdown of zero rows is undefined")
    first = [next(iter(_as_labels(p)), None) for p in predictions]
    is_new = [t == NEW_INDIVIDUAL for t in truths]
    pred_new = [f == NEW_INDIVIDUAL for f in first]
    n, n_new = len(scores), sum(is_new)
    n_known, n_pred_new = n - n_new, sum(pred_new)
    both = sum(a and b for a, b in zip(is_new, pred_new, strict=True))
    known_hits = sum(f == t for f, t, new in zip(first, truths, is_new, strict=True) if not new)
    return {
        "map5": sum(scores) / n,
        "map5_known": _ratio(sum(s for s, new in zip(scores, is_new, strict=True) if not new), n_known),
        "map5_new": _ratio(sum(s for s, new in zip(scores, is_new, strict=True) if new), n_new),
        "n": n,
        "n_known": n_known,
        "n_new": n_new,
        "n_pred_new_at1": n_pred_new,
        "new_precision_at1": _ratio(both, n_pred_new),
        "new_recall_at1": _ratio(both, n_new),
        "pred_new_share_at1": n_pred_new / n,
        "top1_known": _ratio(known_hits, n_known),
        "hits_at_rank": [sum(1 for s in scores if s == 1.0 / r) for r in range(1, TOP_K + 1)]
        + [sum(1 for s in scores if s == 0.0)],
    }


def format_breakdown(result: dict) -> str:
    """A small aligned text table of a :func:`score_breakdown` result, for people."""

    def fmt(v):
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    rows = [
        ("MAP@5", result["map5"], f"{result['n']} images"),
        ("MAP@5 known", result["map5_known"], f"{result['n_known']} images of animals in train"),
        ("MAP@5 new", result["map5_new"], f"{result['n_new']} images of new animals"),
        ("new@1 precision", result["new_precision_at1"],
         f"{result['n_pred_new_at1']} rows predict new first"),
        ("new@1 recall", result["new_recall_at1"], "share of new animals predicted new first"),
        ("new@1 share", result["pred_new_share_at1"], "share of rows predicting new first"),
        ("top-1 known", result["top1_known"], "share of known animals right at rank 1"),
    ]
    table = "\n".join(f"{name:<16} {fmt(value):>7}  {note}" for name, value, note in rows)
    hits = result.get("hits_at_rank")
    if hits:
        table += "\nfirst hit at rank 1-5, miss: " + " ".join(str(h) for h in hits)
    return table
