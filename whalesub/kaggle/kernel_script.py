"""whalesub's offline Kaggle kernel: find the inputs, install the wheels, embed, submit.

This file is copied as it is into the kernel folder by ``whalesub kaggle build`` and runs before
whalesub is installed, so it uses the standard library only. Steps, each timed:

1. find the inputs by searching the input root for marker files, whatever the mount layout
   (``/kaggle/input/<slug>/``, ``/kaggle/input/competitions/<slug>/``,
   ``/kaggle/input/datasets/<owner>/<slug>/``, ``/kaggle/input/<owner>/<slug>/``): a
   ``manifest.json`` whose ``kind`` is ``whalesub-models`` / ``whalesub-wheels`` / ``whalesub-boxes``,
   and the competition folder (``train.csv`` beside ``sample_submission.csv``);
2. check the wheels against their manifest and install them offline:
   ``pip install --no-index --no-deps --find-links DIR <the manifest's explicit list>``;
3. hand over to ``whalesub.kaggle.kernel.run_kernel`` (from the wheel just installed), which checks
   the models, prints the environment, embeds, submits and validates.

Environment overrides (for rehearsals; Kaggle needs none): ``WHALESUB_KAGGLE_INPUT`` (input root,
default ``/kaggle/input``), ``WHALESUB_KAGGLE_WORKING`` (output folder, default ``/kaggle/working``),
``WHALESUB_KAGGLE_TARGET`` (install the wheels with ``pip --target`` there instead of site-packages).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MANIFEST = "manifest.json"
KINDS = ("whalesub-models", "whalesub-wheels", "whalesub-boxes")
COMPETITION = "competition"
LAYOUTS = (
    "<root>/<slug>/",
    "<root>/competitions/<slug>/",
    "<root>/datasets/<owner>/<slug>/",
    "<root>/<owner>/<slug>/",
    "<root>/<model>/<framework>/<variation>/<version>/",
)
MAX_DEPTH = 6


class KernelInputError(Exception):
    """A missing or broken input: the message names it and where it was searched."""


@contextlib.contextmanager
def timed(step: str, times: dict):
    """Print the wall time of one step and record it in ``times`` (seconds)."""
    print(f"[whalesub] {step} ...", flush=True)
    t0 = time.perf_counter()
    yield
    times[step] = round(time.perf_counter() - t0, 3)
    print(f"[whalesub] {step}: {times[step]:.1f} s", flush=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(folder: Path, files: dict) -> list[str]:
    """Problems of ``folder`` against ``{relative path: sha256}``: missing or changed files."""
    problems = []
    for rel, digest in sorted(files.items()):
        p = folder / rel
        if not p.is_file():
            problems.append(f"{p} is missing")
        elif sha256_file(p) != digest:
            problems.append(f"{p} does not match its sha256 in {folder / MANIFEST}")
    return problems


def _describe_tree(root: Path, depth: int = 3, limit: int = 40) -> str:
    """The first folders under ``root`` (what is mounted), for error messages."""
    seen = []
    for dirpath, dirnames, _ in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if len(rel.parts) >= depth:
            dirnames[:] = []
        if rel.parts:
            seen.append(str(rel) + "/")
        if len(seen) >= limit:
            break
    return ", ".join(seen) if seen else "(nothing)"


def find_inputs(root: Path) -> dict[str, list[Path]]:
    """Folders holding each input kind under ``root``: ``{kind: [folder, ...]}`` (sorted).

    A folder with a whalesub ``manifest.json`` or the competition files is not searched further,
    so image folders are listed once at most.
    """
    found: dict[str, list[Path]] = {k: [] for k in (*KINDS, COMPETITION)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if len(here.relative_to(root).parts) >= MAX_DEPTH:
            dirnames[:] = []
        kind = None
        if MANIFEST in filenames:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                kind = json.loads((here / MANIFEST).read_text(encoding="utf-8")).get("kind")
        if kind in KINDS:
            found[kind].append(here)
            dirnames[:] = []
        elif "sample_submission.csv" in filenames and "train.csv" in filenames:
            found[COMPETITION].append(here)
            dirnames[:] = []
        dirnames.sort()
    return {k: sorted(v) for k, v in found.items()}


def pick_input(found: dict[str, list[Path]], kind: str, root: Path, required: bool = True) -> Path | None:
    """The one folder of ``kind``, or KernelInputError naming the input and the layouts searched."""
    folders = found.get(kind, [])
    what = {
        "whalesub-models": "the models dataset (manifest.json of kind whalesub-models)",
        "whalesub-wheels": "the wheels dataset (manifest.json of kind whalesub-wheels)",
        "whalesub-boxes": "the boxes dataset (manifest.json of kind whalesub-boxes)",
        COMPETITION: "the competition data (train.csv beside sample_submission.csv)",
    }[kind]
    if len(folders) > 1:
        raise KernelInputError(
            f"{what} is mounted {len(folders)} times: {', '.join(map(str, folders))}; "
            "attach only one version to the kernel"
        )
    if not folders:
        if not required:
            return None
        raise KernelInputError(
            f"{what} was not found under {root} (searched {MAX_DEPTH} levels deep, in the layouts "
            f"{'; '.join(LAYOUTS)}). Mounted: {_describe_tree(root)}. Add it to the kernel's inputs "
            "(dataset_sources / competition_sources in kernel-metadata.json; accept the competition's "
            "rules in the browser, or its data is not mounted)"
        )
    return folders[0]


def install_wheels(folder: Path, target: str | None) -> list[str]:
    """Check the wheels against their manifest and install the manifest's list offline."""
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    problems = verify_files(folder, manifest.get("files", {}))
    if problems:
        raise KernelInputError(f"the wheels dataset {folder} is incomplete: " + "; ".join(problems))
    install = list(manifest["install"])
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "--isolated",
        "install",
        "--no-index",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--find-links",
        str(folder),
    ]
    if target:
        cmd += ["--target", target, "--upgrade"]
    print("[whalesub] " + " ".join(cmd + install), flush=True)
    proc = subprocess.run(cmd + install, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelInputError(
            f"installing {', '.join(install)} from {folder} failed (a wheel missing or "
            f"built for another Python/platform?):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    if target:
        sys.path.insert(0, target)
    importlib.invalidate_caches()
    return install


def main() -> int:
    root = Path(os.environ.get("WHALESUB_KAGGLE_INPUT", "/kaggle/input"))
    working = Path(os.environ.get("WHALESUB_KAGGLE_WORKING", "/kaggle/working"))
    times: dict = {}
    try:
        with timed("find inputs", times):
            found = find_inputs(root)
            inputs = {k: pick_input(found, k, root, required=k != "whalesub-boxes") for k in found}
            for k, v in inputs.items():
                print(f"[whalesub]   {k}: {v}", flush=True)
        with timed("install wheels", times):
            install_wheels(inputs["whalesub-wheels"], os.environ.get("WHALESUB_KAGGLE_TARGET"))
        # whalesub exists only now, installed from the wheel; this file is its standalone entry point
        # (the modules of the package import its helpers, never the other way round)
        kernel = importlib.import_module("whalesub.kaggle.kernel")
        kernel.run_kernel(inputs, working, times)
    except ImportError as exc:  # a dependency neither Kaggle's image nor the wheels dataset has
        print(f"[whalesub] error: the module {exc.name or exc} is missing on this Kaggle image ({exc}): "
              "build again with `whalesub kaggle build --package <its pip name>` (or without "
              "--no-extra-wheels), upload the wheels dataset and run the kernel again",
              file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        # whalesub's own errors (bad input, named): one message; anything else: the traceback
        if not any(c.__name__ in ("KernelInputError", "WhalesubError") for c in type(exc).__mro__):
            raise
        print(f"[whalesub] error: {exc}", file=sys.stderr, flush=True)
        return 1
    print("[whalesub] times (s): " + json.dumps(times), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
