"""Speed of a bundle in ExecuTorch's own runner: load once, then repeated greedy prompt + decode
runs (the first `warmup` runs are not counted). Shared by `aot validate` and `aot bench`; `aot bench
--depth` measures decode after contexts of given lengths.

Lengths left to their defaults fit the bundle: a prompt of BOS + P tokens and N generated tokens
need P + 1 + N positions, and a bundle built with a short --max-context-len gets shorter runs
(said in the result); lengths given that do not fit are a ConfigError.
"""

from __future__ import annotations

import statistics
import time

import psutil

from aot.bundle import Bundle
from aot.errors import ConfigError
from aot.progress import peak_rss_mib, reset_peak_rss
from aot.runner.engines import StockEngine

PROMPT_TOKENS, DECODE_TOKENS = 128, 64  # `aot validate` and `aot bench` (pp 128, tg 64) when not given
MIN_PROMPT = 2  # BOS and one token of text: the stock runner takes an empty prompt to continue a prefill()


def summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 2),
        "median": round(statistics.median(values), 2),
        "stdev": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "runs": [round(v, 2) for v in values],
    }


def fit_lengths(context: int, prompt: int | None, new: int | None, defaults: tuple[int, int],
                flags: tuple[str, str]) -> tuple[int, int, bool]:
    """(prompt tokens after BOS, new tokens, whether a default was shrunk) for runs in a bundle of
    `context` positions. A length not given (None) takes its default, shrunk to fit beside the
    other; both left out shrink in proportion. Given lengths must fit as they are."""
    room = context - 1  # BOS takes one position
    if prompt is not None and new is not None:
        if prompt + new > room:
            raise ConfigError(f"{flags[0]} {prompt} and {flags[1]} {new}: BOS, the prompt and the generated tokens "
                              f"({prompt + new + 1}) do not fit the bundle's context ({context}); lower them")
        return prompt, new, False
    for flag, given in zip(flags, (prompt, new)):
        if given is not None and given > room - 1:
            raise ConfigError(f"{flag} {given} leaves no room in the bundle's context ({context}) for the other "
                              f"length; at most {room - 1}")
    if room < 2:
        raise ConfigError(f"the bundle's context ({context}) holds no prompt and generated token beside BOS")
    if prompt is None and new is None:
        p, n = defaults
        if p + n <= room:
            return p, n, False
        p = max(1, room * p // (p + n))
        return p, room - p, True
    if prompt is None:
        p = min(defaults[0], room - new)
        return p, new, p < defaults[0]
    n = min(defaults[1], room - prompt)
    return prompt, n, n < defaults[1]


def measure_speed(bundle: Bundle, ids: list[int], prompt_tokens: int | None, decode_tokens: int | None,
                  repeats: int, warmup: int = 0) -> dict:
    """ids: tokenized text (BOS first) to cut the prompt from; lengths None: the defaults, fitted."""
    context = bundle.manifest["export"]["max_context_len"]
    p, n, shrunk = fit_lengths(context, prompt_tokens, decode_tokens, (PROMPT_TOKENS, DECODE_TOKENS),
                               ("--prompt-tokens", "--decode-tokens"))
    n_prompt = min(p, len(ids) - 1)
    if n_prompt < 1:
        raise ConfigError("the text has no tokens to make a prompt of; give a longer --text")
    reset_peak_rss()
    start = time.perf_counter()
    engine = StockEngine(bundle)
    # The runner takes text and re-tokenizes it; the count it reports is what is recorded.
    prompt = engine.fit_text(ids[1:], n_prompt + 1)
    runs = [engine.generate(prompt, n) for _ in range(warmup + repeats)]
    first, runs = runs[0], runs[warmup:]
    return {
        "engine": "stock (TextLLMRunner)",
        "load_s": round(engine.init_s + first.load_s, 3),
        "prompt_tokens": runs[0].prompt_tokens,
        "prompt_tokens_requested": prompt_tokens if prompt_tokens is not None else PROMPT_TOKENS,
        "decode_tokens_requested": decode_tokens if decode_tokens is not None else DECODE_TOKENS,
        "defaults_shrunk": shrunk,  # a length not given was cut to fit the bundle's context
        "generated_tokens": min(r.generated_tokens for r in runs),
        "ttft_ms": summary([r.ttft_s * 1000 for r in runs]),
        "prefill_tps": summary([r.prefill_tps for r in runs]),
        "decode_tps": summary([r.decode_tps for r in runs]),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "wall_s": round(time.perf_counter() - start, 3),
    }


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def depth_lengths(context: int, depths: tuple[int, ...], decode_tokens: int | None) -> tuple[int, bool]:
    """(tokens to generate after each depth, whether the default was shrunk): a depth D is a prompt
    of max(D, MIN_PROMPT) tokens (BOS included), and D + N must fit the context."""
    deepest = max(max(depths), MIN_PROMPT)
    if deepest >= context:
        raise ConfigError(f"--depth {max(depths)}: the bundle's context ({context}) leaves no room to generate after "
                          f"it; lower --depth below {context} or rebuild with a larger --max-context-len")
    if decode_tokens is None:
        n = min(DECODE_TOKENS, context - deepest)
        return n, n < DECODE_TOKENS
    if deepest + decode_tokens > context:
        raise ConfigError(f"--depth {max(depths)} and -n {decode_tokens}: {deepest + decode_tokens} tokens do not "
                          f"fit the bundle's context ({context}); lower --depth or -n (at most "
                          f"{context - deepest} here), or rebuild with a larger --max-context-len")
    return decode_tokens, False


def measure_depths(bundle: Bundle, text: str, depths: tuple[int, ...], decode_tokens: int | None, repeats: int,
                   warmup: int = 1) -> dict:
    """Per depth D (llama-bench's -d): a D-token prompt's time to first token and prefill, then
    decode tok/s over N tokens after it; RSS at load and after each depth. One runner for all
    depths, in the order given: the KV cache's pages stay resident once touched."""
    context = bundle.manifest["export"]["max_context_len"]
    n, shrunk = depth_lengths(context, depths, decode_tokens)
    reset_peak_rss()
    start = time.perf_counter()
    engine = StockEngine(bundle)
    ids, copies = list(engine.tokenizer.encode(text, 0, 0)), 1
    if not ids:
        raise ConfigError("the text has no tokens to make prompts of; give a longer --text")
    if max(depths) > len(ids):  # deeper than the text: the text repeated (as text: natural token boundaries)
        copies = max(depths) // len(ids) + 2
        ids = list(engine.tokenizer.encode("\n\n".join([text] * copies), 0, 0))
    loaded = engine.generate(engine.fit_text(ids, MIN_PROMPT), 1)  # the program loads on the first call
    load = {"load_s": round(engine.init_s + loaded.load_s, 3), "rss_load_mib": rss_mib()}
    rows = []
    for depth in depths:
        prompt = engine.fit_text(ids, max(depth, MIN_PROMPT))
        runs = [engine.generate(prompt, n) for _ in range(warmup + repeats)][warmup:]
        rows.append({
            "depth": depth,
            "prompt_tokens": runs[0].prompt_tokens,
            "generated_tokens": min(r.generated_tokens for r in runs),
            "ttft_ms": summary([r.ttft_s * 1000 for r in runs]),
            "prefill_tps": summary([r.prefill_tps for r in runs]),
            "decode_tps": summary([r.decode_tps for r in runs]),
            "rss_end_mib": rss_mib(),
        })
    return {
        "engine": "stock (TextLLMRunner)",
        **load,
        "decode_tokens_requested": decode_tokens if decode_tokens is not None else DECODE_TOKENS,
        "decode_tokens": n,
        "defaults_shrunk": shrunk,
        "text_copies": copies,
        "depths": rows,
        "rss_end_mib": rss_mib(),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "wall_s": round(time.perf_counter() - start, 3),
    }
