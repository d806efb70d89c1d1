"""From neighbours to five labels per query: kNN per individual, then the ``new_individual`` column.

The rule, all of it vectorised over [Q, k] arrays (memory O(Q x k), never Q x individuals):

1. Exact top-k gallery neighbours of each query by cosine (:mod:`whalesub.ranking.index`).
2. Each individual's score is its best cosine among those neighbours: the max over all of its
   gallery vectors, several views of one image included.
3. Individuals are ranked by that score; equal scores rank by label string (alphabetical).
4. ``new_individual`` is one more candidate whose score is the constant ``threshold``. An
   individual whose score equals the threshold ranks *before* it. So it lands at rank 1 when
   the threshold beats every individual, is absent when five individuals reach it, and
   anywhere in between otherwise. Scores are float32 and so is the comparison: a threshold
   typed as 0.7 ties with a score of float32(0.7).
5. The first five labels are the prediction; they are distinct by construction.

Fewer than five individuals among the top k (a query whose neighbours all belong to one or two
large individuals): those rows are re-ranked exactly over the whole gallery in small batches,
which gives the same answer as searching deeper until five distinct individuals appear. If the
whole gallery has fewer than five individuals, a row holds them all plus ``new_individual`` when
the threshold lets it in (so 1-5 labels, all distinct; a valid submission row).
"""

from __future__ import annotations

import logging

import numpy as np

from whalesub.core.errors import ConfigError
from whalesub.data.contract import NEW_INDIVIDUAL
from whalesub.ranking.index import FlatIndex

log = logging.getLogger(__name__)

PAD = -1  # "no label" in label-code arrays
NEW = -2  # code of new_individual in the output of insert_new_individual
TOP = 5


def encode_labels(label_strs) -> tuple[np.ndarray, np.ndarray]:
    """Map label strings [N] to codes [N] int64 into ``classes`` (sorted unique strings)."""
    classes, codes = np.unique(np.asarray(label_strs, dtype=str), return_inverse=True)
    return codes.astype(np.int64), classes


def individual_candidates(scores: np.ndarray, indices: np.ndarray, gallery_labels: np.ndarray,
                          n_max: int = TOP) -> tuple[np.ndarray, np.ndarray]:
    """Best cosine per individual among each row's neighbours, ranked.

    ``scores`` [Q, k] f32 and ``indices`` [Q, k] int64 (any order within a row; index -1 = none);
    ``gallery_labels`` [N] int64 codes. Returns ``labels`` [Q, n_max] int64 (PAD = -1 where a row
    has fewer individuals) and ``scores`` [Q, n_max] f32 (-inf at PAD), sorted by (-score, code).
    """
    q, k = scores.shape
    valid = indices >= 0
    lab = np.where(valid, gallery_labels[np.where(valid, indices, 0)], PAD).ravel()
    s = np.where(valid, scores, -np.inf).astype(np.float32).ravel()
    row = np.repeat(np.arange(q, dtype=np.int64), k)
    # Group by (row, label) with the best score first; keep that first entry of each group.
    o = np.lexsort((-s, lab, row))
    r, lab, s = row[o], lab[o], s[o]
    keep = np.ones(r.size, dtype=bool)
    keep[1:] = (r[1:] != r[:-1]) | (lab[1:] != lab[:-1])
    keep &= lab != PAD
    r, lab, s = r[keep], lab[keep], s[keep]
    # Rank the individuals of each row by (-score, code) and scatter the first n_max.
    o = np.lexsort((lab, -s, r))
    r, lab, s = r[o], lab[o], s[o]
    pos = np.arange(r.size) - np.searchsorted(r, r, side="left")
    take = pos < n_max
    out_l = np.full((q, n_max), PAD, dtype=np.int64)
    out_s = np.full((q, n_max), -np.inf, dtype=np.float32)
    out_l[r[take], pos[take]] = lab[take]
    out_s[r[take], pos[take]] = s[take]
    return out_l, out_s


def exact_candidates(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray,
                     n_max: int = TOP, budget_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`individual_candidates` but over the whole gallery (no top-k cut).

    ``gallery`` [N, D] f32, ``gallery_labels`` [N] int64, ``queries`` [Q, D] f32. Works in
    query batches of about ``budget_bytes`` of [B, N] scores; used for the rare rows whose
    top k holds fewer than ``n_max`` individuals.
    """
    order = np.argsort(gallery_labels, kind="stable")
    g = np.ascontiguousarray(gallery[order], dtype=np.float32)
    sorted_labels = gallery_labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    codes = sorted_labels[starts]  # ascending individual codes
    m = min(n_max, codes.size)
    q = queries.shape[0]
    out_l = np.full((q, n_max), PAD, dtype=np.int64)
    out_s = np.full((q, n_max), -np.inf, dtype=np.float32)
    batch = max(1, budget_bytes // (4 * max(g.shape[0], codes.size)))
    for a in range(0, q, batch):
        per_ind = np.maximum.reduceat(queries[a:a + batch] @ g.T, starts, axis=1)  # [B, n_ind]
        # Columns are ascending codes, so a stable sort on -score gives the (-score, code) order.
        top = np.argsort(-per_ind, axis=1, kind="stable")[:, :m]
        top_s = np.take_along_axis(per_ind, top, axis=1)
        out_l[a:a + batch, :m] = codes[top]
        out_s[a:a + batch, :m] = top_s
    return out_l, out_s


def batch_starts(n: int, batch_size: int, progress: bool, desc: str):
    """``range(0, n, batch_size)``, wrapped in a tqdm progress bar when ``progress``."""
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(starts, desc=desc, unit="batch")
    return starts


def rank_queries(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray, k: int = 100,
                 n_max: int = TOP, *, use_gpu: bool | None = None, batch_size: int = 8192,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Candidate individuals per query: (labels [Q, n_max] int64, scores [Q, n_max] f32), ranked.

    ``gallery`` [N, D] and ``queries`` [Q, D] unit vectors (float32), ``gallery_labels`` [N] int64
    codes. Searches the top ``k`` neighbours in batches (neighbour arrays are batch x k), then
    re-ranks exactly the rows with fewer than ``min(n_max, individuals)`` candidates.
    """

    index = FlatIndex(gallery, use_gpu=use_gpu)
    q = queries.shape[0]
    labels = np.empty((q, n_max), dtype=np.int64)
    scores = np.empty((q, n_max), dtype=np.float32)
    for a in batch_starts(q, batch_size, progress, f"rank k={min(k, index.n)}"):
        s, i = index.search(queries[a:a + batch_size], k, batch_size=batch_size)
        rows = slice(a, a + batch_size)
        labels[rows], scores[rows] = individual_candidates(s, i, gallery_labels, n_max)
    need = min(n_max, int(np.unique(gallery_labels).size))
    short = np.flatnonzero((labels != PAD).sum(axis=1) < need)
    if short.size:
        log.info("%d queries have fewer than %d individuals in their top %d: re-ranking them exactly",
                 short.size, need, k)
        labels[short], scores[short] = exact_candidates(gallery, gallery_labels, queries[short], n_max)
    return labels, scores


def insert_new_individual(cand_labels: np.ndarray, cand_scores: np.ndarray, threshold: float | np.ndarray,
                          top: int = TOP) -> np.ndarray:
    """Insert ``new_individual`` (code NEW = -2) with score ``threshold``; keep ``top``.

    ``cand_labels``/``cand_scores`` [Q, m] ranked as from :func:`individual_candidates`;
    ``threshold`` one float for every row, or [Q] floats, one per row (per-species thresholds).
    Returns [Q, top] int64 codes, PAD (-1) where a row runs out of candidates. Its rank is the
    number of candidates scoring >= threshold (ties go to the individual).
    """
    q, m = cand_labels.shape
    if m < top:
        cand_labels = np.pad(cand_labels, ((0, 0), (0, top - m)), constant_values=PAD)
    # Compared in float32, the dtype of the scores, so a threshold typed as 0.7 ties with a 0.7 score.
    t = np.float32(threshold) if np.ndim(threshold) == 0 else np.asarray(threshold, np.float32)[:, None]
    pos = (cand_scores.astype(np.float32, copy=False) >= t).sum(axis=1, keepdims=True)  # 0-based rank
    cols = np.arange(top)[None, :]
    src = np.where(cols < pos, cols, cols - 1).clip(0)
    out = np.take_along_axis(cand_labels[:, :top], np.broadcast_to(src, (q, top)), axis=1)
    return np.where(cols == pos, NEW, out)


def decode_labels(codes: np.ndarray, classes: np.ndarray) -> list[list[str]]:
    """[Q, top] codes (NEW, PAD or index into ``classes``) -> per row the label strings, PAD dropped."""

    names = np.append(np.asarray(classes, dtype=object), NEW_INDIVIDUAL)
    idx = np.where(codes == NEW, len(classes), codes)
    keep = codes != PAD
    return [names[r[m]].tolist() for r, m in zip(idx, keep, strict=True)]


def predict_top5(gallery: np.ndarray, gallery_label_strs, queries: np.ndarray, threshold: float,
                 k: int = 100, *, top: int = TOP, use_gpu: bool | None = None,
                 progress: bool = False) -> list[list[str]]:
    """Top-``top`` labels per query (``new_individual`` included by ``threshold``); see module doc."""
    codes, classes = encode_labels(gallery_label_strs)
    labels, scores = rank_queries(gallery, codes, queries, k, top, use_gpu=use_gpu, progress=progress)
    return decode_labels(insert_new_individual(labels, scores, threshold, top), classes)


# --- from files: shared by `whalesub submit` and `whalesub tune` ---------------------------------


def check_threshold(threshold: float) -> float:
    """Raise ConfigError unless ``threshold`` is a finite cosine in [-1, 1]."""
    if not np.isfinite(threshold) or not -1.0 <= threshold <= 1.0:
        raise ConfigError(
            f"--threshold {threshold} is outside [-1, 1]: it is the cosine score given to new_individual; "
            "pick one with `whalesub tune` (typical values 0.3-0.7)")
    return float(threshold)
