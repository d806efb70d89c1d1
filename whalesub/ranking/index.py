"""Exact nearest-neighbour search by inner product (cosine on unit vectors) with FAISS.

``IndexFlatIP`` is exact: every query is compared with every gallery vector. It runs on the GPU
(``StandardGpuResources`` + ``index_cpu_to_gpu``) when FAISS sees one and on the CPU otherwise.
Queries go through in batches, so memory is the gallery plus O(batch x D + Q x k).

Tie order: within each row the returned neighbours are sorted by (-score, gallery index), so
equal scores come out in gallery order whatever FAISS did. Which of several neighbours tied
exactly at the k-th score makes it into the top k is FAISS's choice.
"""

from __future__ import annotations

import logging

import numpy as np

from whalesub.core.errors import WhalesubError

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # FAISS GPU k-selection limit
DEFAULT_BATCH = 8192


def sort_ties(scores: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (-score, index); ``scores`` [Q, k] f32, ``indices`` [Q, k] int64.

    Missing neighbours (index -1, score -inf or FAISS's -3.4e38) sort last with score -inf.
    Rows that are already strictly decreasing (FAISS's usual output) are left as they are.
    """
    s = np.where(indices < 0, -np.inf, scores).astype(np.float32, copy=False)
    idx = indices.astype(np.int64, copy=False)
    redo = np.flatnonzero((s[:, 1:] >= s[:, :-1]).any(axis=1))  # ties or out of order
    if redo.size:
        sr, ir = s[redo], idx[redo]
        q, k = sr.shape
        idx_key = np.where(ir < 0, np.iinfo(np.int64).max, ir)
        rows = np.repeat(np.arange(q), k)
        order = np.lexsort((idx_key.ravel(), -sr.ravel(), rows)).reshape(q, k) - (np.arange(q) * k)[:, None]
        s, idx = s.copy(), idx.copy()
        s[redo], idx[redo] = np.take_along_axis(sr, order, axis=1), np.take_along_axis(ir, order, axis=1)
    return s, idx


class FlatIndex:
    """An exact inner-product index over ``gallery`` [N, D] (converted to contiguous float32)."""

    def __init__(self, gallery: np.ndarray, use_gpu: bool | None = None):
        # faiss.loader logs each CPU-variant probe at INFO; only its warnings concern users.
        logging.getLogger("faiss.loader").setLevel(max(logging.WARNING, logging.getLogger().level))
        import faiss

        gallery = np.ascontiguousarray(gallery, dtype=np.float32)
        if gallery.ndim != 2 or gallery.shape[0] == 0:
            raise WhalesubError(f"the gallery must be a non-empty N x D array, got shape {gallery.shape}")
        self.n, self.dim = gallery.shape
        cpu = faiss.IndexFlatIP(self.dim)
        cpu.add(gallery)
        self.cpu_index = cpu
        self.gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
        self.index = cpu
        if self.gpu:
            self._res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._res, 0, cpu)
        log.info("FAISS IndexFlatIP on %s: %d x %d", "GPU" if self.gpu else "CPU", self.n, self.dim)

    def search(self, queries: np.ndarray, k: int, *, batch_size: int = DEFAULT_BATCH,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` neighbours of ``queries`` [Q, D]: scores [Q, k'] f32 and indices [Q, k'] int64.

        ``k' = min(k, N)``; rows sorted by (-score, index).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise WhalesubError(
                f"queries must be Q x {self.dim} to match the gallery, got shape {queries.shape}")
        if k < 1:
            raise WhalesubError(f"k must be at least 1, got {k}")
        k = min(int(k), self.n)
        index = self.index if (not self.gpu or k <= GPU_MAX_K) else self.cpu_index
        q = queries.shape[0]
        scores = np.empty((q, k), dtype=np.float32)
        indices = np.empty((q, k), dtype=np.int64)
        starts = range(0, q, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"search k={k}", unit="batch", leave=False)
        for a in starts:
            s, i = index.search(queries[a:a + batch_size], k)
            scores[a:a + batch_size], indices[a:a + batch_size] = sort_ties(s, i)
        return scores, indices


def search(gallery: np.ndarray, queries: np.ndarray, k: int, *, use_gpu: bool | None = None,
           batch_size: int = DEFAULT_BATCH, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product neighbours: (scores [Q, min(k, N)] f32, indices int64).

    ``gallery`` [N, D] and ``queries`` [Q, D] should be L2-normalised (scores are cosines).
    """
    return FlatIndex(gallery, use_gpu=use_gpu).search(queries, k, batch_size=batch_size, progress=progress)
