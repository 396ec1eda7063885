"""Prefill and decode speed of bundles' model.pte, side by side, without a tokenizer (bundles built
with --random-weights have none): random token ids through `forward`, as the runners call it.

    .venv/bin/python bench/pte_speed.py build/1b-8da4w build/1b-spinquant --out bench/results/pte_speed.json

Per bundle and repeat: reset by loading the method afresh, one prefill call of --prompt tokens
(chunked by the bundle's max_seq_len), then --decode single-token calls. Reports the median over
--repeats of prefill tok/s and decode tok/s (the first repeat warms caches and is dropped).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(bundle: Path, prompt: int, decode: int, repeats: int) -> dict:
    from aot.bundle import PTE_NAME
    from aot.runner.pte import PteProgram

    prog = PteProgram(bundle / PTE_NAME)
    meta = prog.metadata()
    seq, vocab = meta["get_max_seq_len"], meta["get_vocab_size"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt + decode), generator=g)
    prefill, dec = [], []
    for _ in range(repeats + 1):
        fwd = prog.forward()  # a fresh method: fresh KV cache
        start = time.perf_counter()
        for pos in range(0, prompt, seq):
            chunk = ids[:, pos : min(pos + seq, prompt)]
            fwd(chunk, torch.tensor([pos]))
        mid = time.perf_counter()
        for pos in range(prompt, prompt + decode):
            fwd(ids[:, pos : pos + 1], torch.tensor([pos]))
        end = time.perf_counter()
        prefill.append(prompt / (mid - start))
        dec.append(decode / (end - mid))
    prefill, dec = prefill[1:], dec[1:]
    manifest = json.loads((bundle / "bundle.json").read_text())
    return {
        "bundle": str(bundle),
        "quant": manifest["quant"]["scheme"],
        "pte_mib": round((bundle / PTE_NAME).stat().st_size / 2**20, 1),
        "prefill_tps": round(statistics.median(prefill), 1),
        "decode_tps": round(statistics.median(dec), 2),
        "prefill_all": [round(x, 1) for x in prefill],
        "decode_all": [round(x, 2) for x in dec],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/pte_speed.json")
    a = ap.parse_args()
    from aot.native import native_output_silenced, quiet_libraries

    quiet_libraries(debug=False)
    results = []
    for b in a.bundles:
        with native_output_silenced():
            r = measure(b, a.prompt, a.decode, a.repeats)
        results.append(r)
        print(f"{b}: {r['quant']}, {r['pte_mib']} MiB, prefill {r['prefill_tps']} tok/s, decode {r['decode_tps']} tok/s",
              flush=True)
    out = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
           "prompt": a.prompt, "decode": a.decode, "repeats": a.repeats, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
