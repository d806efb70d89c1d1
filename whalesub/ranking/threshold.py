"""Choosing the ``new_individual`` threshold on labelled queries (out-of-fold or a held-out split).

The candidates of each query (:func:`whalesub.ranking.rank.rank_queries`, five individuals with their
best cosines) do not depend on the threshold; only the rank of ``new_individual`` does: it is
the number of candidates scoring >= threshold. So MAP@5 for a whole grid of thresholds comes
from one ranking, in closed form, as [T, Q] arrays:

- truth is a known individual at candidate rank r (0-based): after the insertion it sits at
  r + 1 if new_individual went in at or before r, else at r; AP = 1 / (rank + 1) if rank < 5;
- truth is ``new_individual``: AP = 1 / (p + 1) with p its insertion rank, if p < 5;
- truth is an individual absent from the gallery (cannot be predicted): AP = 0.

A target new share s picks the threshold at which a fraction s of the queries get
``new_individual`` first, i.e. whose best candidate scores below it (1st place: s ~ 0.165).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from whalesub.core.errors import ConfigError, DataError
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.rank import NEW, TOP, encode_labels, rank_queries

log = logging.getLogger(__name__)

UNREACHABLE = -3  # truth code of an individual that is not in the gallery


@dataclass
class ThresholdSearch:
    """MAP@5 over a grid. Arrays are [T]; ``best_*`` is the first threshold with the highest MAP@5."""

    thresholds: np.ndarray
    map5: np.ndarray
    map5_known: np.ndarray
    map5_new: np.ndarray
    new_share: np.ndarray  # fraction of queries with new_individual first
    best_threshold: float
    best_map5: float

    def table(self) -> list[dict]:
        return [{"threshold": float(t), "map5": float(m), "map5_known": float(a), "map5_new": float(b),
                 "new_share": float(s)}
                for t, m, a, b, s in zip(self.thresholds, self.map5, self.map5_known, self.map5_new,
                                         self.new_share, strict=True)]


def truth_codes(truth_labels, classes: np.ndarray) -> np.ndarray:
    """Truth strings [Q] -> int64 codes: index into ``classes``, NEW (-2), or UNREACHABLE (-3)."""

    truth = np.asarray(truth_labels, dtype=str)
    pos = np.searchsorted(classes, truth).clip(0, max(len(classes) - 1, 0))
    found = (classes[pos] == truth) if len(classes) else np.zeros(truth.shape, bool)
    return np.where(truth == NEW_INDIVIDUAL, NEW, np.where(found, pos, UNREACHABLE)).astype(np.int64)


def average_precision_grid(cand_labels: np.ndarray, cand_scores: np.ndarray, truth: np.ndarray,
                           thresholds: np.ndarray, top: int = TOP) -> np.ndarray:
    """AP@top of every query at every threshold: [T, Q] float64.

    ``cand_labels``/``cand_scores`` [Q, m] ranked candidates (m >= top), ``truth`` [Q] codes from
    :func:`truth_codes`, ``thresholds`` [T], or [T, Q] for a threshold per row.
    """
    t = np.asarray(thresholds, dtype=np.float64).astype(np.float32)  # compared like insert_new_individual
    q, m = cand_labels.shape
    hit = cand_labels[:, :top] == truth[:, None]
    r = np.where(hit.any(axis=1), hit.argmax(axis=1), top)  # truth's rank among candidates, `top` = absent
    ap = np.zeros((t.shape[0], q))
    s = cand_scores[:, :top].astype(np.float32)
    for a in range(0, t.shape[0], 64):  # [64, Q, top] booleans at a time
        tt = t[a:a + 64, None, None] if t.ndim == 1 else t[a:a + 64, :, None]
        p = (s[None] >= tt).sum(axis=2)  # [t, Q] insertion rank of new_individual
        rank = np.where(truth == NEW, p, r + (p <= r))
        ok = (rank < top) & (truth != UNREACHABLE) & ((truth == NEW) | (r < top))
        ap[a:a + 64] = np.where(ok, 1.0 / (rank + 1), 0.0)
    return ap


def check_grid(thresholds) -> np.ndarray:
    """``thresholds`` as a non-empty float64 [T] array of finite values, else ConfigError.

    A NaN threshold puts new_individual nowhere and could be reported as the best one.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.size == 0:
        raise ConfigError("the threshold grid is empty; pass e.g. --grid 0.0:1.0:0.02")
    if not np.isfinite(thresholds).all():
        raise ConfigError(f"the threshold grid holds {int((~np.isfinite(thresholds)).sum())} NaN or infinite "
                          "values; every threshold must be a finite cosine, e.g. --grid 0.0:1.0:0.02")
    return thresholds


def grid_search(cand_labels: np.ndarray, cand_scores: np.ndarray, truth: np.ndarray,
                thresholds: np.ndarray, top: int = TOP) -> ThresholdSearch:
    """MAP@5 (all, known, new) and new-first share at each threshold; the best threshold."""
    thresholds = check_grid(thresholds)
    ap = average_precision_grid(cand_labels, cand_scores, truth, thresholds, top)
    is_new = truth == NEW
    nan = np.full(thresholds.size, np.nan)
    map5 = ap.mean(axis=1)
    best = int(np.argmax(map5))
    return ThresholdSearch(
        thresholds=thresholds, map5=map5,
        map5_known=ap[:, ~is_new].mean(axis=1) if (~is_new).any() else nan,
        map5_new=ap[:, is_new].mean(axis=1) if is_new.any() else nan,
        new_share=(cand_scores[:, 0][None, :].astype(np.float32)
                   < thresholds.astype(np.float32)[:, None]).mean(axis=1),
        best_threshold=float(thresholds[best]), best_map5=float(map5[best]))


def check_new_share(share: float, flag: str = "--new-share") -> float:
    """Raise ConfigError unless ``share`` (a fraction of queries, ``flag`` names the option) is in [0, 1]."""
    if not 0.0 <= share <= 1.0:  # NaN fails too
        raise ConfigError(f"{flag} {share} must be within [0, 1] (e.g. 0.165)")
    return float(share)


def threshold_for_new_share(cand_scores: np.ndarray, share: float) -> float:
    """Threshold at which ``round(share * Q)`` queries get new_individual first.

    Those are the queries whose best candidate scores below it; the threshold is the midpoint
    between the two best-scores around that cut (exact unless they tie). It is not clipped to
    [-1, 1]: when every query must get new_individual first and the best score is exactly 1.0 (a
    duplicate photo) or a float32 rounding above it, only a threshold one float32 step above that
    score does it. So a chosen threshold may exceed 1 by a rounding step; a threshold typed by the
    user (``--threshold``, :func:`whalesub.ranking.rank.check_threshold`) is still a cosine in [-1, 1].
    """
    check_new_share(share, "target new share")
    cand_scores = np.asarray(cand_scores)
    if cand_scores.ndim != 2 or cand_scores.shape[0] == 0 or cand_scores.shape[1] == 0:
        raise DataError(f"cannot choose a threshold for new share {share}: there are no ranked queries "
                        f"(candidate scores of shape {cand_scores.shape}); give a query file with at least "
                        "one image, or a fixed --threshold")
    best = np.sort(cand_scores[:, 0].astype(np.float32))
    n = int(round(share * best.size))
    if n == 0:
        t = best[0]
    elif n == best.size:
        t = np.nextafter(best[-1], np.float32(np.inf))
    else:  # compared in float32, like the scores: never round onto best[n - 1]
        t = np.float32((np.float64(best[n - 1]) + np.float64(best[n])) / 2)
        t = best[n] if t <= best[n - 1] else t
    return float(t)


MAX_GRID = 100_000  # thresholds in one grid (0:1:1e-5 has 100,001): more is a typo, not a finer search

GRID_FORM = ("start:stop:step (finite numbers, step > 0, stop >= start) or a comma list of finite "
             f"thresholds, all within [-1, 1] and at most {MAX_GRID:,} of them; e.g. 0.0:1.0:0.02")


def parse_grid(text: str) -> np.ndarray:
    """``"start:stop:step"`` (stop included) or ``"a,b,c"`` -> thresholds [T] float64 within [-1, 1].

    ConfigError naming ``text`` and :data:`GRID_FORM` for anything else: a value that is not a
    finite number (NaN, inf), a step <= 0, stop < start, a threshold outside [-1, 1], or more than
    :data:`MAX_GRID` thresholds (refused before anything is allocated).
    """
    bad = f"--grid {text!r} is not {GRID_FORM}"
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not np.isfinite([start, stop, step]).all() or step <= 0 or stop < start:
                raise ValueError
            with np.errstate(over="ignore"):  # (stop - start) / step may overflow to inf: too many
                n = np.floor(np.float64(stop - start) / step + 1e-9) + 1
            if not n <= MAX_GRID:
                count = f"{int(n):,}" if n < 1e18 else "over 1e18"
                raise ConfigError(f"--grid {text!r} would hold {count} thresholds, more than the "
                                  f"{MAX_GRID:,} allowed; use a coarser step, e.g. 0.0:1.0:0.02 "
                                  "(51 thresholds)")
            grid = start + step * np.arange(int(n))
        else:
            values = text.split(",")
            if len(values) > MAX_GRID:
                raise ConfigError(f"--grid {text[:40]!r}... lists {len(values):,} thresholds, more than the "
                                  f"{MAX_GRID:,} allowed; use start:stop:step, e.g. 0.0:1.0:0.02")
            grid = np.array([float(x) for x in values])
            if not np.isfinite(grid).all():
                raise ValueError
    except (ValueError, OverflowError):
        raise ConfigError(bad) from None
    with np.errstate(over="ignore", invalid="ignore"):  # 1e300 rounds to inf: refused just below
        grid = np.round(grid, 10)  # before the range check: -0.2 + 24 * 0.05 is 1.0000000000000002
    if grid.size == 0 or np.abs(grid).max() > 1:
        raise ConfigError(f"--grid {text!r}: thresholds must lie within [-1, 1] (cosines); e.g. 0.0:1.0:0.02")
    return grid


def tune_arrays(gallery: np.ndarray, gallery_label_strs, queries: np.ndarray, truth_labels,
                thresholds: np.ndarray, target_new_share: float | None = None, k: int = 100, *,
                use_gpu: bool | None = None, progress: bool = False, class_species=None,
                k0: float = 20.0) -> dict:
    """Threshold search in memory (e.g. training's validation on out-of-fold embeddings).

    ``gallery`` [N, D] and ``queries`` [Q, D] unit float32, ``gallery_label_strs`` [N] and
    ``truth_labels`` [Q] strings (``new_individual`` for animals absent from the gallery).
    Returns a JSON-ready dict: ``n``, ``n_new``, ``k``, ``table`` (one dict per threshold),
    ``best`` (threshold, map5, new_share) and, with ``target_new_share``, ``target``; with
    ``class_species`` ([n_ind] str, species of each sorted unique gallery label), ``per_species``
    from :func:`tune_per_species` (shrinkage ``k0``).
    """

    if target_new_share is not None:
        check_new_share(target_new_share, "--target-new-share")
    codes, classes = encode_labels(gallery_label_strs)
    truth = truth_codes(truth_labels, classes)
    if (unreachable := int((truth == UNREACHABLE).sum())):
        log.warning("%d queries are labelled with individuals absent from the gallery: they score 0 "
                    "(label them new_individual, as CV folds do, to tune for unseen animals)", unreachable)
    labels, scores = rank_queries(gallery, codes, queries, k, use_gpu=use_gpu, progress=progress)
    return tune_candidates(labels, scores, truth, thresholds, target_new_share, k,
                           class_species=class_species, k0=k0)


def tune_candidates(labels: np.ndarray, scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray,
                    target_new_share: float | None = None, k: int = 100, *, class_species=None,
                    k0: float = 20.0) -> dict:
    """:func:`tune_arrays` on ranked candidates (any scoring: kNN or blended) and truth codes.

    ``labels``/``scores`` [Q, m] as in :func:`average_precision_grid`, ``truth`` [Q] from
    :func:`truth_codes`; ``k`` is only reported. Returns the dict of :func:`tune_arrays`.
    """
    found = grid_search(labels, scores, truth, thresholds)
    best = int(np.argmax(found.map5))
    result = {"n": int(truth.size), "n_new": int((truth == NEW).sum()), "k": int(k), "table": found.table(),
              "best": {"threshold": found.best_threshold, "map5": found.best_map5,
                       "new_share": float(found.new_share[best])}}
    if target_new_share is not None:
        t = threshold_for_new_share(scores, target_new_share)
        one = grid_search(labels, scores, truth, np.array([t]))
        result["target"] = {"new_share": float(one.new_share[0]), "threshold": t, "map5": float(one.map5[0])}
    if class_species is not None:
        result["per_species"] = tune_per_species(labels, scores, truth, class_species, thresholds, k0)
    return result


# --- per-species thresholds -----------------------------------------------------------------------


def top_species(cand_labels: np.ndarray, class_species: np.ndarray) -> np.ndarray:
    """Species of each query's top candidate: [Q] str, ``""`` for a row without candidates.

    ``cand_labels`` [Q, m] codes (PAD = -1), ``class_species`` [n_ind] str, the species of each code.
    """
    top = cand_labels[:, 0]
    names = np.append(np.asarray(class_species, dtype=str), "")
    return names[np.where(top >= 0, top, len(names) - 1)]


def row_thresholds(cand_labels: np.ndarray, class_species: np.ndarray, by_species: dict[str, float],
                   global_threshold: float) -> np.ndarray:
    """Threshold of each query [Q] float64: that of its top candidate's species, else the global one."""
    species = top_species(cand_labels, class_species)
    return np.array([by_species.get(s, global_threshold) for s in species.tolist()], dtype=np.float64)


PLATEAU_TOL = 1e-12  # MAP@5 values this close are equal (sums of 1/rank over the same rows)


def plateau_choice(map5: np.ndarray, thresholds: np.ndarray, anchor: float) -> int:
    """Index of the best of ``map5`` [T] over ``thresholds`` [T]; among equal bests (within
    :data:`PLATEAU_TOL`), the threshold nearest ``anchor`` (the lower one of two equally near).

    A flat MAP@5 over a range of thresholds is no evidence for any value in it: the first
    (lowest) one would move a species' threshold far from the global one for nothing.
    """
    map5 = np.asarray(map5, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)  # any sequence
    top = np.flatnonzero(map5 >= map5.max() - PLATEAU_TOL)
    dist = np.round(np.abs(thresholds[top] - anchor), 9)  # 0.3-0.2 == 0.2-0.1
    return int(top[np.lexsort((thresholds[top], dist))[0]])


def tune_per_species(cand_labels: np.ndarray, cand_scores: np.ndarray, truth: np.ndarray,
                     class_species: np.ndarray, thresholds: np.ndarray, k0: float = 20.0) -> dict:
    """Per-species thresholds, grouped by the species of each query's top candidate.

    The global threshold is the grid's best on all queries. Each species' raw threshold is the
    grid's best on its n queries alone (:func:`plateau_choice`: on a plateau of equal MAP@5, the grid
    value nearest the global threshold, so a species moves only on evidence), then shrunk toward the
    global one:
    ``t = w * raw + (1 - w) * global`` with ``w = n / (n + k0)`` (k0 = 0: no shrinkage; a species
    with n << k0 stays near the global threshold). Arrays as in :func:`average_precision_grid`,
    ``class_species`` [n_ind] str. Returns a JSON-ready dict: ``global``, ``k0``, ``n``,
    ``map5_global`` / ``map5_per_species`` (MAP@5 of these queries with one threshold / with the
    species' shrunk thresholds; the latter is in-sample, so optimistic) and ``species``:
    name -> {threshold, raw_threshold, n, weight, map5_raw, map5_global}.
    """
    if not np.isfinite(k0) or k0 < 0:
        raise ConfigError(f"--k0 {k0} must be >= 0 (prior weight, in queries, of the global threshold)")
    thresholds = check_grid(thresholds)
    ap = average_precision_grid(cand_labels, cand_scores, truth, thresholds)  # [T, Q]
    g = int(np.argmax(ap.mean(axis=1)))
    t_global = float(thresholds[g])
    species = top_species(cand_labels, class_species)
    per_row = np.full(truth.size, t_global)
    table = {}
    for name in np.unique(species[species != ""]).tolist():
        rows = species == name
        n = int(rows.sum())
        sp_map = ap[:, rows].mean(axis=1)
        best = plateau_choice(sp_map, thresholds, t_global)
        w = n / (n + k0)
        t = float(w * thresholds[best] + (1 - w) * t_global)
        per_row[rows] = t
        table[name] = {"threshold": t, "raw_threshold": float(thresholds[best]), "n": n, "weight": w,
                       "map5_raw": float(sp_map[best]), "map5_global": float(sp_map[g])}
    map5_species = float(average_precision_grid(cand_labels, cand_scores, truth, per_row[None, :])[0].mean())
    log.info("per-species thresholds for %d species (k0=%g): MAP@5 %.4f with the global %.4f -> %.4f",
             len(table), k0, float(ap[g].mean()), t_global, map5_species)
    return {"global": t_global, "k0": float(k0), "n": int(truth.size), "map5_global": float(ap[g].mean()),
            "map5_per_species": map5_species, "species": table}
