"""User-facing errors.

Every problem with user input (files, columns, rows, keys, arguments) is raised as a
:class:`WhalesubError` whose message says *what* is wrong, *where* (file, row, column, key)
and *how to fix it*. The CLI prints the message on one line block and exits with status 2;
library callers can catch it. ``assert`` is reserved for internal invariants.
"""

from __future__ import annotations


class WhalesubError(Exception):
    """An error caused by user input; the message is meant to be read by a person."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        message = _unwrap_worker_message(str(message), type(self))
        self.problems = list(problems or [])
        if self.problems:
            message = message.rstrip() + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


_WORKER_MARK = "\nOriginal Traceback (most recent call last):\n"


def _unwrap_worker_message(message: str, cls: type) -> str:
    """The error's own message when torch's DataLoader re-raises it from a worker process.

    torch re-raises a worker's exception as ``type(exc)("Caught X in DataLoader worker ...
    Original Traceback ...: <message>")``; keeping only ``<message>`` means a bad image met by a
    loader worker still reaches the user as one readable message, never a traceback.
    """
    if not message.startswith("Caught ") or _WORKER_MARK not in message:
        return message
    for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = message.rfind("\n" + name)
        if at >= 0:
            return message[at + 1 + len(name):].rstrip("\n")
    return message


class DataError(WhalesubError):
    """A data file (CSV, image, embedding file) breaks the data contract."""


class ConfigError(WhalesubError):
    """A configuration key, value or type is wrong."""


def first_few(items, n: int = 5) -> str:
    """Render up to ``n`` items and a count of the rest, for error messages."""
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:n])
    rest = len(items) - n
    return shown + (f" and {rest} more" if rest > 0 else "")


class WriteError(WhalesubError):
    """A file could not be written (disk full, file-size limit, permission); nothing was replaced."""
