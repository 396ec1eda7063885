"""`aot bench`: llama-bench style rows, pp N (prompt processing) and tg N (text generation),
mean ± std tok/s over repeats in ExecuTorch's own runner; with --depth (llama-bench's -d), per depth
D a ppD row (a D-token prompt) and a tgN @ dD row (decode after it), with time to first token and RSS."""

from __future__ import annotations

import os
from pathlib import Path

from aot.bundle import open_bundle
from aot.errors import ConfigError
from aot.runner.engines import PythonEngine
from aot.speed import measure_depths, measure_speed
from aot.texts import text_file


def bench_bundle(path: Path, prompt_tokens: int | None, decode_tokens: int | None, repeats: int,
                 text: Path | None, depths: tuple[int, ...] = (), adapter: str | None = None) -> dict:
    """Lengths None: the defaults, shrunk to fit the bundle's context (aot.speed)."""
    for flag, value in (("-p", prompt_tokens), ("-n", decode_tokens), ("-r", repeats)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, but got {value}")
    if any(d < 0 for d in depths):
        raise ConfigError(f"--depth must be >= 0, but got {','.join(map(str, depths))}")
    if depths and prompt_tokens is not None:
        raise ConfigError("-p and --depth: with --depth each prompt is D tokens long; drop -p")
    bundle = open_bundle(path).with_adapter(adapter)
    source = text_file(text).read_text(errors="replace")
    if depths:
        speed = measure_depths(bundle, source, depths, decode_tokens, repeats)
        rows = [row for d in speed["depths"] for row in _depth_rows(d)]
    else:
        encoder = PythonEngine(bundle)
        speed = measure_speed(bundle, encoder.encode(source), prompt_tokens, decode_tokens, repeats, warmup=1)
        rows = [
            {"test": f"pp{speed['prompt_tokens']}", **_row(speed["prefill_tps"])},
            {"test": f"tg{speed['generated_tokens']}", **_row(speed["decode_tps"])},
        ]
    m = bundle.manifest
    return {
        "bundle": str(bundle.root),
        "model": m["model"]["name"],
        "params": m["model"]["num_params"],
        "pte_bytes": m["files"][bundle.program]["bytes"],
        "adapter": bundle.adapter,
        "quant": m["quant"]["scheme"],
        "delegate": m["delegate"],
        "cpus": os.cpu_count(),
        "max_context_len": m["export"]["max_context_len"],
        "rows": rows,
        "speed": speed,
    }


def parse_depths(value: str | None) -> tuple[int, ...]:
    """--depth "0,512,2048" -> (0, 512, 2048)."""
    if value is None:
        return ()
    try:
        depths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ConfigError(f"--depth must be token counts like 0,512,2048, but got '{value}'") from None
    if len(set(depths)) != len(depths):
        raise ConfigError(f"--depth lists a depth twice: '{value}'")
    return depths


def _row(s: dict) -> dict:
    return {"tps_mean": s["mean"], "tps_std": s["stdev"], "runs": s["runs"]}


def _depth_rows(d: dict) -> list[dict]:
    extra = {"depth": d["depth"], "ttft_ms": d["ttft_ms"]["mean"], "rss_end_mib": d["rss_end_mib"]}
    return [{"test": f"pp{d['prompt_tokens']}", **_row(d["prefill_tps"]), **extra},
            {"test": f"tg{d['generated_tokens']} @ d{d['prompt_tokens']}", **_row(d["decode_tps"]), **extra}]


def markdown(r: dict) -> str:
    depth = "depths" in r["speed"]
    head = "| model | params | size | quant | backend | cpus | test | t/s |" + (" ttft ms | RSS MiB |" if depth else "")
    rows = [
        f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['pte_bytes'] / 2**20:.2f} MiB | {r['quant']} "
        f"| {r['delegate']} | {r['cpus']} | {row['test']} | {row['tps_mean']:.2f} ± {row['tps_std']:.2f} |"
        + (f" {row['ttft_ms']:.1f} | {row['rss_end_mib']:.0f} |" if depth else "")
        for row in r["rows"]
    ]
    lines = [head, "|---" * head.count(" |") + "|", *rows]
    if depth:
        s = r["speed"]
        lines.append(f"\nRSS {s['rss_load_mib']:.0f} MiB at load, {s['rss_end_mib']:.0f} MiB at the end; "
                     f"context {r['max_context_len']}")
    if r["speed"].get("defaults_shrunk"):
        lines.append(f"\nlengths shrunk to fit the bundle's context ({r['max_context_len']}); pass -p/-n to choose")
    return "\n".join(lines)
