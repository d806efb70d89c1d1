"""Upload, push and submit through the real ``kaggle`` client (2.2.5), run as a subprocess.

The client is run, never imported here (``import kaggle`` authenticates at import time and exits
the process without credentials). It exits 0 on many server errors ("Dataset version creation
error: ...", "Kernel push error: ..."), so every command must print its own success sentence;
otherwise the command fails with what the client printed.

- datasets: ``kaggle datasets status`` first (404: new), then ``create`` or ``version`` with
  ``--dir-mode zip`` (subfolders are otherwise silently skipped), then poll the status until
  ``ready`` (a fresh version may 404 for a few seconds);
- kernel: ``kaggle kernels push``, poll ``kaggle kernels status`` until COMPLETE, download the output;
- competition: ``kaggle competitions submit`` of a CSV validated first.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from whalesub.core.errors import ConfigError, WhalesubError

log = logging.getLogger(__name__)

OK_CREATE = "Dataset is being created"
OK_VERSION = "Dataset version is being created"
OK_PUSH = "successfully pushed"
OK_SUBMIT = "Successfully submitted"
KERNEL_DONE = ("COMPLETE",)
KERNEL_FAILED = ("ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED", "CANCELLED")


class KaggleClientError(WhalesubError):
    """The kaggle client failed (or printed an error while exiting 0)."""


def find_credentials(env: dict | None = None) -> str:
    """Where the client will find credentials (the client's own order), or ConfigError saying how."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("HOME") or Path.home())
    config_dir = Path(env["KAGGLE_CONFIG_DIR"]) if env.get("KAGGLE_CONFIG_DIR") else None
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    for name in ("access_token", "access_token.txt"):
        if (home / ".kaggle" / name).is_file():
            return str(home / ".kaggle" / name)
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"
    for folder in (config_dir, home / ".kaggle", xdg):
        if folder is not None and (folder / "kaggle.json").is_file():
            return str(folder / "kaggle.json")
    if (home / ".kaggle" / "credentials.json").is_file():
        return str(home / ".kaggle" / "credentials.json")
    where = f"{config_dir}/kaggle.json, " if config_dir else ""
    raise ConfigError(
        "no Kaggle credentials found (looked for KAGGLE_API_TOKEN, ~/.kaggle/access_token, "
        f"KAGGLE_USERNAME + KAGGLE_KEY, {where}~/.kaggle/kaggle.json, {xdg}/kaggle.json, "
        "~/.kaggle/credentials.json): create a token at https://www.kaggle.com/settings/api and "
        "export KAGGLE_API_TOKEN=..., or save kaggle.json to ~/.kaggle/ (chmod 600), "
        "or run `kaggle auth login`"
    )


def kaggle_command() -> list[str]:
    """The command that runs the installed client (the ``kaggle`` extra), or ConfigError."""
    if importlib.util.find_spec("kaggle") is None:
        raise ConfigError(
            "the kaggle client is not installed: pip install 'whalesub[kaggle]' (kaggle==2.2.5 and six)"
        )
    return [sys.executable, "-c", "import sys; from kaggle.cli import main; sys.exit(main())"]


def run_kaggle(
    args: list[str], expect: str | None = None, timeout_s: float = 3600
) -> subprocess.CompletedProcess:
    """Run ``kaggle ARGS``; KaggleClientError unless it exits 0 and prints ``expect`` (when given)."""
    cmd = kaggle_command() + args
    log.info("kaggle %s", " ".join(args))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise KaggleClientError(f"kaggle {' '.join(args)} did not finish within {timeout_s:.0f} s") from None
    said = "\n".join(
        line for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip() and "%|" not in line
    )  # progress bars are noise in a message
    if proc.returncode != 0 or (expect is not None and expect not in proc.stdout):
        raise KaggleClientError(
            f"kaggle {' '.join(args)} failed (exit {proc.returncode}): {said[-3000:] or 'no output'}"
        )
    return proc


def dataset_status(ref: str) -> str | None:
    """``ready``, ``pending``, ``error``, ... or None when the dataset does not exist (404)."""
    try:
        proc = run_kaggle(["datasets", "status", ref], timeout_s=300)
    except KaggleClientError as exc:
        if "not found" in str(exc).lower() or "404" in str(exc):
            return None
        raise
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[-1].lower() if lines else ""


def wait_until(
    what: str,
    poll: Callable[[], str | None],
    done: tuple[str, ...],
    failed: tuple[str, ...],
    timeout_s: float,
    interval_s: float,
) -> str:
    """Call ``poll`` every ``interval_s`` until it returns a ``done`` state; fail on ``failed`` or timeout."""
    deadline = time.monotonic() + timeout_s
    state = None
    while True:
        state = poll()
        if state in done:
            return state
        if state in failed:
            raise KaggleClientError(f"{what} ended with status {state!r}")
        if time.monotonic() + interval_s > deadline:
            raise KaggleClientError(
                f"{what} still has status {state!r} after {timeout_s:.0f} s; check it on "
                "kaggle.com and re-run"
            )
        log.info("%s: %s; checking again in %.0f s", what, state or "not visible yet", interval_s)
        time.sleep(interval_s)


def upload_dataset(
    folder: Path, ref: str, message: str, timeout_s: float = 1800, interval_s: float = 10
) -> str:
    """Create the dataset ``ref`` from ``folder``, or version it when it exists; wait until ready."""
    if dataset_status(ref) is None:
        # `create` on an existing slug fails with a misleading "title already in use": status first
        run_kaggle(["datasets", "create", "-p", str(folder), "--dir-mode", "zip"], expect=OK_CREATE)
        action = "created"
    else:
        run_kaggle(
            ["datasets", "version", "-p", str(folder), "--dir-mode", "zip", "-m", message], expect=OK_VERSION
        )
        action = "versioned"
    gone = ("failed", "deleted")
    wait_until(f"dataset {ref}", lambda: dataset_status(ref), ("ready",), gone, timeout_s, interval_s)
    log.info("dataset %s %s and ready", ref, action)
    return action


def kernel_status(ref: str) -> tuple[str, str]:
    """(status such as RUNNING or COMPLETE, failure message or '') of a kernel's latest run."""
    out = run_kaggle(["kernels", "status", ref], timeout_s=300).stdout
    m = re.search(r'has status "(?:KernelWorkerStatus\.)?([A-Za-z_]+)"', out)
    if not m:
        raise KaggleClientError(f"kaggle kernels status {ref}: unexpected answer {out.strip()!r}")
    failure = re.search(r'Failure message: "(.*)"', out)
    return m.group(1).upper(), failure.group(1) if failure else ""


def wait_kernel(ref: str, timeout_s: float = 9 * 3600, interval_s: float = 30) -> str:
    """Poll until the kernel's run is COMPLETE; KaggleClientError with its failure message otherwise."""
    failure = ""

    def poll() -> str:
        nonlocal failure
        state, failure = kernel_status(ref)
        return state

    try:
        return wait_until(f"kernel {ref}", poll, KERNEL_DONE, KERNEL_FAILED, timeout_s, interval_s)
    except KaggleClientError as exc:
        raise KaggleClientError(
            f"{exc}{': ' + failure if failure else ''}; read its log with `kaggle kernels logs {ref}`"
        ) from None


def push_kernel(folder: Path) -> str:
    """``kaggle kernels push``; returns what the client printed (version and URL)."""
    return run_kaggle(["kernels", "push", "-p", str(folder)], expect=OK_PUSH).stdout.strip()


def download_output(ref: str, out: Path) -> list[Path]:
    """Download the kernel's output files to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    run_kaggle(["kernels", "output", ref, "-p", str(out)])
    return sorted(p for p in out.rglob("*") if p.is_file())


def submit_csv(csv: Path, competition: str, message: str) -> str:
    """``kaggle competitions submit``; returns the client's confirmation."""
    find_credentials()
    return run_kaggle(
        ["competitions", "submit", "-c", competition, "-f", str(csv), "-m", message], expect=OK_SUBMIT
    ).stdout.strip()
