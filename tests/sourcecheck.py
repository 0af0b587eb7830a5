"""Reading the project's own source for the architecture tests: which files, and which literal comparisons."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_files(outside: Path) -> list[Path]:
    """The Python files of quantization/ and service/ that are not under ``outside``."""
    return [p for pkg in ("quantization", "service") for p in (ROOT / pkg).rglob("*.py") if outside not in p.parents]


def literal_comparisons(path: Path, names: set[str], root: Path = ROOT) -> list[str]:
    """``x == "embed"``, ``"translate" != y``, ``t in ("embed", "classify")``: one of ``names`` compared as a literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        literals = []
        for left, op, right in zip([node.left, *node.comparators], node.ops, node.comparators):
            if isinstance(op, (ast.Eq, ast.NotEq)):
                sides = [left, right]
            elif isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, (ast.Tuple, ast.List, ast.Set)):
                sides = list(right.elts)  # membership in a list of names (a substring test is not one)
            else:
                continue
            literals += [e.value for e in sides if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        if names & set(literals):
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found
