"""The project's import graph: no cycles, and the data plane never imports the control plane.

Static: every module of runner/, testbed/ and analysis/ is parsed with ast (nothing is
imported), and each ``import`` / ``from ... import`` of a project module is an edge, wherever
it stands (a function-level import is still a dependency). Imports under
``if TYPE_CHECKING:`` are left out: they never execute, they only name types.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runner", "testbed", "analysis")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):  # type: ignore[no-untyped-def]
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``
    when that is a module, else as ``pkg``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import runner.x.y` depends on runner.x.y
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {n: imports_of(n, p, modules) for n, p in modules.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)) is not None:
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)) is not None:
            return found
    return None


def test_the_checker_sees_a_cycle_and_type_only_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    modules = {"runner": ROOT, "runner.server": ROOT, "runner.hooks": ROOT}
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from runner import server\n"
           "def f():\n    from runner import hooks\n")
    tmp = ROOT / "tests" / "_imports_probe.py"
    try:
        tmp.write_text(src)
        assert imports_of("runner.probe", tmp, modules) == {"runner.hooks"}
    finally:
        tmp.unlink()


def test_every_package_is_parsed() -> None:
    g = graph()
    for pkg in PACKAGES:
        assert sum(n.startswith(pkg + ".") for n in g) >= 5, pkg
    assert "runner.methods.registry" in g["runner.config"]
    assert "runner.trainer" in g["runner.methods.hetero"]
    assert "runner.methods.hetero" in g["runner.methods.hsplitlora"]
    assert "testbed.backends.local" in g["testbed.commands.runtime"]
    assert "testbed.commands.runtime" in g["testbed.cli"]
    assert "testbed.experiment.cell" in g["testbed.experiment.run"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("lower,upper", [("runner", "testbed"), ("runner", "analysis"),
                                         ("analysis", "testbed")])
def test_layers(lower: str, upper: str) -> None:
    """runner/ runs inside the containers without testbed/; analysis/ reads run directories
    without the control plane."""
    bad = sorted((n, m) for n, deps in graph().items() if n.split(".")[0] == lower
                 for m in deps if m.split(".")[0] == upper)
    assert not bad, f"{lower}/ imports {upper}/: {bad}"


def test_commands_sit_on_top_of_testbed() -> None:
    """testbed/commands/ (and cli.py, which registers them) are what the other parts of
    testbed/ serve: no backend, experiment or shared module imports a command module."""
    g = graph()
    top = {n for n in g if n == "testbed.cli" or n.startswith("testbed.commands")}
    bad = sorted((n, m) for n, deps in g.items() if n.startswith("testbed") and n not in top
                 for m in deps & top)
    assert not bad, f"imports of testbed's command layer: {bad}"


# What an engine may import of runner/methods/: the registry and the plug-in interface, and
# the building blocks every method shares (FedAvg and the other rules' maths, the memory
# model). Everything else there is a method's own code.
ENGINE_MAY_USE = {"runner.methods", "runner.methods.registry", "runner.methods.hooks",
                  "runner.methods.plugins", "runner.methods.aggregation", "runner.methods.memory"}


def test_engines_never_import_a_method() -> None:
    """The engines reach methods through the registry's plug-in paths only."""
    g = graph()
    methods = {n for n in g if n.startswith("runner.methods.")} - ENGINE_MAY_USE
    assert "runner.methods.hsplitlora" in methods and "runner.methods.hetlora_server" in methods
    for engine in ("runner.trainer", "runner.server", "runner.client"):
        assert not (g[engine] & methods), (engine, g[engine] & methods)
