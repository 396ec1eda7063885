"""Build the real Llama 3.2 1B (or 3B) architecture with random weights, with `aot build` and with
ExecuTorch's own `export_llm`, in one run on one machine; print wall time and peak RSS of both and
their ratio, and write JSON.

    .venv/bin/python bench/build_1b.py                 # 1B, 8da4w g32, XNNPACK
    .venv/bin/python bench/build_1b.py --model 3b --skip-export-llm

Same configuration on both sides: random weights, linear layers (the output projection included)
8da4w with group 32, embedding unquantized (export_llm's defaults for `quantization.qmode=8da4w`),
KV cache with custom SDPA, dynamic prefill up to --max-seq-len, XNNPACK. `--preset` adds a build
of aot's default recipe (8-bit embedding, 8da8w output) for reference.

Peak RSS is the process's maximum resident set: wait4's for export_llm, the largest per-stage
peak aot records (VmHWM) for aot build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_measured(cmd: list[str], log: Path, cwd: Path = ROOT) -> dict:
    """Run a command; wall seconds and peak RSS (MiB) of the child, from wait4."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"{cmd[0]} failed with exit code {code}; last lines of {log}:\n" + "\n".join(tail))
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def write_params(model: str, path: Path) -> None:
    """Meta params.json for export_llm's base.params (the registry's sizes)."""
    from aot.families.text.model import MODELS

    a = MODELS[model]
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size, "ffn_dim_multiplier": 1.5 if model == "1b" else 1.0,
              "multiple_of": 256, "norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "use_scaled_rope": True}
    path.write_text(json.dumps(params))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="1b", choices=["1b", "3b"])
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--max-context-len", type=int, default=2048)
    p.add_argument("--skip-export-llm", action="store_true")
    p.add_argument("--skip-aot", action="store_true",
                   help="only export_llm; its run is merged into an existing results file of the same machine")
    p.add_argument("--preset", action="store_true", help="also build aot's default 8da4w recipe")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    from aot.doctor import host_info

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="aot-bench-"))
    aot = [str(Path(sys.executable).with_name("aot"))]
    common = ["--model", args.model, "--random-weights", "--quant", "8da4w", "--group-size", str(args.group_size),
              "--max-seq-len", str(args.max_seq_len), "--max-context-len", str(args.max_context_len), "--json"]
    runs = {}

    def aot_build(name: str, extra: list[str]) -> None:
        out = work / name
        print(f"[bench] aot build ({name}) ...", flush=True)
        measured = run_measured(aot + ["build", "--out", str(out), *common, *extra], work / f"{name}.log")
        measured["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        bundle = json.loads((out / "bundle.json").read_text())
        # aot resets the kernel's peak-RSS mark at each stage to measure stages apart, so wait4
        # sees only the last stage's peak; the process peak is the largest stage peak.
        measured["peak_rss_mib"] = max(measured["peak_rss_mib"], bundle["build"]["peak_rss_mib"])
        runs[name] = {**measured, "pte_bytes": bundle["files"]["model.pte"]["bytes"],
                      "stages": bundle["build"]["stages"], "delegation": bundle["delegation"]["forward"]}
        print(f"[bench]   {measured['seconds']} s, peak {measured['peak_rss_mib'] / 1024:.2f} GiB", flush=True)

    if not args.skip_aot:
        aot_build("aot", ["--embedding-quant", "none", "--output-quant", "8da4w"])
    if args.preset:
        aot_build("aot-preset", [])

    if not args.skip_export_llm:
        params = work / "params.json"
        write_params(args.model, params)
        eos = 10**6  # outside the vocab: random weights never stop early when benchmarked
        cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm",
               f"base.params={params}", "base.model_class=llama3_2",
               "model.use_kv_cache=True", "model.use_sdpa_with_kv_cache=True", "model.enable_dynamic_shape=True",
               "backend.xnnpack.enabled=True", f"export.max_seq_length={args.max_seq_len}",
               f"export.max_context_length={args.max_context_len}",
               "export.output_name=export_llm.pte", "quantization.qmode=8da4w",
               f"quantization.group_size={args.group_size}",
               f'base.metadata="{{\\"get_bos_id\\":128000,\\"get_eos_ids\\":[{eos}]}}"']
        print("[bench] export_llm ...", flush=True)
        # Run inside the work dir: export_llm writes the .pte and hydra's outputs/ into its cwd.
        measured = run_measured(cmd, work / "export_llm.log", cwd=work)
        runs["export_llm"] = {**measured, "pte_bytes": (work / "export_llm.pte").stat().st_size,
                              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(f"[bench]   {measured['seconds']} s, peak {measured['peak_rss_mib'] / 1024:.2f} GiB", flush=True)

    file = args.out / f"build_{args.model}.json"
    if file.exists():  # runs measured earlier on this machine (e.g. --skip-export-llm, then --skip-aot)
        earlier = json.loads(file.read_text())
        if earlier.get("machine", {}).get("cpu") == host_info()["cpu"]:
            merged = {name: {"measured_at": "an earlier run of this script", **r}
                      for name, r in earlier.get("runs", {}).items() if name not in runs}
            runs = {**merged, **runs}
    result = {
        "model": args.model, "quant": f"8da4w g{args.group_size}", "delegate": "xnnpack",
        "max_seq_len": args.max_seq_len, "max_context_len": args.max_context_len,
        "machine": {**host_info(), "python": platform.python_version()},
        "runs": runs, "work_dir": str(work),
    }
    if "export_llm" in runs and "aot" in runs:
        e, a = runs["export_llm"], runs["aot"]
        result["ratio_aot_over_export_llm"] = {
            "seconds": round(a["seconds"] / e["seconds"], 3),
            "peak_rss": round(a["peak_rss_mib"] / e["peak_rss_mib"], 3),
            "pte_bytes": round(a["pte_bytes"] / e["pte_bytes"], 3),
        }
    file.write_text(json.dumps(result, indent=2) + "\n")

    lines = [f"| build ({args.model}, 8da4w g{args.group_size}, XNNPACK) | wall | peak RSS | model.pte | measured |",
             "|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['seconds']:.0f} s | {r['peak_rss_mib'] / 1024:.2f} GiB | {r['pte_bytes'] / 2**20:,.0f} MiB "
                     f"| {r.get('measured_at', '')} |")
    if "ratio_aot_over_export_llm" in result:
        r = result["ratio_aot_over_export_llm"]
        lines.append(f"| aot / export_llm | {r['seconds']:.2f}x | {r['peak_rss']:.2f}x | {r['pte_bytes']:.2f}x | |")
    lines.append("")
    if "aot" in runs:
        lines.append("aot stages: " + ", ".join(f"{s['name']} {s['seconds']:.0f} s / {s['peak_rss_mib'] / 1024:.2f} GiB"
                                             for s in runs["aot"]["stages"]))
    lines.append(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
                 f"{result['machine']['memory_gib']} GiB")
    file.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"wrote {file} and {file.with_suffix('.md')}; bundles and logs in {work}")


if __name__ == "__main__":
    main()
