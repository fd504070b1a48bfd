"""The house rules of ../shared/STYLE.md, read from the source: no import cycles (function-level imports included),
each package imports only what its layer may, nothing imports `workflows`, and no file outside tests/ is too long
to read top to bottom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hyformer", "features", "jobs", "workflows", "benchmarks")
# third-party imports each layer may use (the standard library is always allowed)
ALLOWED = {
    "hyformer": {"torch", "numpy"},
    "features": {"polars", "pyarrow", "numpy", "sqlglot"},  # sqlglot: checks a mapping's SQL before Polars parses it
}
MAX_LINES = 600


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def imports(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """Every module `path` imports, at any depth of the file (function bodies too); `from pkg import name` counts as
    importing pkg.name when that is a module of ours."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
    return found


def graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    mods = sources(root, packages)
    names = set(mods)
    return {m: {i for i in imports(p, names, root) if i in names and i != m} for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path) -> None:
    """The checker itself: a cycle closed only inside a function body is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x  # the cycle's closing edge, inside a function\n")
    (pkg / "c.py").write_text("import pkg.b\n")
    edges = graph(tmp_path, ("pkg",))
    assert edges["pkg.a"] == {"pkg", "pkg.b"} and edges["pkg.b"] == {"pkg.a"} and edges["pkg.c"] == {"pkg.b"}
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(graph(tmp_path, ("pkg",))) is None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    mods = sources()
    bad = []
    for name, path in mods.items():
        if name.split(".")[0] != layer:
            continue
        for imp in imports(path, set(mods)):
            top = imp.split(".")[0]
            if top == layer or top in sys.stdlib_module_names or top == "__future__" or top in ALLOWED[layer]:
                continue
            bad.append(f"{path.relative_to(ROOT)} imports {imp}")
    assert not bad, f"{layer}/ may import only {sorted(ALLOWED[layer])} and the standard library:\n" + "\n".join(bad)


def test_nothing_imports_workflows() -> None:
    edges = graph()
    bad = [
        f"{m} imports {i}"
        for m, deps in edges.items()
        for i in deps
        if i.startswith("workflows") and not m.startswith("workflows")
    ]
    bad += [
        f"{m} imports {i}"
        for m, deps in edges.items()
        if m.startswith("workflows")
        for i in deps
        if i.startswith("workflows")
    ]
    assert not bad, "workflows compose jobs; nothing imports a workflow:\n" + "\n".join(bad)


def test_no_file_outside_tests_is_over_600_lines() -> None:
    files = [p for pkg in (*PACKAGES, "infra") for p in (ROOT / pkg).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by concern): {long}"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command: list[str]) -> None:
    """ruff (a dev dependency, configured in pyproject.toml: lines <= 120 characters) finds nothing."""
    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), "ruff is missing: install the dev dependencies (bash infra/install.sh --dev)"
    proc = subprocess.run([str(ruff), *command, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
