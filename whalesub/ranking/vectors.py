"""Embedding-vector arithmetic, written once: unit rows, view averaging, class centres.

A pure array module (numpy in, numpy out, no file paths). Every place that normalises rows or
averages views of one image calls these functions, so the kernel, ``whalesub submit`` and
training's validation cannot drift apart by a rounding rule:

- sums and norms are accumulated in float64 and the result is rounded to float32 once;
- averaging views is normalising their float64 sum (the normalised mean is the same direction);
- a row whose norm is below ``EPS`` (all zeros, or views that cancel out) stays all zeros; the
  callers that must refuse such rows check :func:`zero_rows`.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def unit_rows(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """[N, D] -> [N, D] ``dtype`` rows of unit L2 norm (computed in float64; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)).astype(dtype, copy=False)


def zero_rows(x: np.ndarray) -> np.ndarray:
    """[N] bool: rows with no direction (norm below ``EPS``), e.g. views that cancel out."""
    return np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1) < EPS


def average_groups(x: np.ndarray, groups: np.ndarray, n_groups: int, dtype=np.float32) -> np.ndarray:
    """Rows [M, D] with group index [M] (0 <= g < n_groups) -> [n_groups, D] unit ``dtype`` rows.

    Each output row is the normalised float64 sum of its group's rows, i.e. the direction of their
    mean; a group without rows (or whose rows cancel out) gives a zero row.
    """
    x = np.asarray(x)
    sums = np.zeros((n_groups, x.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(groups, dtype=np.int64), x.astype(np.float64, copy=False))
    return unit_rows(sums, dtype)


def average_views(views: np.ndarray) -> np.ndarray:
    """[N, V, D] views of N images (flips, crops...) -> [N, D] float32 unit rows, one per image."""
    views = np.asarray(views)
    if views.ndim != 3:
        raise ValueError(f"views must be [N, V, D], got shape {views.shape}")
    return unit_rows(views.astype(np.float64, copy=False).sum(axis=1))


def sub_centre_means(weight: np.ndarray, n_classes: int) -> np.ndarray:
    """ArcFace sub-centres [C * k, D] (rows c*k .. c*k+k-1 belong to class c) -> [C, D] float32 unit rows.

    Each sub-centre is normalised, the k of a class are averaged and the mean renormalised (equal to
    the normalised centre when k = 1). Raises ValueError when the rows do not split into the classes.
    Max-over-sub-centres scoring needs the raw sub-centres instead; this single centre per class is
    what class-centre kNN blending uses.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or n_classes < 1 or w.shape[0] % n_classes:
        raise ValueError(f"head weight of shape {w.shape} does not split into {n_classes} classes")
    k = w.shape[0] // n_classes
    return average_groups(unit_rows(w, np.float64), np.arange(w.shape[0]) // k, n_classes)
