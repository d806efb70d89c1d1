"""One writer per output: a lock file beside each output that a long command writes.

Two commands writing the same output at once (two ``whalesub embed --out x.npz`` started by
mistake, two ``predict`` on one ``--out`` folder) would overwrite each other's chunks and
temporaries and fail with a bare OSError, or worse, mix their results. :func:`output_lock` takes
``.NAME.lock`` beside the output (``x.npz`` -> ``.x.npz.lock``) for the duration of the work; a
second process on the same output stops at once with one :class:`BusyError` line naming the other
process (pid, host, command, start time) and the lock file, or waits up to ``wait`` seconds.

Mechanism: ``fcntl.flock`` on the lock file (exclusive, non-blocking), so the kernel releases the
lock when its holder exits or is killed: a lock file left by a killed writer is simply taken over
(stale locks need no clean-up). The holder writes its pid, host, start time and command into the
file for the message; the file is removed when the work ends. After taking the lock the holder checks
that the file is still the one under the name (a writer that finished and removed it in between
makes us retry), the classic guard against the unlink race. Where ``fcntl`` does not exist
(Windows), the lock file is created with ``O_CREAT | O_EXCL`` instead and a lock whose pid is gone
on this host is stale and taken over. The lock is re-entrant within a process: a command holding
the lock of its output folder may call a function that takes it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from whalesub.core.atomic import pid_alive, writing
from whalesub.core.errors import WhalesubError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_HELD: dict[str, int] = {}  # lock path -> depth, for re-entry within this process
_GUARD = threading.Lock()


class BusyError(WhalesubError):
    """Another process is writing the same output."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``.NAME.lock`` in the same folder (a folder output: beside it)."""
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.lock"


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]})


def read_holder(lock: Path) -> dict:
    """What the lock file says about its holder ({} when unreadable or empty)."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _busy(path: Path, lock: Path, what: str, waited: float) -> BusyError:
    h = read_holder(lock)
    who = (f"process {h.get('pid', '?')} on host {h.get('host', '?')} (since {h.get('started', '?')}: "
           f"{h.get('command', '?')})") if h else "another process"
    after = f" (waited {waited:g} s)" if waited > 0 else ""
    return BusyError(f"{what or path} is being written by {who}{after}; lock file {lock}. Wait for that "
                     "command to finish (or stop it) and run this one again; two commands must not write "
                     "the same output at once")


def _try_flock(lock: Path) -> int | None:
    """An fd holding the flock on the file now named ``lock``, or None when another process holds it."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if _holder_dead(lock):  # held only by children the killed holder forked: take it over
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            return None
        except BaseException:
            os.close(fd)
            raise
        try:  # the file may have been removed (and recreated) by its last holder meanwhile
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _holder_dead(lock: Path) -> bool:
    """The lock file names a holder on this host whose process is gone. A flock can outlive its
    holder: worker processes it forked (image decoding) inherit the descriptor and keep the lock until
    they notice their parent died; they write no output, so the lock is stale."""
    h = read_holder(lock)
    return (h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int)
            and h["pid"] != os.getpid() and not pid_alive(h["pid"]))


def _try_excl(lock: Path) -> int | None:  # pragma: no cover - the path where fcntl is missing
    while True:
        try:
            return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _holder_dead(lock):
                return None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)


def _acquire(lock: Path) -> int | None:
    return _try_flock(lock) if fcntl is not None else _try_excl(lock)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, what: str = "", wait: float = 0.0,
                poll: float = 0.5) -> Iterator[Path]:
    """Hold the lock of output ``path`` for the block; yield the lock file's path.

    ``wait``: seconds to wait for another holder to finish (0: stop at once). Raises
    :class:`BusyError` naming the holder when the lock stays taken. The lock file is removed at the
    end, also when the block raises.
    """
    lock = lock_path(path)
    key = str(lock)
    with _GUARD:
        if key in _HELD:
            _HELD[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield lock
        finally:
            with _GUARD:
                _HELD[key] -= 1
        return
    with writing(path, what):  # an output folder that cannot be written: one WriteError naming it
        created = _make_parents(lock.parent)
        fd = _acquire(lock)
    start = time.monotonic()
    while fd is None:
        waited = time.monotonic() - start
        if waited >= wait:
            _remove_if_empty(created)
            raise _busy(Path(path), lock, what, round(waited, 1) if wait > 0 else 0.0)
        time.sleep(min(poll, max(wait - waited, 0.01)))
        fd = _acquire(lock)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, _holder_text().encode())
        except OSError:  # a full disk: the lock holds without its note; the output's own write reports it
            pass
        with _GUARD:
            _HELD[key] = 1
        try:
            yield lock
        finally:
            with _GUARD:
                del _HELD[key]
    finally:  # unlink before unlocking: a waiter that then locks the old inode sees it is gone and retries
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
        _remove_if_empty(created)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        with contextlib.suppress(FileExistsError):
            f.mkdir()
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders the lock created when the work left nothing in them (a command that failed
    on its arguments leaves no empty output folder behind)."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            return
