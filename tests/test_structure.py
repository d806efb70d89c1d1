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
                 "    from whalesub.rank import NEW\n    import whalesub.data\n")
    got = imported_modules("train.fit", f, {"train.config", "whalesub.rank", "whalesub.data", "train.fit"})
    assert got == {"train.config", "whalesub.rank", "whalesub.data"}


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert cycles == [], f"import cycles among project modules: {cycles}"


def test_whalesub_never_imports_train():
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "train")
           for m, deps in import_graph().items() if m.split(".")[0] == "whalesub"}
    assert not {m: d for m, d in bad.items() if d}, "whalesub must not import train/"


# The README's "Module map", as data: module (or package prefix ending in ".") -> layer.
# 1 contract/utilities, 2 arrays, 3 files & vision, 4 pipelines, 5 faces (CLI, train/).
LAYERS = {
    "whalesub": 1, "whalesub.errors": 1, "whalesub.atomic": 1, "whalesub.data": 1,
    "whalesub.vectors": 2, "whalesub.index": 2, "whalesub.rank": 2, "whalesub.threshold": 2,
    "whalesub.metric": 2,
    "whalesub.store": 3, "whalesub.submission": 3, "whalesub.image": 3, "whalesub.spec": 3,
    "whalesub.model": 3, "whalesub.sources": 3, "whalesub.onnx_fp16": 3, "whalesub.export": 3,
    "whalesub.runtime": 3, "whalesub.backends": 3, "whalesub.loader": 3, "whalesub.shards": 3,
    "whalesub.synth": 3, "whalesub.synth.": 3, "whalesub.boxes": 3,
    "whalesub.centres": 2,
    "whalesub.report_render": 3,
    "whalesub.pipeline": 4, "whalesub.embed": 4, "whalesub.pseudo": 4, "whalesub.scorefiles": 4,
    "whalesub.blend": 4, "whalesub.oof": 4, "whalesub.predict": 4, "whalesub.report": 4,
    "whalesub.kaggle": 4, "whalesub.kaggle.": 4,
    "whalesub.cli": 5, "train": 5, "train.": 5,
}


def layer_of(module: str, table: dict[str, int] = LAYERS) -> int | None:
    """The module's layer: its own entry, else the longest package prefix ("pkg.") that holds it."""
    if module in table:
        return table[module]
    prefixes = [p for p in table if p.endswith(".") and module.startswith(p)]
    return table[max(prefixes, key=len)] if prefixes else None


def layer_violations(graph: dict[str, set[str]], table: dict[str, int] = LAYERS) -> list[str]:
    """Every import of a module from a higher layer, and every module the table does not place."""
    out = [f"{m} has no layer: add it to LAYERS here and to the README's module map"
           for m in sorted(graph) if layer_of(m, table) is None]
    for m, deps in sorted(graph.items()):
        lm = layer_of(m, table)
        for d in sorted(deps):
            ld = layer_of(d, table)
            if lm is not None and ld is not None and ld > lm:
                out.append(f"{m} (layer {lm}) imports {d} (layer {ld})")
    return out


def test_layer_checker_finds_a_planted_upward_import_and_an_unplaced_module():
    table = {"whalesub.rank": 2, "whalesub.store": 3, "train.": 5}
    graph = {"whalesub.rank": {"whalesub.store"}, "whalesub.store": set(), "train.fit": {"whalesub.rank"},
             "whalesub.new": set()}
    assert layer_violations(graph, table) == [
        "whalesub.new has no layer: add it to LAYERS here and to the README's module map",
        "whalesub.rank (layer 2) imports whalesub.store (layer 3)"]


def test_every_import_goes_to_the_same_or_a_lower_layer():
    assert layer_violations(import_graph()) == []


def _readme_name(entry: str) -> str:
    """How the README's module map writes a LAYERS entry."""
    special = {"whalesub": "whalesub/__init__", "whalesub.synth": "synth/*", "whalesub.synth.": "synth/*",
               "whalesub.kaggle": "kaggle/*", "whalesub.kaggle.": "kaggle/*",
               "train": "train/", "train.": "train/"}
    return special.get(entry, entry.rpartition(".")[2])


def test_the_readme_module_map_matches_the_layers_table():
    """Each README row (layer N) names exactly the LAYERS entries of layer N (train/ ones by file)."""
    import re

    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| ([1-5]) [^|]*\|([^|]*)\|",
                                                             (ROOT / "README.md").read_text(encoding="utf-8"),
                                                             re.MULTILINE)}
    assert sorted(rows) == [1, 2, 3, 4, 5], "README's Development section: one module-map row per layer"
    for layer, cell in rows.items():
        named = set(re.findall(r"`([^`]+)`", cell))
        want = {_readme_name(m) for m, n in LAYERS.items() if n == layer}
        if layer == 5:  # train/'s own modules are listed by name after `train/`
            named -= {m.rpartition(".")[2] for m in project_modules() if m.startswith("train.")}
        assert named == want, f"layer {layer}: README names {sorted(named)}, LAYERS has {sorted(want)}"


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
