"""The int8 KV cache against the fp32 one, position by position: two bundles of the same weights
and quantization that differ only in --kv-cache, teacher-forced through ExecuTorch's runtime on one
long text, compared per depth bucket (top-1 agreement, KL(fp32 || int8), perplexity of each), and
each against the fp32 eager reference (`aot validate`'s figures).

    .venv/bin/aot build --model demo --max-seq-len 64 --max-context-len 8192 --kv-cache fp32 --out build/kv/fp32
    .venv/bin/aot build --model demo --max-seq-len 64 --max-context-len 8192 --kv-cache int8 --out build/kv/int8
    .venv/bin/python bench/kv_accuracy.py build/kv/fp32 build/kv/int8 --max-tokens 8192

Writes --out (JSON; default bench/results/kv_accuracy.json) and the table next to it (.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from aot.bundle import open_bundle
    from aot.doctor import host_info
    from aot.metrics import by_depth, row_metrics, summarize
    from aot.native import native_output_silenced
    from aot.runner.engines import PythonEngine
    from aot.texts import text_file
    from aot.validate import reference_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path, help="The fp32-cache bundle.")
    ap.add_argument("int8", type=Path, help="The int8-cache bundle (same weights, same quantization).")
    ap.add_argument("--text", type=Path, help="Text to score [the demo's held-out sample].")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_accuracy.json")
    a = ap.parse_args()

    bundles = {name: open_bundle(p) for name, p in (("fp32", a.fp32), ("int8", a.int8))}
    engines = {name: PythonEngine(b) for name, b in bundles.items()}
    for name, b in bundles.items():
        got = b.manifest["export"]["kv_cache"]["storage"]
        if got != name:
            sys.exit(f"{b.root}: its KV cache is {got}, not {name}")
    text = text_file(a.text)
    engine = engines["fp32"]
    ids = engine.encode(text.read_text(errors="replace"))[: min(a.max_tokens, engine.max_context_len)]
    chunk = engine.max_seq_len
    _, reference = reference_model(bundles["fp32"], None, len(ids))
    rows = {"int8_vs_fp32": [], "fp32_vs_reference": [], "int8_vs_reference": []}
    start = time.perf_counter()
    with torch.no_grad(), native_output_silenced():
        for pos in range(0, len(ids) - 1, chunk):
            window = ids[pos : pos + chunk]
            target = torch.tensor(ids[pos + 1 : pos + chunk + 1])
            n = target.numel()
            ref = reference(torch.tensor([window]), torch.tensor([pos]))[0][:n]
            fp32 = engines["fp32"].score_chunk(window, pos)[:n]
            int8 = engines["int8"].score_chunk(window, pos)[:n]
            rows["int8_vs_fp32"].append(row_metrics(fp32, int8, target))
            rows["fp32_vs_reference"].append(row_metrics(ref, fp32, target))
            rows["int8_vs_reference"].append(row_metrics(ref, int8, target))
    result = {"text": {"file": str(text), "tokens": len(ids)}, "chunk": chunk, "machine": host_info(),
              "bundles": {k: str(b.root) for k, b in bundles.items()},
              "seconds": round(time.perf_counter() - start, 1),
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, parts in rows.items():
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        result[name] = {**summarize(merged), "by_depth": by_depth(merged)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| depth | positions | int8 vs fp32 cache: top-1 | KL | ppl fp32-cache / ref | ppl int8-cache / ref |",
             "|---|---|---|---|---|---|"]
    for b, f, i in zip(result["int8_vs_fp32"]["by_depth"], result["fp32_vs_reference"]["by_depth"],
                       result["int8_vs_reference"]["by_depth"]):
        lines.append(f"| {b['depth']} | {b['positions']} | {b['top1_agreement']:.4f} | {b['kl_mean']:.5f} | "
                     f"{f['ppl_ratio']:.4f} | {i['ppl_ratio']:.4f} |")
    o = result["int8_vs_fp32"]
    lines.append(f"| all | {o['positions']} | {o['top1_agreement']:.4f} | {o['kl_mean']:.5f} | "
                 f"{result['fp32_vs_reference']['ppl_ratio']:.4f} | {result['int8_vs_reference']['ppl_ratio']:.4f} |")
    lines.append(f"\n{text.name}, {len(ids)} tokens teacher-forced in {chunk}-token chunks; {result['measured_at']}")
    table = "\n".join(lines) + "\n"
    a.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
