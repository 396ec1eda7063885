"""aot/preflight.py: the size and peak-memory estimate from the architecture and the plan, and the
one-line stop when memory or disk is short (`--no-preflight` only estimates)."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest

from aot import preflight
from aot.errors import ResourcesShort
from aot.families.text.model import MODELS
from aot.preflight import GIB, bytes_per_param, check, estimate, weight_bytes
from aot.quant import LayerQuant, QuantConfig

KINDS = {"embedding": 1000, "output": 1000, "linear": 64_000, "other": 10}


def test_bytes_per_param():
    assert bytes_per_param(None) == 4.0 and bytes_per_param(None, "bfloat16") == 2.0
    assert bytes_per_param(LayerQuant(8, 0, "int8-dynamic")) == 1.0  # per-channel: scales negligible
    assert bytes_per_param(LayerQuant(4, 32, "int8-dynamic")) == 0.5 + 2 / 32  # a 16-bit scale per group


def test_weight_bytes_by_kind():
    plan = QuantConfig().plan()  # 8da4w: linears 4-bit g32, embedding and output 8-bit
    assert weight_bytes(KINDS, plan) == 1000 * 1 + 1000 * 1 + 64_000 * (0.5 + 2 / 32) + 10 * 4
    assert weight_bytes(KINDS, QuantConfig(scheme="none").plan()) == 4 * sum(KINDS.values())
    assert weight_bytes(KINDS, QuantConfig(scheme="bf16").plan()) == 2 * sum(KINDS.values())
    vision = {"vision.linear": 100, "linear": 7}
    assert weight_bytes(vision, QuantConfig(scheme="none").plan(), prefix="vision.") == 400


def test_estimate_for_the_real_1b_matches_the_measured_build():
    """Calibration point in the module's docstring: 1B 8da4w, 1.0 GiB of weights, 2.09 GiB peak."""
    est = estimate(MODELS["1b"].params_by_kind(), QuantConfig().plan())
    assert est["pte_bytes"] == pytest.approx(1.0 * GIB, rel=0.05)
    assert est["peak_rss_bytes"] == pytest.approx(2.09 * GIB, rel=0.05)
    fp32 = estimate(MODELS["1b"].params_by_kind(), QuantConfig(scheme="none").plan())
    assert fp32["pte_bytes"] > 4 * est["pte_bytes"]


def test_short_memory_stops_with_one_line(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: 1 * GIB)
    with pytest.raises(ResourcesShort) as e:
        check("--model 1b", MODELS["1b"].params_by_kind(), QuantConfig().plan())
    message = str(e.value)
    assert "--model 1b needs about 2.1 GiB of memory at peak" in message and "1.0 GiB is available" in message
    assert "--no-preflight" in message and "\n" not in message
    skipped = check("--model 1b", MODELS["1b"].params_by_kind(), QuantConfig().plan(), enabled=False)
    assert skipped["checked"] is False and skipped["pte_bytes"] > 0


def test_short_disk_stops_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight, "available_memory", lambda: 1000 * GIB)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(GIB, GIB, GIB // 2))
    with pytest.raises(ResourcesShort, match=r"needs about 1\.0 GiB of disk but 0\.5 GiB is free there"):
        check("x", MODELS["1b"].params_by_kind(), QuantConfig().plan(), out_dir=tmp_path / ".out.tmp")
    ok = check("x", MODELS["tiny"].params_by_kind(), QuantConfig().plan(), out_dir=tmp_path)
    assert ok["checked"] is True and ok["available_bytes"] == 1000 * GIB


def test_unknown_memory_does_not_stop(monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda: None)
    assert check("x", MODELS["3b"].params_by_kind(), QuantConfig(scheme="none").plan())["checked"] is True


def test_available_memory_reads_this_machine():
    have = preflight.available_memory()
    assert have is not None and 0 < have < 1 << 50
    assert Path("/proc/meminfo").is_file()


# ---- the runtime plan predicted before building (tests/test_memplan.py checks it against built .pte files)


def test_parse_size():
    assert preflight.parse_size("6GiB") == 6 * GIB and preflight.parse_size("3.5 GiB") == int(3.5 * GIB)
    assert preflight.parse_size("512MiB") == 512 * 2**20 and preflight.parse_size("6GB") == 6 * 10**9
    assert preflight.parse_size("8gib") == 8 * GIB
    for bad in ("6", "GiB", "six GiB", "6 GiBs", "nan GiB", "inf GiB"):
        with pytest.raises(ValueError, match="--device-memory takes a size with a unit"):
            preflight.parse_size(bad)
    assert preflight.device_memory_errors("0 MiB") == ["--device-memory must be more than 0, but got '0 MiB'"]
    assert preflight.device_memory_errors(None) == preflight.device_memory_errors("1 GiB") == []


def test_kv_cache_per_position_for_the_real_sizes():
    """LLAMA32.md: per position 1B 64 KiB, 3B 224 KiB in fp32; int8 with ExecuTorch's per (token,
    head) fp32 scale and int8 zero point: 2.16 / 7.27 GiB at 131072 positions."""
    one, three = MODELS["1b"], MODELS["3b"]
    assert preflight.kv_bytes_per_position(one, "fp32") == 64 * 1024
    assert preflight.kv_bytes_per_position(three, "fp32") == 224 * 1024
    assert preflight.kv_bytes_per_position(one, "int8") == 2 * 16 * 8 * (64 + 5)
    assert preflight.kv_bytes_per_position(one, "int8") * 131072 / GIB == pytest.approx(2.16, abs=0.005)
    assert preflight.kv_bytes_per_position(three, "int8") * 131072 / GIB == pytest.approx(7.27, abs=0.005)
    assert preflight.kv_bytes_per_position(one, "fp32", "bfloat16") == 32 * 1024  # bf16 builds convert the cache


def _cfg(**fields):
    from aot.config import build_config

    return build_config(Path("/nonexistent/out"), model="1b", random_weights=True, bos_id=1, eos_ids=[2], **fields)


def _runtime(cfg):
    from aot.backends import get_backend

    args = MODELS[cfg.model]
    return preflight.runtime(cfg, args, args.params_by_kind(), cfg.quant.plan(), backend=get_backend(cfg.delegate))


def test_runtime_prediction_of_the_1b_at_128k():
    fp32 = _runtime(_cfg(max_context_len=131072))
    assert fp32["kv_cache_bytes"] == 8 * GIB and fp32["biggest"] == "kv_cache"
    assert fp32["rope_tables_bytes"] == 131072 * 64 * 4  # cos and sin, [131072, 32] fp32 each
    int8 = _runtime(_cfg(max_context_len=131072, kv_cache="int8"))
    assert int8["at_load_bytes"] < 3.5 * GIB  # issue 19's target for the 1B, 8da4w, int8 cache, 128K
    sink = _runtime(_cfg(max_context_len=131072, attention_sink="4,2048"))
    assert sink["kv_cache"]["positions"] == 4 + 2048 + 128 and sink["kv_cache_bytes"] == (4 + 2048 + 128) * 64 * 1024


def test_device_memory_names_the_biggest_part_and_fixes_that_fit():
    from aot.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _runtime(_cfg(max_context_len=131072, device_memory="6GiB"))
    message = str(e.value)
    assert "\n" not in message and "the biggest part is the KV cache, 8.00 GiB" in message
    assert "--kv-cache int8 (about 3.19 GiB)" in message
    n = int(message.split("--max-context-len ")[1].split(",")[0])
    window = int(message.split("--attention-sink 4,")[1].split(" ")[0])
    assert _runtime(_cfg(max_context_len=n, device_memory="6GiB"))["fits"] is True
    with pytest.raises(ConfigError):  # and the suggestion is the longest (to 1024 positions)
        _runtime(_cfg(max_context_len=n + 1024, device_memory="6GiB"))
    fits = _runtime(_cfg(max_context_len=131072, attention_sink=f"4,{window}", device_memory="6GiB"))
    assert fits["fits"] is True and fits["device_memory_bytes"] == 6 * GIB
    # an int8 cache that is still too long: a shorter context with it; weights too big: a smaller model
    with pytest.raises(ConfigError, match=r"to fit: --max-context-len 15360, or --kv-cache int8 --max-context-len \d+, or"):
        _runtime(_cfg(max_context_len=131072, device_memory="2GiB"))
    with pytest.raises(ConfigError, match=r"to fit: a smaller model: not even the shortest cache fits beside the weights \(1023.3 MiB\)$"):
        _runtime(_cfg(max_context_len=2048, device_memory="1GiB"))
    with pytest.raises(ConfigError, match=r"a smaller model or a 4-bit --quant \(8da4w\)"):
        _runtime(_cfg(max_context_len=2048, quant="none", device_memory="4GiB"))
