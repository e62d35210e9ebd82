"""The import graph of ``src/bloomwire``: layers import downward, no cycles, no imports in functions.

The layers (docs/architecture.md): contract -> runtime, store, access -> services -> app. Finer,
as the code is: each unit below has a rank and may import only units of a lower rank (and itself):

====  =======================================================================================
rank  unit
====  =======================================================================================
0     ``bloomwire.errors`` (the exception root)
1     ``bloomwire`` (the package itself: ``__version__``, the error root)
2     ``bloomwire.contract`` (topics, events, lifecycle, geometry)
3     ``bloomwire.runtime``, ``bloomwire.store`` (neither imports the other)
4     ``bloomwire.access`` (uses the runtime's MQTT connection and broker files)
5     ``bloomwire.services.<name>``, one unit per service (no service imports another)
6     ``bloomwire.app`` and ``bloomwire.__main__`` (CLI, demo, simulator, benches, clients)
====  =======================================================================================

Every import counts, also one inside a function (and those fail on their own), and so does a
module named in a string (``"bloomwire.services.persister"`` in the supervisor's service table,
``"bloomwire.app.bench.commands"`` in the CLI's lazy commands): those are imported by
``importlib``, which only the CLI may call.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "bloomwire"
#: Alembic's revision scripts are loaded by Alembic, not imported by the code (its env.py is checked).
SKIP = ("versions",)

RANKS: dict[str, int] = {
    "errors": 0,
    "bloomwire": 1,
    "contract": 2,
    "runtime": 3,
    "store": 3,
    "access": 4,
    "services": 5,
    "app": 6,
}
#: Modules that may call ``importlib.import_module``: the CLI loads one service by name and its
#: command groups on first use (a service process imports only its own service).
DYNAMIC_IMPORTERS = frozenset({"bloomwire.app.cli"})
_MODULE_NAME = re.compile(r"bloomwire(\.[a-z_][a-z0-9_]*)+")


@dataclass
class Module:
    """One module of the package: where it is, what it imports and from where."""

    name: str
    path: Path
    is_package: bool
    imports: dict[str, int] = field(default_factory=dict)  # imported module -> first line
    function_level: list[tuple[int, str]] = field(default_factory=list)
    dynamic_calls: list[int] = field(default_factory=list)


def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if any(p in SKIP for p in parts):
            continue
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = Module(".".join(parts), path, is_package)
    return found


MODULES = _modules()


def _resolve(module: Module, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The bloomwire modules an import statement loads (``from pkg import sub`` -> ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.name.split(".")
            if not module.is_package:
                base.pop()
            base = base[: len(base) - node.level + 1]
            prefix = ".".join([*base, *([node.module] if node.module else [])])
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]
    yield from (n for n in names if n.split(".")[0] == "bloomwire")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: Module) -> None:
        self.module = module
        self.depth = 0

    def generic_visit(self, node: ast.AST) -> None:
        nested = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        self.depth += nested
        if isinstance(node, ast.Import | ast.ImportFrom):
            self._import(node)
        super().generic_visit(node)
        self.depth -= nested

    def _import(self, node: ast.Import | ast.ImportFrom) -> None:
        if self.depth:
            self.module.function_level.append((node.lineno, ast.unparse(node)))
        for target in _resolve(self.module, node):
            self.module.imports.setdefault(target, node.lineno)

    def visit_Constant(self, node: ast.Constant) -> None:
        """A string naming a module counts as importing it; one naming the module's own package
        (a logger's name) does not."""
        if isinstance(node.value, str):
            name = node.value.split(":")[0]
            own_package = self.module.name.startswith(f"{name}.")
            if _MODULE_NAME.fullmatch(name) and name in MODULES and not own_package:
                self.module.imports.setdefault(name, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        callee = ast.unparse(node.func)
        if callee in {"importlib.import_module", "import_module", "__import__"}:
            self.module.dynamic_calls.append(node.lineno)
        self.generic_visit(node)


for _module in MODULES.values():
    _Collector(_module).visit(ast.parse(_module.path.read_text(encoding="utf-8"), str(_module.path)))


def unit(name: str) -> str:
    """``bloomwire.services.persister.projector`` -> ``services.persister``; ``bloomwire`` -> itself."""
    parts = name.split(".")
    if len(parts) == 1:
        return "bloomwire"
    if parts[1] == "__main__":
        return "app"
    if parts[1] == "services" and len(parts) > 2:
        return f"services.{parts[2]}"
    return parts[1]


def rank(name: str) -> int:
    return RANKS[unit(name).split(".")[0]]


def _where(module: Module, line: int) -> str:
    return f"{module.path.relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer() -> None:
    unknown = sorted({unit(m) for m in MODULES if unit(m).split(".")[0] not in RANKS})
    assert not unknown, f"give these a rank in RANKS (and docs/architecture.md): {unknown}"
    assert len(MODULES) > 50, "the walk found too few modules: is SRC right?"


def test_imports_go_down_the_layers() -> None:
    upward = [
        f"{_where(module, line)}: {module.name} (rank {rank(module.name)}) imports {target} "
        f"(rank {rank(target)})"
        for module in MODULES.values()
        for target, line in module.imports.items()
        if unit(target) != unit(module.name) and rank(target) >= rank(module.name)
    ]
    assert not upward, "imports that do not go down the layers:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = {m.name: [t for t in m.imports if t in MODULES and t != m.name] for m in MODULES.values()}
    cycles = _strongly_connected(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in cycles)


def test_no_function_level_imports() -> None:
    found = [
        f"{_where(module, line)}: {text}"
        for module in MODULES.values()
        for line, text in module.function_level
        if not _optional(module, text)
    ]
    assert not found, "imports inside functions (move them to the top of the module):\n" + "\n".join(found)


def test_dynamic_imports_only_in_the_cli() -> None:
    found = [
        _where(module, line)
        for module in MODULES.values()
        if module.name not in DYNAMIC_IMPORTERS
        for line in module.dynamic_calls
    ]
    assert not found, f"importlib.import_module outside {sorted(DYNAMIC_IMPORTERS)}: {found}"


def test_the_wheel_holds_only_bloomwire() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    find = config["packages"]["find"]
    assert find["where"] == ["src"]
    assert find["include"] == ["bloomwire*"], "package discovery must not pick up other top-level names"
    assert set(config.get("package-data", {})) <= {"bloomwire"}
    tops = sorted(p.name for p in SRC.iterdir() if p.is_dir() and not p.name.endswith(".egg-info"))
    assert tops in (["bloomwire"], ["__pycache__", "bloomwire"]), f"top-level packages in src/: {tops}"


#: What the CLI module must not import by itself: each service process (``bloomwire service run
#: NAME``) loads the CLI, then its own service only (``LazyGroup``, ``ALL_SERVICES``).
_NOT_IN_THE_CLI = ("bloomwire.services", "bloomwire.app.bench", "bloomwire.app.clients", "bloomwire.store")
_HEAVY = ("scipy", "numpy", "starlette", "uvicorn", "sqlalchemy", "alembic", "playwright")


def test_the_cli_module_leaves_services_benches_and_clients_unloaded() -> None:
    probe = "import sys, json, bloomwire.app.cli; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    unwanted = [m for m in loaded if m.startswith(_NOT_IN_THE_CLI) or m.split(".")[0] in _HEAVY]
    assert not unwanted, f"importing bloomwire.app.cli loaded: {unwanted}"


def test_the_lazy_commands_are_listed_and_load() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bloomwire", "--help"], capture_output=True, text=True, check=True, timeout=60
    )
    listed = set(re.findall(r"^[│|]\s+([a-z][a-z-]*)\s", out.stdout, re.MULTILINE))
    lazy = {"db", "history", "bench", "rider", "shop", "track", "simulate", "demo"}
    assert lazy <= listed, f"missing from --help: {sorted(lazy - listed)}"


#: Third-party packages only a dev extra installs, imported where they are used (``bloomwire bench
#: web`` drives Chromium with Playwright; nothing else needs it installed).
OPTIONAL = {"bloomwire.app.bench.web": ("playwright",)}


def _optional(module: Module, text: str) -> bool:
    return any(re.match(rf"(from|import) {p}\b", text) for p in OPTIONAL.get(module.name, ()))


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root, targets in graph.items():
        if root in index:
            continue
        work = [(root, iter(targets))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(component)
    return cycles


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": ["b"], "b": ["c"], "c": []}, []),
        ({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, list[str]], expected: list[list[str]]) -> None:
    assert [sorted(c) for c in _strongly_connected(graph)] == expected
