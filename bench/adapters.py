"""Many LoRA adapters over one foundation: bundle size, memory, speed and accuracy.

Four rank-16 adapters on all seven projections of every layer, written in PEFT's layout
(adapter_config.json + adapter_model.safetensors, fp32), are built

- into one bundle: `--adapter a1=DIR ... --adapter a4=DIR` (model.pte is the foundation alone,
  adapter-aK.pte each adapter's program, model.ptd the foundation's weights, stored once);
- one at a time, merged: `--adapter DIR` (an ordinary single-file bundle), as an app shipping
  separate bundles would.

and measured: the files (a bundle with 1 and 2 adapters holds the same model.pte, model.ptd and
adapter programs as the 4-adapter one; this script checks that on a 2-adapter build of the demo),
peak RSS with the foundation and 1-4 adapter programs loaded in one process against merged bundles
loaded side by side, load time of an adapter's program once the foundation is loaded, decode and
prefill speed (ExecuTorch's runner, `aot bench`) of an unmerged adapter against its merged bundle,
and, for the demo model (trained weights), the accuracy of each form against the fp32 model with
the adapter merged (`aot validate --adapter NAME`).

    .venv/bin/python bench/adapters.py                  # the demo model (~8 min)
    .venv/bin/python bench/adapters.py --model 1b       # the 1B architecture, random weights (~35 min)

Writes --out (JSON; default bench/results/adapters_MODEL.json) and a table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AOT = str(ROOT / ".venv" / "bin" / "aot")
PY = str(ROOT / ".venv" / "bin" / "python")
HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
      "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
      "feed_forward.w2": "mlp.down_proj"}


def aot(*args: str) -> dict:
    start = time.perf_counter()
    done = subprocess.run([AOT, *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"aot {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return {**json.loads(done.stdout), "wall_s": round(time.perf_counter() - start, 1)}


def write_adapters(model: str, folder: Path, count: int, rank: int, relative: float) -> list[Path]:
    """`count` PEFT adapters. With the demo's weights, each update B @ A is scaled to `relative`
    of its layer's weight (Frobenius norm), as a fine-tune moves a model; random otherwise."""
    import torch
    from safetensors.torch import save_file

    from aot.families.text.model import MODELS

    args = MODELS[model]
    weights = None
    if model == "demo":
        from aot.families.text.family import TextFamily
        from aot.texts import DEMO_CHECKPOINT

        weights = dict(TextFamily().reference(DEMO_CHECKPOINT, 8).named_parameters())
    hd = args.head_dim
    io = {"attention.wq": (args.dim, args.n_heads * hd), "attention.wk": (args.dim, args.n_kv_heads * hd),
          "attention.wv": (args.dim, args.n_kv_heads * hd), "attention.wo": (args.n_heads * hd, args.dim),
          "feed_forward.w1": (args.dim, args.ffn_hidden), "feed_forward.w3": (args.dim, args.ffn_hidden),
          "feed_forward.w2": (args.ffn_hidden, args.dim)}
    out = []
    for k in range(count):
        gen, tensors = torch.Generator().manual_seed(100 + k), {}
        for layer in range(args.n_layers):
            for kind, (i, o) in io.items():
                a = torch.randn(rank, i, generator=gen) / i**0.5
                b = torch.randn(o, rank, generator=gen) / rank**0.5
                if weights is not None:  # ||2 * B @ A|| = relative * ||W||
                    w = weights[f"layers.{layer}.{kind}.weight"]
                    b *= relative * w.norm() / (2 * (b @ a).norm())
                else:
                    b *= 0.02
                key = f"base_model.model.model.layers.{layer}.{HF[kind]}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.contiguous(), b.contiguous()
        d = folder / f"a{k + 1}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
            "target_modules": sorted(v.split(".")[1] for v in HF.values()), "bias": "none", "lora_dropout": 0.0}))
        out.append(d)
    return out


RSS_PROBE = r"""
import json, os, resource, sys, time
import psutil, torch
from aot.runner.pte import PteProgram
from aot.native import native_output_silenced
progs, rows, held = json.loads(sys.argv[1]), [], []
tokens, pos = torch.zeros((1, 1), dtype=torch.long), torch.tensor([0])
with native_output_silenced():
    for pte, ptd in progs:
        t = time.perf_counter()
        p = PteProgram(pte, ptd)
        f = p.forward()
        f(tokens, pos)  # XNNPACK packs its weights at the first load of the method
        held.append((p, f))
        rows.append({"program": os.path.basename(pte), "load_s": round(time.perf_counter() - t, 3),
                     "rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1)})
print(json.dumps({"rows": rows, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def rss(programs: list[tuple[Path, Path | None]]) -> dict:
    arg = json.dumps([[str(p), str(d) if d else None] for p, d in programs])
    done = subprocess.run([PY, "-c", RSS_PROBE, arg], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"rss probe failed: {done.stderr[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def speed(bundle: Path, adapter: str | None, p: int, n: int, repeats: int) -> dict:
    r = aot("bench", str(bundle), "-p", str(p), "-n", str(n), "-r", str(repeats),
            *(["--adapter", adapter] if adapter else []))
    s = r["speed"]
    return {"prefill_tps": s["prefill_tps"]["median"], "decode_tps": s["decode_tps"]["median"],
            "prompt_tokens": s["prompt_tokens"], "generated_tokens": s["generated_tokens"]}


def accuracy(bundle: Path, adapter: str | None) -> dict:
    r = aot("validate", str(bundle), "--skip-speed", "--max-tokens", "512",
            *(["--adapter", adapter] if adapter else []))
    a = r["accuracy"]
    return {k: a.get(k) for k in ("ppl_reference", "ppl_bundle", "ppl_ratio", "top1_agreement", "kl_mean")}


def measure(work: Path, root: Path, repeats: int) -> dict:
    """Merged bundle, then the unmerged adapter, then the foundation, one after another."""
    out = {"merged": speed(work / "merged", None, 128, 64, repeats),
           "unmerged_8da8w": speed(root, "a1", 128, 64, repeats),
           "foundation": speed(root, None, 128, 64, repeats)}
    for kind in ("decode", "prefill"):
        out[f"{kind}_cost_unmerged"] = round(1 - out["unmerged_8da8w"][f"{kind}_tps"] / out["merged"][f"{kind}_tps"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="demo (its trained weights) or 1b/3b (random weights) [demo]")
    ap.add_argument("--work", type=Path, default=None, help="[build/bench-adapters-MODEL]")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--count", type=int, default=4, help="adapters in the one bundle [4]")
    ap.add_argument("--skip-speed", action="store_true", help="sizes and memory only")
    args = ap.parse_args()
    import shutil

    work = args.work or ROOT / "build" / f"bench-adapters-{args.model}"
    out = args.out or ROOT / "bench" / "results" / f"adapters_{args.model}.json"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    folders = write_adapters(args.model, work / "adapters", args.count, args.rank, 0.1)
    weights = ["--model", args.model] + ([] if args.model == "demo" else ["--random-weights"])
    common = [*weights, "--max-context-len", "2048", "--max-seq-len", "128", "--no-preflight"]
    adapter_file = (folders[0] / "adapter_model.safetensors").stat().st_size
    result: dict = {"model": args.model, "rank": args.rank, "adapter_file_bytes": adapter_file,
                    "adapter_params": adapter_file // 4, "builds": {}}

    multi = aot("build", *common, "--out", str(work / "multi"),
                *[x for k, f in enumerate(folders) for x in ("--adapter", f"a{k + 1}={f}")])
    merged = aot("build", *common, "--out", str(work / "merged"), "--adapter", str(folders[0]))
    result["builds"] = {"multi": multi["wall_s"], "merged": merged["wall_s"]}
    files = {n: f["bytes"] for n, f in multi["files"].items()}
    base = files["model.pte"] + files["model.ptd"] + files["tokenizer.json"]
    per = [files[f"adapter-a{k}.pte"] for k in range(1, args.count + 1)]
    merged_bytes = merged["files"]["model.pte"]["bytes"]
    result["files"] = files
    result["merged_pte_bytes"] = merged_bytes
    result["sizes"] = [{"adapters": k, "one_bundle": base + sum(per[:k]),
                        "separate_bundles": k * (merged_bytes + merged["files"]["tokenizer.json"]["bytes"]),
                        "extra_per_adapter": per[k - 1],
                        "extra_vs_fp32_file": round(per[k - 1] / adapter_file, 3),
                        "extra_vs_bf16_file": round(per[k - 1] / (adapter_file / 2), 3)}
                       for k in (1, 2, 4) if k <= args.count]
    if args.model == "demo":  # a 2-adapter bundle holds the same files as the 4-adapter one
        two = aot("build", *common, "--out", str(work / "two"),
                  *[x for k, f in enumerate(folders[:2]) for x in ("--adapter", f"a{k + 1}={f}")])
        result["two_adapter_build_same_files"] = all(
            two["files"][n]["sha256"] == multi["files"][n]["sha256"]
            for n in ("model.pte", "model.ptd", "adapter-a1.pte", "adapter-a2.pte"))

    root, ptd = work / "multi", work / "multi" / "model.ptd"
    result["rss"] = {
        "foundation_then_adapters": rss([(root / "model.pte", ptd)] + [(root / f"adapter-a{k}.pte", ptd)
                                                                          for k in range(1, args.count + 1)]),
        "adapter_alone": rss([(root / "adapter-a1.pte", ptd)]),
        "merged_bundles_side_by_side": rss([(work / "merged" / "model.pte", None)] * 2),
    }
    result["speed"] = None if args.skip_speed else measure(work, root, args.repeats)
    if args.model == "demo":
        fp32 = aot("build", *common, "--out", str(work / "unmerged-fp32"), "--adapter", str(folders[0]),
                   "--adapter-mode", "unmerged", "--adapter-quant", "none")
        result["builds"]["unmerged_fp32"] = fp32["wall_s"]
        result["accuracy"] = {"merged 8da4w": accuracy(work / "merged", None),
                              "unmerged, adapter 8da8w": accuracy(root, "a1"),
                              "unmerged, adapter fp32": accuracy(work / "unmerged-fp32", None),
                              "foundation alone (no adapter) vs its own fp32": accuracy(root, None)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


def table(r: dict) -> str:
    mib = lambda n: f"{n / 2**20:,.2f} MiB"  # noqa: E731
    lines = [f"## {r['model']}: rank-{r['rank']} adapters on all 7 projections "
             f"(adapter file {mib(r['adapter_file_bytes'])} fp32)", "",
             "| adapters | one bundle | separate merged bundles | each adapter adds | vs its fp32 / bf16 file |",
             "|---|---|---|---|---|"]
    for s in r["sizes"]:
        lines.append(f"| {s['adapters']} | {mib(s['one_bundle'])} | {mib(s['separate_bundles'])} | "
                     f"{mib(s['extra_per_adapter'])} | {s['extra_vs_fp32_file']}x / {s['extra_vs_bf16_file']}x |")
    lines += ["", "| loaded in one process | load s | RSS after |", "|---|---|---|"]
    for name, probe in r["rss"].items():
        for row in probe["rows"]:
            lines.append(f"| {name}: {row['program']} | {row['load_s']} | {row['rss_mib']:,.1f} MiB |")
    if r["speed"]:
        lines += ["", "| program | prefill tok/s | decode tok/s |", "|---|---|---|"]
        for name, s in r["speed"].items():
            if isinstance(s, dict):
                lines.append(f"| {name} | {s['prefill_tps']:.1f} | {s['decode_tps']:.2f} |")
        lines.append(f"\nunmerged adapter vs merged: decode {r['speed']['decode_cost_unmerged']:+.1%} slower, "
                     f"prefill {r['speed']['prefill_cost_unmerged']:+.1%}")
    if "accuracy" in r:
        lines += ["", "| form (vs the fp32 model with the adapter merged) | ppl ratio | top-1 | KL |", "|---|---|---|---|"]
        for name, a in r["accuracy"].items():
            lines.append(f"| {name} | {a['ppl_ratio']:.4f} | {a['top1_agreement']:.3f} | {a['kl_mean']:.5f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
