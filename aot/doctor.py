"""`aot doctor`: what this machine has, and which delegates can build and run here."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

from aot import hfcache
from aot.backends import BACKENDS
from aot.pipeline import versions

# CPU features the int8/int4 kernels of XNNPACK use when present.
_X86_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
_ARM_FEATURES = ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")


def diagnose() -> dict:
    delegates = {}
    for name, cls in sorted(BACKENDS.items()):
        backend = cls()
        status = backend.availability()
        delegates[name] = {"available": status.ok, "reason": status.reason, "description": cls.description,
                           "schemes": list(cls.schemes), "socs": list(backend.socs()),
                           "simulate": cls.static_shapes}  # `aot simulate` runs its recipe here
    return {"versions": versions(), "host": host_info(), "delegates": delegates, "hf_cache": hf_cache()}


def hf_cache() -> dict:
    """The published Llama 3.2 checkpoints in the Hugging Face cache (`--model NAME` builds them)."""
    found = [r for r in hfcache.cached_published() if r["state"] != "absent"]
    return {"path": str(hfcache.cache_dir()), "checkpoints": found}


def host_info() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Hardware") and value.strip():
                cpu = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    wanted = _ARM_FEATURES if platform.machine() in ("aarch64", "arm64") else _X86_FEATURES
    memory = round(psutil.virtual_memory().total / 2**30, 1)  # MemTotal on Linux
    return {
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_features": [f for f in wanted if f in flags],
        "memory_gib": memory,
    }
