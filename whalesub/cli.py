"""The ``whalesub`` command line.

Each command parses its arguments, checks them, and calls one library function; no logic lives
here. Heavy libraries (torch, timm, onnx, faiss) are imported inside the functions that need
them so that ``whalesub --help`` is instant. A :class:`~whalesub.errors.WhalesubError` becomes
one readable message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path  # noqa: F401  (used by the command signatures below)

import typer

from whalesub.errors import WhalesubError

app = typer.Typer(
    name="whalesub",
    help="Identify individual animals from photographs: embed, rank, threshold, submit, score.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def guarded(fn):
    """Turn WhalesubError into one message on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WhalesubError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


# Commands are added below, one section per command; keep each body short and call the library.
# --- submit / tune (whalesub.rank, whalesub.threshold) -------------------------------------------

# --- score / validate (whalesub.metric, whalesub.submission) ---------------------------------------

# --- synth (whalesub.synth) ------------------------------------------------------------------------

# --- export / embed (whalesub.export, whalesub.embed) ----------------------------------------------


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
