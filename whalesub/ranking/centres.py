"""kNN blended with class centres: each individual's score = r x kNN score + (1 - r) x centre cosine.

``kNN score`` is :mod:`whalesub.ranking.rank`'s: the best cosine over the individual's gallery vectors;
``centre cosine`` is the cosine of the query to the individual's centre. Every individual's centre
must come from the same source, or the blend mixes scales (a query sits closer to a gallery mean
than to an ArcFace weight row, so individuals given one kind of centre would win the top-1 picks):

- ``"gallery"`` (:func:`gallery_centres`, the default of the CLI): the normalised mean of the
  individual's gallery vectors, per model slice (:func:`model_slices`); needs no head;
- ``"head"``: the ArcFace heads' class centres (``class_centres.npz`` of an export); the
  workflows refuse the blend unless every individual has one in every model.

:func:`rank_with_centres` still accepts ``has_centre`` False (scored by its kNN score alone) for
benchmarks; the workflows always pass all True. ``r = 1`` is not computed here: callers use
:func:`whalesub.ranking.rank.rank_queries`, so today's rankings stay bit-identical.

Candidates (memory O(Q x (k + kc)), never Q x individuals), per query:

1. the individuals among the top ``k`` gallery neighbours (their kNN scores are exact: the best
   vector of an individual that has any vector in the top k is in the top k), and
2. the individuals of the top ``kc`` centres by cosine (FAISS over the centres); those absent
   from 1. get their kNN score computed exactly over all their gallery vectors.

Every candidate is scored with both terms and ranked by (-score, code). An individual in neither
set scores at most ``r * s_k + (1 - r) * c_kc`` (``s_k``: the k-th neighbour's cosine, ``c_kc``:
the kc-th centre's), or ``s_k`` if it has no centre. A row whose ``n_max``-th score does not beat
that bound strictly (or has fewer candidates than it needs; an exhausted search bounds by -2) is
re-ranked exactly over all individuals in small batches, so the result equals a dense queries x
individuals ranking.
"""

from __future__ import annotations

import logging

import numpy as np

from whalesub.core.errors import ConfigError, DataError
from whalesub.ranking.index import FlatIndex
from whalesub.ranking.rank import PAD, TOP, batch_starts, individual_candidates
from whalesub.ranking.vectors import average_groups, unit_rows

log = logging.getLogger(__name__)


def check_ratio(ratio: float) -> float:
    """Raise ConfigError unless ``ratio`` (weight of the kNN term) lies in [0, 1]."""
    if not np.isfinite(ratio) or not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"--knn-ratio {ratio} must be within [0, 1] (1: kNN only, 0: class centres only)")
    return float(ratio)


CENTRE_SOURCES = ("gallery", "head")


def check_centre_source(source: str) -> str:
    """Raise ConfigError unless ``source`` is one of :data:`CENTRE_SOURCES`."""
    if source not in CENTRE_SOURCES:
        raise ConfigError(f"--centres-from {source!r} is not known: use gallery (every individual's centre "
                          "is the mean of its gallery vectors) or head (the heads' class_centres.npz)")
    return source


def model_slices(gallery: np.ndarray, n_models: int, sample: int = 256, tol: float = 1e-4) -> list[int]:
    """The widths [D_1, ..., D_M] of the ``n_models`` per-model blocks of combined embeddings.

    ``whalesub embed`` concatenates per-model unit vectors and divides by sqrt(M), so in every row
    the squared norm of the first m blocks is m / M: each boundary is the first column where the
    running squared norm of every one of the first ``sample`` rows is within ``tol`` of m / M.
    Columns zero in all those rows may sit on either side of a boundary; the means do not depend
    on it. DataError when no such column exists (the rows are not M blocks of equal norm).
    """
    d = gallery.shape[1]
    if n_models <= 1:
        return [d]
    rows = np.asarray(gallery[:sample], dtype=np.float64)
    run = np.cumsum(rows * rows, axis=1)
    cuts = [0]
    for m in range(1, n_models):
        ok = np.flatnonzero(np.all(np.abs(run - m / n_models) < tol, axis=0))
        ok = ok[ok + 1 > cuts[-1]]
        if ok.size == 0:
            raise DataError(f"the gallery vectors (D={d}) are not {n_models} model blocks of equal norm: no "
                            f"column where the first {m} blocks hold {m}/{n_models} of every row's squared "
                            "norm; embed the gallery with `whalesub embed` (or use --centres-from head)")
        cuts.append(int(ok[0]) + 1)
    cuts.append(d)
    return [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def gallery_centres(gallery: np.ndarray, gallery_labels: np.ndarray, n_ind: int,
                    dims: list[int] | None = None) -> np.ndarray:
    """Every individual's centre from its gallery vectors: [n_ind, D] f32 (``--centres-from gallery``).

    ``gallery`` [N, D] holds M models' vectors side by side (block widths ``dims``, default one
    block), ``gallery_labels`` [N] codes in [0, n_ind). Per block: the normalised mean of the
    individual's vectors (each row's block normalised first); blocks concatenated and divided by
    sqrt(M), the scale of the combined queries, so a centre cosine is the mean of the per-model
    centre cosines. An individual whose vectors cancel out gets a zero block.
    """
    dims = [gallery.shape[1]] if dims is None else list(dims)
    if sum(dims) != gallery.shape[1]:
        raise ConfigError(f"model blocks of D={sum(dims)} in all but the gallery has D={gallery.shape[1]}")
    out, lo = [], 0
    for d in dims:
        out.append(average_groups(unit_rows(gallery[:, lo:lo + d], np.float64), gallery_labels, n_ind,
                                  np.float64))
        lo += d
    return (np.concatenate(out, axis=1) / np.sqrt(len(dims))).astype(np.float32)


def _exact_knn(gallery_sorted, starts, sizes, queries, rows, codes, budget: int = 64 << 20) -> np.ndarray:
    """Best cosine of ``queries[rows[i]]`` over the gallery vectors of individual ``codes[i]`` [P] f32.

    ``gallery_sorted`` [N, D] grouped by code, ``starts``/``sizes`` [n_ind] its groups.
    """
    out = np.empty(rows.size, dtype=np.float32)
    d = gallery_sorted.shape[1]
    chunk = max(1, budget // (4 * d * max(1, int(sizes[codes].max(initial=1)))))
    for a in range(0, rows.size, chunk):
        r, c = rows[a:a + chunk], codes[a:a + chunk]
        n = sizes[c]
        pair = np.repeat(np.arange(r.size), n)
        vec = np.repeat(starts[c], n) + (np.arange(pair.size) - np.repeat(np.cumsum(n) - n, n))
        dots = np.einsum("pd,pd->p", queries[r[pair]], gallery_sorted[vec])
        best = np.full(r.size, -np.inf, dtype=np.float32)
        np.maximum.at(best, pair, dots)
        out[a:a + chunk] = best
    return out


def _dense(gallery_sorted, starts, queries, centres, has_centre, ratio, n_max, budget: int = 256 << 20):
    """Exact blended ranking over all individuals, in batches: (labels, scores) [Q, n_max]."""
    n_ind = starts.size
    q = queries.shape[0]
    labels = np.full((q, n_max), PAD, dtype=np.int64)
    scores = np.full((q, n_max), -np.inf, dtype=np.float32)
    m = min(n_max, n_ind)
    batch = max(1, budget // (4 * max(gallery_sorted.shape[0], n_ind)))
    for a in range(0, q, batch):
        x = queries[a:a + batch]
        knn = np.maximum.reduceat(x @ gallery_sorted.T, starts, axis=1)
        s = np.where(has_centre, np.float32(ratio) * knn + np.float32(1 - ratio) * (x @ centres.T), knn)
        top = np.argsort(-s, axis=1, kind="stable")[:, :m]  # columns are codes: ties by code
        labels[a:a + batch, :m], scores[a:a + batch, :m] = top, np.take_along_axis(s, top, axis=1)
    return labels, scores


def rank_with_centres(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray,
                      centres: np.ndarray, has_centre: np.ndarray, ratio: float, k: int = 100,
                      n_max: int = TOP, *, centre_k: int | None = None, use_gpu: bool | None = None,
                      batch_size: int = 4096, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Blended candidates per query: (labels [Q, n_max] int64, scores [Q, n_max] f32), ranked.

    ``gallery`` [N, D], ``queries`` [Q, D] unit vectors, ``gallery_labels`` [N] int64 codes in
    [0, n_ind); ``centres`` [n_ind, D] unit vectors (row c: centre of code c, ignored where
    ``has_centre`` [n_ind] bool is False); ``ratio`` r in [0, 1); ``centre_k`` (default ``k``)
    centres searched per query. Any float dtype: all three are cast to float32 first, so every score
    is computed in float32. See the module docstring for the candidates and exactness.
    """
    ratio = check_ratio(ratio)
    # Once, here: every path (candidates, exact kNN terms, the dense re-rank) then computes in float32,
    # whatever the caller's dtype (float16 centres would otherwise make the dense re-rank float16).
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    centres = np.ascontiguousarray(centres, dtype=np.float32)
    has_centre = np.asarray(has_centre, dtype=bool)
    n_ind = centres.shape[0]
    order = np.argsort(gallery_labels, kind="stable")
    g = np.ascontiguousarray(gallery[order], dtype=np.float32)
    sizes = np.bincount(gallery_labels, minlength=n_ind)
    if (sizes == 0).any():
        raise ConfigError(f"{int((sizes == 0).sum())} individual codes have no gallery vector")
    starts = np.cumsum(sizes) - sizes
    index = FlatIndex(gallery, use_gpu=use_gpu)
    with_centre = np.flatnonzero(has_centre)
    cindex = FlatIndex(centres[with_centre], use_gpu=use_gpu) if with_centre.size else None
    kc = k if centre_k is None else centre_k
    r32, c32 = np.float32(ratio), np.float32(1 - ratio)
    q = queries.shape[0]
    labels = np.empty((q, n_max), dtype=np.int64)
    scores = np.empty((q, n_max), dtype=np.float32)
    inexact = []
    for a in batch_starts(q, batch_size, progress, f"rank+centres r={ratio:g}"):
        x = np.ascontiguousarray(queries[a:a + batch_size], dtype=np.float32)
        s, i = index.search(x, k, batch_size=batch_size)
        knn_l, knn_s = individual_candidates(s, i, gallery_labels, n_max=s.shape[1])
        knn_bound = s[:, -1] if s.shape[1] < index.n else np.full(x.shape[0], -2.0, np.float32)
        bound = knn_bound.copy()
        cand = knn_l
        if cindex is not None:
            cs, ci = cindex.search(x, kc, batch_size=batch_size)
            cen_bound = cs[:, -1] if cs.shape[1] < cindex.n else np.full(x.shape[0], -2.0, np.float32)
            bound = r32 * knn_bound + c32 * cen_bound
            if with_centre.size < n_ind:  # an individual without a centre may score up to s_k
                bound = np.maximum(bound, knn_bound)
            cand = np.concatenate([knn_l, with_centre[ci]], axis=1)
        # Unique (row, code) pairs of the union; the kNN score where the neighbours hold it.
        b, m = cand.shape
        key = np.arange(b)[:, None] * n_ind + cand
        pairs = np.unique(key[cand != PAD])
        rows, codes = pairs // n_ind, pairs % n_ind
        knn_keys = key[:, :knn_l.shape[1]][knn_l != PAD]
        knn_vals = knn_s[knn_l != PAD]
        o = np.argsort(knn_keys)
        pos = np.searchsorted(knn_keys[o], pairs).clip(0, max(knn_keys.size - 1, 0))
        found = knn_keys[o][pos] == pairs
        knn = np.where(found, knn_vals[o][pos], np.float32(0))
        if (~found).any():
            knn[~found] = _exact_knn(g, starts, sizes, x, rows[~found], codes[~found])
        cen = np.einsum("pd,pd->p", x[rows], centres[codes])
        blended = np.where(has_centre[codes], r32 * knn + c32 * cen, knn).astype(np.float32)
        # Back to [b, width] arrays and ranked like kNN candidates (identity "gallery" of codes).
        width = int(np.bincount(rows, minlength=b).max(initial=1))
        col = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
        mat_s = np.full((b, width), -np.inf, dtype=np.float32)
        mat_i = np.full((b, width), -1, dtype=np.int64)
        mat_s[rows, col], mat_i[rows, col] = blended, codes
        lab, sc = individual_candidates(mat_s, mat_i, np.arange(n_ind), n_max)
        labels[a:a + b], scores[a:a + b] = lab, sc
        need = min(n_max, n_ind)
        ok = (lab[:, need - 1] != PAD) & (sc[:, need - 1] > bound)
        inexact.append(a + np.flatnonzero(~ok))
    redo = np.concatenate(inexact) if inexact else np.empty(0, np.int64)
    if redo.size:
        log.info("%d queries: a candidate outside the kNN and centre top-k could reach the top %d; "
                 "re-ranking them exactly over all individuals", redo.size, n_max)
        labels[redo], scores[redo] = _dense(g, starts, queries[redo], centres, has_centre, ratio, n_max)
    return labels, scores
