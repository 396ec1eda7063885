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
