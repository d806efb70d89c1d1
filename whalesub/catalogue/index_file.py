"""The catalogue's on-disk FAISS index: an ``IndexFlatIP`` file that grows by appending.

``faiss.write_index`` lays a flat inner-product index out as a 45-byte header (``IxFI``, d int32,
ntotal int64, two int64 fields, is_trained, metric int32, then the code size as a uint64 count of
floats) followed by the vectors themselves, float32 row-major. So adding rows is appending their
bytes and patching two counters in the header: the cost is proportional to the rows added, not to
the catalogue. The file stays readable by ``faiss.read_index``.

The database is the source of truth (:mod:`whalesub.catalogue.store`); this file is a cache that is
checked on every open (:func:`read_header` says how many rows it holds, or None when it is torn) and
repaired from the database when it lags.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from whalesub.core.atomic import atomic_open

HEADER = 45
_NTOTAL_AT, _SIZE_AT = 8, 37
_DUMMY = 1 << 20


def header_bytes(n: int, dim: int) -> bytes:
    """The header of a flat inner-product index of ``n`` rows of ``dim`` float32."""
    return b"IxFI" + struct.pack("<iqqq?i", dim, n, _DUMMY, _DUMMY, True, 0) + struct.pack("<Q", n * dim)


def read_header(path: Path, dim: int) -> int | None:
    """Rows held by the index file at ``path``; None when it is missing, torn or of another shape."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(HEADER)
    except OSError:
        return None
    if len(head) < HEADER or head[:4] != b"IxFI":
        return None
    d, n, _, _, _, metric = struct.unpack("<iqqq?i", head[4:_SIZE_AT])
    (floats,) = struct.unpack("<Q", head[_SIZE_AT:HEADER])
    if d != dim or metric != 0 or floats != n * d or size != HEADER + 4 * floats:
        return None
    return int(n)


def write_index(path: Path, vectors: np.ndarray) -> None:
    """Write ``vectors`` [N, D] float32 as a whole new index file, atomically."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    with atomic_open(path, "wb") as fh:
        fh.write(header_bytes(len(vectors), vectors.shape[1]))
        fh.write(vectors.tobytes())


def append_rows(path: Path, vectors: np.ndarray, n_before: int) -> None:
    """Append ``vectors`` [M, D] to an index file of ``n_before`` rows (checked by the caller).

    Data first, then the counters, each flushed to disk: a kill in between leaves a file whose
    header disagrees with its length, which :func:`read_header` reports as torn.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = n_before + len(vectors), vectors.shape[1]
    with open(path, "r+b") as fh:
        fh.seek(HEADER + 4 * n_before * dim)
        fh.write(vectors.tobytes())
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())
        fh.seek(_NTOTAL_AT)
        fh.write(struct.pack("<q", n))
        fh.seek(_SIZE_AT)
        fh.write(struct.pack("<Q", n * dim))
        fh.flush()
        os.fsync(fh.fileno())


def read_rows(path: Path, n: int, dim: int) -> np.ndarray:
    """The index's vectors as a read-only memory map [n, dim] float32 (no copy)."""
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", offset=HEADER, shape=(n, dim))
