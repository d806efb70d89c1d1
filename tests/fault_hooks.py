"""Run a whalesub command or training in a child process that SIGKILLs itself at a chosen point.

Test helper, not a test module. ``python tests/fault_hooks.py FAULT TARGET ARGS...`` where TARGET is
``whalesub`` (the CLI) or ``train`` (``python -m train``) and FAULT is JSON (or ``null``: no fault):

- ``{"kind": "replace", "name": "out.csv", "nth": 1}``: killed just before the nth ``os.replace`` /
  ``os.rename`` onto a file called ``out.csv`` (its temporary file is complete, not yet renamed);
- ``{"kind": "write", "name": "out.csv", "nth": 1, "bytes": 100}``: killed in the middle of writing
  the nth temporary file of ``out.csv`` (``.out.csv.*.tmp*``), after ``bytes`` bytes (or characters);
- ``{"kind": "call", "name": "whalesub.workflows.submit.tune_arrays"}``: killed when that function is called.

A point that is never reached lets the command finish normally, so the test sees exit status 0
instead of -SIGKILL and fails. The hooks wrap Python's own ``os.replace``, ``os.rename`` and
``open``, so the code under test needs no test switches.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _is_temp_of(file, name: str) -> bool:
    base = os.path.basename(os.fsdecode(file)) if isinstance(file, str | bytes | os.PathLike) else ""
    return base.startswith(f".{name}.") and ".tmp" in base[len(name) + 2:]


class _KillAfter:
    """A writable file that kills the process once ``limit`` bytes (or characters) went through it."""

    def __init__(self, fh, limit: int):
        self._fh, self._left = fh, limit

    def write(self, data):
        if len(data) >= self._left:
            self._fh.write(data[: self._left])
            self._fh.flush()
            _die()
        self._left -= len(data)
        return self._fh.write(data)

    def __getattr__(self, attr):
        return getattr(self._fh, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


def install(fault: dict) -> None:
    """Arm the fault in this process."""
    kind, name, nth, seen = fault["kind"], fault["name"], int(fault.get("nth", 1)), [0]
    if kind == "replace":
        for attr in ("replace", "rename"):
            real = getattr(os, attr)

            def hooked(src, dst, *args, _real=real, **kwargs):
                if os.path.basename(os.fsdecode(dst)) == name:
                    seen[0] += 1
                    if seen[0] == nth:
                        _die()
                return _real(src, dst, *args, **kwargs)

            setattr(os, attr, hooked)
    elif kind == "write":
        real_open = builtins.open

        def hooked_open(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax") and _is_temp_of(file, name):  # not atomic.py's "rb+" fsync
                seen[0] += 1
                if seen[0] == nth:
                    return _KillAfter(fh, int(fault["bytes"]))
            return fh

        builtins.open = hooked_open
    elif kind == "call":
        module_name, func = name.rsplit(".", 1)
        module = importlib.import_module(module_name)

        def killed(*args, **kwargs):
            _die()

        setattr(module, func, killed)
    else:
        raise ValueError(f"unknown fault kind {kind!r}")


def command(fault: dict | None, target: str, *args) -> list[str]:
    """The argv that runs ``target`` (whalesub | train) with ``args`` under ``fault``."""
    return [sys.executable, str(Path(__file__).resolve()), json.dumps(fault), target, *map(str, args)]


def run(fault: dict | None, target: str, *args, fsize: int | None = None, timeout: float = 300,
        **kwargs) -> subprocess.CompletedProcess:
    """Run it from the repository root and wait; ``fsize``: RLIMIT_FSIZE in bytes (SIGXFSZ ignored,
    so a write past the limit fails with EFBIG, as on a full disk)."""

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(command(fault, target, *args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=limit if fsize is not None else None, **kwargs)


def _main(argv: list[str]) -> None:
    fault, target, args = json.loads(argv[0]), argv[1], argv[2:]
    sys.path.insert(0, str(REPO))
    if fault is not None:
        install(fault)
    if target == "whalesub":
        from whalesub.cli import app

        sys.argv = ["whalesub", *args]
        app()
    elif target == "train":
        sys.argv = ["train", *args]
        runpy.run_module("train", run_name="__main__", alter_sys=True)
    else:
        raise SystemExit(f"unknown target {target!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
