"""The wheels dataset: whalesub's own wheel plus what Kaggle's image lacks, in one flat folder.

The kernel installs them with ``pip install --no-index --no-deps --find-links DIR <explicit list>``,
so nothing is fetched and no dependency pin can replace the image's CUDA stack (torch and the
``nvidia-*`` libraries it brings stay as the image has them).

Defaults (:data:`DEFAULT_PACKAGES`), for Kaggle's GPU image (Python 3.12, manylinux x86_64, CUDA 12):
- ``faiss-gpu-cu12``: FAISS with GPU search, built for CUDA 12 (its ``nvidia-cublas-cu12`` /
  ``nvidia-cuda-runtime-cu12`` dependencies are the ones torch's CUDA 12 wheels already bring);
- ``onnxruntime-gpu<1.27``: 1.27 and later are built for CUDA 13 and silently fall back to the CPU
  on a CUDA 12 image.
Everything else whalesub imports at inference (numpy, pandas, Pillow, OpenCV, torch, tqdm) is part
of Kaggle's image; ``benchmarks/kaggle_rehearsal.py`` proves the list complete in a fresh venv.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import whalesub
from whalesub.core.errors import ConfigError, WhalesubError

log = logging.getLogger(__name__)

DEFAULT_PACKAGES = ("faiss-gpu-cu12", "onnxruntime-gpu<1.27")
DEFAULT_PYTHON = "3.12"
DEFAULT_PLATFORMS = (
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_28_x86_64",
)
FORBIDDEN = ("torch", "torchvision", "torchaudio", "tensorflow", "jax")  # never ship a framework
_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)-.+\.whl$")


def canonical(name: str) -> str:
    """PEP 503 name: lowercase, runs of -_. one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    """``onnxruntime-gpu<1.27`` -> ``onnxruntime-gpu``."""
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if not m:
        raise ConfigError(f"--package {spec!r} is not a requirement such as 'onnxruntime-gpu<1.27'")
    return canonical(m.group(1))


def parse_wheel(path: Path) -> tuple[str, str]:
    """(canonical name, version) of a wheel file name."""
    m = _WHEEL.match(path.name)
    if not m:
        raise WhalesubError(f"{path.name} is not a wheel file name (name-version-tags.whl)")
    return canonical(m.group("name")), m.group("version")


def pick_wheel(spec: str, wheels: list[Path], folder: Path) -> Path:
    """The wheel of ``spec`` (``onnxruntime-gpu<1.27``) at the highest version the spec allows
    (PEP 440 order, not file-name order: 1.26 before 1.9 by name), among ``wheels`` of ``folder``."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    try:
        req = Requirement(spec)
    except InvalidRequirement as exc:
        raise ConfigError(f"--package {spec!r} is not a requirement such as 'onnxruntime-gpu<1.27' "
                          f"({exc})") from None
    name = requirement_name(spec)
    found: list[tuple[Version, Path]] = []
    for p in wheels:
        n, v = parse_wheel(p)
        if n != name:
            continue
        try:
            found.append((Version(v), p))
        except InvalidVersion:
            raise WhalesubError(f"{p}: {v!r} is not a PEP 440 version") from None
    if not found:
        raise ConfigError(f"--wheels-from {folder} has no wheel of {name!r}")
    fits = [(v, p) for v, p in found if req.specifier.contains(v, prereleases=True)]
    if not fits:
        raise ConfigError(f"--wheels-from {folder} has no wheel of {spec!r}: it has "
                          f"{', '.join(sorted({str(v) for v, _ in found}, key=Version))}")
    top = max(v for v, _ in fits)
    same = sorted(p for v, p in fits if v == top)
    if len(same) > 1:
        raise ConfigError(f"--wheels-from {folder} holds {len(same)} wheels of {name} {top} "
                          f"({', '.join(p.name for p in same)}): keep the one for Kaggle's Python and "
                          "platform")
    return same[0]


def build_whalesub_wheel(source: Path | None, out: Path) -> Path:
    """Build whalesub's wheel (``pip wheel --no-deps``) from ``source`` (a checkout) into ``out``.

    ``source`` None: the checkout this whalesub runs from, when it is one (an installed whalesub
    has no pyproject.toml beside it: pass ``--whalesub-wheel`` or ``--source``).
    """
    if source is None:
        source = Path(whalesub.__file__).resolve().parents[1]
    if not (source / "pyproject.toml").is_file():
        raise ConfigError(
            f"{source} is not a whalesub source checkout (no pyproject.toml): pass --source "
            "CHECKOUT, or --whalesub-wheel FILE (from `pip wheel --no-deps CHECKOUT`)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp,
            str(source),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        built = sorted(Path(tmp).glob("whalesub-*.whl"))
        if proc.returncode != 0 or not built:
            raise WhalesubError(
                f"building the whalesub wheel failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}"
            )
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(built[0], out / built[0].name))


def download_wheels(
    packages: list[str],
    out: Path,
    python_version: str = DEFAULT_PYTHON,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> None:
    """``pip download`` binary wheels of exactly ``packages`` (no dependencies) for a target."""
    if not packages:
        return
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "-d",
        str(out),
    ]
    for p in platforms:
        cmd += ["--platform", p]
    log.info("downloading %s for Python %s (%s)", ", ".join(packages), python_version, ", ".join(platforms))
    proc = subprocess.run(cmd + list(packages), capture_output=True, text=True)
    if proc.returncode != 0:
        raise WhalesubError(
            f"pip download failed for {', '.join(packages)} (Python {python_version}, "
            f"{', '.join(platforms)}):\n{proc.stderr[-3000:]}\nfix --package / --python-version "
            "/ --platform, or download the wheels yourself and pass --wheels-from DIR"
        )


def collect_wheels(
    packages: list[str],
    out: Path,
    *,
    whalesub_wheel: Path | None = None,
    source: Path | None = None,
    wheels_from: Path | None = None,
    python_version: str = DEFAULT_PYTHON,
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
) -> dict:
    """Fill ``out`` (flat) with whalesub's wheel and one wheel per package; return the install list.

    ``wheels_from``: take the wheels from this folder instead of downloading them (offline builds).
    Returns ``{"install": ["whalesub==0.1.dev12+g1a2b3c4", "faiss-gpu-cu12==1.14.1", ...], "wheels":
    {name: file}}`` (whalesub's version from git: one per commit).
    """
    names = [requirement_name(p) for p in packages]
    bad = sorted(set(names) & set(FORBIDDEN))
    if bad:
        raise ConfigError(
            f"--package {', '.join(bad)}: never ship a framework; Kaggle's image has its own "
            "(a second copy would replace its CUDA stack)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if whalesub_wheel is not None:
        if not whalesub_wheel.is_file():
            raise ConfigError(f"--whalesub-wheel {whalesub_wheel} does not exist")
        shutil.copy2(whalesub_wheel, out / whalesub_wheel.name)
    else:
        build_whalesub_wheel(source, out)
    if wheels_from is not None:
        for spec in packages:
            best = pick_wheel(spec, sorted(wheels_from.glob("*.whl")), wheels_from)
            shutil.copy2(best, out / best.name)
    else:
        download_wheels(list(packages), out, python_version, platforms)
    by_name: dict[str, Path] = {}
    for p in sorted(out.glob("*.whl")):
        name = parse_wheel(p)[0]
        if name in by_name:
            raise WhalesubError(f"{out} holds two wheels of {name}: {by_name[name].name}, {p.name}")
        by_name[name] = p
    missing = [n for n in ["whalesub", *names] if n not in by_name]
    if missing:
        raise WhalesubError(f"no wheel of {', '.join(missing)} in {out}")
    install = [f"{n}=={parse_wheel(by_name[n])[1]}" for n in ["whalesub", *names]]
    return {"install": install, "wheels": {n: by_name[n].name for n in ["whalesub", *names]}}
