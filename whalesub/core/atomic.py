"""Atomic file writing: a crash never leaves a half-written file that looks complete.

Write to a temporary file in the destination's folder, flush and fsync, then ``os.replace``
it onto the final name (atomic on POSIX and Windows within one file system). On any error the
temporary file is removed and the destination is left untouched.

Temporary names are hidden and carry the writer's process id and host
(``.NAME.<pid>@<host>.<random>.tmp<suffix>``), so the next write of the same destination removes
the temporaries that a killed writer on this host left behind. A failure of the operating system
while writing (disk full, file-size limit, permission) becomes one :class:`WriteError` that names
the destination; exit status 2 on the command line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from whalesub.core.errors import WhalesubError, WriteError

_TEMP_TAIL = re.compile(r"(\d+)@([0-9a-f]{8})\.[^.]+\.tmp.*")
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _host_tag() -> str:
    """8 hex digits of the host name (short and safe in a file name)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is alive (this process counts; another user's does too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete the temporaries of ``path`` whose writer (a process on this host) is gone; return a count."""
    path = Path(path)
    head, host, removed = f".{path.name}.", _host_tag(), 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP_TAIL.fullmatch(entry.name[len(head):]) if entry.name.startswith(head) else None
        if m is None or m.group(2) != host or pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
    return removed


def make_temp(path: str | os.PathLike, suffix: str = "", folder: bool = False) -> Path:
    """Create a hidden temporary file (or folder) beside ``path``, first removing stale ones."""
    path = Path(path)
    remove_stale_temps(path)
    prefix = f".{path.name}.{os.getpid()}@{_host_tag()}."
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=f".tmp{suffix}", dir=path.parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _os_error_of(exc: BaseException) -> OSError | None:
    """The OSError that caused ``exc`` (itself, or one in its ``__cause__``/``__context__`` chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def as_write_error(exc: BaseException, path: str | os.PathLike, what: str = "") -> WriteError | None:
    """A :class:`WriteError` naming ``path`` when an OSError caused ``exc`` (None otherwise).

    Libraries that wrap the OSError (``torch.save`` raises RuntimeError with the OSError as its
    context) are recognised too; any other :class:`WhalesubError` already says what is wrong.
    """
    other = isinstance(exc, WhalesubError) and not isinstance(exc, WriteError)
    os_error = None if other else _os_error_of(exc)  # an inner WriteError is named after the outer path
    if os_error is None:
        return None
    plain = os_error.filename or os_error.errno is None  # str() already says it all
    why = str(os_error) if plain else f"[Errno {os_error.errno}] {os_error.strerror}"
    hint = ("the disk is full or a file-size limit was reached: free space (or raise the limit) "
            if os_error.errno in _NO_SPACE else "fix the cause ")
    return WriteError(f"cannot write {what or Path(path)}: {why}; nothing was written under that "
                      f"name (an earlier {Path(path).name} there is unchanged). To fix: {hint}"
                      "and run the command again")


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn an operating-system failure inside the block into one :class:`WriteError` naming ``path``."""
    try:
        yield
    except Exception as exc:
        error = as_write_error(exc, path, what)
        if error is None:
            raise
        raise error from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Use this for writers that want a file name (``np.savez``, ONNX). Prefer :func:`atomic_open`
    for writers that accept a file object (``torch.save``): their OS errors then name the file.
    ``suffix`` defaults to the destination's suffix so libraries that append one behave.
    """
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the work is done, with a bare OSError
        raise WhalesubError(f"cannot write {path}: it is a folder; give a file name")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = make_temp(path, path.suffix if suffix is None else suffix)
    try:
        with writing(path):
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` atomically."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("x", "w"), **kwargs) as fh:
            yield fh


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
