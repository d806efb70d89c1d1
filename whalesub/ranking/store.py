"""Embedding files: image ids + vectors + provenance, in one ``.npz``.

Format (``numpy.savez``, readable with ``numpy.load(path, allow_pickle=False)``)
-----------------------------------------------------------------------------------
``ids``
    1-D unicode string array (``<U...``) of length N: the image file name each vector belongs to
    (the same names as the ``image`` column of ``train.csv`` / ``sample_submission.csv``).
    A name may appear several times: several views of one image, for example the original and
    the horizontally flipped crop in a flipped gallery. In a gallery every view counts as one
    more neighbour of the image's individual; in a query file the views of one image are
    averaged (then re-normalised) into one query vector.
``embeddings``
    N x D array, ``float32`` or ``float16``, finite, one row per entry of ``ids``. Rows should
    be L2-normalised (inner product = cosine); rows that are not are normalised on use with a
    warning, all-zero rows are an error.
``meta``
    0-d unicode string array holding a JSON object. Every key is optional for files you bring
    yourself; ``whalesub embed`` writes: ``format`` (``"whalesub.embeddings"``), ``format_version``
    (1), ``fingerprint`` (of the model weights and preprocessing: gallery and queries must agree),
    ``model`` (the ModelSpec as a dict), ``tta`` (e.g. ``["orig", "hflip"]``), ``views_per_image``,
    ``created`` (UTC ISO time), ``whalesub_version``. A missing ``meta`` is read as ``{}``.

Bring your own embeddings::

    np.savez("gallery.npz", ids=np.array(names), embeddings=vectors.astype(np.float32),
             meta=json.dumps({"fingerprint": "my-model-v1"}))

or ``whalesub.ranking.store.save_embeddings(path, names, vectors, {"fingerprint": "my-model-v1"})``, which
also checks the arrays and writes atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import whalesub
from whalesub.core.atomic import atomic_open
from whalesub.core.errors import DataError, first_few
from whalesub.ranking.vectors import average_groups, unit_rows, zero_rows

log = logging.getLogger(__name__)

FORMAT = "whalesub.embeddings"
FORMAT_VERSION = 1
_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_NORM_TOL = 1e-3


@dataclass
class Embeddings:
    """Vectors of one image set. ``ids``: [N] str; ``vectors``: [N, D] float32/float16; ``meta``: dict."""

    ids: np.ndarray
    vectors: np.ndarray
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def fingerprint(self) -> str | None:
        fp = self.meta.get("fingerprint")
        return None if fp is None else str(fp)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


def _where(path) -> str:
    return f"embedding file {str(path)!r}" if path is not None else "embeddings"


def _check_arrays(ids: np.ndarray, vectors: np.ndarray, where: str) -> list[str]:
    """Return every problem with ``ids`` / ``vectors`` (empty when they follow the format)."""
    problems = []
    if ids.ndim != 1:
        problems.append(f"'ids' must be 1-D, got shape {ids.shape}")
    elif ids.dtype.kind != "U":
        problems.append(f"'ids' must be a unicode string array, got dtype {ids.dtype}")
    elif (ids == "").any():
        rows = np.flatnonzero(ids == "")
        problems.append(f"'ids' has {rows.size} empty names (rows {first_few(rows.tolist())})")
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        problems.append(f"'embeddings' must be 2-D N x D with D > 0, got shape {vectors.shape}")
    elif vectors.dtype not in _DTYPES:
        problems.append(f"'embeddings' must be float32 or float16, got dtype {vectors.dtype}")
    if not problems and ids.shape[0] != vectors.shape[0]:
        problems.append(f"'ids' has {ids.shape[0]} entries but 'embeddings' has {vectors.shape[0]} rows")
    if not problems and ids.shape[0] == 0:
        problems.append("the file holds no vectors (N = 0)")
    if not problems:
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            named = [f"row {r} ({ids[r]})" for r in rows[:5]]
            problems.append(
                f"{rows.size} rows of 'embeddings' hold NaN or inf: {', '.join(named)}"
                + (f" and {rows.size - 5} more" if rows.size > 5 else "")
            )
    if problems:
        problems.append(f"fix or re-create the {where} (see whalesub.ranking.store for the format)")
    return problems


def default_meta(**extra) -> dict:
    """The provenance keys every written file carries, plus ``extra``."""

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "whalesub_version": whalesub.__version__,
    }
    meta.update(extra)
    return meta


def save_embeddings(path: str | os.PathLike, ids, vectors: np.ndarray, meta: dict | None = None) -> Path:
    """Check and write ``ids`` [N] and ``vectors`` [N, D] (float32/float16) to ``path`` atomically.

    ``meta`` (JSON-serialisable) is merged over :func:`default_meta`. Returns the path written.
    """
    path = Path(path)
    ids = np.asarray(ids, dtype=str)
    vectors = np.asarray(vectors)
    problems = _check_arrays(ids, vectors, f"arrays passed to save_embeddings for {str(path)!r}")
    if problems:
        raise DataError(f"cannot write {_where(path)}:", problems)
    try:
        meta_json = json.dumps(default_meta(**(meta or {})), sort_keys=True)
    except TypeError as exc:
        raise DataError(f"cannot write {_where(path)}: meta is not JSON-serialisable ({exc})") from None
    # A file object, not a name: np.savez appends ".npz" to names that lack it.
    with atomic_open(path, "wb") as fh:
        np.savez(fh, ids=ids, embeddings=np.ascontiguousarray(vectors), meta=np.array(meta_json))
    return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read and check an embedding file; raise DataError naming the file and every problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{_where(path)} not found: check the path (write one with `whalesub embed`)")
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{_where(path)} is not a .npz (zip) file; write it with numpy.savez or save_embeddings")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in ("ids", "embeddings") if k not in keys]
            if missing:
                raise DataError(
                    f"{_where(path)} lacks the array(s) {first_few(missing)} "
                    f"(it has {first_few(sorted(keys))}); "
                    "save 'ids' (image names) and 'embeddings' (N x D float32) with numpy.savez"
                )
            ids, vectors = npz["ids"], npz["embeddings"]
            meta_raw = npz["meta"] if "meta" in keys else None
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise DataError(
            f"{_where(path)} cannot be read without pickle ({exc}); store 'ids' as a unicode "
            "array (np.array(names, dtype=str)) and 'meta' as a JSON string"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a damaged member (bad .npy header, CRC...) is a bad file
        raise DataError(f"{_where(path)} is not a readable .npz file ({type(exc).__name__}: {exc}); "
                        "re-create it with numpy.savez or save_embeddings") from None
    not_arrays = [k for k, v in (("ids", ids), ("embeddings", vectors), ("meta", meta_raw))
                  if v is not None and not isinstance(v, np.ndarray)]
    if not_arrays:  # np.load hands back the raw bytes of a member that is not a .npy file
        raise DataError(f"{_where(path)}: member(s) {first_few(not_arrays)} are not numpy arrays (.npy); "
                        "re-create the file with numpy.savez or save_embeddings")
    if ids.dtype.kind == "S":
        ids = np.char.decode(ids, "utf-8")
    problems = _check_arrays(ids, vectors, _where(path))
    if problems:
        raise DataError(f"{_where(path)} breaks the embedding format:", problems)
    meta = _parse_meta(meta_raw, path)
    return Embeddings(ids=ids, vectors=vectors, meta=meta, path=path)


def _parse_meta(meta_raw: np.ndarray | None, path: Path) -> dict:
    if meta_raw is None:
        return {}
    try:
        meta = json.loads(str(meta_raw[()]))
    except (json.JSONDecodeError, TypeError, IndexError) as exc:
        raise DataError(
            f"{_where(path)}: 'meta' is not a JSON string ({exc}); store json.dumps(dict)") from None
    if not isinstance(meta, dict):
        raise DataError(f"{_where(path)}: 'meta' must be a JSON object, got {type(meta).__name__}")
    return meta


def unit_float32(emb: Embeddings) -> np.ndarray:
    """Return the vectors as C-contiguous float32 [N, D] rows of unit L2 norm.

    Rows further than 1e-3 from unit norm are normalised with a warning; all-zero rows raise.
    """
    x = np.ascontiguousarray(emb.vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    zero = norms == 0
    if zero.any():
        rows = np.flatnonzero(zero)
        raise DataError(
            f"{_where(emb.path)}: {rows.size} all-zero vectors (rows {first_few(rows.tolist())}, "
            f"ids {first_few(emb.ids[rows].tolist())}); a zero vector has no direction: re-embed those images"
        )
    if np.abs(norms - 1).max() > _NORM_TOL:
        log.warning("%s: vectors are not L2-normalised; normalising them (cosine similarity)",
                    _where(emb.path))
        x = unit_rows(x)
    return x


def check_compatible(gallery: Embeddings, queries: Embeddings) -> None:
    """Raise DataError unless gallery and queries share the dimension and the model fingerprint."""
    g, q = _where(gallery.path), _where(queries.path)
    if gallery.dim != queries.dim:
        raise DataError(
            f"dimension mismatch: gallery {g} has D={gallery.dim} but queries {q} have D={queries.dim}; "
            "embed both sets with the same model"
        )
    fg, fq = gallery.fingerprint, queries.fingerprint
    if fg is not None and fq is not None and fg != fq:
        raise DataError(
            f"fingerprint mismatch: gallery {g} has meta['fingerprint']={fg!r} but queries {q} have {fq!r}; "
            "they come from different models or preprocessing: embed both with the same weights and spec"
        )
    if fg is None or fq is None:
        log.warning("no fingerprint in %s: cannot check that both sets come from the same model",
                    " and ".join(w for w, f in ((g, fg), (q, fq)) if f is None))
    # box crops are not part of the model fingerprint (a flipped gallery with flip-TTA queries is
    # a valid pairing, so TTA is not either), but crops that differ are almost always a mistake
    bg, bq = gallery.meta.get("box_type"), queries.meta.get("box_type")
    if "box_type" in gallery.meta and "box_type" in queries.meta and bg != bq:
        log.warning("gallery %s was embedded with box type %r but queries %s with %r: "
                    "embed both with the same --boxes/--box-type unless this is deliberate", g, bg, q, bq)


def average_views(emb: Embeddings) -> Embeddings:
    """Collapse repeated ids (several views of one image) into one unit vector per image.

    Returns ids in order of first appearance and the re-normalised mean of each image's views
    (float32). Files with unique ids are returned unchanged.
    """
    uniq, first, inverse = np.unique(emb.ids, return_index=True, return_inverse=True)
    if uniq.size == len(emb):
        return emb
    order = np.argsort(first, kind="stable")  # output row r: the r-th distinct id by first appearance
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(order.size)
    vectors = average_groups(unit_float32(emb), rank_of[inverse.ravel()], uniq.size)
    if (bad := zero_rows(vectors)).any():
        raise DataError(f"{_where(emb.path)}: the views of {first_few(uniq[order][bad].tolist())} "
                        "cancel out (sum to zero)")
    log.info("%s: averaged %d views into %d images", _where(emb.path), len(emb), uniq.size)
    return Embeddings(ids=uniq[order], vectors=vectors, meta=emb.meta, path=emb.path)


def combined_fingerprint(models) -> str:
    """One model: its own fingerprint (ModelSpec incl. preprocessing + weights; the one training
    writes into its OOF files). Several: 16 hex of sha256 over the ordered list of theirs."""
    if len(models) == 1:
        return models[0].fingerprint
    payload = json.dumps([m.fingerprint for m in models])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
