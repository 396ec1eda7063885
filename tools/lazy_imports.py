"""Lists imports of aot's own modules that sit inside functions (the import layers want them at the
top of the module; only slow or vendor-gated imports stay lazy, each with a comment).
tests/test_layers.py holds the package to the same list.

    .venv/bin/python tools/lazy_imports.py [--all]    # --all: third-party imports too
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lazy_imports(root: Path = ROOT, every: bool = False) -> tuple[list[tuple[str, int, str]], int]:
    """(path, line, import) of each import inside a function or class body, outside `if
    TYPE_CHECKING:` (of aot's modules; of any with `every`), and how many imports of aot's
    modules there are in all."""
    found, total = [], 0
    for path in sorted((root / "aot").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            ours = any(n.split(".")[0] == "aot" for n in names)
            total += ours
            if (ours or every) and id(node) not in top and not _in_type_checking(tree, node):
                found.append((path.relative_to(root).as_posix(), node.lineno, ast.unparse(node)))
    return found, total


def _in_type_checking(tree: ast.Module, target: ast.AST) -> bool:
    return any(isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
               and any(child is target for child in ast.walk(n)) for n in tree.body)


def main() -> None:
    found, total = lazy_imports(every="--all" in sys.argv)
    for path, line, text in found:
        print(f"{path}:{line}: {text}")
    ours = sum(1 for *_, text in found if text.split()[1].split(".")[0] == "aot")
    print(f"{ours} of {total} imports of aot modules sit inside functions", file=sys.stderr)


if __name__ == "__main__":
    main()
