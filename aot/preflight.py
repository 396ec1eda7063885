"""Before a build starts: will this machine hold it? Estimate the bundle's size and the build's
peak memory from the architecture and the quantization plan, and stop with one line when the
memory available or the disk free at --out is short (`--no-preflight` builds anyway).

The estimate is calibrated on measured builds (bench/results, 2-core host, streamed load):
peak RSS ~ 0.3 GiB + 1.8 x the program's weight bytes (Llama 3.2 1B 8da4w: 1.0 GiB of weights,
2.09 GiB peak; 3B: 2.2 GiB, 4.26 GiB). Weight bytes per parameter: fp32 4, bf16 2, 8-bit 1,
4-bit 0.5 plus a 16-bit scale per group.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil

from aot.errors import ResourcesShort

GIB = 1024**3
BASE_BYTES = 0.3 * GIB
PEAK_PER_WEIGHT_BYTE = 1.8


def bytes_per_param(recipe, dtype: str = "float32") -> float:
    """Stored bytes per weight of a LayerQuant recipe (None: the compute dtype)."""
    if recipe is None:
        return 2.0 if dtype == "bfloat16" else 4.0
    scales = 2.0 / recipe.group_size if recipe.group_size else 0.0
    return recipe.bits / 8 + scales


def weight_bytes(kinds: dict[str, int], plan, prefix: str = "") -> float:
    """kinds: parameter counts by layer kind (linear, embedding, output, other)."""
    recipes = {"linear": plan.linear, "embedding": plan.embedding, "output": plan.output, "other": None}
    return sum(n * bytes_per_param(recipes[kind.removeprefix(prefix)], plan.dtype)
               for kind, n in kinds.items() if kind.startswith(prefix))


def estimate(kinds: dict[str, int], text_plan, vision_plan=None) -> dict:
    weights = weight_bytes({k: v for k, v in kinds.items() if not k.startswith("vision.")}, text_plan)
    if vision_plan is not None:
        weights += weight_bytes({k: v for k, v in kinds.items() if k.startswith("vision.")}, vision_plan, "vision.")
    return {"pte_bytes": int(weights), "peak_rss_bytes": int(BASE_BYTES + PEAK_PER_WEIGHT_BYTE * weights)}


def available_memory() -> int | None:
    """Memory a new process can use without swapping (MemAvailable on Linux); None when unknown."""
    try:
        return psutil.virtual_memory().available
    except (OSError, RuntimeError):
        return None


def check(what: str, kinds: dict[str, int], text_plan, vision_plan=None, out_dir: Path | None = None,
          enabled: bool = True) -> dict:
    """Raise ResourcesShort when the estimate does not fit; return the estimate otherwise."""
    est = estimate(kinds, text_plan, vision_plan)
    if not enabled:
        return {**est, "checked": False}
    need, have = est["peak_rss_bytes"], available_memory()
    if have is not None and need > have:
        raise ResourcesShort(
            f"{what} needs about {need / GIB:.1f} GiB of memory at peak (estimated from {sum(kinds.values()) / 1e9:.2f}B "
            f"parameters at this quantization) but {have / GIB:.1f} GiB is available; build on a larger machine, "
            "free memory, or pass --no-preflight to try anyway")
    if out_dir is not None:
        free = shutil.disk_usage(out_dir).free
        if est["pte_bytes"] * 1.05 > free:
            raise ResourcesShort(
                f"--out {out_dir.parent}: the bundle needs about {est['pte_bytes'] / GIB:.1f} GiB of disk but "
                f"{free / GIB:.1f} GiB is free there; choose another --out, free space, or pass --no-preflight")
    return {**est, "checked": True, "available_bytes": have}
