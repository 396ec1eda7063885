#!/usr/bin/env python3
"""aot's device-side runner: greedy continuations and speed of one model.pte, as JSON.

Self-contained on purpose: `aot validate --device ssh://...` copies this one file next to the
bundle's model.pte on the device and runs it with the device's Python, which needs only the
ExecuTorch pip wheel (its pybind runtime and torch), never aot. It is also what the host runs for
the baseline the device is compared with, so both sides run the same code.

    python3 device_runner.py request.json result.json

request.json: {"pte": "model.pte", ["data": "model.ptd",] "prompts": [[token ids], ...], "new_tokens": N, "repeats": R}
(prompts start with BOS; the host tokenizes, so the device needs no tokenizer). result.json:
{"ok": true, "tokens": [[generated ids per prompt]], "stop_reasons": ["eos" | "max_new_tokens" |
"context", ...], "speed": {...}, "device": {...}} or {"ok": false, "error": "runtime" | "load" |
"context" | "run", "message": "..."}. Exit code 0 when ok. Generation stops at the program's
context (get_max_context_len); a prompt that leaves no room in it is refused before any run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

FORMAT = 1


def describe() -> dict:
    """What this machine is, from the places every Linux has (Android's too)."""
    info = {"os": platform.platform(), "machine": platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            info["memory_mib"] = round(int(f.readline().split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                    info["cpu"] = value.strip()
                    break
    except OSError:
        pass
    return info


def thermal() -> dict:
    """Thermal zones' temperatures (degrees C), where the kernel reports them."""
    zones, base = {}, "/sys/class/thermal"
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith("thermal_zone"))
    except OSError:
        return zones
    for name in names:
        try:
            with open(f"{base}/{name}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{name}/temp") as f:
                zones[f"{name}:{kind}"] = int(f.read().strip()) / 1000
        except (OSError, ValueError):
            continue
    return zones


def _median(values):
    s = sorted(values)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2 if s else 0.0


def run(request: dict, base: str = ".") -> dict:
    """Every prompt `repeats` times: load the method afresh (empty KV cache), prefill in chunks of
    the program's max_seq_len, then greedy single-token steps. Tokens come from the first repeat
    (greedy runs repeat exactly); speed is the median over repeats."""
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (llama:: ops)
        import executorch.kernels.quantized  # noqa: F401  (quantized embeddings)
        import torch
        from executorch.runtime import Runtime
    except Exception as e:  # ImportError, or a wheel built for another Python/ABI
        return {"ok": False, "error": "runtime",
                "message": f"the ExecuTorch runtime does not import with {sys.executable} ({type(e).__name__}: {e})"}
    import executorch

    pte = os.path.join(base, request["pte"])
    start = time.perf_counter()
    try:
        data = request.get("data")  # model.ptd when the weights are external
        program = Runtime.get().load_program(pte, data_path=os.path.join(base, data) if data else None)
        meta = {name: list(program.load_method(name).execute([]))
                for name in ("get_max_seq_len", "get_max_context_len", "get_eos_ids")}
        program.load_method("forward")
    except Exception as e:
        return {"ok": False, "error": "load", "message": f"{pte}: ExecuTorch cannot load it ({e})"}
    load_s = time.perf_counter() - start
    seq_len, context, eos = meta["get_max_seq_len"][0], meta["get_max_context_len"][0], set(meta["get_eos_ids"])
    longest = max((len(p) for p in request["prompts"]), default=0)
    if longest >= context:
        return {"ok": False, "error": "context",
                "message": f"a {longest}-token prompt leaves no room to generate in {pte}'s context ({context})"}
    before = thermal()
    tokens, stops, ttft, prefill, decode = [], [], [], [], []
    try:
        for repeat in range(request.get("repeats", 1)):
            for i, prompt in enumerate(request["prompts"]):
                forward = program.load_method("forward")
                t0 = time.perf_counter()
                for pos in range(0, len(prompt), seq_len):
                    out = forward.execute([torch.tensor([prompt[pos : pos + seq_len]]), torch.tensor([pos])])[0]
                logits = out[0, -1] if out.dim() == 3 else out[0]
                generated, stamps, pos = [], [], len(prompt)
                steps = min(request["new_tokens"], context - pos)
                stop = "context" if steps < request["new_tokens"] else "max_new_tokens"
                for step in range(steps):
                    token = int(logits.argmax())
                    stamps.append(time.perf_counter())
                    generated.append(token)
                    if token in eos:
                        stop = "eos"
                        break
                    if step + 1 == steps:  # the last token's logits are not needed
                        break
                    out = forward.execute([torch.tensor([[token]]), torch.tensor([pos])])[0]
                    logits = out[0, -1] if out.dim() == 3 else out[0]
                    pos += 1
                if repeat == 0:
                    tokens.append(generated)
                    stops.append(stop)
                if stamps:
                    ttft.append(stamps[0] - t0)
                    prefill.append(len(prompt) / max(stamps[0] - t0, 1e-9))
                    if len(stamps) > 1:
                        decode.append((len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9))
    except Exception as e:
        return {"ok": False, "error": "run", "message": f"{pte}: forward failed ({type(e).__name__}: {e})"}
    return {
        "ok": True,
        "format": FORMAT,
        "tokens": tokens,
        "stop_reasons": stops,
        "speed": {
            "load_s": round(load_s, 3),
            "ttft_ms": {"median": round(_median(ttft) * 1000, 2), "min": round(min(ttft, default=0) * 1000, 2),
                        "max": round(max(ttft, default=0) * 1000, 2)},
            "prefill_tps": {"median": round(_median(prefill), 2), "min": round(min(prefill, default=0), 2),
                            "max": round(max(prefill, default=0), 2)},
            "decode_tps": {"median": round(_median(decode), 2), "min": round(min(decode, default=0), 2),
                           "max": round(max(decode, default=0), 2)},
            "runs": len(ttft),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        "thermal": {"before": before, "after": thermal()},
        "device": describe(),
        "runtime": {"executorch": getattr(executorch, "__version__", "unknown"), "python": sys.executable},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.splitlines()[0] + "\nusage: device_runner.py request.json result.json", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        request = json.load(f)
    result = run(request, base=os.path.dirname(os.path.abspath(argv[1])))
    tmp = argv[2] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, argv[2])
    return 0 if result["ok"] else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv))
