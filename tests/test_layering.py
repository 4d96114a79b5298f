"""Static layering rules of the ``pix2cap`` package, checked with ``ast`` (nothing is imported).

* No import cycle among pix2cap modules, except ``pix2cap.config.config`` <->
  ``pix2cap.config.defaults`` (the defaults are built with the config's node class, and
  ``get_cfg`` hands them out). Every import counts, function-local ones included: an import
  moved into a function to dodge a cycle still ties the two modules together.
* ``pix2cap.utils`` is the bottom layer: it never imports ``pix2cap.data``,
  ``pix2cap.modeling``, ``pix2cap.bridge`` or ``pix2cap.evaluation``.
* No file in ``pix2cap/bridge/`` is longer than 500 lines.
* Every function-local import of a pix2cap module says why it is local, in a comment on the
  import or on the line right above it (tool directives such as ``# noqa`` are no reason).

Each test lists every violation as ``path:line``.
"""

from __future__ import annotations

import ast
import collections
import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pix2cap"
PACKAGE_DIR = REPO / PACKAGE

ALLOWED_CYCLES = [frozenset({"pix2cap.config.config", "pix2cap.config.defaults"})]
UTILS_FORBIDDEN = ("pix2cap.data", "pix2cap.modeling", "pix2cap.bridge", "pix2cap.evaluation")
BRIDGE_MAX_LINES = 500

# Comment directives for tools; what is left of a comment once they are removed is its reason.
_DIRECTIVES = re.compile(
    r"noqa(:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*)?"
    r"|type:\s*ignore(\[[^\]]*\])?"
    r"|pragma:\s*no\s*cover"
    r"|(pylint|mypy|pyright|ruff|isort|fmt)\s*:\s*[\w=,\- ]*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Import:
    """One import statement's dependency of ``source`` on the pix2cap module ``target``."""

    source: str
    target: str
    path: str  # relative to the repository root
    line: int
    end_line: int
    local: bool  # inside a function body
    via: str = ""  # for a package whose __init__ runs first: the module the statement names

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


# ---------------------------------------------------------------------------------------------
# Collecting modules and imports
# ---------------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _existing(name: str) -> Optional[str]:
    """``name`` if it is a pix2cap module, else its nearest pix2cap ancestor; None outside."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _ancestors(name: str) -> Set[str]:
    """The packages enclosing module ``name`` (``pix2cap.a.b`` -> ``pix2cap``, ``pix2cap.a``)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _parents(tree: ast.AST) -> Dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _in_function(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return True
    return False


def _targets(module: str, node: ast.AST) -> List[str]:
    """The pix2cap modules one ``import`` / ``from ... import`` statement imports."""
    found: List[str] = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                found.append(_existing(alias.name))
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            package = module if _is_package(module) else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        if base != PACKAGE and not base.startswith(PACKAGE + "."):
            return []
        for alias in node.names:
            # ``from pkg import name``: the submodule when ``name`` is one, else pkg itself.
            submodule = f"{base}.{alias.name}"
            found.append(submodule if submodule in MODULES else _existing(base))
    return [t for t in dict.fromkeys(found) if t is not None]


def _collect() -> Tuple[List[Import], Dict[str, List[str]]]:
    """Every import of a pix2cap module, and each file's lines."""
    imports: List[Import] = []
    lines: Dict[str, List[str]] = {}
    for module, path in MODULES.items():
        rel = str(path.relative_to(REPO))
        text = path.read_text(encoding="utf-8")
        lines[rel] = text.splitlines()
        tree = ast.parse(text, filename=rel)
        parents = _parents(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            local = _in_function(node, parents)
            importing = _ancestors(module) | ({module} if _is_package(module) else set())
            end = node.end_lineno or node.lineno
            for target in _targets(module, node):
                imports.append(Import(module, target, rel, node.lineno, end, local))
                # Importing a.b.c first runs a/b/__init__.py unless the importer is inside a.b
                # (then that package is already being imported): a dependency as well.
                for package in _ancestors(target) - importing:
                    imports.append(Import(module, package, rel, node.lineno, end, local, target))
    imports.sort(key=lambda i: (i.path, i.line, i.target))
    return imports, lines


IMPORTS, LINES = _collect()


# ---------------------------------------------------------------------------------------------
# Cycles
# ---------------------------------------------------------------------------------------------
def _strongly_connected(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """Tarjan's algorithm, iterative (deep import chains would exceed the recursion limit)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components: List[Set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _shortest_path(graph: Dict[str, Set[str]], start: str, goal: str, within: Set[str]):
    """Shortest module path start -> ... -> goal inside ``within`` (BFS), or None."""
    previous: Dict[str, Optional[str]] = {start: None}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = []
            while node is not None:
                path.append(node)
                node = previous[node]
            return path[::-1]
        for child in sorted(graph[node] & within):
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return None


def find_cycles(imports: List[Import]) -> List[str]:
    """One readable chain per import edge that lies on a forbidden cycle (deduplicated)."""
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    first_import: Dict[Tuple[str, str], Import] = {}
    for imp in imports:
        graph[imp.source].add(imp.target)
        first_import.setdefault((imp.source, imp.target), imp)

    def chain(cycle: List[str]) -> str:
        steps = [cycle[0]]
        for source, target in zip(cycle, cycle[1:]):
            imp = first_import[(source, target)]
            kind = ", function-local" if imp.local else ""
            if imp.via:
                kind += f", package of {imp.via}"
            steps.append(f"  -> {target}  ({imp.where}{kind})")
        return "\n".join(steps)

    reports: Dict[Tuple[str, ...], str] = {}
    for component in _strongly_connected(graph):
        self_loops = [m for m in component if m in graph[m]]
        if len(component) == 1 and not self_loops:
            continue
        for source in sorted(component):
            for target in sorted(graph[source] & component):
                back = _shortest_path(graph, target, source, component)
                cycle = [source] + back if target != source else [source, source]
                if frozenset(cycle) in ALLOWED_CYCLES:
                    continue
                # Rotate so each cycle is reported once, from its smallest module.
                ring = cycle[:-1]
                k = ring.index(min(ring))
                key = tuple(ring[k:] + ring[:k])
                reports.setdefault(key, chain(list(key) + [key[0]]))
    return [reports[k] for k in sorted(reports)]


# ---------------------------------------------------------------------------------------------
# Local-import reasons
# ---------------------------------------------------------------------------------------------
def _comments(path: str) -> Dict[int, Tuple[str, bool]]:
    """line -> (comment text without '#', whether the line holds nothing but the comment)."""
    text = "\n".join(LINES[path]) + "\n"
    found: Dict[int, Tuple[str, bool]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            alone = not LINES[path][row - 1][: tok.start[1]].strip()
            found[row] = (tok.string.lstrip("#").strip(), alone)
    return found


def _is_reason(comment: str) -> bool:
    """True when a comment says something beyond tool directives."""
    rest = _DIRECTIVES.sub(" ", comment)
    return re.search(r"[A-Za-z]{2,}", rest) is not None


def missing_reasons(imports: List[Import]) -> List[str]:
    """``path:line`` of every function-local pix2cap import without a one-line reason."""
    comments_of: Dict[str, Dict[int, Tuple[str, bool]]] = {}
    found = []
    seen = set()
    for imp in imports:
        if not imp.local or (imp.path, imp.line) in seen:
            continue
        seen.add((imp.path, imp.line))
        comments = comments_of.setdefault(imp.path, _comments(imp.path))
        on_import = [comments[r][0] for r in range(imp.line, imp.end_line + 1) if r in comments]
        above = comments.get(imp.line - 1)
        candidates = on_import + ([above[0]] if above and above[1] else [])
        if not any(_is_reason(c) for c in candidates):
            code = LINES[imp.path][imp.line - 1].strip()
            found.append(f"{imp.where}: function-local import without a reason: {code}")
    return found


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def _fail(title: str, violations: List[str]) -> None:
    if violations:
        pytest.fail(f"{title} ({len(violations)}):\n" + "\n".join(violations), pytrace=False)


def test_no_import_cycles():
    _fail("import cycles among pix2cap modules", find_cycles(IMPORTS))


def test_utils_import_nothing_above_them():
    violations = [
        f"{imp.where}: {imp.source} imports {imp.target}"
        for imp in IMPORTS
        if imp.source.startswith("pix2cap.utils")
        and any(imp.target == p or imp.target.startswith(p + ".") for p in UTILS_FORBIDDEN)
    ]
    _fail("pix2cap.utils importing higher layers", violations)


def test_bridge_files_are_short():
    violations = [
        f"{path}:{BRIDGE_MAX_LINES + 1}: {len(lines)} lines (at most {BRIDGE_MAX_LINES})"
        for path, lines in sorted(LINES.items())
        if path.startswith(f"{PACKAGE}/bridge/") and len(lines) > BRIDGE_MAX_LINES
    ]
    _fail("files in pix2cap/bridge over the line limit", violations)


def test_local_imports_say_why():
    _fail("function-local pix2cap imports without a reason", missing_reasons(IMPORTS))


# ---------------------------------------------------------------------------------------------
# The checker itself, on made-up code
# ---------------------------------------------------------------------------------------------
def test_import_resolution():
    meta_arch = "pix2cap.modeling.meta_arch.pix2cap"
    assert _targets(meta_arch, _stmt("from ..caption_head import decode")) == [
        "pix2cap.modeling.caption_head"
    ]
    assert _targets("pix2cap.modeling", _stmt("from . import meta_arch")) == [
        "pix2cap.modeling.meta_arch"
    ]
    assert _targets("pix2cap.config.config", _stmt("from .defaults import _C")) == [
        "pix2cap.config.defaults"
    ]
    assert _targets("pix2cap.engine.defaults", _stmt("import pix2cap.data.catalog as c")) == [
        "pix2cap.data.catalog"
    ]
    assert _targets("pix2cap.engine.defaults", _stmt("from pix2cap import data, config")) == [
        "pix2cap.data",
        "pix2cap.config",
    ]
    assert _targets("pix2cap.engine.defaults", _stmt("import torch, os.path")) == []


def test_checks_catch_made_up_violations():
    a = Import("pix2cap.a", "pix2cap.b", "pix2cap/a.py", 3, 3, False)
    b = Import("pix2cap.b", "pix2cap.a", "pix2cap/b.py", 7, 7, True)
    ok = Import("pix2cap.config.defaults", "pix2cap.config.config", "d.py", 1, 1, False)
    saved = dict(MODULES)
    MODULES.update({"pix2cap.a": Path("a.py"), "pix2cap.b": Path("b.py")})
    try:
        cycles = find_cycles([a, b, ok])
    finally:
        MODULES.clear()
        MODULES.update(saved)
    assert cycles == [
        "pix2cap.a\n"
        "  -> pix2cap.b  (pix2cap/a.py:3)\n"
        "  -> pix2cap.a  (pix2cap/b.py:7, function-local)"
    ]
    assert not any(_is_reason(c) for c in ("noqa: F401", "noqa", "type: ignore", "fmt: off"))
    assert _is_reason("noqa: F401  (registers the datasets)")
    assert _is_reason("avoids a cycle: data imports modeling")


def _stmt(code: str) -> ast.stmt:
    return ast.parse(code).body[0]
