"""The Llama 3.2 Vision image encoder at its real size (ViT-H/14, 1280 wide, 4 tiles of 560 px):
the memory ExecuTorch plans for one image's encoder pass, and the time per image, with attention
over all 6432 patch rows at once and in query chunks (aot.families.vision.model.VISION_ATTENTION_CHUNK).

    .venv/bin/python bench/vision_encoder.py                    # 2 local + 1 global layers, chunk 0/1024/512
    .venv/bin/python bench/vision_encoder.py --layers 32 --global-layers 8 --chunks 1024   # the whole encoder

Random weights (the arithmetic and memory do not depend on them), float32 or --quant 8da8w/8da4w,
XNNPACK. Planned memory is what the .pte's method metadata says the runtime allocates for
activations between delegated subgraphs (ExecuTorch's memory planner); XNNPACK sizes its own
workspace for the tensors inside a subgraph when the method first runs, so the process's RSS growth
over the first image is reported too. Both grow with the attention chunk, not with the number of
layers (layers reuse the memory). Writes
bench/results/vision_encoder.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(layers: int, global_layers: int, chunk: int, quant: str, repeats: int) -> dict:
    import torch

    from aot.families.vision import model as mllama
    from aot.families.vision.family import example_inputs
    from aot.config import QuantConfig
    from aot.families.common import random_init_
    from aot.pipeline import lower, to_executorch
    from aot.backends import get_backend
    from aot.quant import apply_plan
    from aot.progress import peak_rss_mib, reset_peak_rss
    from aot.runner.pte import load_kernels

    base = mllama.VISION_MODELS["11b-vision"]
    inter = tuple(i for i in base.vision.intermediate_layers if i < layers) or (layers - 1,)
    vision = dataclasses.replace(base.vision, n_layers=layers, n_global_layers=global_layers, intermediate_layers=inter)
    args = dataclasses.replace(base, vision=vision)
    mllama.VISION_ATTENTION_CHUNK = chunk or 10**9
    torch.manual_seed(0)
    encoder = mllama.VisionEncoder(args).eval().requires_grad_(False)
    random_init_(encoder, 0)
    plan = QuantConfig(scheme=quant).plan()
    if quant != "none":
        apply_plan(encoder, plan, output_name="-")
    inputs, _ = example_inputs(args)
    t0 = time.perf_counter()
    program = {"vision_encoder": torch.export.export(encoder, inputs, strict=False)}
    backend = get_backend("xnnpack")
    et = to_executorch(lower(program, backend, plan, {}), share_mutable_buffers=True)
    build_s = time.perf_counter() - t0
    plan = next(p for p in et.executorch_program.execution_plan if p.name == "vision_encoder")
    planned = sum(plan.non_const_buffer_sizes)
    with tempfile.TemporaryDirectory() as d:
        pte = Path(d) / "v.pte"
        with open(pte, "wb") as f:
            et.write_to_file(f)
        load_kernels()
        from executorch.runtime import Runtime

        loaded = Runtime.get().load_program(str(pte))
        method = loaded.load_method("vision_encoder")
        pixel = torch.randn(*inputs[0].shape)
        before = current_rss_mib()
        reset_peak_rss()
        method.execute([pixel, *inputs[1:]])  # warm-up; XNNPACK sizes its own workspace here
        run_peak = peak_rss_mib() - before
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            method.execute([pixel, *inputs[1:]])
            times.append(time.perf_counter() - t)
        size = pte.stat().st_size
    return {"layers": layers, "global_layers": global_layers, "attention_chunk": chunk or "none (all rows)",
            "quant": quant, "planned_mib": round(planned / 2**20, 1), "run_rss_growth_mib": round(run_peak, 1), "pte_mib": round(size / 2**20, 1),
            "seconds_per_image": round(min(times), 3), "build_seconds": round(build_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--global-layers", type=int, default=1)
    p.add_argument("--chunks", default="0,1024,512", help="query rows per attention call; 0 = all at once")
    p.add_argument("--quant", default="none", choices=["none", "8da8w", "8da4w"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    from aot.doctor import host_info

    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        row = measure(args.layers, args.global_layers, chunk, args.quant, args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"vision_encoder_{args.layers}+{args.global_layers}_{args.quant}"
    (args.out / f"{name}.json").write_text(json.dumps({"machine": host_info(), "runs": rows}, indent=2) + "\n")
    lines = ["| layers | attention chunk | quant | planned arena | RSS growth, first image | .pte | s / image (4 tiles) | build s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layers']}+{r['global_layers']} | {r['attention_chunk']} | {r['quant']} | {r['planned_mib']:,} MiB | "
              f"{r['run_rss_growth_mib']:,} MiB | "
              f"{r['pte_mib']:,} MiB | {r['seconds_per_image']} | {r['build_seconds']} |" for r in rows]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
