"""The package's layout: imports flow one way, the CLI sits on top, every top-level module says what it owns.

The import graph is read from the source with `ast`, without importing anything, so it costs milliseconds. Its
nodes are the modules under `src/attnlab` (a package counts as its `__init__.py`: `attnlab.mixers` is
`mixers/__init__.py`). Every `import` and `from ... import` statement counts, at module level or inside a
function, except those under `if TYPE_CHECKING:`, which never run. An edge goes to the module named:
`import attnlab.a.b` and `from .a.b import name` depend on `attnlab.a.b` only, not on the packages
above it; `from . import x` and `from .a import x` depend on the submodule `attnlab.x` / `attnlab.a.x` when
it is one, and on the package otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "attnlab"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / PACKAGE
CLI = f"{PACKAGE}.cli"
CLI_IMPORTERS = {f"{PACKAGE}.__main__"}


def module_name(path: Path) -> str:
    """The dotted name of the module in `path`; a package's `__init__.py` is the package itself."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def is_type_checking_block(node: ast.AST) -> bool:
    """Whether `node` is `if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_statements(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """All import statements in `tree`, at any depth, except the bodies of `if TYPE_CHECKING:`."""
    found = []
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if is_type_checking_block(node):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that the module `name` (source at `path`) imports, by the rule in the docstring."""
    is_package = path.name == "__init__.py"
    targets = set()
    for statement in import_statements(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(statement, ast.Import):
            targets.update(alias.name for alias in statement.names)
            continue
        if statement.level:
            # `from .x import y` in attnlab.a.b is relative to attnlab.a; in the package attnlab.a, to itself.
            anchor = name.split(".")
            if not is_package:
                anchor.pop()
            anchor = anchor[: len(anchor) - (statement.level - 1)]
            base = ".".join(anchor + ([statement.module] if statement.module else []))
        else:
            base = statement.module
        for alias in statement.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    """Module name → the package's modules it imports."""
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `[a, b, ..., a]`, or None when the graph is acyclic (depth-first search)."""
    finished: set[str] = set()
    for start in sorted(graph):
        if start in finished:
            continue
        path = [start]
        on_path = {start}
        branches = [iter(sorted(graph[start]))]
        while branches:
            successor = next(branches[-1], None)
            if successor is None:
                finished.add(path[-1])
                on_path.discard(path.pop())
                branches.pop()
            elif successor in on_path:
                return path[path.index(successor) :] + [successor]
            elif successor not in finished:
                path.append(successor)
                on_path.add(successor)
                branches.append(iter(sorted(graph[successor])))
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, found one at a time: each found cycle's closing edge is removed before looking again,
    so every cycle in the list is real and the list is empty only when the graph is acyclic."""
    graph = {name: set(targets) for name, targets in graph.items()}
    cycles = []
    while (cycle := find_cycle(graph)) is not None:
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def test_graph_sees_relative_and_lazy_imports():
    """The reader itself: a module that the CLI imports inside a function is in the graph."""
    graph = import_graph()
    assert f"{PACKAGE}.train" in graph[CLI]
    assert f"{PACKAGE}.presets" in graph[CLI]
    assert f"{PACKAGE}.mixers" in graph[f"{PACKAGE}.model"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycles = all_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_only_main_imports_the_cli():
    importers = {name for name, targets in import_graph().items() if CLI in targets}
    assert importers <= CLI_IMPORTERS, f"{CLI} is imported by {sorted(importers - CLI_IMPORTERS)}"


def test_top_level_modules_have_docstrings():
    """Each module directly in the package, and each subpackage's `__init__.py`, says what it owns."""
    top_level = [*PACKAGE_DIR.glob("*.py"), *PACKAGE_DIR.glob("*/__init__.py")]
    missing = [
        str(path.relative_to(PACKAGE_DIR))
        for path in sorted(top_level)
        if not ast.get_docstring(ast.parse(path.read_text(), filename=str(path)))
    ]
    assert not missing, f"modules without a docstring: {missing}"


def test_code_and_docs_cite_only_what_the_repository_holds():
    """The method is docs/method.md; nothing points at the spec file outside the repository."""
    root = PACKAGE_DIR.parents[1]
    texts = [*PACKAGE_DIR.rglob("*.py"), *PACKAGE_DIR.rglob("*.yaml"), root / "README.md", *root.glob("docs/*.md")]
    dangling = [
        f"{path.relative_to(root)}:{number}"
        for path in texts
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if "spec §" in line or "shared/spec" in line
    ]
    assert (root / "docs" / "method.md").is_file() and dangling == []


def test_no_closed_list_of_mixer_names_outside_the_builtin_registration():
    """Mixers are known through the registry (`attnlab.mixers.registry`), not through lists of the seven names."""
    seven = ["standard", "mlp", "approximate", "nonapprox", "rndembqk", "fixedseqqk", "staticembqk"]
    closed = []
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = {element.value for element in node.elts if isinstance(element, ast.Constant)}
                if len(names & set(seven)) >= 3:
                    closed.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}")
    assert closed == []
