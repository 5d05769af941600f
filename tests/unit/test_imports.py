"""What each module imports (issue 12): the pure modules stay pure, and every module imports on its own.

The import rules between packages are checked by ``lint-imports`` (pyproject.toml); these tests check
what it cannot see: which standard-library modules the pure code pulls in, and that no module works
only because another one was imported first.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import blockprov

# Pure code does no I/O (docs/architecture.md): bytes in, values and bytes out.
PURE = ["blockprov.nbd.protocol", "blockprov.nbd.handshake", "blockprov.nbd.events", "blockprov.cache.maps",
        "blockprov.align", "blockprov.codec", "blockprov.manifest", "blockprov.partitions"]
IMPURE = ("asyncio", "socket", "os")

# The pure modules that do not yet keep the rule, and the line that breaks it (reported, not fixed here).
KNOWN_IMPURE: dict[str, str] = {}  # module -> why it may not be pure yet (xfail, strict)

SRC = Path(blockprov.__file__).resolve().parents[1]  # the src/ these tests run against


def _fresh_env() -> dict[str, str]:
    """The environment of a fresh interpreter that finds the same blockprov as this one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, *, lazy: bool) -> list[tuple[str, int]]:
    """The modules ``module``'s source imports, with the line: those its import runs (not under
    ``if TYPE_CHECKING:``), and with ``lazy`` those inside functions too (they run when called)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text(), spec.origin)
    package = module if spec.submodule_search_locations is not None else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.orelse:
                visit(stmt)
            return
        if not lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.append((base, node.lineno))
            if base.split(".")[0] == "blockprov" and _is_package(base):
                # `from package import submodule` imports package.submodule
                found.extend((f"{base}.{a.name}", node.lineno) for a in node.names
                             if _is_module(f"{base}.{a.name}"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _impure_imports(module: str) -> list[str]:
    """Where ``module``, or a blockprov module it pulls in, imports one of IMPURE: ``path:line imports
    name``. A module named in an import statement is read whole, lazy imports in its functions
    included (the pure code may call them); a package __init__ loaded only because it is a parent
    is read for what its import runs."""
    seen: set[tuple[str, bool]] = set()
    todo = [(module, True)] + [(p, False) for p in _parents(module)]
    hits: set[str] = set()
    while todo:
        m, lazy = todo.pop()
        if (m, lazy) in seen:
            continue
        seen.add((m, lazy))
        spec = importlib.util.find_spec(m)
        assert spec is not None and spec.origin is not None
        for name, line in _imports(m, lazy=lazy):
            if name.split(".")[0] in IMPURE:
                hits.add(f"{Path(spec.origin).relative_to(SRC)}:{line} imports {name}")
            elif name.split(".")[0] == "blockprov" and _is_module(name):
                todo += [(name, True)] + [(p, False) for p in _parents(name)]
    return sorted(hits)


def _pure_params() -> list[object]:
    return [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KNOWN_IMPURE[m]))
            if m in KNOWN_IMPURE else m for m in PURE]


@pytest.mark.parametrize("module", _pure_params())
def test_pure_module_code_imports_no_asyncio_socket_or_os(module: str) -> None:
    """Our own code a pure module runs imports none of asyncio, socket, os.

    Read from the source (ast), not from sys.modules: every interpreter preloads ``os`` before any
    code of ours runs, so "``os`` is in sys.modules" proves nothing and a meta-path finder that
    refuses ``os`` is never asked. So we walk the module's import statements, lazy ones inside
    functions included, and transitively those of every blockprov module it imports and of the
    package __init__ files its import runs (see ``_impure_imports``). Third-party and
    standard-library modules are not walked: blake3, zstandard, threading use os themselves, which is
    not I/O done by our pure code. The next test covers them for asyncio and socket, which nothing
    preloads.
    """
    assert _impure_imports(module) == []


@pytest.mark.parametrize("module", PURE)
def test_pure_module_loads_no_asyncio_or_socket(module: str) -> None:
    """Imported alone in a fresh interpreter, a pure module (with everything it pulls in, third-party
    libraries included) leaves asyncio and socket unloaded. Checked only if the fresh interpreter had
    not loaded them already, so the test cannot pass for the wrong reason."""
    code = (
        "import sys\n"
        "before = [m for m in ('asyncio', 'socket') if m in sys.modules]\n"
        "assert not before, f'preloaded by the interpreter: {before}'\n"
        f"import {module}\n"
        "print(' '.join(m for m in sorted(sys.modules) if m.split('.')[0] in ('asyncio', 'socket')))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_fresh_env(),
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [], f"importing {module} loads {p.stdout.strip()}"


def _all_modules() -> list[str]:
    """Every module under src/blockprov, found from the files (nothing imported to list them).
    ``__main__`` modules are left out: importing one runs it."""
    names = []
    for path in sorted((SRC / "blockprov").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__":
            names.append(".".join(parts))
    return names


def test_every_module_imports_on_its_own(tmp_path: Path) -> None:
    """Each module imports alone in a fresh interpreter: no import cycle that only a lucky import
    order hides, no module leaning on a name another module loaded. One interpreter per module
    (a few seconds in all, two at a time), run from an empty directory."""
    modules = _all_modules()
    assert len(modules) > 50 and "blockprov.cli" in modules

    def alone(module: str) -> str | None:
        p = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                           env=_fresh_env(), cwd=tmp_path, timeout=120)
        if p.returncode == 0:
            return None
        return f"{module}:\n{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"

    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(alone, modules) if f is not None]
    assert failures == [], "modules that do not import on their own:\n" + "\n".join(failures)
