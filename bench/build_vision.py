"""Build the real Llama 3.2 11B Vision architecture with random weights (`aot build --model
11b-vision --random-weights`), then answer one generated image with `aot run --image`; print and
write (JSON + markdown) the build's time and peak RSS per stage, the .pte size, the preflight
estimate, and the image encoder's time and decode speed.

    .venv/bin/python bench/build_vision.py                        # 11b-vision, text 8da4w, vision 8da8w
    .venv/bin/python bench/build_vision.py --vision-quant 8da4w

Peak RSS is wait4's maximum resident set of the build process; per-stage peaks come from the
bundle's own record (VmHWM reset at each stage).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_measured(cmd: list[str], log: Path) -> dict:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, cwd=ROOT)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"{cmd[1]} failed with exit code {code}; last lines of {log}:\n" + "\n".join(tail))
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "result": json.loads(stdout)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="11b-vision")
    p.add_argument("--vision-quant", default="8da8w")
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--max-context-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--keep", type=Path, help="keep the bundle here (default: a temporary directory)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    import numpy as np
    from PIL import Image

    from aot.doctor import host_info

    work = Path(tempfile.mkdtemp(prefix="aot-bench-vision-"))
    bundle = args.keep or work / "bundle"
    aot = str(Path(sys.executable).with_name("aot"))
    build = run_measured([aot, "build", "--model", args.model, "--random-weights", "--vision-quant", args.vision_quant,
                          "--max-seq-len", str(args.max_seq_len), "--max-context-len", str(args.max_context_len),
                          "--out", str(bundle), "--force", "--json"], work / "build.log")
    manifest = build.pop("result")
    image = work / "image.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(image)  # 2x2 tiles
    # Random weights: no tokenizer, so the runner is driven with token ids.
    from aot.bundle import open_bundle

    run = measure_engine(open_bundle(bundle), image, args.new_tokens)
    pte = manifest["files"]["model.pte"]["bytes"]
    result = {
        "machine": host_info(), "model": args.model, "vision_quant": args.vision_quant,
        "build": {**build, "pte_bytes": pte, "stages": manifest["build"]["stages"],
                  "preflight": manifest["build"].get("preflight")},
        "run": run,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"build_{args.model}_{args.vision_quant}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"`aot build --model {args.model} --random-weights --vision-quant {args.vision_quant}` "
             f"(text 8da4w g32, max_seq_len {args.max_seq_len}, context {args.max_context_len}):", "",
             "| stage | seconds | peak RSS |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['seconds']:.1f} | {s['peak_rss_mib'] / 1024:.2f} GiB |" for s in manifest["build"]["stages"]]
    lines += [f"| **total** | **{build['seconds']}** | **{build['peak_rss_mib'] / 1024:.2f} GiB** |", "",
              f".pte {pte / 2**30:.2f} GiB ({pte / 1e9:.2f} GB); preflight estimate: "
              f"{(result['build']['preflight'] or {}).get('pte_bytes', 0) / 2**30:.2f} GiB .pte, "
              f"{(result['build']['preflight'] or {}).get('peak_rss_bytes', 0) / 2**30:.2f} GiB peak.", "",
              f"One {run['tiles']}-tile image: vision_encoder {run['image_s']:.1f} s; prefill {run['prefill_tokens']} tokens "
              f"{run['prefill_tps']:.2f} tok/s; decode {run['decode_tps']:.2f} tok/s; runner peak RSS "
              f"{run['peak_rss_mib'] / 1024:.2f} GiB."]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def measure_engine(bundle, image: Path, new_tokens: int) -> dict:
    """Image encoder time, prefill and decode speed through aot's vision runner, by token ids."""
    import resource

    from aot.runner.mllama import VisionEngine, load_image

    engine = VisionEngine(bundle)
    pre = load_image(image, engine.spec)
    state, tiles = engine.image_state(pre)
    ids = [engine.bos, engine.image_token] + [1000 + i for i in range(30)]
    mask = engine.mask(ids, tiles)
    t = time.perf_counter()
    logits = engine.prefill(ids, mask, state)
    prefill_s = time.perf_counter() - t
    row, pos, stamps = mask[:, -1:], len(ids), []
    for _ in range(new_tokens):
        token = int(logits.argmax())
        logits = engine.step([token], pos, row, state)
        pos += 1
        stamps.append(time.perf_counter())
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"tiles": tiles, "image_s": round(engine.image_s, 2), "prefill_tokens": len(ids),
            "prefill_tps": round(len(ids) / prefill_s, 2), "decode_tps": round(decode, 2), "load_s": round(engine.load_s, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


if __name__ == "__main__":
    main()
