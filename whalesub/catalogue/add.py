"""Adding photos whose vectors are known: the one path every ``catalogue add`` goes through.

:func:`add_vectors` skips photos the catalogue already holds (same sha256: renamed copies are
recognised), renames a new photo whose name another photo already uses (``stem-<sha8>.ext``),
copies the files into ``photos/``, inserts rows and the history in ONE transaction, and only then
appends the vectors to the index file. Label imports (``--labels``) are a ``labels`` decision in
the same transaction, so they can be undone like any other.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from whalesub.catalogue.decisions import check_id, record
from whalesub.catalogue.store import PHOTOS, Catalogue, CatalogueError
from whalesub.core.atomic import atomic_path
from whalesub.core.errors import first_few
from whalesub.ranking.vectors import unit_rows, zero_rows

log = logging.getLogger(__name__)


@dataclass
class NewPhoto:
    """One photo to add: its name, content hash and, optionally, file, crop box, id and species."""

    name: str
    sha256: str
    source: Path | None = None
    box: tuple | None = None
    individual_id: str | None = None
    species: str | None = None


def _free_name(name: str, sha: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    p = Path(name)
    return f"{p.stem}-{sha[:8]}{p.suffix}"


def add_vectors(
    cat: Catalogue, photos: list[NewPhoto], vectors: np.ndarray, who: str, note: dict | None = None
) -> dict:
    """Add ``photos`` with their ``vectors`` [M, D] (L2-normalised here); returns a summary dict."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (len(photos), cat.dim) or not np.isfinite(vectors).all():
        raise CatalogueError(
            f"vectors of shape {vectors.shape} (finite?) do not fit {len(photos)} photos of a "
            f"catalogue of dimension {cat.dim}"
        )
    if zero_rows(vectors).any():
        raise CatalogueError(
            f"photos {first_few([p.name for p, z in zip(photos, zero_rows(vectors), strict=True) if z])}"
            " have an all-zero vector: the model gave them no direction"
        )
    vectors = unit_rows(vectors)
    for p in photos:
        if p.individual_id is not None:
            check_id(p.individual_id, f"label of {p.name}")
    with cat.transaction():
        held = cat.photo_rows([p.sha256 for p in photos])
        fresh, seen, changes, conflicts, same = [], set(), [], [], []
        for i, p in enumerate(photos):
            if p.sha256 in held:
                row, held_name, held_id = held[p.sha256]
                same.append(f"{p.name}={held_name}" if p.name != held_name else p.name)
                if p.individual_id is not None and held_id != p.individual_id:
                    if held_id is None:
                        changes.append((row, None, p.individual_id))
                    else:
                        conflicts.append(f"{p.name}: label {p.individual_id!r}, catalogue {held_id!r}")
            elif p.sha256 not in seen:
                seen.add(p.sha256)
                fresh.append(i)
            else:
                same.append(p.name)
        if conflicts:
            raise CatalogueError(
                f"{len(conflicts)} photo(s) already in the catalogue carry another id there; "
                "nothing was added. Fix the labels, or change the catalogue with `catalogue "
                "confirm` / `merge` first:",
                conflicts[:50],
            )
        names = [photos[i].name for i in fresh]
        taken = (
            {
                n
                for (n,) in cat.db.execute(
                    f"SELECT name FROM photos WHERE name IN ({','.join('?' * len(names))})", names
                )
            }
            if names
            else set()
        )
        start, rows = cat.size, []
        for j, i in enumerate(fresh):
            p = photos[i]
            name = _free_name(p.name, p.sha256, taken)
            taken.add(name)
            if name != p.name:
                log.warning("another photo is already called %s: this one is stored as %s", p.name, name)
            if p.source is not None:
                _copy(p.source, cat.folder / PHOTOS / name)
            rows.append((start + j, name, p, vectors[i]))
        seq = None  # an add that adds nothing leaves no history row (its labels, if any, do)
        if rows:
            args = {"photos": len(rows), "skipped": len(same), "first": start, **(note or {})}
            seq = record(cat, "add", args, [], who)
        cat.db.executemany(
            "INSERT INTO photos(row, sha256, name, source, box, added, individual_id, species) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
            [
                (
                    r,
                    p.sha256,
                    n,
                    None if p.source is None else str(p.source),
                    None if p.box is None else json.dumps([float(x) for x in p.box]),
                    seq,
                    p.species,
                )
                for r, n, p, v in rows
            ],
        )
        cat.db.executemany(
            "INSERT INTO vectors(row, vector) VALUES (?, ?)", [(r, v.tobytes()) for r, _, _, v in rows]
        )
        changes += [(r, None, p.individual_id) for r, _, p, _ in rows if p.individual_id is not None]
        if changes:
            record(cat, "labels", {"photos": len(changes), **(note or {})}, changes, who)
    if rows:
        cat.append_index(start, start + len(rows))
    if same:
        log.info(
            "%d photo(s) already in the catalogue (same content): not embedded again (%s)",
            len(same),
            first_few(same, 3),
        )
    return {
        "added": len(rows),
        "skipped": len(same),
        "labelled": len(changes),
        "photos": cat.size,
        "renamed": sum(1 for _, n, p, _ in rows if n != p.name),
    }


def _copy(src: Path, dst: Path) -> None:
    """Copy atomically; a file left there by an add killed before its commit (no row names it) is replaced."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
