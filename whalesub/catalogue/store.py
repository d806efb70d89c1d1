"""The catalogue folder: one SQLite file (the truth), a FAISS index file (a cache), photos, a lock.

Layout of ``DIR``::

    catalogue.sqlite   photos (content hash, name, current id), vectors, history, changes, meta
    index.faiss        IndexFlatIP of every photo's vector, row i = photo row i (appended in place)
    photos/            a copy of every photo under its catalogue name (rebuilds and review pages)
    catalogue.lock     flock: writers exclusive, readers shared; holds the writer's pid

SQLite runs in WAL mode with ``synchronous=FULL``; every change is one ``BEGIN IMMEDIATE`` ..
``COMMIT``, so a SIGKILL leaves the database before or after it, never between. The index file
is written after the commit; every open compares it with the database (row count, first and last
vectors) and appends or rewrites what lags. Copying the folder (no process writing) is a backup.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from whalesub import __version__
from whalesub.catalogue import index_file
from whalesub.core.errors import DataError, WhalesubError

log = logging.getLogger(__name__)

DB, INDEX, PHOTOS, LOCK = "catalogue.sqlite", "index.faiss", "photos", "catalogue.lock"
FORMAT = "whalesub.catalogue/1"

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE photos(row INTEGER PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, name TEXT NOT NULL UNIQUE,
    source TEXT, box TEXT, added INTEGER NOT NULL, individual_id TEXT, species TEXT);
CREATE TABLE vectors(row INTEGER PRIMARY KEY, vector BLOB NOT NULL);  -- apart: photos stay quick to scan
CREATE INDEX photos_individual ON photos(individual_id);
CREATE TABLE history(seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, args TEXT NOT NULL, who TEXT NOT NULL,
    at TEXT NOT NULL, undoes INTEGER);
CREATE TABLE changes(seq INTEGER NOT NULL, photo INTEGER NOT NULL, old_id TEXT, new_id TEXT);
CREATE INDEX changes_seq ON changes(seq);
CREATE TABLE cache(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class CatalogueError(WhalesubError):
    """A catalogue folder, photo or id is wrong, or the catalogue is busy."""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def file_sha256(path: Path) -> str:
    from whalesub.models.export import sha256_file

    try:
        return sha256_file(path)
    except OSError as exc:
        raise DataError(f"cannot read photo {path}: {exc.strerror or exc}; fix or leave it out") from None


def who_default() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


@dataclass
class Catalogue:
    """An open catalogue: ``db`` (sqlite3 connection, autocommit; use :meth:`transaction`)."""

    folder: Path
    db: sqlite3.Connection
    lock_fh: object
    dim: int
    fingerprint: str

    # ---- opening and closing -------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, fingerprint: str, dim: int, model: dict) -> Catalogue:
        """A new, empty catalogue in ``folder`` (created; must not hold a catalogue yet)."""
        folder = Path(folder)
        if (folder / DB).exists():
            raise CatalogueError(
                f"{folder} already holds a catalogue ({DB}); open it, or choose another "
                "folder (a catalogue's model changes with `whalesub catalogue rebuild`)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PHOTOS).mkdir(exist_ok=True)
        fh = _lock(folder, exclusive=True, timeout=0)
        tmp = folder / f".{DB}.{os.getpid()}.tmp"  # a killed init leaves no half-made catalogue
        db = _connect(tmp)
        db.executescript(SCHEMA)
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "dim": str(dim),
            "model": json.dumps(model),
            "created": now(),
            "whalesub_version": __version__,
            "labels_version": "0",
        }
        with _tx(db):
            db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        db.close()
        index_file.write_index(folder / INDEX, np.zeros((0, dim), np.float32))
        os.replace(tmp, folder / DB)
        db = _connect(folder / DB)
        return cls(folder, db, fh, dim, fingerprint)

    @classmethod
    def open(cls, folder: Path, write: bool = True, timeout: float = 600.0) -> Catalogue:
        """Open ``folder`` (the lock is exclusive for ``write``, else shared) and repair its index file."""
        folder = Path(folder)
        if not (folder / DB).is_file():
            raise CatalogueError(
                f"{folder} is not a catalogue (no {DB} in it); create one with "
                "`whalesub catalogue init DIR --model EXPORT`"
            )
        fh = _lock(folder, exclusive=True, timeout=timeout)
        try:
            db = _connect(folder / DB)
            meta = dict(db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as exc:
            fh.close()
            raise CatalogueError(
                f"{folder / DB} is not a readable catalogue database ({exc}); restore the folder from a copy"
            ) from None
        if meta.get("format") != FORMAT:
            db.close()
            fh.close()
            raise CatalogueError(f"{folder / DB}: format {meta.get('format')!r}, expected {FORMAT!r}")
        cat = cls(folder, db, fh, int(meta["dim"]), meta["fingerprint"])
        cat.sync_index()
        if not write:
            fcntl.flock(fh, fcntl.LOCK_SH)
        return cat

    def close(self) -> None:
        self.db.close()
        self.lock_fh.close()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with _tx(self.db):
            yield self.db

    # ---- metadata --------------------------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        """Inside a transaction."""
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def bump_labels(self) -> None:
        """Inside a transaction that changed labels: cached calibrations become stale."""
        self.set_meta("labels_version", str(int(self.meta("labels_version", "0")) + 1))

    @property
    def model(self) -> dict:
        return json.loads(self.meta("model", "{}"))

    # ---- photos ------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(row) + 1, 0) FROM photos").fetchone()[0])

    def vector_of(self, row: int) -> np.ndarray:
        blob = self.db.execute("SELECT vector FROM vectors WHERE row = ?", (row,)).fetchone()[0]
        return np.frombuffer(blob, dtype=np.float32)

    def labels(self) -> np.ndarray:
        """[N] object array: each photo row's current individual id (None when unlabelled)."""
        out = np.full(self.size, None, dtype=object)
        for row, ind in self.db.execute(
            "SELECT row, individual_id FROM photos WHERE individual_id IS NOT NULL"
        ):
            out[row] = ind
        return out

    def vectors(self) -> np.ndarray:
        """[N, D] float32 memory map of every photo's vector (row = photo row)."""
        return index_file.read_rows(self.folder / INDEX, self.size, self.dim)

    def photo_rows(self, shas: list[str]) -> dict[str, tuple[int, str, str | None]]:
        """sha256 -> (row, name, individual id or None) for the hashes the catalogue holds."""
        out = {}
        for a in range(0, len(shas), 500):
            part = shas[a : a + 500]
            marks = ",".join("?" * len(part))
            q = f"SELECT sha256, row, name, individual_id FROM photos WHERE sha256 IN ({marks})"
            out.update({s: (r, n, i) for s, r, n, i in self.db.execute(q, part)})
        return out

    def individuals(self) -> set[str]:
        return {
            r[0]
            for r in self.db.execute(
                "SELECT DISTINCT individual_id FROM photos WHERE individual_id IS NOT NULL"
            )
        }

    # ---- the index file ------------------------------------------------------------------------------
    def sync_index(self) -> str:
        """Make ``index.faiss`` hold exactly the database's vectors; returns what was done."""
        path, n_db = self.folder / INDEX, self.size
        n_file = index_file.read_header(path, self.dim)

        def same(row: int) -> bool:
            return np.array_equal(index_file.read_rows(path, n_file, self.dim)[row], self.vector_of(row))

        if n_file is not None and n_file <= n_db and (n_file == 0 or (same(0) and same(n_file - 1))):
            if n_file == n_db:
                return "ok"
            self.append_index(n_file, n_db)
            log.warning("%s lagged the database by %d rows: appended them", path, n_db - n_file)
            return "appended"
        log.warning(
            "%s does not match the database (%s rows, database %d): rebuilding it from the database",
            path,
            "torn" if n_file is None else n_file,
            n_db,
        )
        vecs = np.zeros((n_db, self.dim), np.float32)
        for row, blob in self.db.execute("SELECT row, vector FROM vectors"):
            vecs[row] = np.frombuffer(blob, dtype=np.float32)
        index_file.write_index(path, vecs)
        return "rebuilt"

    def append_index(self, start: int, stop: int) -> None:
        """Append photo rows ``start`` .. ``stop`` - 1 (from the database) to the index file."""
        vecs = np.zeros((stop - start, self.dim), np.float32)
        for row, blob in self.db.execute(
            "SELECT row, vector FROM vectors WHERE row >= ? AND row < ?", (start, stop)
        ):
            vecs[row - start] = np.frombuffer(blob, dtype=np.float32)
        index_file.append_rows(self.folder / INDEX, vecs, start)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=60)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


@contextlib.contextmanager
def _tx(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _lock(folder: Path, exclusive: bool, timeout: float):
    """Take ``catalogue.lock`` (waiting up to ``timeout`` seconds); the file records the holder's pid."""
    fh = open(folder / LOCK, "a+")  # noqa: SIM115 - held open for the catalogue's lifetime
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline, waited = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise CatalogueError(
                    f"catalogue {folder} is busy: {holder} holds {LOCK}; wait for it to "
                    "finish (or raise --lock-timeout) and run the command again"
                ) from None
            if not waited:
                log.info("catalogue %s is busy: waiting for the lock", folder)
                waited = True
            time.sleep(0.1)
    if exclusive:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
    return fh
