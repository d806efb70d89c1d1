"""``catalogue identify``: candidates per individual and per image, probabilities, new-animal groups.

For each query photo: the exact top neighbours among the catalogue's *labelled* photos (FAISS
IndexFlatIP; a query already in the catalogue never matches itself), the best ``top`` images and
the best ``top`` individuals (an individual scores its best cosine, as in ``submit``), each with
the calibrated probability that it shows the same animal, and the probability that the animal is
new (:mod:`whalesub.catalogue.calibrate`). Nothing is assigned: a person decides.

Queries judged new (P(new) >= 0.5, or top cosine below ``new_below``) are matched against each
other: two are linked when their pair is more likely than not the same animal (image calibration,
or cosine >= ``link_above``), and the connected groups get ids ``batch-1``, ``batch-2``...
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whalesub.catalogue.calibrate import NEW_SHARE, Calibration, fit_calibration
from whalesub.catalogue.store import Catalogue, CatalogueError
from whalesub.core.atomic import atomic_write_text

log = logging.getLogger(__name__)

REFIT_CHANGE = 0.05  # refit the calibration once the labelled photos changed by more than 5%


@dataclass
class Gallery:
    """The labelled photos: catalogue rows [M], label codes [M] into ``classes``, names [M], the index."""

    rows: np.ndarray
    codes: np.ndarray
    classes: np.ndarray
    vectors: np.ndarray
    cat: Catalogue

    def names(self, positions: np.ndarray) -> np.ndarray:
        """Photo names of gallery ``positions`` (any shape); read from the database only for these."""
        positions = np.asarray(positions)
        wanted = np.unique(self.rows[positions.ravel()]).tolist()
        found = {}
        for a in range(0, len(wanted), 900):
            part = wanted[a : a + 900]
            q = f"SELECT row, name FROM photos WHERE row IN ({','.join('?' * len(part))})"
            found.update(self.cat.db.execute(q, part))
        return np.array([found[r] for r in self.rows[positions.ravel()].tolist()], dtype=object).reshape(
            positions.shape
        )


def load_gallery(cat: Catalogue) -> Gallery:
    """The labelled photos; their rows and id codes are cached in the database per labels version."""
    version = cat.meta("labels_version")
    cached = cat.db.execute("SELECT value FROM cache WHERE key = 'gallery'").fetchone()
    rows = None
    if cached is not None:
        with np.load(io.BytesIO(cached[0]), allow_pickle=False) as z:
            if str(z["version"]) == version:
                rows, codes, classes = z["rows"], z["codes"], z["classes"]
    if rows is None:
        rows, codes, classes = _read_labels(cat)
        buf = io.BytesIO()
        np.savez(buf, version=np.array(version), rows=rows, codes=codes, classes=classes)
        with cat.transaction():
            cat.db.execute("INSERT OR REPLACE INTO cache VALUES ('gallery', ?)", (buf.getvalue(),))
    if not len(rows):
        raise CatalogueError(
            f"catalogue {cat.folder} has no labelled photo to match against: add photos with "
            "--labels, or record decisions (`catalogue new PHOTO`)"
        )
    allv = cat.vectors()
    vectors = allv if len(rows) == len(allv) else allv[rows]
    return Gallery(rows, codes, classes, vectors, cat)


def _read_labels(cat: Catalogue) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from whalesub.ranking.rank import encode_labels

    got = cat.db.execute("SELECT row, individual_id FROM photos WHERE individual_id IS NOT NULL ORDER BY row")
    got = got.fetchall()
    if not got:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, str)
    codes, classes = encode_labels([r[1] for r in got])
    return np.fromiter((r[0] for r in got), np.int64, len(got)), codes, classes


def calibration_of(
    cat: Catalogue, gallery: Gallery, refit: bool = False, new_share: float = NEW_SHARE
) -> tuple[Calibration | None, str]:
    """The catalogue's calibration (cached in its database).

    Refitted when the model or ``new_share`` changed, when the number of labelled photos moved by more
    than :data:`REFIT_CHANGE` since the fit (single decisions barely move a fit made on thousands of
    pairs, and a fit at 100,000 photos takes a minute), when the last try could not calibrate and labels
    changed since, or when ``refit``.
    """
    if not 0 < new_share < 1:
        raise CatalogueError(f"--new-share must be between 0 and 1 (exclusive), got {new_share}")
    key, n, version = f"{cat.fingerprint}:{new_share}", len(gallery.rows), cat.meta("labels_version")
    row = cat.db.execute("SELECT value FROM cache WHERE key = 'calibration'").fetchone()
    if row is not None and not refit:
        cached = json.loads(row[0])
        if cached.get("key") == key:
            if cached["calibration"] and abs(n - cached["labelled"]) <= REFIT_CHANGE * cached["labelled"]:
                return Calibration.from_json(cached["calibration"]), ""
            if not cached["calibration"] and cached.get("labels_version") == version:
                return None, cached.get("why", "")
    log.info("fitting the calibration on out-of-fold pairs of %d labelled photos", n)
    calib, why = fit_calibration(np.asarray(gallery.vectors), gallery.codes, new_share=new_share)
    value = json.dumps(
        {
            "key": key,
            "labelled": n,
            "labels_version": version,
            "calibration": calib.to_json() if calib else None,
            "why": why,
        }
    )
    with cat.transaction():
        cat.db.execute("INSERT OR REPLACE INTO cache VALUES ('calibration', ?)", (value,))
    return calib, why


def identify_vectors(
    gallery: Gallery,
    queries: np.ndarray,
    query_rows: np.ndarray,
    top: int = 12,
    calibration: Calibration | None = None,
    new_below: float | None = None,
    link_above: float | None = None,
) -> list[dict]:
    """Per query (``queries`` [Q, D] unit rows; ``query_rows`` [Q]: its catalogue row or -1), a dict:
    ``individuals`` and ``images`` (lists of candidates), ``p_new``, ``group``."""
    from whalesub.ranking.index import FlatIndex
    from whalesub.ranking.rank import individual_candidates

    if top < 1:
        raise CatalogueError(f"--top must be at least 1, got {top}")
    n = len(gallery.rows)
    k = min(n, max(100, 10 * top) + 1)
    scores, idx = FlatIndex(gallery.vectors).search(queries, k)
    self_hit = (idx >= 0) & (gallery.rows[np.maximum(idx, 0)] == np.asarray(query_rows)[:, None])
    if self_hit.any():  # drop each query's own row, keep the order
        idx, scores = idx.copy(), scores.copy()
        idx[self_hit], scores[self_hit] = -1, -np.inf
        order = np.argsort(self_hit, axis=1, kind="stable")
        idx, scores = np.take_along_axis(idx, order, 1), np.take_along_axis(scores, order, 1)
    ind_l, ind_s = individual_candidates(scores, idx, gallery.codes, n_max=top)
    # each individual is shown by its best photo: its first neighbour in the (sorted) row
    nb_codes = np.where(idx >= 0, gallery.codes[np.maximum(idx, 0)], -1)
    first = np.argmax(nb_codes[:, None, :] == ind_l[:, :, None], axis=2)  # [Q, top]
    img_j, img_s = np.maximum(idx[:, :top], 0), scores[:, :top]
    both = gallery.names(
        np.concatenate([np.take_along_axis(np.maximum(idx, 0), first, axis=1), img_j], axis=1)
    )
    ind_photo, img_name = both[:, : first.shape[1]], both[:, first.shape[1] :]
    img_ok = idx[:, :top] >= 0
    top1 = np.where(ind_l[:, 0] >= 0, ind_s[:, 0], -1.0)
    if calibration is not None:
        p_ind = calibration.curves["individual"](ind_s)
        p_img = calibration.curves["image"](img_s)
        p_new = np.where(ind_l[:, 0] >= 0, 1.0 - calibration.curves["known"](top1), 1.0)
    classes, codes = gallery.classes, gallery.codes
    out = []
    for q in range(len(queries)):
        inds = [
            {"id": str(classes[c]), "cos": float(ind_s[q, t]), "photo": str(ind_photo[q, t])}
            for t, c in enumerate(ind_l[q])
            if c >= 0
        ]
        imgs = [
            {"photo": str(img_name[q, t]), "id": str(classes[codes[j]]), "cos": float(img_s[q, t])}
            for t, j in enumerate(img_j[q])
            if img_ok[q, t]
        ]
        if calibration is not None:
            for t, c in enumerate(inds):
                c["p"] = float(p_ind[q, t])
            for t, c in enumerate(imgs):
                c["p"] = float(p_img[q, t])
        out.append(
            {
                "individuals": inds,
                "images": imgs,
                "top1": float(top1[q]),
                "p_new": None if calibration is None else float(p_new[q]),
                "group": None,
            }
        )
    _group_new(out, queries, calibration, new_below, link_above)
    return out


def _group_new(results: list[dict], queries: np.ndarray, calibration, new_below, link_above) -> None:
    if new_below is not None:
        unmatched = [i for i, r in enumerate(results) if r["top1"] < new_below]
    elif calibration is not None:
        unmatched = [i for i, r in enumerate(results) if r["p_new"] >= 0.5]
    else:
        log.warning("no calibration and no --new-below: photos of the batch are not grouped")
        return
    if link_above is not None:

        def link(cos):
            return cos >= link_above
    elif calibration is not None:

        def link(cos):
            return calibration.curves["image"](cos) >= 0.5
    else:
        log.warning("no calibration and no --link-above: new photos of the batch are not grouped")
        return
    parent = list(range(len(unmatched)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    sub = np.asarray(queries, np.float32)[unmatched]
    cos = sub @ sub.T
    for a in range(len(unmatched)):
        for b in np.flatnonzero(link(cos[a, a + 1 :])) + a + 1:
            parent[root(int(b))] = root(a)
    names: dict[int, str] = {}
    for a, q in enumerate(unmatched):
        results[q]["group"] = names.setdefault(root(a), f"batch-{len(names) + 1}")


def write_candidates(path: Path, names: list[str], results: list[dict]) -> int:
    """One CSV row per candidate: query, kind (individual|image), rank, individual_id, photo, cosine,
    p_same, p_new, group."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "kind", "rank", "individual_id", "photo", "cosine", "p_same", "p_new", "group"])
    n = 0
    for name, r in zip(names, results, strict=True):
        pn = "" if r["p_new"] is None else f"{r['p_new']:.4f}"
        for kind in ("individual", "image"):
            for rank, c in enumerate(r[kind + "s"], 1):
                p = f"{c['p']:.4f}" if "p" in c else ""
                w.writerow(
                    [name, kind, rank, c["id"], c["photo"], f"{c['cos']:.6f}", p, pn, r["group"] or ""]
                )
                n += 1
        if not r["individuals"]:
            w.writerow([name, "none", 0, "", "", "", "", pn, r["group"] or ""])
    atomic_write_text(path, buf.getvalue())
    return n


def identify_photos(
    cat: Catalogue,
    inputs: list[Path],
    embedder_args: dict,
    *,
    top: int = 12,
    out: Path,
    html: Path | None = None,
    boxes: Path | None = None,
    box_type: str | None = None,
    new_below: float | None = None,
    link_above: float | None = None,
    thumb_px: int = 128,
    refit: bool = False,
    new_share: float = NEW_SHARE,
) -> dict:
    """``catalogue identify``: embed the photos the catalogue lacks, rank, write the CSV (and HTML)."""
    from whalesub.catalogue.photos import Embedder, list_photos
    from whalesub.catalogue.store import file_sha256

    paths = list_photos(inputs)
    names = [p.name for p in paths]
    shas = [file_sha256(p) for p in paths]
    held = cat.photo_rows(shas)
    rows = np.array([held[s][0] if s in held else -1 for s in shas], np.int64)
    queries = np.zeros((len(paths), cat.dim), np.float32)
    todo = np.flatnonzero(rows < 0)
    allv = cat.vectors()
    for i in np.flatnonzero(rows >= 0):
        queries[i] = allv[rows[i]]
    if len(todo):
        picked = [None] * len(paths)
        if boxes is not None:
            from whalesub.embedding.loader import select_boxes

            picked = select_boxes(boxes, box_type, names)
        emb = Embedder(cat, **embedder_args)
        queries[todo] = emb([paths[i] for i in todo], [picked[i] for i in todo], desc="catalogue identify")
    gallery = load_gallery(cat)
    calibration, why = calibration_of(cat, gallery, refit, new_share)
    if calibration is None:
        log.warning("probabilities left out: %s", why)
    results = identify_vectors(gallery, queries, rows, top, calibration, new_below, link_above)
    n = write_candidates(out, names, results)
    if html is not None:
        from whalesub.catalogue.review import write_review

        write_review(html, cat, paths, results, calibration, why, top, thumb_px)
    groups = {r["group"] for r in results if r["group"]}
    return {
        "queries": len(paths),
        "embedded": int(len(todo)),
        "rows": n,
        "out": str(out),
        "new": sum(1 for r in results if r["group"]),
        "groups": len(groups),
        "calibrated": calibration is not None,
        "html": None if html is None else str(html),
    }
