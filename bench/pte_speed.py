"""Prefill and decode speed of bundles' model.pte, side by side, without a tokenizer (bundles built
with --random-weights have none): random token ids through `forward`, as the runners call it.

    .venv/bin/python bench/pte_speed.py build/1b-8da4w build/1b-spinquant --out bench/results/pte_speed.json
    .venv/bin/python bench/pte_speed.py build/1b-8da4w /tmp/export_llm.pte --bandwidth

Arguments are bundle directories or bare .pte files (e.g. export_llm's, read through the same
metadata methods). --bandwidth also measures the machine's memory read bandwidth (a 1 GiB sum,
best of 5, all threads) and reports each decode's fraction of the bandwidth bound: decode reads
every weight once per token except the token embedding (one row is gathered), so the fraction is
tok/s x (model.pte bytes - embedding table bytes) / bandwidth. The embedding's size comes from
bundle.json; for a bare .pte pass --bare-embedding-bytes (fp32 1B: 128256 x 2048 x 4 = 1050673152).
The KV cache read (about 1% of the weights at these lengths) is left out.

All programs are loaded first; then per round, each in turn (the order reversed every other round):
load the method afresh (an empty KV cache), one prefill of --prompt tokens (chunked by the program's
max_seq_len), then --decode single-token calls. Reports the median over --repeats rounds of prefill
tok/s and decode tok/s (a first round warms caches and is dropped).
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


def measure_bandwidth(gib: int = 1, repeats: int = 5) -> float:
    """Bytes per second a full-array reduction reads (all threads): the decode roofline."""
    x = torch.ones(gib * 2**28, dtype=torch.float32)
    x.sum()  # fault the pages in
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Subject:
    """One model.pte, loaded once; `once()` is one measured prefill + decode on a fresh method."""

    def __init__(self, bundle: Path, prompt: int, decode: int):
        from aot.bundle import PTE_NAME
        from aot.runner.pte import PteProgram

        self.bundle, self.prompt, self.decode = bundle, prompt, decode
        self.pte = bundle if bundle.suffix == ".pte" else bundle / PTE_NAME
        self.prog = PteProgram(self.pte)
        meta = self.prog.metadata()
        # The chunk the method accepts: export_llm's reports get_max_seq_len 128 but takes at most 127.
        upper = self.prog.program.metadata("forward").input_tensor_meta(0).sizes()[1]
        self.seq, vocab = min(meta["get_max_seq_len"], upper), meta["get_vocab_size"]
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (1, prompt + decode), generator=g)
        self.prefill, self.dec = [], []

    def once(self) -> None:
        fwd = self.prog.forward()  # a fresh method: fresh KV cache
        start = time.perf_counter()
        for pos in range(0, self.prompt, self.seq):
            fwd(self.ids[:, pos : min(pos + self.seq, self.prompt)], torch.tensor([pos]))
        mid = time.perf_counter()
        for pos in range(self.prompt, self.prompt + self.decode):
            fwd(self.ids[:, pos : pos + 1], torch.tensor([pos]))
        end = time.perf_counter()
        self.prefill.append(self.prompt / (mid - start))
        self.dec.append(self.decode / (end - mid))

    def embedding_bytes(self, bare: int | None) -> int | None:
        if self.bundle.suffix == ".pte":
            return bare
        m = json.loads((self.bundle / "bundle.json").read_text())
        args, emb = m["model"]["args"], m["quant"]["plan"]["embedding"]
        rows, dim = args["vocab_size"], args["dim"]
        if emb is None:
            return rows * dim * (2 if m["quant"]["plan"]["dtype"] == "bfloat16" else 4)
        groups = 1 if emb["group_size"] == 0 else dim // emb["group_size"]
        return rows * dim * emb["bits"] // 8 + rows * groups * 4

    def result(self) -> dict:
        prefill, dec = self.prefill[1:], self.dec[1:]  # the first run warms caches
        b = self.bundle
        quant = "(bare .pte)" if b.suffix == ".pte" else json.loads((b / "bundle.json").read_text())["quant"]["scheme"]
        return {
            "bundle": str(b),
            "quant": quant,
            "pte_bytes": self.pte.stat().st_size,
            "pte_mib": round(self.pte.stat().st_size / 2**20, 1),
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
    ap.add_argument("--bandwidth", action="store_true", help="Also measure read bandwidth and the decode roofline.")
    ap.add_argument("--bare-embedding-bytes", type=int, help="Embedding table bytes of the bare .pte files.")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/pte_speed.json")
    a = ap.parse_args()
    from aot.native import native_output_silenced, quiet_libraries

    quiet_libraries(debug=False)
    with native_output_silenced():
        subjects = [Subject(b, a.prompt, a.decode) for b in a.bundles]
        # Interleaved, the order reversed every other round, so drift in the machine's state
        # (other load, page cache, frequency) falls on every subject alike.
        for r in range(a.repeats + 1):
            for s in (subjects if r % 2 == 0 else subjects[::-1]):
                s.once()
    results = [{**s.result(), "embedding_bytes": s.embedding_bytes(a.bare_embedding_bytes)} for s in subjects]
    for r in results:
        print(f"{r['bundle']}: {r['quant']}, {r['pte_mib']} MiB, prefill {r['prefill_tps']} tok/s, "
              f"decode {r['decode_tps']} tok/s", flush=True)
    out = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
           "prompt": a.prompt, "decode": a.decode, "repeats": a.repeats, "results": results}
    if a.bandwidth:
        bw = measure_bandwidth()
        out["read_bandwidth_gb_s"] = round(bw / 1e9, 2)
        for r in results:
            if r["embedding_bytes"] is None:
                continue
            read = r["pte_bytes"] - r["embedding_bytes"]
            r["bytes_read_per_token"] = read
            r["bandwidth_bound_tps"] = round(bw / read, 2)
            r["fraction_of_bound"] = round(r["decode_tps"] * read / bw, 3)
        print(f"read bandwidth {bw / 1e9:.2f} GB/s")
    lines = ["| model.pte | MiB | prefill tok/s | decode tok/s | decode bound tok/s | fraction |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['bundle']} ({r['quant']}) | {r['pte_mib']:,.0f} | {r['prefill_tps']} | {r['decode_tps']} | "
                     f"{r.get('bandwidth_bound_tps', '-')} | {r.get('fraction_of_bound', '-')} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
