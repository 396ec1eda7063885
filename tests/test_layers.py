"""The package's import structure, enforced: the layers and independence contracts in
pyproject.toml ([tool.importlinter], run by import-linter's own `lint-imports`), no import cycle
between any two modules, and imports of aot's own modules at the top of each module except where
a comment says why not (the CLI and what its --help reads: torch takes ~3 s to import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from lazy_imports import lazy_imports  # noqa: E402  (tools/lazy_imports.py, the same list)

# Modules whose function-level imports of aot modules are deliberate (each says why in a comment).
LAZY_ALLOWED = {"aot/cli.py", "aot/cli_support.py", "aot/generate.py"}


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "3 kept" in done.stdout, done.stdout[-1000:]


def test_no_import_cycles_between_modules():
    graph = grimp.build_graph("aot", exclude_type_checking_imports=True, cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = [c for c in _components(edges) if len(c) > 1]
    assert not cycles, cycles


def test_imports_of_aot_modules_sit_at_the_top():
    found, total = lazy_imports(ROOT)
    lazy = [f"{path}:{line}: {text}" for path, line, text in found if path not in LAZY_ALLOWED]
    assert total > 200 and not lazy, lazy


def _components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(edges.get(w, ()))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_cycles():
    comps = _components({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()})
    assert sorted(c for c in comps if len(c) > 1) == [["a", "b", "c"]]
