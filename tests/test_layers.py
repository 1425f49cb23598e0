"""The package's layers: imports point down only, nothing forms a cycle, and a function-local import
says why it is not at the top. Every import counts, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moespac_gguf"
# Bottom to top: a subpackage may import its own modules and those of the layers below it.
LAYERS = [["core"], ["llama"], ["residency", "decode"], ["gate", "sim", "demo"], ["api"], ["tools", "server"], ["cli"]]
# ... except these, below it too: the residency engine sees routing as arrays and slots through an interface
FORBIDDEN = {("residency", "llama")}
ROOT = "moespac_gguf"  # the package's __init__ and the deprecated generate shim: a facade over core and api


def rank_of(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str, bool, str]]:
    """(line, imported module or name, function-local, source line) of every import of `path`."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] if mod.count(".") < 2 else [mod]
        else:
            continue
        for t in targets:
            found.append((node.lineno, t, id(node) in local, lines[node.lineno - 1]))
    return found


def package_of(module: str) -> str | None:
    """The subpackage of a moespac_gguf module (ROOT for the package's own modules); None if not ours."""
    parts = module.split(".")
    if parts[0] != ROOT:
        return None
    if len(parts) == 1 or parts[1] in ("generate", "__version__", "MoeSpac", "MoespacError", "read_layout"):
        return ROOT
    return parts[1] if any(parts[1] in layer for layer in LAYERS) else ROOT


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer_violations(files: list[Path], root: Path = PACKAGE.parent) -> list[str]:
    bad = []
    for path in files:
        mine = package_of(module_name(path, root))
        for line, target, _, _ in imports(path, root):
            theirs = package_of(target)
            if theirs is None or theirs == mine:
                continue
            where = f"{path.relative_to(root)}:{line} imports {target}"
            if theirs == ROOT:
                bad.append(f"{where}: the package facade is for users, not for the layers")
            elif mine == ROOT:
                if theirs not in ("core", "api"):
                    bad.append(f"{where}: the facade re-exports core and api only")
            elif rank_of(theirs) >= rank_of(mine) or (mine, theirs) in FORBIDDEN:
                bad.append(f"{where}: {mine} may not import {theirs}")
    return bad


def test_imports_point_down_the_layers():
    assert layer_violations(modules()) == []


def test_an_upward_import_is_caught(tmp_path):
    """The check itself reports what it exists for (so that it cannot pass vacuously)."""
    probes = {
        "core/probe.py": (
            "def f():\n    from ..api import MoeSpac  # lazy: a deliberate violation\n    return MoeSpac\n",
            "core may not import api",
        ),
        "llama/probe.py": ("from ..decode.draft import SelfDraft\n", "llama may not import decode"),
        "residency/probe.py": ("from ..llama.tap import RoutingTap\n", "residency may not import llama"),
        "gate/probe.py": ("from moespac_gguf.sim.trace import RoutingTrace\n", "gate may not import sim"),
        "api/probe.py": ("from ..cli import main\n", "api may not import cli"),
        "sim/probe.py": ("from moespac_gguf import MoeSpac\n", "the package facade is for users"),
    }
    for rel, (source, message) in probes.items():
        path = tmp_path / "moespac_gguf" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        assert [v for v in layer_violations([path], tmp_path) if message in v], rel
    ok = tmp_path / "moespac_gguf" / "api" / "fine.py"
    ok.write_text("from ..gate.model import LookaheadGate\nfrom .options import ModelOptions\n")
    assert layer_violations([ok], tmp_path) == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    names = {module_name(p) for p in modules()}
    for path in modules():
        deps = set()
        for _, target, _, _ in imports(path):
            while target and target not in names:
                target = target.rpartition(".")[0]
            if target and target != module_name(path):
                deps.add(target)
        graph[module_name(path)] = deps
    # a package imports its own __init__ on the way to any of its modules: that edge is not a cycle
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                return stack + [node, dep]
            if dep not in state:
                cycle = visit(dep, stack + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            assert visit(node, []) is None


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_function_local_imports_say_why(path):
    """An import inside a function is there to keep something heavy out of start-up (libllama,
    matplotlib): each says so on its line (`# lazy: <reason>`)."""
    unexplained = [
        f"{line}: {text.strip()}" for line, _, local, text in imports(path) if local and "# lazy:" not in text
    ]
    assert unexplained == []


def test_generate_is_a_deprecated_reexport():
    """The README of the last release imported MoeSpac from moespac_gguf.generate: it still works, with a warning."""
    import importlib
    import sys

    sys.modules.pop("moespac_gguf.generate", None)
    with pytest.warns(DeprecationWarning, match="from moespac_gguf import MoeSpac"):
        generate = importlib.import_module("moespac_gguf.generate")
    from moespac_gguf import MoeSpac

    assert generate.MoeSpac is MoeSpac
