"""`aot inspect`: a bundle's manifest, checked against its files and against the program itself,
and the program's runtime memory plan (aot.memplan)."""

from __future__ import annotations

from pathlib import Path

from aot.bundle import PTE_NAME, verify_bundle
from aot.errors import BundleError
from aot.memplan import read_memory_plan
from aot.runner.pte import PteProgram


def inspect_bundle(path: Path) -> dict:
    manifest = verify_bundle(path)
    root = Path(path).expanduser()
    root = root if root.is_dir() else root.parent
    data = manifest.get("data_file")
    program = PteProgram(root / PTE_NAME, root / data if data else None)
    metadata = program.metadata()
    recorded = manifest.get("metadata", {})
    differing = [k for k in recorded if metadata.get(k) != recorded[k]]
    if differing:
        raise BundleError(
            f"{root / PTE_NAME}: metadata {', '.join(differing)} differs from bundle.json; rebuild the bundle"
        )
    methods = {
        name: program.method_meta(name) for name in program.method_names if name not in metadata
    }
    # read from the program itself: also for bundles built before bundle.json recorded it
    plan = read_memory_plan(root / PTE_NAME, root / data if data else None)
    return {**manifest, "path": str(root), "memory_plan": plan, "program": {"methods": methods, "metadata": metadata}}
