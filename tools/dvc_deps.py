"""Which fbta source files each dvc.yaml stage runs, from the import graph — so no stage can go stale.

A stage's command ``fbta <command>`` runs ``fbta/cli.py`` and the stage module
``fbta/stages/<module>.py``; every ``fbta`` module either imports, at module level
or inside a function, runs with it. Its ``deps`` must cover all of them: a file
listed, or a folder above it. ``--write`` lists a library package's folder
(``fbta/mil``) when any of its modules runs, and top-level and stage modules as
files.

    .venv/bin/python tools/dvc_deps.py            # each stage: what it lacks, and the suggested code deps
    .venv/bin/python tools/dvc_deps.py --check    # exit 1 if a stage lacks one (tests/test_dvc.py runs this)
    .venv/bin/python tools/dvc_deps.py --write    # rewrite the fbta/ deps of every stage in dvc.yaml
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path = ROOT) -> Path | None:
    for p in (root / (name.replace(".", "/") + ".py"), root / name.replace(".", "/") / "__init__.py"):
        if p.is_file():
            return p
    return None


def imported(path: Path, name: str, root: Path = ROOT) -> set[str]:
    """fbta modules ``path`` (module ``name``) imports anywhere in its body, with their parent packages."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fbta"}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod.split(".")[0] != "fbta":
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names if module_file(f"{mod}.{a.name}", root)}
    return {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 2)}


def closure(start: str, root: Path = ROOT) -> set[Path]:
    """Source files of ``start`` and of every fbta module it reaches."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo += sorted(imported(path, name, root))
    return {module_file(m, root).relative_to(root) for m in seen}  # type: ignore[union-attr]


def stage_code(command: str, root: Path = ROOT) -> set[Path]:
    """What ``fbta <command>`` runs: the CLI and the stage module, with everything they import."""
    sys.path.insert(0, str(root))
    from fbta.cli import COMMANDS

    return closure("fbta.cli", root) | closure(f"fbta.stages.{COMMANDS[command][0]}", root)


def covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def suggest(files: set[Path]) -> list[str]:
    """The code deps to list: a library package's folder when any of its modules is used (so a module
    added to it later is covered too), top-level and stage modules as files."""
    out = set()
    for f in files:
        parts = f.parts
        out.add(str(Path(*parts[:2])) if len(parts) > 2 and parts[1] != "stages" else str(f))
    return sorted(out)


def rewrite(text: str, code: dict[str, list[str]]) -> str:
    """dvc.yaml with each stage's ``- fbta/...`` deps replaced by ``code[stage]`` (comments and order kept)."""
    lines, out, stage, in_deps, written = text.splitlines(keepends=True), [], None, False, False
    for line in lines:
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if indent == 2 and stripped.endswith(":") and not stripped.startswith("-"):
            stage, in_deps, written = stripped[:-1], False, False
        elif indent == 4:
            in_deps = stripped == "deps:"
        if in_deps and stage in code and stripped.startswith("- fbta/"):
            if not written:
                out += [f"{' ' * indent}- {d}\n" for d in code[stage]]
                written = True
            continue
        out.append(line)
    return "".join(out)


def stages(root: Path = ROOT) -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml stage → (fbta command, its deps), for stages whose cmd is ``fbta <command>``."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in spec.items():
        cmd = st["cmd"].split()
        if cmd[0] == "fbta":
            out[name] = (cmd[1], [str(d) for d in st.get("deps", [])])
    return out


def missing(root: Path = ROOT) -> dict[str, list[str]]:
    """Stage → fbta files it runs that its deps do not cover."""
    return {name: sorted(str(p) for p in stage_code(cmd, root) if not covered(p, deps))
            for name, (cmd, deps) in stages(root).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a stage's deps miss a file it runs")
    ap.add_argument("--write", action="store_true", help="replace each stage's fbta/ deps in dvc.yaml by the suggestion")
    args = ap.parse_args()
    if args.write:
        path = ROOT / "dvc.yaml"
        path.write_text(rewrite(path.read_text(), {n: suggest(stage_code(c)) for n, (c, _) in stages().items()}))
    lacking = missing()
    for name, (cmd, deps) in stages().items():
        if args.check and not lacking[name]:
            continue
        print(f"{name}: lacks {lacking[name] or 'nothing'}")
        if not args.check:
            print("  code deps: " + ", ".join(suggest(stage_code(cmd))))
    return 1 if args.check and any(lacking.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
