"""The package's shape (issue 17): module and class sizes, leaf modules, one-way imports, a cheap `import reporter`.

Read from the source with `ast`, so a failure names the file, the line and the rule it breaks.
"""
import ast
import functools
import json
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Set, Tuple

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reporter")
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250
# Leaves: they import nothing from the package, so anything may import them.
LEAVES = ("record", "transport", "checks", "tbformat")
# The AnyLearn client speaks over the wire; it never reads the journal.
CLIENT_NEVER_IMPORTS = ("journal", "reader")
# What `import reporter` must not load: the delivery side and the wire are loaded when delivery starts.
NOT_LOADED_BY_IMPORT = ("reporter.deliver", "reporter.lane", "reporter.client", "reporter.transport",
                        "reporter.reader", "reporter.cursor", "reporter.runlock", "urllib.request", "http.client")


@functools.lru_cache(maxsize=None)
def _modules() -> Tuple[Tuple[str, str], ...]:
    """(dotted name under reporter, path) of every module of the package."""
    return tuple(_walk())


def _walk() -> Iterator[Tuple[str, str]]:
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, PACKAGE_DIR)[:-3].replace(os.sep, ".")
            if rel.endswith("__init__"):
                rel = rel[: -len("__init__")].rstrip(".")
            yield rel, path


def _tree(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> List[str]:
    """The package modules an import names ('' is reporter itself), relative or absolute."""
    if node.level == 0:
        if not (node.module or "").startswith("reporter"):
            return []
        base = node.module[len("reporter"):].lstrip(".")
    else:
        parts = module.split(".") if module else []
        if not is_package:
            parts = parts[:-1]
        drop = node.level - 1
        if drop:
            parts = parts[:-drop] if drop <= len(parts) else []
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from . import x` / `from .pkg import sub`: a name may be a submodule, else it is a name of `base`.
    known = {m for m, _ in _modules()}
    submodules = [f"{base}.{a.name}".lstrip(".") for a in node.names]
    found = [m for m in submodules if m in known]
    return found + ([base] if len(found) < len(submodules) else [])


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(module: str, path: str) -> Tuple[Set[str], Set[str]]:
    """(top-level, lazy) package modules `module` imports; lazy = inside a function or under TYPE_CHECKING
    (never run)."""
    known = {m for m, _ in _modules()}
    is_package = path.endswith("__init__.py")
    top: Set[str] = set()
    lazy: Set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = (in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                     or _type_checking(child))
            targets: List[str] = []
            if isinstance(child, ast.ImportFrom):
                targets = _resolve(module, is_package, child)
            elif isinstance(child, ast.Import):
                targets = [a.name[len("reporter"):].lstrip(".") for a in child.names
                           if a.name == "reporter" or a.name.startswith("reporter.")]
            for target in targets:
                if target in known and target != module:
                    (lazy if in_function else top).add(target)
            visit(child, inner)

    visit(_tree(path), False)
    return top, lazy


def _graph() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]]]:
    top: Dict[str, Set[str]] = {}
    lazy: Dict[str, Set[str]] = {}
    for module, path in _modules():
        top[module], lazy[module] = _imports(module, path)
    return top, lazy


def test_no_module_is_over_500_lines_and_no_class_over_250():
    too_big = []
    for module, path in _modules():
        tree = _tree(path)
        with open(path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{os.path.relpath(path, PACKAGE_DIR)}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{os.path.relpath(path, PACKAGE_DIR)}:{node.lineno}: class {node.name} "
                                   f"is {size} lines (at most {MAX_CLASS_LINES})")
    assert not too_big, "\n".join(too_big)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_from_the_package(leaf):
    top, lazy = _graph()
    assert leaf in top, f"reporter/{leaf}.py is gone: update LEAVES"
    assert not (top[leaf] | lazy[leaf]), f"reporter/{leaf}.py imports {sorted(top[leaf] | lazy[leaf])}"


def test_the_client_never_imports_the_journal_or_its_reader():
    top, lazy = _graph()
    assert not (top["client"] | lazy["client"]) & set(CLIENT_NEVER_IMPORTS), sorted(top["client"] | lazy["client"])


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_imports_go_one_way_with_no_cycle():
    top, lazy = _graph()
    cycles = _cycles(top)
    assert not cycles, f"import cycles among reporter's modules (top-level imports): {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_imports_are_listed_and_none_repeats_a_top_level_one():
    """Imports inside functions (and under TYPE_CHECKING) are left out of the cycle rule: they are how
    `import reporter` stays cheap and how a host loads what only one command needs. They are listed here (pytest -s shows them)."""
    top, lazy = _graph()
    for module in sorted(lazy):
        if lazy[module]:
            print(f"lazy: {module or 'reporter'} -> {', '.join(sorted(t or 'reporter' for t in lazy[module]))}")
    repeated = {m: sorted(lazy[m] & top[m]) for m in lazy if lazy[m] & top[m]}
    assert not repeated, f"imported both at the top and inside a function: {repeated}"


def test_import_reporter_loads_neither_the_delivery_side_nor_the_wire():
    code = ("import json, sys, reporter; "
            f"print(json.dumps([m for m in {list(NOT_LOADED_BY_IMPORT)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []
