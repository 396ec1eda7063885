"""Lists imports of aot's own modules that sit inside functions (the import layers want them at the
top of the module; only slow or vendor-gated imports stay lazy, each with a comment).

    .venv/bin/python tools/lazy_imports.py [--all]    # --all: third-party imports too
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    every = "--all" in sys.argv
    top = inner = 0
    for path in sorted((ROOT / "aot").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            ours = any(n == "aot" or n.startswith("aot.") for n in names)
            if not (ours or every):
                continue
            if id(node) in top_level or _in_type_checking(tree, node):
                top += ours
                continue
            inner += ours
            print(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    print(f"{inner} of {top + inner} imports of aot modules sit inside functions", file=sys.stderr)


def _in_type_checking(tree: ast.Module, target: ast.AST) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(child is target for child in ast.walk(node)):
                return True
    return False


if __name__ == "__main__":
    main()
