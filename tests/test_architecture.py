"""The import graph of the library and the service: no circles, and the library never imports the service.

Every import counts, function-level ones included: a circle hidden behind an import inside a function is
still a circle (it only moves the failure to run time)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quantization", "service")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from a import b`` counts as ``a.b`` where that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # a name that is a submodule imports that module; any other name comes from ``base`` itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a.b.C -> a.b: the nearest enclosing project module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    # (importing a.b also runs a/__init__; only what a module names is an edge: ``from . import x`` in a.b is
    # an edge to a.x, ``from . import name_in_init`` one to a)
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read_the_way_python_resolves_imports():
    graph = _graph()
    assert "quantization.task_model" in graph["quantization.marian"]      # from ..task_model import ...
    assert "quantization.strategies.base" in graph["quantization.strategies.int8"]  # from .base import ...
    assert "quantization.errors" in graph["service.serving"]               # from quantization.errors import ...
    # and a circle is found where there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles_in_the_library_or_the_service():
    assert _cycles(_graph()) == []


def test_the_library_never_imports_the_service():
    graph = _graph()
    assert {(m, t) for m, ts in graph.items() if m.startswith("quantization") for t in ts
            if t.startswith("service")} == set()


# torch internals, the deprecated quantized-tensor API, and a forward asking whether it is being compiled
INTERNAL_MODULES = ("torch._dynamo", "torch._inductor", "torch.ao", "torch.ops.quantized")
INTERNAL_NAMES = {"_make_per_channel_quantized_tensor", "_make_per_tensor_quantized_tensor", "quantize_per_tensor",
                  "quantize_per_channel", "is_compiling"}
DOOR = ROOT / "quantization" / "internals"


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _internal_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            names = [_dotted(node)]
            if node.attr in INTERNAL_NAMES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
        if any(n == m or n.startswith(m + ".") for n in names for m in INTERNAL_MODULES):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {names[0]}")
    return found


def test_torch_internals_are_reached_only_through_quantization_internals():
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if DOOR not in p.parents]
    assert sorted({hit for p in files for hit in _internal_uses(p)}) == []
    inside = [hit for p in DOOR.rglob("*.py") for hit in _internal_uses(p)]
    assert any("torch._dynamo" in h for h in inside) and any("torch.ops.quantized" in h for h in inside)
    assert any("_make_per_channel_quantized_tensor" in h for h in inside)  # the check sees them where they are
