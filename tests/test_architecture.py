"""The import rules of ARCHITECTURE.md, checked on the source (imports inside functions count too)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import dvc_deps  # noqa: E402

LIBRARY = ("slides", "tiling", "synth", "features", "mil", "e2e", "seg", "tune", "registry", "io", "training")
STAGE_LAYER = ("fbta.stages", "fbta.cli", "fbta.slide_status", "fbta.results", "fbta.tracking")
# config plumbing, not a consumer of settings: merges dotted values into a config for tuning trials
TAKES_WHOLE_CONFIG = {("fbta.tune.space", "with_values")}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "fbta").rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def graph() -> dict[str, set[str]]:
    """Module → the fbta modules it imports; packages' __init__ re-exports left out (they only gather)."""
    mods = modules()
    packages = {n for n, p in mods.items() if p.name == "__init__.py"}
    return {n: {m for m in dvc_deps.imported(p, n) if m in mods and m != n and m not in packages}
            for n, p in mods.items() if n not in packages}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_packages_never_import_the_stage_layer():
    bad = {n: sorted(m for m in deps if m.startswith(STAGE_LAYER))
           for n, deps in graph().items() if n.split(".")[1] in LIBRARY}
    assert not {n: v for n, v in bad.items() if v}


def test_library_functions_take_typed_options_not_the_whole_config():
    """A parameter named ``cfg`` typed DictConfig is the whole config; sections (``tile_cfg``) are fine."""
    offenders = []
    for name, path in modules().items():
        if name.split(".")[1:2] and name.split(".")[1] in LIBRARY:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for a in node.args.args + node.args.kwonlyargs:
                        ann = ast.unparse(a.annotation) if a.annotation is not None else ""
                        if a.arg == "cfg" and "DictConfig" in ann and (name, node.name) not in TAKES_WHOLE_CONFIG:
                            offenders.append(f"{name}.{node.name}")
    assert offenders == []
