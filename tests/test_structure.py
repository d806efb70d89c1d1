"""The layering the README promises: no import cycles, whalesub never imports train, every module imports.

Imports are read with ``ast`` (function-level ones included), so a cycle hidden behind a lazy import
inside a function is found too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("whalesub", "train")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (module ``name``), relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when it exists
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import whalesub.data.x` -> nearest project module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    known = set(mods)
    # a package's __init__ is imported by every submodule import; it only matters if it imports back
    return {m: imported_modules(m, p, known) for m, p in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    graph["c"] = set()
    assert find_cycles(graph) == []


def test_relative_and_lazy_imports_are_read(tmp_path):
    f = tmp_path / "mod.py"
    f.write_text("from .config import X\n\ndef f():\n"
                 "    from whalesub.ranking.rank import NEW\n    import whalesub.data.contract\n")
    known = {"train.config", "whalesub.ranking.rank", "whalesub.data.contract", "train.fit"}
    got = imported_modules("train.fit", f, known)
    assert got == {"train.config", "whalesub.ranking.rank", "whalesub.data.contract"}


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert cycles == [], f"import cycles among project modules: {cycles}"


def test_whalesub_never_imports_train():
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "train")
           for m, deps in import_graph().items() if m.split(".")[0] == "whalesub"}
    assert not {m: d for m, d in bad.items() if d}, "whalesub must not import train/"


def declared_layers() -> tuple[str, ...]:
    """The package order stated once, in ``whalesub/__init__.py`` (read without importing it)."""
    tree = ast.parse((ROOT / "whalesub" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LAYERS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("whalesub/__init__.py must define LAYERS, the package order")


def layer_of(module: str, order: tuple[str, ...]) -> int | None:
    """A module's layer from its place in the tree: ``whalesub`` itself 0, ``whalesub.<pkg>[.x]`` the
    1-based position of ``pkg`` in ``order``, ``train``/``train.*`` above all; None when unplaced."""
    parts = module.split(".")
    if parts[0] == "train":
        return len(order) + 1
    if module == "whalesub":
        return 0
    return order.index(parts[1]) + 1 if parts[1] in order else None


def layer_violations(graph: dict[str, set[str]], order: tuple[str, ...]) -> list[str]:
    """Every import of a module from a higher layer, and every module in no declared package."""
    out = [f"{m} is in no package of whalesub.LAYERS: put it in one (or add its package there)"
           for m in sorted(graph) if layer_of(m, order) is None]
    for m, deps in sorted(graph.items()):
        lm = layer_of(m, order)
        for d in sorted(deps):
            ld = layer_of(d, order)
            if lm is not None and ld is not None and ld > lm:
                out.append(f"{m} (layer {lm}, {m.split('.')[1] if lm else 'whalesub'}) imports {d} "
                           f"(layer {ld})")
    return out


def test_layer_checker_finds_a_planted_upward_import_and_an_unplaced_module():
    order = ("core", "ranking", "models")
    graph = {"whalesub.ranking.rank": {"whalesub.models.spec", "whalesub.core.errors"},
             "whalesub.models.spec": {"whalesub.ranking.rank"}, "train.fit": {"whalesub.models.spec"},
             "whalesub.core.errors": set(), "whalesub.stray": set(), "whalesub": set()}
    assert layer_violations(graph, order) == [
        "whalesub.stray is in no package of whalesub.LAYERS: put it in one (or add its package there)",
        "whalesub.ranking.rank (layer 2, ranking) imports whalesub.models.spec (layer 3)"]


def test_every_module_lives_in_a_declared_package():
    order = declared_layers()
    top = {p.name for p in (ROOT / "whalesub").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    top |= {p.stem for p in (ROOT / "whalesub").glob("*.py") if p.stem != "__init__"}
    assert top == set(order), f"whalesub's packages {sorted(top)} vs whalesub.LAYERS {list(order)}"


def test_every_import_goes_to_the_same_or_a_lower_layer():
    assert layer_violations(import_graph(), declared_layers()) == []


def test_the_package_docstrings_state_the_order():
    """The order in whalesub/__init__'s docstring lists LAYERS in order; each package's docstring
    names its layer."""
    import re

    order = declared_layers()
    doc = ast.get_docstring(ast.parse((ROOT / "whalesub" / "__init__.py").read_text(encoding="utf-8")))
    listed = re.findall(r"^\d+\. ``(\w+)``", doc, re.MULTILINE)
    assert tuple(listed) == order, f"whalesub/__init__ docstring lists {listed}, LAYERS is {order}"
    for i, pkg in enumerate(order, 1):
        init = ROOT / "whalesub" / pkg / "__init__.py"
        if init.exists():
            text = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
            assert f"Layer {i}" in text, f"{init}: its docstring must say 'Layer {i}' and what it may import"


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain among project modules (the graph has no cycles)."""
    from functools import cache

    @cache
    def chain(m: str) -> tuple[str, ...]:
        best = max((chain(d) for d in graph.get(m, ())), key=len, default=())
        return (m, *best)

    return list(max((chain(m) for m in sorted(graph)), key=len))


def test_longest_chain_oracle():
    graph = {"a": {"b", "c"}, "b": {"d"}, "c": set(), "d": set()}
    assert longest_chain(graph) == ["a", "b", "d"]


def test_every_module_imports_in_a_fresh_interpreter():
    mods = sorted(m for m in project_modules() if not m.endswith("__main__"))
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *mods], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("module", ["whalesub.cli"])
def test_cli_start_up_stays_light(module):
    """`whalesub --help` must not pull torch, onnx or faiss (they are imported where they are used)."""
    code = (f"import sys, {module}\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'faiss', 'timm', 'albumentations') "
            "if m in sys.modules]\nprint(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "", f"importing {module} loads {r.stdout.strip()}"
