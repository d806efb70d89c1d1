"""Calibrated probabilities from cosines, fitted on out-of-fold pairs of the catalogue itself.

A sample of labelled photos (at most ``n_queries``) is split into ``folds`` folds; each fold's
photos are searched against the labelled catalogue *without that fold*, exactly like a new photo
searched against the catalogue. That gives three sets of (cosine, outcome) pairs:

- ``individual``: each of a query's top individuals (best cosine over its photos) -> same animal?
- ``image``: each of its top images -> same animal?
- ``known``: its best individual's cosine -> is its animal in the catalogue at all? (a photo whose
  animal has no photo outside its fold plays a new animal, and so does every query scored without
  its own animal, weighted to a prior share of new animals). P(new animal) = 1 - P(known).

Each is an isotonic regression (scikit-learn, increasing, clipped), stored as its breakpoints and
applied by linear interpolation (what ``IsotonicRegression.predict`` does). The reliability table is
cross-fitted: fold f's pairs are predicted by the regression fitted on the other folds, so it shows
how well the calibration holds on pairs it did not see (expected calibration error, ECE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("individual", "image", "known")
BINS = 10
MIN_PAIRS = 10
NEW_SHARE = 0.2  # default share of new animals in a batch (Happywhale's test set: ~16-20%)


@dataclass
class Curve:
    """An increasing map cosine -> probability given by breakpoints (x ascending, y in [0, 1])."""

    x: list[float]
    y: list[float]

    def __call__(self, cos) -> np.ndarray:
        return np.interp(np.asarray(cos, dtype=np.float64), self.x, self.y)


@dataclass
class Calibration:
    curves: dict[str, Curve]
    reliability: dict[str, list[dict]] = field(default_factory=dict)
    ece: dict[str, float] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "curves": {k: {"x": c.x, "y": c.y} for k, c in self.curves.items()},
            "reliability": self.reliability,
            "ece": self.ece,
            "pairs": self.pairs,
        }

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(
            {k: Curve(v["x"], v["y"]) for k, v in d["curves"].items()},
            d.get("reliability", {}),
            d.get("ece", {}),
            d.get("pairs", {}),
        )


def reliability_table(
    p: np.ndarray, outcomes: np.ndarray, weights: np.ndarray | None = None, bins: int = BINS
) -> tuple[list[dict], float]:
    """Equal-width bins of predicted probability: pairs, mean predicted, observed rate (weighted); and
    the ECE (sum over bins of weight share x |mean predicted - observed rate|)."""
    p, y = np.asarray(p, np.float64), np.asarray(outcomes, np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, np.float64)
    b = np.minimum((p * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for i in range(bins):
        m = (b == i) & (w > 0)
        if not m.any():
            continue
        pred, obs = float(np.average(p[m], weights=w[m])), float(np.average(y[m], weights=w[m]))
        rows.append(
            {
                "bin": f"{i / bins:.1f}-{(i + 1) / bins:.1f}",
                "pairs": int(m.sum()),
                "predicted": pred,
                "observed": obs,
            }
        )
        ece += w[m].sum() / w.sum() * abs(pred - obs)
    return rows, float(ece)


def oof_pairs(
    vectors: np.ndarray,
    labels: np.ndarray,
    *,
    n_queries: int = 2000,
    folds: int = 5,
    top: int = 12,
    seed: int = 0,
    new_share: float = NEW_SHARE,
) -> dict[str, tuple]:
    """(cosines, outcomes, fold, weights) per kind, from ``vectors`` [N, D] unit rows and ``labels`` [N]
    int codes.

    ``known`` pairs: each query's best cosine and whether its animal had a photo outside the fold; and,
    for the queries whose animal had one, the best cosine among the *other* animals (what the query
    would score were its animal new). Those simulated new animals are weighted so that new animals make
    up ``new_share`` of the weight when the natural ones (animals all of whose photos fell in the fold)
    are fewer: P(new) is calibrated for batches with that share of new animals.
    """
    from whalesub.ranking.index import FlatIndex
    from whalesub.ranking.rank import individual_candidates

    n = len(vectors)
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.permutation(n)[: min(n_queries, n)])
    fold_of = np.full(n, -1)
    fold_of[queries] = rng.permutation(len(queries)) % folds
    out = {k: ([], [], [], []) for k in KINDS}

    def put(kind, s, y, f, w=None):
        parts = out[kind]
        parts[0].append(np.asarray(s, np.float64))
        parts[1].append(np.asarray(y, bool))
        parts[2].append(np.full(len(s), f))
        parts[3].append(np.ones(len(s)) if w is None else np.asarray(w, np.float64))

    simulated = []
    for f in range(folds):
        q = np.flatnonzero(fold_of == f)
        keep = np.flatnonzero(fold_of != f)
        if not len(q) or not len(keep):
            continue
        k = min(len(keep), max(100, 10 * top))
        s, idx = FlatIndex(vectors[keep]).search(vectors[q], k)
        g_lab = labels[keep]
        ind_l, ind_s = individual_candidates(s, idx, g_lab, n_max=top + 1)
        truth = labels[q][:, None]
        valid = ind_l[:, :top] >= 0
        put("individual", ind_s[:, :top][valid], (ind_l[:, :top] == truth)[valid], f)
        img_valid = idx[:, :top] >= 0
        img_l = np.where(img_valid, g_lab[np.maximum(idx[:, :top], 0)], -1)
        put("image", s[:, :top][img_valid], (img_l == truth)[img_valid], f)
        present = np.isin(labels[q], g_lab)
        has = ind_l[:, 0] >= 0
        put("known", ind_s[has, 0], present[has], f)
        other = np.where(ind_l == truth, -np.inf, ind_s)  # best score among the other animals
        best_other = other.max(axis=1)
        sim = present & np.isfinite(best_other)
        simulated.append((best_other[sim], f))
    nat_s, nat_y = np.concatenate(out["known"][0] or [np.zeros(0)]), np.concatenate(out["known"][1] or [[]])
    n_sim = sum(len(s) for s, _ in simulated)
    deficit = new_share * len(nat_s) - (~nat_y.astype(bool)).sum()
    if n_sim and deficit > 0:
        w = deficit / (n_sim * (1 - new_share))
        for s, f in simulated:
            put("known", s, np.zeros(len(s), bool), f, np.full(len(s), w))
    return {k: tuple(np.concatenate(v) if v else np.zeros(0) for v in out[k]) for k in KINDS}


def fit_curve(scores: np.ndarray, outcomes: np.ndarray, weights: np.ndarray | None = None) -> Curve:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(np.asarray(scores, np.float64), np.asarray(outcomes, np.float64), sample_weight=weights)
    return Curve([float(v) for v in iso.X_thresholds_], [float(v) for v in iso.y_thresholds_])


def fit_calibration(vectors: np.ndarray, labels: np.ndarray, **kw) -> tuple[Calibration | None, str]:
    """The calibration of a catalogue's labelled photos, or (None, why not)."""
    pairs = oof_pairs(vectors, labels, **kw)
    curves, reliability, ece, counts = {}, {}, {}, {}
    for kind in KINDS:
        s, y, fold, w = pairs[kind]
        y = y.astype(np.float64)
        if (y > 0).sum() < MIN_PAIRS or (y == 0).sum() < MIN_PAIRS:
            return None, (
                f"too few out-of-fold {kind} pairs to calibrate ({int((y > 0).sum())} matching, "
                f"{int((y == 0).sum())} not; {MIN_PAIRS} of each needed): label more photos, "
                "with several photos per individual"
            )
        p = np.zeros(len(s))
        for f in np.unique(fold):
            m = fold == f
            train = ~m
            if (y[train] > 0).any() and (y[train] == 0).any():
                p[m] = fit_curve(s[train], y[train], w[train])(s[m])
            else:
                p[m] = np.average(y[train], weights=w[train]) if train.any() else 0.5
        reliability[kind], ece[kind] = reliability_table(p, y, w)
        curves[kind] = fit_curve(s, y, w)
        counts[kind] = int(len(s))
    log.info("calibration: out-of-fold ECE %s on %s pairs", {k: round(v, 4) for k, v in ece.items()}, counts)
    return Calibration(curves, reliability, ece, counts), ""
