"""`aot bench`: llama-bench style rows, pp N (prompt processing) and tg N (text generation),
mean ± std tok/s over repeats in ExecuTorch's own runner."""

from __future__ import annotations

import os
from pathlib import Path

from aot.bundle import PTE_NAME, open_bundle
from aot.errors import ConfigError
from aot.runner.engines import PythonEngine
from aot.speed import measure_speed
from aot.texts import text_file


def bench_bundle(path: Path, prompt_tokens: int, decode_tokens: int, repeats: int, text: Path | None) -> dict:
    for flag, value in (("-p", prompt_tokens), ("-n", decode_tokens), ("-r", repeats)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, but got {value}")
    bundle = open_bundle(path)
    encoder = PythonEngine(bundle)
    ids = encoder.encode(text_file(text).read_text(errors="replace"))
    speed = measure_speed(bundle, ids, encoder.token_bytes, prompt_tokens, decode_tokens, repeats, warmup=1)
    m = bundle.manifest
    return {
        "bundle": str(bundle.root),
        "model": m["model"]["name"],
        "params": m["model"]["num_params"],
        "pte_bytes": m["files"][PTE_NAME]["bytes"],
        "quant": m["quant"]["scheme"],
        "delegate": m["delegate"],
        "cpus": os.cpu_count(),
        "rows": [
            {"test": f"pp{speed['prompt_tokens']}", **_row(speed["prefill_tps"])},
            {"test": f"tg{speed['generated_tokens']}", **_row(speed["decode_tps"])},
        ],
        "speed": speed,
    }


def _row(s: dict) -> dict:
    return {"tps_mean": s["mean"], "tps_std": s["stdev"], "runs": s["runs"]}


def markdown(r: dict) -> str:
    head = "| model | params | size | quant | backend | cpus | test | t/s |\n|---|---|---|---|---|---|---|---|"
    rows = [
        f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['pte_bytes'] / 2**20:.2f} MiB | {r['quant']} "
        f"| {r['delegate']} | {r['cpus']} | {row['test']} | {row['tps_mean']:.2f} ± {row['tps_std']:.2f} |"
        for row in r["rows"]
    ]
    return "\n".join([head, *rows])
