"""The shape of the code, checked from its own source (no import is executed): data flows one way through
layered packages, no import cycle, no store or encoder probed for what it has, no long function without a
stated reason, no presentation in the library. Each failure names the file and line to change."""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"  # beside a def (same line or the line above): why this function stays long

# Lower layers never import higher ones (catalog -> model -> export -> encoder -> store -> query).
# A module's layer is that of the longest prefix listed.
LAYERS: list[list[str]] = [
    ["fgplugin.errors", "fgplugin.redact", "fgplugin.progress", "fgplugin.similarity", "fgplugin.codecs"],
    ["fgplugin.schema", "fgplugin.images", "fgplugin.preprocess", "fgplugin.devices", "fgplugin.encoding",
     "fgplugin.card"],
    ["fgplugin.catalog", "fgplugin.importers", "fgplugin.splits", "fgplugin.synth", "fgplugin.dataset",
     "fgplugin.serve_api"],
    ["fgplugin.models"],
    ["fgplugin.evaluation", "fgplugin.attention_viz"],
    ["fgplugin.training"],
    ["fgplugin.export", "fgplugin.loading"],
    ["fgplugin.search"],
    ["fgplugin.encoder"],
    ["fgplugin.opensearch"],
    ["fgplugin.stores", "fgplugin.indexer", "fgplugin.query"],
    ["fgplugin.serve", "fgplugin.web"],
    ["fgplugin"],  # the package itself (version, a few names): matched exactly, not as a prefix
    ["fgplugin_cli"],
]
# Modules a store, encoder or model argument goes by: getattr/hasattr on these is probing a contract.
CONTRACT_NAMES = {"store", "st", "encoder", "enc", "model"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported fgplugin module
    line: int
    local: bool  # inside a function
    commented: bool  # a comment on the line or the two lines above says why


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in (("fgplugin", "fgplugin"), ("cli", "fgplugin_cli")):
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not MODULES[module].name == "__init__.py":
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = _resolve(module, node)
    out = []
    for a in node.names:
        target = f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
        if target in MODULES and target not in out:
            out.append(target)
    return out


def _commented(lines: list[str], lineno: int) -> bool:
    window = lines[max(0, lineno - 3): lineno]
    return any("#" in line for line in window)


def _walk(tree: ast.AST):
    """(node, inside a function) for every node, except what only a type checker reads."""
    stack = [(tree, False)]
    while stack:
        node, in_fn = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            yield child, in_fn
            stack.append((child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))))


@functools.cache
def _parse(module: str) -> tuple[ast.AST, list[str]]:
    text = MODULES[module].read_text(encoding="utf-8")
    return ast.parse(text), text.splitlines()


def _every_node(prefix: str = ""):
    """(module, node, source lines) for every AST node of the modules whose name starts with ``prefix``."""
    for module in MODULES:
        if module.startswith(prefix):
            tree, lines = _parse(module)
            for node in ast.walk(tree):
                yield module, node, lines


def _imports() -> list[Import]:
    out = []
    for module in MODULES:
        tree, lines = _parse(module)
        for node, in_fn in _walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, node):
                    if target != module:
                        out.append(Import(module, target, node.lineno, in_fn, _commented(lines, node.lineno)))
    return out


IMPORTS = _imports()


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(REPO)}:{line}"


def _layer(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (module.startswith(p + ".") and p != "fgplugin")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS"
    return layer


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_even_through_function_local_imports():
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        # importing a.b.c runs a/__init__ and a/b/__init__ too: a package importing its own module is fine
        if not imp.source.startswith(imp.target + "."):
            edges.setdefault(imp.source, set()).add(imp.target)
    cycles = _cycles(edges)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_data_flows_one_way_through_the_layers():
    upward = [f"{_where(i.source, i.line)}: {i.source} (layer {_layer(i.source)}) imports {i.target} "
              f"(layer {_layer(i.target)})" for i in IMPORTS
              if _layer(i.target) > _layer(i.source) and not i.source.startswith(i.target + ".")]
    assert not upward, "\n" + "\n".join(upward)


def test_function_local_imports_in_the_library_say_why():
    """A local import is for an optional dependency (torch for a query client) or start-up time, stated
    beside it; never to dodge a cycle (the cycle test above counts local imports too)."""
    silent = [f"{_where(i.source, i.line)}: {i.source} imports {i.target} inside a function without a comment"
              for i in IMPORTS if i.local and not i.commented and i.source.startswith("fgplugin.")]
    assert not silent, "\n" + "\n".join(silent)


def test_no_function_over_80_lines_without_a_stated_reason():
    long = []
    for module, node, lines in _every_node():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - first + 1
            marked = any(LONG_MARK in lines[k - 1] for k in (first - 1, node.lineno) if k >= 1)
            if n > MAX_FUNCTION_LINES and not marked:
                long.append(f"{_where(module, node.lineno)}: {node.name} is {n} lines")
    assert not long, "\n" + "\n".join(long)


def test_stores_encoders_and_models_are_used_through_their_contracts_not_probed():
    probes = []
    for module, node, _ in _every_node():
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and node.args):
            subject = node.args[0]
            name = subject.attr if isinstance(subject, ast.Attribute) else getattr(subject, "id", "")
            if name in CONTRACT_NAMES:
                probes.append(f"{_where(module, node.lineno)}: {ast.unparse(node)}")
    assert not probes, "\n" + "\n".join(probes)


@pytest.mark.parametrize("library", ["rich", "typer"])
def test_the_library_does_not_present(library):
    """Tables, progress bars and console output belong to cli/; the library returns data."""
    users = []
    for module, node, _ in _every_node("fgplugin."):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n == library or n.startswith(library + ".") for n in names):
            users.append(f"{_where(module, node.lineno)}")
    assert not users, "\n" + "\n".join(users)


def test_private_names_stay_in_their_module():
    """A helper another module needs is public in its home (one rule, one home)."""
    borrowed = []
    for module, node, _ in _every_node():
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fgplugin")):
            borrowed += [f"{_where(module, node.lineno)}: {a.name} from {_resolve(module, node)}"
                         for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not borrowed, "\n" + "\n".join(borrowed)


def test_the_checks_above_can_fail():
    """The detectors themselves: a cycle, an upward import and a probe are found in small examples."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("fgplugin.search.embedded") < _layer("fgplugin.opensearch.store") < _layer("fgplugin_cli.query")
    assert _layer("fgplugin.models.base") < _layer("fgplugin.training.trainer")
