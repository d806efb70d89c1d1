"""What a person decided: confirm, new, merge, split, label imports; undo, history, export, stats.

Every decision is one transaction that appends a ``history`` row (kind, arguments, who, when) and
one ``changes`` row per photo whose id it changed (old id, new id), then updates the photos. The
history is append-only: ``undo`` never deletes, it appends an ``undo`` row naming the decision it
reverses and applies that decision's changes backwards. A decision is undone when an ``undo`` row
names it; ``undo`` always takes the latest decision not yet undone, so the photos are exactly in
that decision's "after" state when it is reversed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from whalesub.catalogue.store import Catalogue, CatalogueError, file_sha256, now
from whalesub.core.atomic import atomic_write_text
from whalesub.data.contract import NEW_INDIVIDUAL

log = logging.getLogger(__name__)

UNDOABLE = ("confirm", "new", "merge", "split", "labels")
ID_PREFIX = "cat-"


def check_id(ind: str, flag: str = "ID") -> str:
    """An individual id a person typed: non-empty, no surrounding spaces, CSV-safe, not new_individual."""
    bad = not ind or ind != ind.strip() or any(c in ind for c in ',\n\r"') or ind == NEW_INDIVIDUAL
    if bad:
        raise CatalogueError(
            f"{flag} {ind!r} is not a usable individual id: give a non-empty name without "
            f"commas, quotes, line breaks or surrounding spaces, other than {NEW_INDIVIDUAL!r}"
        )
    return ind


def record(
    cat: Catalogue,
    kind: str,
    args: dict,
    changes: list[tuple[int, str | None, str | None]],
    who: str,
    undoes: int | None = None,
) -> int:
    """Inside a transaction: append the history row and its changes, apply them; returns its seq."""
    cur = cat.db.execute(
        "INSERT INTO history(kind, args, who, at, undoes) VALUES (?, ?, ?, ?, ?)",
        (kind, json.dumps(args, sort_keys=True), who, now(), undoes),
    )
    seq = cur.lastrowid
    cat.db.executemany("INSERT INTO changes VALUES (?, ?, ?, ?)", [(seq, r, o, n) for r, o, n in changes])
    cat.db.executemany("UPDATE photos SET individual_id = ? WHERE row = ?", [(n, r) for r, _, n in changes])
    if changes:
        cat.bump_labels()
    return seq


def find_photo(cat: Catalogue, ref: str) -> tuple[int, str, str | None]:
    """(row, name, current id) of the photo ``ref`` names: its catalogue name, a file (by content)
    or a prefix of at least 8 hex digits of its sha256."""
    row = cat.db.execute("SELECT row, name, individual_id FROM photos WHERE name = ?", (ref,)).fetchone()
    if row is None and Path(ref).is_file():
        row = cat.db.execute(
            "SELECT row, name, individual_id FROM photos WHERE sha256 = ?", (file_sha256(Path(ref)),)
        ).fetchone()
    if row is None and len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref.lower()):
        rows = cat.db.execute(
            "SELECT row, name, individual_id FROM photos WHERE sha256 LIKE ?", (ref.lower() + "%",)
        ).fetchall()
        if len(rows) > 1:
            raise CatalogueError(
                f"photo {ref!r}: {len(rows)} photos have hashes starting so; give more digits"
            )
        row = rows[0] if rows else None
    if row is None:
        raise CatalogueError(
            f"photo {ref!r} is not in catalogue {cat.folder} (no photo of that name, file or "
            "hash prefix): add it first with `whalesub catalogue add`"
        )
    return int(row[0]), row[1], row[2]


def rows_of(cat: Catalogue, ind: str) -> list[int]:
    return [
        r for (r,) in cat.db.execute("SELECT row FROM photos WHERE individual_id = ? ORDER BY row", (ind,))
    ]


def _known(cat: Catalogue, ind: str, flag: str) -> list[int]:
    rows = rows_of(cat, check_id(ind, flag))
    if not rows:
        raise CatalogueError(
            f"{flag} {ind!r} is not an individual of catalogue {cat.folder}; list them with "
            "`whalesub catalogue stats --ids`, or make a new one with `catalogue new PHOTO --id`"
        )
    return rows


def _fresh(cat: Catalogue, ind: str | None) -> str:
    if ind is not None:
        if rows_of(cat, check_id(ind, "--id")):
            raise CatalogueError(
                f"--id {ind!r} is already an individual of catalogue {cat.folder}: "
                "use `catalogue confirm PHOTO ID` to add a photo to it"
            )
        return ind
    taken = cat.individuals()
    n = 1 + int(cat.db.execute("SELECT COUNT(*) FROM history WHERE kind IN ('new', 'split')").fetchone()[0])
    while f"{ID_PREFIX}{n:05d}" in taken:
        n += 1
    return f"{ID_PREFIX}{n:05d}"


def confirm(cat: Catalogue, photo: str, ind: str, who: str) -> dict:
    """Give ``photo`` the existing id ``ind``."""
    with cat.transaction():
        row, name, old = find_photo(cat, photo)
        _known(cat, ind, "ID")
        if old == ind:
            raise CatalogueError(f"photo {name} already belongs to {ind}: nothing to confirm")
        seq = record(cat, "confirm", {"photo": name, "id": ind, "was": old}, [(row, old, ind)], who)
    return {"seq": seq, "photo": name, "id": ind, "was": old}


def new(cat: Catalogue, photo: str, ind: str | None, who: str) -> dict:
    """Make ``photo`` the first photo of a new individual (``ind`` or a fresh ``cat-NNNNN``)."""
    with cat.transaction():
        row, name, old = find_photo(cat, photo)
        ind = _fresh(cat, ind)
        seq = record(cat, "new", {"photo": name, "id": ind, "was": old}, [(row, old, ind)], who)
    return {"seq": seq, "photo": name, "id": ind, "was": old}


def merge(cat: Catalogue, keep: str, gone: str, who: str) -> dict:
    """Every photo of ``gone`` becomes a photo of ``keep`` (one animal with two ids)."""
    if keep == gone:
        raise CatalogueError(f"merge {keep} {gone}: the two ids are the same")
    with cat.transaction():
        _known(cat, keep, "ID_A")
        rows = _known(cat, gone, "ID_B")
        seq = record(
            cat,
            "merge",
            {"keep": keep, "gone": gone, "photos": len(rows)},
            [(r, gone, keep) for r in rows],
            who,
        )
    return {"seq": seq, "keep": keep, "gone": gone, "photos": len(rows)}


def split(cat: Catalogue, ind: str, photos: list[str], new_id: str | None, who: str) -> dict:
    """Move ``photos`` (all of individual ``ind``) to a new individual."""
    if not photos:
        raise CatalogueError("split: name the photos that move to the new individual")
    with cat.transaction():
        _known(cat, ind, "ID")
        found = [find_photo(cat, p) for p in photos]
        wrong = [f"{n} ({o or 'unlabelled'})" for _, n, o in found if o != ind]
        if wrong:
            raise CatalogueError(f"split {ind}: these photos are not of {ind}: {', '.join(wrong)}")
        target = _fresh(cat, new_id)
        rows = sorted({r for r, _, _ in found})
        seq = record(
            cat,
            "split",
            {"id": ind, "new_id": target, "photos": [n for _, n, _ in found]},
            [(r, ind, target) for r in rows],
            who,
        )
    return {"seq": seq, "id": ind, "new_id": target, "photos": len(rows)}


def undo(cat: Catalogue, who: str) -> dict:
    """Reverse the latest decision not yet undone."""
    with cat.transaction():
        done = {u for (u,) in cat.db.execute("SELECT undoes FROM history WHERE undoes IS NOT NULL")}
        kinds = ",".join(f"'{k}'" for k in UNDOABLE)
        target = next(
            (
                r
                for r in cat.db.execute(
                    f"SELECT seq, kind, args FROM history WHERE kind IN ({kinds}) ORDER BY seq DESC"
                )
                if r[0] not in done
            ),
            None,
        )
        if target is None:
            raise CatalogueError(f"catalogue {cat.folder} has no decision left to undo")
        seq, kind, args = target
        changes = cat.db.execute(
            "SELECT photo, old_id, new_id FROM changes WHERE seq = ? ORDER BY rowid DESC", (seq,)
        ).fetchall()
        labels = cat.labels()
        drift = [r for r, _, n in changes if labels[r] != n]
        assert not drift, f"photos {drift} changed after decision {seq} although later ones are undone"
        new_seq = record(
            cat, "undo", {"seq": seq, "kind": kind}, [(r, n, o) for r, o, n in changes], who, undoes=seq
        )
    return {"seq": new_seq, "undid": seq, "kind": kind, "args": json.loads(args), "photos": len(changes)}


def history(cat: Catalogue) -> list[dict]:
    undone = dict(cat.db.execute("SELECT undoes, seq FROM history WHERE undoes IS NOT NULL"))
    return [
        {"seq": s, "kind": k, "args": json.loads(a), "who": w, "at": t, "undone_by": undone.get(s)}
        for s, k, a, w, t in cat.db.execute("SELECT seq, kind, args, who, at FROM history ORDER BY seq")
    ]


def labelled_rows(cat: Catalogue) -> list[tuple[str, str, str]]:
    """(image, species, individual_id) of every labelled photo, in photo order; a photo without its
    own species takes its individual's most common one."""
    rows = cat.db.execute(
        "SELECT name, species, individual_id FROM photos WHERE individual_id IS NOT NULL ORDER BY row"
    ).fetchall()
    common: dict[str, Counter] = {}
    for _, sp, ind in rows:
        if sp:
            common.setdefault(ind, Counter())[sp] += 1
    return [
        (n, sp or (common[ind].most_common(1)[0][0] if ind in common else ""), ind) for n, sp, ind in rows
    ]


def export(cat: Catalogue, out: Path) -> int:
    """Write ``out`` as a train.csv (image, species, individual_id) of the labelled photos; the images
    are in the catalogue's ``photos/`` folder under these names."""
    import csv
    import io

    rows = labelled_rows(cat)
    if not rows:
        raise CatalogueError(f"catalogue {cat.folder} has no labelled photo yet: nothing to export")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "species", "individual_id"])
    w.writerows(rows)
    atomic_write_text(out, buf.getvalue())
    return len(rows)


def stats(cat: Catalogue) -> dict:
    per = Counter(
        ind for (ind,) in cat.db.execute("SELECT individual_id FROM photos WHERE individual_id IS NOT NULL")
    )
    kinds = Counter(k for (k,) in cat.db.execute("SELECT kind FROM history"))
    n = cat.size
    return {
        "folder": str(cat.folder),
        "photos": n,
        "labelled": sum(per.values()),
        "unlabelled": n - sum(per.values()),
        "individuals": len(per),
        "singletons": sum(1 for c in per.values() if c == 1),
        "decisions": dict(sorted(kinds.items())),
        "fingerprint": cat.fingerprint,
        "dim": cat.dim,
        "ids": dict(sorted(per.items())),
    }
