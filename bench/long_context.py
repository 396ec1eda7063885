"""Long context on the real Llama 3.2 architectures (random weights): the KV cache's storage (fp32,
int8) and the context length against the memory a bundle plans and uses and its decode speed at
depth, side by side in one run with llama.cpp's q8_0 KV cache and ExecuTorch's export_llm with
quantize_kv_cache.

    .venv/bin/python bench/long_context.py                                    # 1B: the default matrix
    .venv/bin/python bench/long_context.py --model 3b --contexts 2048,32768 --depths 0,4096
    .venv/bin/python bench/long_context.py --model demo --contexts 2048,8192 --depths 0,1024 --no-llamacpp \
        --no-export-llm --out /tmp/lc_demo.json                              # smoke test

For each --caches x --contexts: `aot build --model M --random-weights --seed 0 --quant 8da4w
--kv-cache C --max-context-len N` (reused from --work when its bundle.json matches), timed with its
peak RSS (wait4); bundle.json's memory_plan (the runtime plan read from the serialized program).
Then each program measured in a fresh process: RSS after the method loads (ExecuTorch allocates its
planned arenas then; pages become resident when written), then for each depth D in ascending order:
prefill up to D tokens (in max_seq_len chunks; `prefill_s` is the cumulative prefill time to reach
D, the time to first token of a D-token prompt up to the few decode steps measured on the way),
then --decode single-token calls: decode tok/s after a context of D. RSS at the end. Random token
ids; ExecuTorch's Python runtime (the kernels TextLLMRunner runs: XNNPACK and the LLM custom ops).

llama.cpp (bench/llamacpp.py's GGUF of the same random weights, Q4_0) runs the same depths with
flash attention and a q8_0 K and V cache (type_k = type_v = GGML_TYPE_Q8_0), n_ctx = the largest
context measured. export_llm builds the same architecture with quantize_kv_cache=True and
8da4w g32 (its own random weights: speed does not depend on their values) at --export-llm-context.

llama-cpp-python (benchmark only): on a CPU with AMX (Sapphire Rapids Xeons) the 0.3.36 wheel
built for the native CPU segfaults in llama_decode (its AMX int8 path); build it without AMX:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
      -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF" \
      .venv/bin/pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36

Writes --out (JSON; default bench/results/long_context_<model>.json) and the table next to it (.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB, MIB = 1024**3, 1024**2
GGML_TYPE_Q8_0 = 8


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def staged_depths(depths: list[int], decode: int, feed, step, prefill_max: int | None = None) -> list[dict]:
    """Prefill to each depth in turn (`feed(tokens, pos)` in chunks it chooses), then `decode`
    single tokens (`step(token, pos)`); per depth: cumulative prefill seconds and decode tok/s.
    Depths past `prefill_max` are reached without a prefill: the decode steps run at positions D..
    over a cache whose earlier positions were not written (the attention reads all D of them either
    way, so the step does the same work; its logits are not the real ones). Those rows say
    "prefilled": false."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (max(depths) + decode * len(depths) + 1,), generator=g).tolist()
    pos, prefill_s, rows = 0, 0.0, []
    for depth in sorted(depths):
        prefilled = prefill_max is None or depth <= prefill_max
        if depth > pos and prefilled:
            start = time.perf_counter()
            feed(ids[pos:depth], pos)
            prefill_s += time.perf_counter() - start
            print(f"[bench]     prefilled to {depth} in {prefill_s:.1f} s", file=sys.stderr, flush=True)
        pos = max(pos, depth)
        first = time.perf_counter()
        step(ids[pos], pos)  # the first token's logits: part of TTFT, not of decode
        start = time.perf_counter()
        for i in range(1, decode):
            step(ids[pos + i], pos + i)
        seconds = time.perf_counter() - start
        rows.append({"depth": depth, "prefilled": prefilled,
                     "prefill_s": round(prefill_s + (start - first), 2) if prefilled else None,
                     "decode_tps": round((decode - 1) / seconds, 2), "rss_mib": round(rss() / MIB, 1)})
        print(f"[bench]     {rows[-1]}", file=sys.stderr, flush=True)
        pos += decode
    return rows


def measure_pte(pte: Path, depths: list[int], decode: int, prefill_max: int | None = None) -> dict:
    """In this (fresh) process: load the program's forward, then staged_depths."""
    import torch

    from aot.native import native_output_silenced
    from aot.runner.pte import PteProgram

    base = rss()
    with native_output_silenced((1, 2)):
        program = PteProgram(pte)
        meta = program.metadata()
        start = time.perf_counter()
        forward = program.forward()
        load_s = time.perf_counter() - start
    loaded = rss()
    chunk, context = meta["get_max_seq_len"], meta["get_max_context_len"]
    depths = [d for d in depths if d + decode <= context]

    def feed(tokens, pos):
        for i in range(0, len(tokens), chunk):
            forward(torch.tensor([tokens[i : i + chunk]]), torch.tensor([pos + i]))

    def step(token, pos):
        forward(torch.tensor([[token]]), torch.tensor([pos]))

    with native_output_silenced((1, 2)):
        rows = staged_depths(depths, decode, feed, step, prefill_max)
    return {"load_s": round(load_s, 2), "rss_before_load_mib": round(base / MIB, 1),
            "rss_at_load_mib": round(loaded / MIB, 1), "depths": rows, "max_context_len": context}


def measure_llamacpp(gguf: Path, depths: list[int], decode: int, n_ctx: int, threads: int) -> dict:
    import llama_cpp

    base = rss()
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, flash_attn=True, type_k=GGML_TYPE_Q8_0, type_v=GGML_TYPE_Q8_0,
                          verbose=False)
    load_s = time.perf_counter() - start
    loaded = rss()

    def feed(tokens, pos):
        llm.n_tokens = pos
        llm.eval(tokens)

    def step(token, pos):
        llm.n_tokens = pos
        llm.eval([token])

    llm.reset()
    rows = staged_depths([d for d in depths if d + decode <= n_ctx], decode, feed, step)
    return {"load_s": round(load_s, 2), "rss_before_load_mib": round(base / MIB, 1),
            "rss_at_load_mib": round(loaded / MIB, 1), "depths": rows, "max_context_len": n_ctx,
            "kv_cache": "q8_0 K and V, flash attention"}


def in_subprocess(args: list[str], log: Path) -> dict:
    """This script's --measure-* mode in a fresh process (its own RSS); its JSON result."""
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-10:]
        raise SystemExit(f"measuring {args} failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build(model: str, cache: str, context: int, out: Path, log: Path) -> dict:
    from build_1b import run_measured

    want = {"kv_cache": cache, "max_context_len": context, "model": model}
    manifest, timing = out / "bundle.json", out.with_suffix(".build.json")
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if (m["export"]["kv_cache"]["storage"], m["export"]["max_context_len"], m["model"]["name"]) == \
                (cache, context, model):  # reused: the build as measured when it was made (if it was)
            measured = json.loads(timing.read_text()) if timing.is_file() else None
            return {**want, "reused": True, "build": measured, "manifest": m}
    cmd = [str(ROOT / ".venv/bin/aot"), "build", "--model", model, "--random-weights", "--seed", "0",
           "--quant", "8da4w", "--kv-cache", cache, "--max-context-len", str(context), "--out", str(out),
           "--force", "--no-preflight"] + ([] if model in ("1b", "3b") else ["--bos-id", "1", "--eos-id", "2"])
    print(f"[bench] aot build {model} {cache} cache, context {context} ...", flush=True)
    measured = {**run_measured(cmd, log), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    timing.write_text(json.dumps(measured) + "\n")
    print(f"[bench]   {measured['seconds']} s, peak {measured['peak_rss_mib'] / 1024:.2f} GiB", flush=True)
    return {**want, "build": measured, "manifest": json.loads(manifest.read_text())}


def plan_summary(manifest: dict) -> dict | None:
    plan = manifest.get("memory_plan")
    if plan is None:
        return None
    total = plan.get("total", plan)
    return {k: v for k, v in total.items() if isinstance(v, (int, float, str))}


def table(result: dict) -> str:
    depths = result["depths"]
    head = "| subject | context | cache | build | build peak | plan at load (KV cache) | RSS at load | " + \
        " | ".join(f"decode @{d // 1024}K" for d in depths) + " | prefill (TTFT) |"
    lines = [head, "|" + "---|" * (8 + len(depths))]
    for s in result["subjects"]:
        b = s.get("build") or {}
        plan = s.get("plan") or {}
        planned = plan.get("at_load_bytes")
        by_depth = {r["depth"]: r for r in s["run"]["depths"]}
        speeds = [f"{by_depth[d]['decode_tps']:.1f} tok/s" if d in by_depth else "-" for d in depths]
        last = next((r for r in reversed(s["run"]["depths"]) if r["prefilled"]), None)
        lines.append(
            f"| {s['name']} | {s['context']} | {s['cache']} | "
            + (f"{b['seconds']:.0f} s" if b else ("reused" if s["name"].startswith("aot") else "-")) + " | "
            + (f"{b['peak_rss_mib'] / 1024:.2f} GiB" if b else "-") + " | "
            + (f"{planned / GIB:.2f} GiB ({plan['mutable_buffers_bytes'] / GIB:.2f})" if planned else "-") + " | "
            + f"{s['run']['rss_at_load_mib'] / 1024:.2f} GiB | " + " | ".join(speeds) + " | "
            + (f"{last['prefill_s']:.1f} s for {last['depth']} tokens" if last and last["depth"] else "-") + " |")
    m = result["machine"]
    lines.append(f"\nmachine: {m['cpu']}, {m['cores']} cores; decode over {result['decode']} tokens per depth, "
                 f"measured {result['measured_at']}. aot depths past {result['prefill_max']} are reached without a "
                 "prefill (decode speed only); llama.cpp's are prefilled.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--caches", default="fp32,int8")
    ap.add_argument("--contexts", default="2048,32768,131072")
    ap.add_argument("--depths", default="0,4096,16384", help="Decode depths, measured on each bundle whose context holds them.")
    ap.add_argument("--decode", type=int, default=16, help="Tokens decoded at each depth.")
    ap.add_argument("--prefill-max", type=int, default=4096,
                    help="aot programs: depths past this are reached without a prefill (decode speed only); "
                         "llama.cpp always prefills.")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "long_context")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-export-llm", action="store_true")
    ap.add_argument("--export-llm-context", type=int, default=32768)
    ap.add_argument("--llamacpp-context", type=int, default=32768, help="llama.cpp's n_ctx (its depths: those that fit).")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--skip", default="", help="MODEL-CACHE-CONTEXT subjects to leave out (comma-separated).")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--measure-pte", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--measure-gguf", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    depths = [int(d) for d in a.depths.split(",")]
    if a.measure_pte:
        print(json.dumps(measure_pte(a.measure_pte, depths, a.decode, a.prefill_max)))
        return
    if a.measure_gguf:
        print(json.dumps(measure_llamacpp(a.measure_gguf, depths, a.decode, a.n_ctx, a.threads)))
        return

    a.work.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in a.contexts.split(",")]
    subjects = []
    for cache in a.caches.split(","):
        for context in contexts:
            name = f"{a.model}-{cache}-{context}"
            if name in a.skip.split(","):
                continue
            b = build(a.model, cache, context, a.work / name, a.work / f"{name}.build.log")
            print(f"[bench] measuring {name} ...", flush=True)
            run = in_subprocess(["--measure-pte", str(a.work / name / "model.pte"), "--depths", a.depths,
                                 "--decode", str(a.decode), "--prefill-max", str(a.prefill_max)],
                                a.work / f"{name}.run.log")
            subjects.append({"name": f"aot {cache} cache", "context": context, "cache": cache,
                             "build": b.get("build"), "plan": plan_summary(b["manifest"]),
                             "kv_cache": b["manifest"]["export"]["kv_cache"], "run": run})
            print(f"[bench]   {json.dumps(run['depths'])}", flush=True)
    if not a.no_llamacpp:
        gguf = a.work / f"{a.model}-q4_0.gguf"
        if not gguf.is_file():
            subprocess.run([sys.executable, str(ROOT / "bench/llamacpp.py"), "--model", a.model, "--gguf", str(gguf),
                            "--keep", "--no-check", "--repeats", "1", "--out", str(a.work / "llamacpp_speed.json")],
                           check=True)
        n_ctx = a.llamacpp_context
        ldepths = ",".join(d for d in a.depths.split(",") if int(d) + a.decode <= n_ctx)
        print(f"[bench] measuring llama.cpp q8_0 cache, n_ctx {n_ctx} ...", flush=True)
        run = in_subprocess(["--measure-gguf", str(gguf), "--n-ctx", str(n_ctx), "--depths", ldepths,
                             "--decode", str(a.decode), "--threads", str(a.threads)], a.work / "llamacpp.run.log")
        subjects.append({"name": "llama.cpp Q4_0", "context": n_ctx, "cache": "q8_0", "build": None, "plan": None,
                         "run": run})
    if not a.no_export_llm:
        subjects.append(export_llm(a))

    from aot.doctor import host_info

    result = {"model": a.model, "quant": "8da4w g32 (aot: 8-bit embedding, 8da8w output)", "depths": depths,
              "decode": a.decode, "prefill_max": a.prefill_max, "machine": host_info(), "subjects": subjects,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = a.out or ROOT / "bench" / "results" / f"long_context_{a.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


def export_llm(a) -> dict:
    from build_1b import run_measured, write_params

    work = a.work / "export_llm"
    work.mkdir(exist_ok=True)
    pte = work / "export_llm.pte"
    params = work / "params.json"
    write_params(a.model, params)
    params = params.absolute()
    ctx = a.export_llm_context
    timing = work / "build.json"  # the build as measured when it was made
    measured = json.loads(timing.read_text()) if pte.is_file() and timing.is_file() else None
    if not pte.is_file():
        cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm",
               f"base.params={params}", "base.model_class=llama3_2",
               "model.use_kv_cache=True", "model.use_sdpa_with_kv_cache=True", "model.enable_dynamic_shape=True",
               "model.quantize_kv_cache=True", "backend.xnnpack.enabled=True", "export.max_seq_length=128",
               f"export.max_context_length={ctx}", "export.output_name=export_llm.pte",
               "quantization.qmode=8da4w", "quantization.group_size=32",
               'base.metadata="{\\"get_bos_id\\":128000,\\"get_eos_ids\\":[1000000]}"']
        print(f"[bench] export_llm quantize_kv_cache, context {ctx} ...", flush=True)
        measured = run_measured(cmd, work / "export_llm.log", cwd=work)
        timing.write_text(json.dumps(measured) + "\n")
    print("[bench] measuring export_llm ...", flush=True)
    run = in_subprocess(["--measure-pte", str(pte), "--depths", a.depths, "--decode", str(a.decode),
                         "--prefill-max", str(a.prefill_max)], a.work / "export_llm.run.log")
    return {"name": "export_llm quantize_kv_cache", "context": ctx, "cache": "int8", "build": measured, "plan": None,
            "run": run}


if __name__ == "__main__":
    main()
