"""The manual tells the truth about the code: README.md and the MkDocs site under docs/.

- every ``--option`` shown for a ``whalesub`` command (fenced code blocks and inline code) exists in
  that command's ``--help`` (read from the click command objects of :data:`whalesub.cli.app`);
- every ``python benchmarks/X.py`` command shown runs with ``--help`` from the repository root;
- ``mkdocs.yml``'s nav lists every ``docs/*.md`` page, and every page it lists exists;
- the architecture page names every package of :data:`whalesub.LAYERS`;
- every dotted ``whalesub.x.y`` name shown in code resolves, and every repository path shown exists.

The checkers are plain functions over text, so the tests below also plant wrong options, names and
paths and see each checker report them.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


# --- code in markdown -------------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE = re.compile(r"(?<!`)`((?:[^`\n]|\n(?![ \t]*\n))+)`(?!`)")  # may wrap lines, not paragraphs


def code_pieces(text: str) -> list[str]:
    """The fenced code blocks of ``text`` (one piece each) and its inline code spans."""
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    return blocks + [span.replace("\n", " ") for span in INLINE.findall(prose)]


def shell_commands(code: str) -> list[str]:
    """One string per shell command: continuation lines joined, comments dropped, split at ; && ||.

    A ``|`` splits too unless an option follows it (``[--large | --n-large K]`` is one usage line).
    """
    code = re.sub(r"\\\n", " ", code)
    out = []
    for line in code.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)
        for part in re.split(r";|&&|\|\||\|(?!\s*-)", line):
            if part.strip():
                out.append(part.strip())
    return out


# --- whalesub options -------------------------------------------------------------------------------

def cli_root():
    import typer.main

    from whalesub.cli import app

    return typer.main.get_command(app)


def _subcommands(cmd) -> dict:
    """A group's subcommands by name (click's and typer's vendored click groups both have ``commands``)."""
    return dict(getattr(cmd, "commands", None) or {})


def help_options(cmd) -> set[str]:
    """The long options ``COMMAND --help`` lists (``--help`` itself included)."""
    opts = {"--help"}
    for p in cmd.params:
        if p.param_type_name == "option" and not getattr(p, "hidden", False):
            opts.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    return opts


WHALESUB = re.compile(r"(?<![\w./=-])whalesub(?=[ \t]+\S)")
OPTION = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")


def bad_whalesub_options(text: str, root=None) -> list[tuple[str, str]]:
    """(command, option) for every ``--option`` that a ``whalesub ...`` command in ``text`` shows but
    that command's ``--help`` does not list."""
    root = root or cli_root()
    bad = []
    for piece in code_pieces(text):
        for command in shell_commands(piece):
            for m in WHALESUB.finditer(command):
                rest = command[m.end():].split()
                cmd, path = root, ["whalesub"]
                for tok in rest:  # descend while the tokens name subcommands; `...` is a placeholder
                    subs = _subcommands(cmd)
                    if tok in subs:
                        cmd, path = subs[tok], [*path, tok]
                    elif tok != "..." or not subs:
                        break
                # the command's own text ends where the next `whalesub` starts
                tail = command[m.end():]
                nxt = WHALESUB.search(tail)
                tail = tail[:nxt.start()] if nxt else tail
                known = help_options(cmd)
                bad += [(" ".join(path), o) for o in OPTION.findall(tail) if o not in known]
    return bad


def test_every_documented_whalesub_option_exists():
    root = cli_root()
    found = {}
    for path in doc_files():
        bad = bad_whalesub_options(path.read_text(encoding="utf-8"), root)
        if bad:
            found[str(path.relative_to(ROOT))] = sorted(set(bad))
    assert not found, f"options the docs show that --help does not list: {found}"


def test_option_checker_finds_planted_options():
    root = cli_root()
    good = (
        "```bash\nwhalesub submit --gallery g.npz --queries q.npz --train-csv t.csv \\\n"
        "    --threshold 0.6 --out s.csv   # a comment --not-an-option\n"
        "whalesub kaggle upload kernels/build --dry-run\n```\n"
        "Prose with `whalesub tune ... --per-species t.json` and `whalesub boxes convert x --append`.\n"
    )
    assert bad_whalesub_options(good, root) == []
    planted = (
        "```bash\nwhalesub submit --gallery g.npz \\\n    --no-such-option 3 --out s.csv\n"
        "for i in 0 1; do whalesub embed --model m --shards $i/2; done\n"
        "whalesub kaggle build models/fold0 --owner me --treshold-json t.json\n```\n"
        "and `whalesub tune --gallery g --per-specie t.json`; `whalesub merge-embeddings a b --output c`\n"
    )
    assert sorted(bad_whalesub_options(planted, root)) == sorted([
        ("whalesub submit", "--no-such-option"),
        ("whalesub embed", "--shards"),
        ("whalesub kaggle build", "--treshold-json"),
        ("whalesub tune", "--per-specie"),
        ("whalesub merge-embeddings", "--output"),
    ])
    # an option of another command does not count: --threshold belongs to submit, not to score
    assert bad_whalesub_options("`whalesub score s.csv --truth t.csv --threshold 0.5`", root) == [
        ("whalesub score", "--threshold")]


def test_shell_commands_split():
    code = "a --x \\\n  --y  # c --z\nfor i in 1; do b --w; done && c | d\ne [--p | --q]"
    assert shell_commands(code) == ["a --x    --y", "for i in 1", "do b --w", "done", "c", "d",
                                    "e [--p | --q]"]


# --- benchmark commands ---------------------------------------------------------------------------

BENCH = re.compile(r"\bpython3? (benchmarks/[\w/.-]+\.py)")


def documented_benchmarks() -> dict[str, list[str]]:
    """Benchmark script path as written -> the doc files that show it."""
    out: dict[str, list[str]] = {}
    for path in doc_files():
        for piece in code_pieces(path.read_text(encoding="utf-8")):
            for script in BENCH.findall(piece):
                out.setdefault(script, []).append(str(path.relative_to(ROOT)))
    return out


def test_docs_show_the_benchmarks():
    shown = documented_benchmarks()
    assert "benchmarks/train_loader.py" in shown and "benchmarks/submit_scale.py" in shown
    missing = [s for s in shown if not (ROOT / s).is_file()]
    assert not missing, f"the docs show benchmark scripts that do not exist: {missing}"
    undocumented = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.py")
                          if str(p.relative_to(ROOT)) not in shown)
    assert not undocumented, f"benchmarks no page shows (add them to docs/benchmarks.md): {undocumented}"


@pytest.fixture(scope="module")
def checkout_only_pythonpath(tmp_path_factory):
    """A PYTHONPATH holding only this checkout's ``whalesub`` (not its ``train``), so a script that
    imports ``train`` must put the repository root on sys.path itself, as from a plain shell."""
    d = tmp_path_factory.mktemp("pp")
    (d / "whalesub").symlink_to(ROOT / "whalesub", target_is_directory=True)
    return str(d)


@pytest.mark.parametrize("script", sorted(p.relative_to(ROOT).as_posix()
                                          for p in (ROOT / "benchmarks").glob("*.py")))
def test_benchmark_runs_with_help_from_the_repo_root(script, checkout_only_pythonpath):
    env = {**os.environ, "PYTHONPATH": checkout_only_pythonpath}
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"python {script} --help failed:\n{r.stderr[-2000:]}"
    assert "usage:" in r.stdout


PYCMD = re.compile(r"\bpython3? (-m train\.demo\b|-m train\b|benchmarks/[\w/.-]+\.py)")


def python_command_options(text: str) -> dict[str, set[str]]:
    """Program (``-m train``, ``-m train.demo``, ``benchmarks/X.py``) -> the options the code of
    ``text`` shows for it."""
    out: dict[str, set[str]] = {}
    for piece in code_pieces(text):
        for command in shell_commands(piece):
            matches = list(PYCMD.finditer(command))
            for m, nxt in zip(matches, [*matches[1:], None][:len(matches)], strict=True):
                tail = command[m.end():nxt.start() if nxt else None]
                out.setdefault(m.group(1), set()).update(OPTION.findall(tail))
    return out


def _norm(option: str) -> str:
    return option.replace("_", "-")  # python -m train takes --key_name and --key-name alike


def bad_python_options(text: str, help_text) -> list[tuple[str, str]]:
    """(program, option) for every option shown for a ``python ...`` program that its ``--help``
    (``help_text(program)``) does not mention."""
    bad = []
    for program, options in python_command_options(text).items():
        known = {_norm(o) for o in OPTION.findall(help_text(program))} | {"--help"}
        bad += [(program, o) for o in sorted(options) if _norm(o) not in known]
    return bad


def run_help(program: str, pythonpath: str) -> str:
    argv = program.split() if program.startswith("-m ") else [program]
    r = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": pythonpath})
    assert r.returncode == 0, f"python {program} --help failed:\n{r.stderr[-2000:]}"
    return r.stdout


def test_every_documented_python_option_exists(checkout_only_pythonpath):
    helps: dict[str, str] = {}

    def help_text(program):
        if program not in helps:
            helps[program] = run_help(program, checkout_only_pythonpath)
        return helps[program]

    found = {}
    for path in doc_files():
        if bad := bad_python_options(path.read_text(encoding="utf-8"), help_text):
            found[path.name] = bad
    assert {"-m train", "-m train.demo", "benchmarks/realdata.py"} <= set(helps)
    assert not found, f"options the docs show that the program's --help does not list: {found}"


def test_python_option_checker_finds_planted_options():
    helps = {"-m train": "usage: python -m train --config FILE.yaml\n  --run_name='x'\n  --fold=0",
             "benchmarks/x.py": "usage: x.py [-h] [--reps REPS]"}
    text = ("```bash\npython -m train --config c.yaml --run-name=a --fold all --epohcs 3\n"
            "torchrun --nproc-per-node=2 -m train --config c.yaml\n```\n"
            "`python benchmarks/x.py [--reps 3] [--rep 2]`\n")
    assert bad_python_options(text, helps.__getitem__) == [("-m train", "--epohcs"),
                                                          ("benchmarks/x.py", "--rep")]


def test_readme_is_a_front_door():
    """Short, and its set-up is still: 1. install, 2. demo, 3. tests, in that order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    first_block = FENCE.search(text).group(2)
    commands = shell_commands(first_block)
    assert commands[:3] == ['pip install -e ".[dev]" -c constraints.txt', "python -m train.demo",
                            "python -m pytest -q"]
    assert "docs/index.md" in text


# --- the MkDocs site ----------------------------------------------------------------------------------

def nav_pages(nav) -> list[str]:
    """Every page file named in a mkdocs nav (nested lists and {title: page} maps)."""
    if isinstance(nav, str):
        return [] if re.match(r"^[a-z]+://", nav) else [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    if isinstance(nav, list):
        return [p for v in nav for p in nav_pages(v)]
    return []


def test_mkdocs_nav_lists_every_page_and_every_listed_page_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config.get("docs_dir", "docs") == "docs"
    assert config["theme"]["name"] == "material" and config.get("strict") is True
    listed = nav_pages(config["nav"])
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"
    missing = [p for p in listed if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav lists pages that do not exist: {missing}"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    unlisted = sorted(pages - set(listed))
    assert not unlisted, f"docs pages missing from mkdocs.yml's nav: {unlisted}"


def test_nav_pages_reads_nested_navs():
    nav = [{"Home": "index.md"}, {"Guide": [{"A": "a.md"}, "b.md", {"Ext": "https://x.org/"}]}]
    assert nav_pages(nav) == ["index.md", "a.md", "b.md"]


def test_architecture_page_names_every_package():
    import whalesub

    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    missing = [p for p in whalesub.LAYERS if f"whalesub.{p}" not in text]
    assert not missing, f"docs/architecture.md does not describe: {missing}"
    # and in the order of LAYERS (the import rule)
    first = [text.index(f"`whalesub.{p}`") for p in whalesub.LAYERS]
    assert first == sorted(first), "docs/architecture.md lists the packages out of LAYERS order"


# --- names and paths shown in code ----------------------------------------------------------------

DOTTED = re.compile(r"(?<![\w./'\"-])whalesub(?:\.[A-Za-z_]\w*)+")  # a quoted one is a string (format name)
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:whalesub|train|tests|benchmarks|kernels|docs)/[\w/.-]*\.(?:py|yaml|md))")


def unresolved_names(text: str) -> list[str]:
    """Dotted ``whalesub.a.b`` names in the code of ``text`` that are neither a module nor an attribute."""
    bad = []
    for piece in code_pieces(text):
        for name in DOTTED.findall(piece):
            parts = name.split(".")
            obj, i = None, len(parts)
            while i > 0:  # the longest importable module prefix
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                    break
                except ModuleNotFoundError:
                    i -= 1
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    bad.append(name)
                    break
                obj = getattr(obj, attr)
    return bad


def missing_paths(text: str) -> list[str]:
    return [p for piece in code_pieces(text) for p in REPO_PATH.findall(piece) if not (ROOT / p).exists()]


def test_names_and_paths_in_the_docs_exist():
    names, paths = {}, {}
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        if bad := sorted(set(unresolved_names(text))):
            names[path.name] = bad
        if bad := sorted(set(missing_paths(text))):
            paths[path.name] = bad
    assert not names, f"whalesub names in the docs that do not exist: {names}"
    assert not paths, f"repository paths in the docs that do not exist: {paths}"


def test_name_and_path_checkers_find_planted_errors():
    text = ("`whalesub.ranking.threshold.tune_arrays` and `whalesub.pipeline.submit_files`, "
            "`whalesub.ranking.rank.no_such_function`, `whalesub.workflows.submit`\n"
            "```\nfrom whalesub.ranking.store import save_embeddings  # whalesub.data\n```\n"
            "`train/heads.py`, `train/no_such.py`, `tests/test_docs.py`\n")
    assert unresolved_names(text) == ["whalesub.pipeline.submit_files",
                                      "whalesub.ranking.rank.no_such_function"]
    assert missing_paths(text) == ["train/no_such.py"]
