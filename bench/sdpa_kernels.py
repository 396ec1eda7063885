"""ExecuTorch's two CPU attention kernels on one decode step at depth: llama::custom_sdpa over an
fp32 cache against llama::custom_quantized_sdpa over the int8 cache (int8 q, k, v with per token
and head scales and zero points), Llama 3.2 1B's attention shape (32 query heads, 8 KV heads of
64), one layer per call. Eager calls of the kernels the bundles run; what decides whether an int8
cache decodes faster at depth.

    .venv/bin/python bench/sdpa_kernels.py                      # -> bench/results/sdpa_kernels.json
    .venv/bin/python bench/sdpa_kernels.py --depths 1024,4096 --heads 24   # the 3B's 24 query heads

Reports ms per call (median of --repeats after a warm-up) and the bytes of cache each call reads
per second (the memory roofline is the machine's read bandwidth, tens of GB/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from aot.doctor import host_info
    from aot.families.common import _per_token_int8
    from aot.native import load_custom_ops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="1024,4096,16384,32768")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sdpa_kernels.json")
    a = ap.parse_args()
    load_custom_ops()
    depths = [int(d) for d in a.depths.split(",")]
    L, H, KV, D = max(depths) + 1, a.heads, a.kv_heads, a.head_dim
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, H, D, generator=g)
    k, v = torch.randn(1, L, KV, D, generator=g), torch.randn(1, L, KV, D, generator=g)
    kq, ks, kz = _per_token_int8(k)
    vq, vs, vz = _per_token_int8(v)
    qq, qs, qz = _per_token_int8(q)
    rows = []
    for pos in depths:
        calls = {
            "fp32": (lambda: torch.ops.llama.custom_sdpa(q, k, v, pos, None, 0, True), 2 * KV * D * 4),
            "int8": (lambda: torch.ops.llama.custom_quantized_sdpa(qq, kq, vq, pos, None, 0, True, None, qz, qs, kz, ks,
                                                                   vz, vs), 2 * KV * (D + 5)),
        }
        for name, (fn, bytes_per_position) in calls.items():
            fn()
            times = []
            for _ in range(a.repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            ms = statistics.median(times) * 1000
            rows.append({"depth": pos, "cache": name, "ms_per_call": round(ms, 2),
                         "cache_read_gb_s": round(bytes_per_position * (pos + 1) / (ms / 1000) / 1e9, 2)})
            print(f"depth {pos:>6}  {name}  {ms:8.2f} ms per call  {rows[-1]['cache_read_gb_s']:6.2f} GB/s of cache",
                  flush=True)
    result = {"shape": {"heads": H, "kv_heads": KV, "head_dim": D}, "threads": torch.get_num_threads(),
              "machine": host_info(), "rows": rows, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
