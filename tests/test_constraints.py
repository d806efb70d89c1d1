"""constraints.txt pins every dependency of pyproject.toml (extras included), and tools/lock.py, which
writes it, follows requirements through markers and extras as pip would."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _lock():
    spec = importlib.util.spec_from_file_location("whalesub_lock", ROOT / "tools" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _lock()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
CONSTRAINTS = (ROOT / "constraints.txt").read_text(encoding="utf-8")


def test_every_pyproject_dependency_is_pinned():
    assert lock.unpinned(PROJECT, CONSTRAINTS) == []
    pins = lock.read_pins(CONSTRAINTS)
    names = {lock.canonicalize_name(r.name) for r in lock.pyproject_requirements(PROJECT)}
    assert {"torch", "pytest", "kaggle", "setuptools-scm", "faiss-cpu", "faiss-gpu"} <= names  # all groups
    assert names <= set(pins) and "whalesub" not in pins
    # the docs and cluster extras of other branches are pinned already
    assert {"mkdocs", "mkdocs-material", "ray"} <= set(pins)


def test_a_new_dependency_without_a_pin_fails():
    planted = {**PROJECT, "optional-dependencies": {**PROJECT["optional-dependencies"],
                                                    "dev": [*PROJECT["optional-dependencies"]["dev"],
                                                            "brand-new-lib>=1.0"]}}
    assert lock.unpinned(planted, CONSTRAINTS) == [
        "brand-new-lib>=1.0: no pin in constraints.txt (run python tools/lock.py)"]
    # a pin the specifier refuses fails as well
    old_torch = CONSTRAINTS.replace(f"torch=={lock.read_pins(CONSTRAINTS)['torch']}\n", "torch==2.0.0\n")
    (problem,) = lock.unpinned(PROJECT, old_torch)
    assert problem.startswith("torch>=2.4: constraints.txt pins torch==2.0.0")


def test_read_pins_hand_worked():
    text = "# header\nNumPy==2.1.0\n  scikit_learn == 1.6.1  # why\nray[default]==2.0\n-e .\npkg>=1\n\n"
    assert lock.read_pins(text) == {"numpy": "2.1.0", "scikit-learn": "1.6.1"}


def test_closure_follows_extras_and_markers_hand_worked():
    """A fake installed world: a needs b[x] and, on another OS only, c; b needs d always and e with
    extra x only, f with extra y only; d and a need each other (a cycle)."""
    world = {
        "a": ("1.0", ["b[x]>=1", "c; sys_platform == 'nonexistent-os'", "whalesub"]),
        "b": ("2.0", ["d", "e; extra == 'x'", "f; extra == 'y'"]),
        "d": ("3.0", ["a"]),
        "e": ("4.0", []),
        "f": ("5.0", []),
        "c-twin": ("6.0", []),
    }
    got = lock.closure([Requirement("a")], world.get)
    assert got == {"a": "1.0", "b": "2.0", "d": "3.0", "e": "4.0"}  # no f (extra y), no c (marker)
    # a root needed on another platform only: pinned at its counterpart's version
    lock.COUNTERPARTS["c"] = "c-twin"
    try:
        got = lock.closure([Requirement("c; sys_platform == 'nonexistent-os'"), Requirement("c-twin")],
                           world.get)
    finally:
        del lock.COUNTERPARTS["c"]
    assert got == {"c": "6.0", "c-twin": "6.0"}
    with pytest.raises(SystemExit, match="not installed here: zzz"):
        lock.closure([Requirement("zzz")], world.get)
    with pytest.raises(SystemExit, match="c is needed on another platform only"):
        lock.closure([Requirement("c; sys_platform == 'nonexistent-os'")], world.get)


def test_ci_installs_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    (line,) = [x for x in ci.splitlines() if "pip install -e" in x]
    assert line.split("#")[0].split() == ["python", "-m", "pip", "install", "-e", '".[dev]"', "-c",
                                          "constraints.txt"]
