"""Speed of a bundle in ExecuTorch's own runner: load once, then repeated greedy prompt + decode
runs (the first `warmup` runs are not counted). Shared by `aot validate` and `aot bench`."""

from __future__ import annotations

import statistics
import time

from aot.bundle import Bundle
from aot.errors import ConfigError
from aot.progress import peak_rss_mib, reset_peak_rss
from aot.runner.engines import StockEngine


def summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "median": round(statistics.median(values), 2),
        "stdev": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "runs": [round(v, 2) for v in values],
    }


def measure_speed(bundle: Bundle, ids: list[int], token_bytes, prompt_tokens: int, decode_tokens: int,
                  repeats: int, warmup: int = 0) -> dict:
    """ids: tokenized text (BOS first) to cut the prompt from; token_bytes: id -> bytes."""
    context = bundle.manifest["export"]["max_context_len"]
    n_prompt = min(prompt_tokens, context - decode_tokens - 1, len(ids) - 1)
    if n_prompt < 1:
        raise ConfigError(
            f"a {prompt_tokens}-token prompt plus {decode_tokens} generated tokens do not fit the "
            f"bundle's context ({context}) or the text; lower -p/-n"
        )
    # The runner takes text and re-tokenizes it; the count it reports is what is recorded.
    prompt = token_bytes(ids[1 : n_prompt + 1]).decode("utf-8", errors="ignore")
    reset_peak_rss()
    start = time.perf_counter()
    engine = StockEngine(bundle)
    runs = [engine.generate(prompt, decode_tokens) for _ in range(warmup + repeats)]
    first, runs = runs[0], runs[warmup:]
    return {
        "engine": "stock (TextLLMRunner)",
        "load_s": round(engine.init_s + first.load_s, 3),
        "prompt_tokens": runs[0].prompt_tokens,
        "decode_tokens_requested": decode_tokens,
        "generated_tokens": min(r.generated_tokens for r in runs),
        "ttft_ms": summary([r.ttft_s * 1000 for r in runs]),
        "prefill_tps": summary([r.prefill_tps for r in runs]),
        "decode_tps": summary([r.decode_tps for r in runs]),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "wall_s": round(time.perf_counter() - start, 3),
    }
