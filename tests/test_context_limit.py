"""The context limit in every path (issue 19, item 5) and `aot bench --depth` (item 7).

A prompt that leaves no room to generate is one line and exit 3 (or, with --truncate-prompt, its
tail is kept); a generation that reaches the context stops there with stop_reason "context"; the
default lengths of validate, bench, validate --device and farm package shrink to fit a short
context. Bundles: conftest's (--max-seq-len 16 --max-context-len 64), run by ExecuTorch's runners.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aot.bundle import open_bundle
from aot.errors import ConfigError
from aot.ondevice import NEW_TOKENS, device_lengths
from aot.runner import device_runner
from aot.runner.engines import PythonEngine, StockEngine, fit_prompt, keep_tail, stop_reason
from aot.speed import DECODE_TOKENS, PROMPT_TOKENS, fit_lengths
from conftest import CTX, run_cli

WORDS = "the quick brown fox jumps over the lazy dog while naïve cafés serve 日本語 tea; "
LONG = WORDS * 40  # far past a 64-token context


# ---- the arithmetic, without a bundle ----------------------------------------------------------

def test_fit_prompt_refuses_or_keeps_the_tail():
    assert fit_prompt(10, 5, 64, truncate=False) == 10
    assert fit_prompt(63, 5, 64, truncate=False) == 63  # one position left: one token
    with pytest.raises(ConfigError, match=r"64 tokens .* holds 64.*--truncate-prompt .*last 58 tokens.*--max-context-len"):
        fit_prompt(64, 5, 64, truncate=False)
    assert fit_prompt(300, 5, 64, truncate=True) == 59  # room for all 5 new tokens
    assert fit_prompt(40, 30, 64, truncate=True) == 34
    assert fit_prompt(300, 900, 64, truncate=True) == 63  # max_new_tokens fills the context: room for one
    assert fit_prompt(20, 5, 64, truncate=True) == 20
    assert keep_tail([0, 1, 2, 3, 4], 3) == [0, 3, 4] and keep_tail([0, 1], 5) == [0, 1]


def test_stop_reason():
    assert stop_reason(3, 10, 10) == "eos"
    assert stop_reason(10, 10, 10) == "max_new_tokens"
    assert stop_reason(10, 10, 900) == "context"


def test_fit_lengths_shrinks_defaults_and_refuses_given_lengths():
    flags = ("-p", "-n")
    assert fit_lengths(512, None, None, (128, 64), flags) == (128, 64, False)
    p, n, shrunk = fit_lengths(64, None, None, (128, 64), flags)
    assert shrunk and p + n + 1 == 64 and p == 42  # in proportion, BOS included
    assert fit_lengths(64, None, 20, (128, 64), flags) == (43, 20, True)
    assert fit_lengths(64, 50, None, (128, 64), flags) == (50, 13, True)
    assert fit_lengths(64, 40, 23, (128, 64), flags) == (40, 23, False)
    with pytest.raises(ConfigError, match=r"-p 60 and -n 10: .*\(71\) do not fit the bundle's context \(64\)"):
        fit_lengths(64, 60, 10, (128, 64), flags)
    with pytest.raises(ConfigError, match="-n 63 leaves no room"):
        fit_lengths(64, None, 63, (128, 64), flags)


def test_help_shows_the_fitted_defaults(monkeypatch):
    from aot.ondevice import PROMPT_TOKENS as DEVICE_PROMPT

    monkeypatch.setenv("COLUMNS", "300")  # one line per option

    for command, flag, value in ((["validate"], "--prompt-tokens", PROMPT_TOKENS),
                                 (["validate"], "--decode-tokens", DECODE_TOKENS),
                                 (["bench"], "--prompt-tokens", PROMPT_TOKENS),
                                 (["bench"], "--decode-tokens", DECODE_TOKENS),
                                 (["validate"], "--device-prompt-tokens", DEVICE_PROMPT),
                                 (["validate"], "--new-tokens", NEW_TOKENS),
                                 (["farm", "package"], "--new-tokens", NEW_TOKENS)):
        line = next(ln for ln in run_cli(*command, "--help").stdout.splitlines() if f" {flag} " in ln)
        assert f"[{value}, or what fits" in line, line


# ---- the stock and python engines on a 64-token bundle -----------------------------------------

def test_the_runner_counts_prompts_as_aot_does(bundle_bytes, bundle_fp32):
    for built in (bundle_bytes, bundle_fp32):
        stock = StockEngine(open_bundle(Path(built["path"])))
        for prompt in ("naïve café — 日本語: ", "x", WORDS):
            assert stock.generate(prompt, 1).prompt_tokens == stock.count(prompt), prompt


@pytest.mark.parametrize("engine", ["stock", "python"])
def test_a_prompt_past_the_context_is_one_line_exit_3(bundle_fp32, engine):
    r = run_cli("run", bundle_fp32["path"], "--prompt", LONG, "--max-new-tokens", 5, "--engine", engine)
    assert r.exit_code == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"context holds {CTX}" in lines[0] and "--truncate-prompt" in lines[0]
    assert "--max-context-len" in lines[0]


def test_no_traceback_from_the_stock_runner_in_a_real_process(bundle_fp32):
    """What a user sees: a subprocess of `aot run` (no CliRunner), the default engine."""
    aot = Path(sys.executable).with_name("aot")
    for args, code in ((["--prompt", LONG], 3), (["--prompt", "the", "--max-new-tokens", "900"], 0),
                       (["--prompt", ""], 3)):
        done = subprocess.run([str(aot), "run", bundle_fp32["path"], *args], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "400"})
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr and "RuntimeError" not in done.stderr, done.stderr


@pytest.mark.parametrize("engine", ["stock", "python"])
def test_truncate_prompt_keeps_the_tail_that_fits(bundle_fp32, engine):
    r = run_cli("run", bundle_fp32["path"], "--prompt", LONG, "--max-new-tokens", 5, "--engine", engine,
                "--truncate-prompt", "--json")
    assert r.exit_code == 0, r.stderr
    g = json.loads(r.stdout)
    full = PythonEngine(open_bundle(Path(bundle_fp32["path"]))).encode(LONG)
    assert g["prompt_truncated_from"] == len(full) > CTX
    assert 0 < g["prompt_tokens"] <= CTX - 5 and g["prompt_tokens"] + g["generated_tokens"] <= CTX
    if engine == "python":  # ids are cut exactly; the stock runner's text tail may re-tokenize shorter
        assert g["prompt_tokens"] == CTX - 5
    shown = run_cli("run", bundle_fp32["path"], "--prompt", LONG, "--max-new-tokens", 5, "--engine", engine,
                    "--truncate-prompt")
    assert shown.exit_code == 0 and "prompt truncated (--truncate-prompt)" in shown.stderr


@pytest.mark.parametrize("engine", ["stock", "python"])
def test_a_long_generation_stops_at_the_context_and_says_so(bundle_fp32, engine):
    r = run_cli("run", bundle_fp32["path"], "--prompt", WORDS, "--max-new-tokens", 900, "--engine", engine, "--json")
    assert r.exit_code == 0, r.stderr
    g = json.loads(r.stdout)
    assert g["stop_reason"] == "context" and g["max_context_len"] == CTX
    assert g["prompt_tokens"] + g["generated_tokens"] == CTX  # the context, exactly filled
    shown = run_cli("run", bundle_fp32["path"], "--prompt", WORDS, "--max-new-tokens", 900, "--engine", engine)
    assert shown.exit_code == 0 and "stopped at the bundle's context" in shown.stderr
    short = json.loads(run_cli("run", bundle_fp32["path"], "--prompt", WORDS, "--max-new-tokens", 3, "--engine",
                               engine, "--json").stdout)
    assert short["stop_reason"] in ("max_new_tokens", "eos") and short["generated_tokens"] <= 3


def test_stock_and_python_agree_up_to_the_limit(bundle_fp32):
    """Both engines run the same greedy tokens right up to the last position."""
    bundle = open_bundle(Path(bundle_fp32["path"]))
    stock, python = StockEngine(bundle), PythonEngine(bundle)
    prompt = stock.fit_text(python.encode(LONG)[1:], 50)
    a, b = stock.generate(prompt, 900), python.generate(prompt, 900)
    assert (a.prompt_tokens, a.generated_tokens, a.stop_reason) == (b.prompt_tokens, b.generated_tokens, b.stop_reason)
    assert a.text == b.text


# ---- validate and bench defaults on a 64-token bundle, bench --depth ---------------------------

def test_validate_defaults_fit_a_short_context(bundle_fp32):
    r = run_cli("validate", bundle_fp32["path"], "--repeats", 1, "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    s = json.loads(r.stdout)["speed"]
    assert s["defaults_shrunk"] and s["prompt_tokens_requested"] == PROMPT_TOKENS
    assert s["prompt_tokens"] + s["generated_tokens"] <= CTX and s["generated_tokens"] >= 1
    bad = run_cli("validate", bundle_fp32["path"], "--repeats", 1, "--prompt-tokens", 60, "--decode-tokens", 10)
    assert bad.exit_code == 3 and "do not fit the bundle's context (64)" in bad.stderr.strip().splitlines()[-1]


def test_bench_defaults_fit_and_depth_rows(bundle_fp32, tmp_path):
    r = run_cli("bench", bundle_fp32["path"], "-r", 1, "--json")
    assert r.exit_code == 0, r.stderr
    plain = json.loads(r.stdout)
    assert [row["test"][:2] for row in plain["rows"]] == ["pp", "tg"] and plain["speed"]["defaults_shrunk"]

    short = tmp_path / "short.txt"
    short.write_text(WORDS)  # fewer tokens than the deepest depth: the text is repeated
    r = run_cli("bench", bundle_fp32["path"], "--depth", "0,24,48", "-n", 8, "-r", 2, "--text", short, "--json")
    assert r.exit_code == 0, r.stderr
    b = json.loads(r.stdout)
    depths = b["speed"]["depths"]
    assert [d["depth"] for d in depths] == [0, 24, 48] and b["speed"]["text_copies"] > 1
    assert [d["prompt_tokens"] for d in depths][1:] == [24, 48]  # the runner's own count
    assert [row["test"] for row in b["rows"]][2:] == ["pp24", "tg8 @ d24", "pp48", "tg8 @ d48"]
    assert all(row["tps_mean"] > 0 and len(row["runs"]) == 2 and row["ttft_ms"] > 0 for row in b["rows"])
    assert b["speed"]["rss_load_mib"] > 0 and all(d["rss_end_mib"] > 0 for d in depths)
    table = run_cli("bench", bundle_fp32["path"], "--depth", "24", "-n", 8, "-r", 1).stdout
    assert "| ttft ms | RSS MiB |" in table and "| tg8 @ d24 |" in table

    for depth, n, needle in (("60", 8, "--depth 60 and -n 8"), ("64", None, "--depth 64"), ("a,b", None, "--depth")):
        r = run_cli("bench", bundle_fp32["path"], "--depth", depth, *(["-n", n] if n else []))
        assert r.exit_code == 3 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---- validate --device and farm package: the device side ---------------------------------------

def test_device_lengths_fit_and_the_device_runner_stops_at_the_context(bundle_fp32):
    bundle = open_bundle(Path(bundle_fp32["path"]))
    p, n, shrunk = device_lengths(bundle, None, None)
    assert shrunk and p + 1 + n == CTX
    with pytest.raises(ConfigError, match="--device-prompt-tokens 40 and --new-tokens 40"):
        device_lengths(bundle, 40, 40)
    prompt = [bundle.manifest["bos_id"]] + list(range(5, 5 + 49))  # 50 tokens
    r = device_runner.run({"pte": str(bundle.pte), "prompts": [prompt], "new_tokens": 900, "repeats": 1})
    assert r["ok"] and len(prompt) + len(r["tokens"][0]) <= CTX
    assert r["stop_reasons"][0] in ("context", "eos")
    if r["stop_reasons"][0] == "context":
        assert len(prompt) + len(r["tokens"][0]) == CTX
    refused = device_runner.run({"pte": str(bundle.pte), "prompts": [prompt * 2], "new_tokens": 4, "repeats": 1})
    assert not refused["ok"] and refused["error"] == "context" and "100-token prompt" in refused["message"]


# ---- vision bundles: aot's own runner ------------------------------------------------------------

@pytest.fixture(scope="module")
def vision_bundle(vision_fp32_bundle) -> Path:
    return Path(vision_fp32_bundle["path"])  # conftest's: fp32, SEQ 8, CTX 48


def test_vision_engine_refuses_truncates_and_stops_at_the_context(vision_bundle, tmp_path):
    import numpy as np
    from PIL import Image

    from aot.runner.mllama import VisionEngine

    picture = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(picture)
    r = run_cli("run", vision_bundle, "--image", picture, "--prompt", "<|image|>" + WORDS * 4)
    assert r.exit_code == 3 and "context holds 48" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    engine = VisionEngine(open_bundle(vision_bundle))
    seen = []
    prefill = engine.prefill
    engine.prefill = lambda ids, mask, state: seen.append(ids) or prefill(ids, mask, state)
    g = engine.generate("<|image|>" + WORDS * 4, 4, image=picture, truncate=True)
    assert g.prompt_truncated_from > 48 and g.prompt_tokens == 44 and g.stop_reason in ("max_new_tokens", "eos")
    assert seen[-1][:2] == [engine.bos, engine.image_token]  # the cut kept the image's place

    g = engine.generate("<|image|>What is in this image?", 900, image=picture)
    assert g.stop_reason == "context" and g.prompt_tokens + g.generated_tokens == 48
