"""Versions from git: every commit its own version, in a checkout and in the wheel built from it, and
the Kaggle kernel refusing models and wheels of two different builds (two commits).

The oracle is git itself: without a tag, setuptools-scm's version is ``0.1.dev<N>+g<hash>`` where N
is the number of commits and ``<hash>`` a prefix of ``git rev-parse HEAD``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import whalesub
from whalesub.core.errors import WhalesubError
from whalesub.kaggle import KIND_MODELS
from whalesub.kaggle.kernel import check_models, same_version
from whalesub.kaggle.package import write_manifest
from whalesub.kaggle.wheels import collect_wheels, parse_wheel

ROOT = Path(__file__).resolve().parents[1]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1"}
_VERSION = re.compile(r"^0\.1\.dev(?P<n>\d+)\+g(?P<hash>[0-9a-f]{7,})$")


def _needs_git_and_scm() -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: versions come from git")
    pytest.importorskip("setuptools_scm", reason="setuptools-scm (the dev extra) computes versions from git")


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV, "HOME": str(repo.parent)}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def python_version_of(path_entry: Path, cwd: Path) -> str:
    """``whalesub.__version__`` as a fresh interpreter sees it with only ``path_entry`` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(path_entry), "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([sys.executable, "-c", "import whalesub; print(whalesub.__version__)"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def expected(repo: Path) -> tuple[int, str]:
    """(commits, full hash of HEAD): what the version must encode."""
    return int(git(repo, "rev-list", "--count", "HEAD")), git(repo, "rev-parse", "HEAD")


def assert_encodes(version: str, repo: Path) -> None:
    m = _VERSION.match(version)
    assert m, f"{version!r} is not 0.1.dev<N>+g<hash> (a clean checkout without tags)"
    n, head = expected(repo)
    assert int(m["n"]) == n and head.startswith(m["hash"]), (version, n, head)


@pytest.fixture()
def repo(tmp_path) -> Path:
    """A git repository holding a copy of this checkout's package and pyproject.toml, one commit."""
    _needs_git_and_scm()
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "whalesub", src / "whalesub", ignore=skip)
    shutil.copy2(ROOT / "pyproject.toml", src / "pyproject.toml")
    (src / "README.md").write_text("# whalesub (test copy)\n")
    git(src, "init", "-q")
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "first")
    return src


def commit(repo: Path, name: str) -> None:
    (repo / f"{name}.txt").write_text(name)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", name)


def test_the_checkout_version_follows_each_new_commit(repo, tmp_path):
    # what an editable install sees: the package imported from its checkout; its metadata (if any
    # whalesub is installed in this interpreter) was frozen at install time and must not win
    first = python_version_of(repo, tmp_path)
    assert_encodes(first, repo)
    commit(repo, "second")
    second = python_version_of(repo, tmp_path)
    assert_encodes(second, repo)
    assert second != first and not same_version(first, second)
    # uncommitted changes: the date suffix setuptools-scm adds, still this commit's hash
    (repo / "second.txt").write_text("changed")
    dirty = python_version_of(repo, tmp_path)
    assert dirty.startswith(second + ".d") and re.fullmatch(r"\d{8}", dirty[len(second) + 2:])


@pytest.mark.slow
def test_kernel_refuses_models_and_wheels_of_two_commits(repo, tmp_path):
    """Build A's models with build B's wheel: the installed kernel refuses, naming both versions;
    B's models with B's wheel pass. The wheel is built from the repository as `kaggle build` does."""
    version_a = python_version_of(repo, tmp_path)  # what `kaggle build` at commit A stamps
    commit(repo, "second")
    wheels = collect_wheels([], tmp_path / "wheels", source=repo)  # whalesub's wheel only: no downloads
    (wheel,) = (tmp_path / "wheels").glob("whalesub-*.whl")
    version_b = parse_wheel(wheel)[1]
    assert wheels["install"] == [f"whalesub=={version_b}"]
    assert_encodes(version_b, repo)  # the wheel carries commit B
    assert version_b == python_version_of(repo, tmp_path)  # = the checkout's own version at B
    assert not same_version(version_a, version_b)
    # the wheel installed (as the kernel installs it): its version comes from its metadata
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert python_version_of(site, tmp_path) == version_b
    # one models dataset per build
    for name, version in (("models_a", version_a), ("models_b", version_b)):
        (tmp_path / name / "fold0").mkdir(parents=True)
        (tmp_path / name / "fold0" / "model.onnx").write_bytes(name.encode())
        write_manifest(tmp_path / name, KIND_MODELS, version, models=["fold0"])
    with pytest.raises(WhalesubError) as err:
        check_models(tmp_path / "models_a", have=version_b)
    message = str(err.value)
    assert version_a in message and version_b in message and "same `whalesub kaggle build`" in message
    assert check_models(tmp_path / "models_b", have=version_b)["whalesub_version"] == version_b
    # the same check inside the installed wheel B, with its own version (no `have`)
    script = ("import sys; from pathlib import Path; from whalesub.kaggle.kernel import check_models\n"
              "for folder in sys.argv[1:]:\n    try:\n        check_models(Path(folder))\n"
              "        print('ok')\n    except Exception as exc:\n"
              "        print(type(exc).__name__, str(exc).replace(chr(10), ' '))")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    folders = [str(tmp_path / "models_a"), str(tmp_path / "models_b")]
    proc = subprocess.run([sys.executable, "-c", script, *folders],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    refused, accepted = proc.stdout.strip().split("\n", 1)
    assert refused.startswith(f"WhalesubError the models dataset {tmp_path / 'models_a'}"), refused
    assert version_a in refused and version_b in refused
    assert accepted.strip() == "ok", accepted


def test_same_version_hand_worked():
    assert same_version("1.0", "1.0.0")  # PEP 440 equal
    assert same_version("0.1.dev3+g1a2b3c4", "0.1.dev3+g1a2b3c4")
    assert not same_version("0.1.dev3+g1a2b3c4", "0.1.dev3+g9f9f9f9")  # same distance, other commit
    assert not same_version("0.1.dev3+g1a2b3c4", "0.1.dev4+g1a2b3c4")
    assert not same_version(None, "0.1.0") and not same_version("", "")
    assert same_version("not a version", "not a version") and not same_version("x", "y")


def test_manifest_without_a_version_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    write_manifest(tmp_path / "m", KIND_MODELS, "0.1.dev1+gabcdef0", models=[])
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    del manifest["whalesub_version"]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WhalesubError, match="packaged for whalesub None"):
        check_models(tmp_path / "m", have="0.1.dev1+gabcdef0")


def test_cli_version_option():
    from whalesub.cli import app

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output == f"whalesub {whalesub.__version__}\n"
    assert whalesub.__version__ != "0.1.0"  # no longer hard-coded


def test_import_is_cheap_and_version_lazy():
    code = ("import sys, whalesub; assert 'setuptools_scm' not in sys.modules and 'importlib.metadata' "
            "not in sys.modules and '__version__' not in vars(whalesub); v = whalesub.__version__; "
            "assert v and vars(whalesub)['__version__'] == v; print(v)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
