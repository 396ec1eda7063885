"""What each NPU recipe costs in accuracy on the demo model, simulated on the host.

    .venv/bin/python bench/npu_simulate.py      # writes bench/results/npu_simulate.{json,md}

Runs `aot simulate --json` for every QNN and MediaTek scheme (plus QNN's 8-bit KV cache option)
with the same text, prefill length and calibration, and tabulates perplexity ratio, KL and top-1
agreement against fp32, overall and split into the prefill and decode graphs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("qnn", "16a8w", []), ("qnn", "16a4w", []), ("qnn", "16a4w-block", []), ("qnn", "8a8w", []),
        ("qnn", "16a4w", ["--kv-bits", "8"]), ("mediatek", "16a8w", []), ("mediatek", "16a4w", []),
        ("mediatek", "8a8w", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--calibration-windows", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "npu_simulate.json")
    ap.add_argument("--table-only", action="store_true", help="Rewrite the markdown table from the JSON.")
    a = ap.parse_args()
    if a.table_only:
        return write_table(json.loads(a.out.read_text())["runs"], a.out.with_suffix(".md"))
    rows = []
    for delegate, scheme, extra in RUNS:
        cmd = [sys.executable, "-m", "aot.cli", "simulate", "--delegate", delegate, "--model", "demo", "--quant", scheme,
               "--max-tokens", str(a.max_tokens), "--prefill-len", str(a.prefill_len),
               "--calibration-windows", str(a.calibration_windows), "--json", *extra]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1]}")
        r = json.loads(proc.stdout)
        r["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(r)
        acc = r["accuracy"]
        print(f"{delegate:9s} {scheme:12s} kv{r['kv_bits'] or '-':>3} ppl x{acc['ppl_ratio']:.4f} KL {acc['kl_mean']:.5f} "
              f"top-1 {acc['top1_agreement']:.2%} (prefill {r['accuracy_prefill']['top1_agreement']:.2%}, "
              f"decode {r['accuracy_decode']['top1_agreement']:.2%})  {r['seconds']} s", flush=True)
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": machine, "runs": rows}, indent=1) + "\n")
    write_table(rows, a.out.with_suffix(".md"))


def kv_cache(r: dict) -> str:
    if r["delegate"] == "mediatek":
        return "float (recipe leaves it)"  # NeuropilotQuantizer does not annotate cache writes
    return f"{r['kv_bits'] or (8 if r['scheme'].startswith('8a') else 16)}-bit"


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| delegate | scheme | KV cache | ppl ratio | KL | top-1 | top-1 prefill | top-1 decode |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r["accuracy"]
        kv = kv_cache(r)
        lines.append(f"| {r['delegate']} | {r['scheme']} | {kv} | {acc['ppl_ratio']:.4f} | {acc['kl_mean']:.5f} | "
                     f"{acc['top1_agreement']:.2%} | {r['accuracy_prefill']['top1_agreement']:.2%} | "
                     f"{r['accuracy_decode']['top1_agreement']:.2%} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
