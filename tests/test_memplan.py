"""aot/memplan.py: the runtime memory plan read from a built .pte, against the prediction the build
made before it started (aot/preflight.py), against the RSS a fresh process measures when it loads
the bundle and fills its whole context, and `--device-memory`, which refuses before building."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from aot.bundle import PTE_NAME
from aot.memplan import memory_plan, read_memory_plan

# The tiny model at a long context: 1 KiB of fp32 cache per position (2 layers x 2 KV heads x 32
# x 4 bytes, keys and values), so its 16 MiB cache is most of what the bundle asks for at load.
LONG, CHUNK = 16_384, 16


def _long_bundle(out: Path, *flags) -> dict:
    result = run_cli("build", "--model", "tiny", "--random-weights", "--bos-id", 1, "--eos-id", 2,
                     "--max-seq-len", CHUNK, "--max-context-len", LONG, "--out", out, "--json", *flags)
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def long_bundle_fp32(tmp_path_factory) -> dict:
    return _long_bundle(tmp_path_factory.mktemp("bundles") / "long-fp32", "--kv-cache", "fp32")


@pytest.fixture(scope="module")
def long_bundle_int8(tmp_path_factory) -> dict:
    return _long_bundle(tmp_path_factory.mktemp("bundles") / "long-int8", "--kv-cache", "int8")


@pytest.fixture(scope="module")
def long_bundle_bf16(tmp_path_factory) -> dict:
    """--quant bf16 converts the whole model, its fp32 cache included: 2 bytes a value."""
    return _long_bundle(tmp_path_factory.mktemp("bundles") / "long-bf16", "--quant", "bf16")


def test_the_plan_names_the_cache_and_counts_every_method(long_bundle_fp32):
    b = long_bundle_fp32
    plan, pte = b["memory_plan"], Path(b["path"]) / PTE_NAME
    assert plan == read_memory_plan(pte) == memory_plan(pte.read_bytes())  # recorded = read from the bytes
    forward = plan["methods"]["forward"]
    assert [(g["name"], g["dtype"], g["shape"], g["count"]) for g in forward["mutable_buffers"]] == [
        ("layers.{i}.attention.k_cache", "float32", [1, LONG, 2, 32], 2),
        ("layers.{i}.attention.v_cache", "float32", [1, LONG, 2, 32], 2)]
    assert forward["mutable_buffers_bytes"] == LONG * 1024
    assert forward["planned_bytes"] == sum(forward["arenas"]) == forward["mutable_buffers_bytes"] + forward["activations_bytes"]
    assert 0 < forward["activations_bytes"] < 0.05 * forward["planned_bytes"]
    xnnpack = forward["delegates"]["XnnpackBackend"]
    assert xnnpack["named_data_bytes"] == plan["program"]["named_data_bytes"] > 0  # its weights
    assert "packs its weights" in xnnpack["at_init"] and any("workspace" in u for u in plan["unknown"])
    constant_methods = [m for name, m in plan["methods"].items() if name.startswith("get_")]
    assert constant_methods and all(m["planned_bytes"] == m["delegate_bytes"] == 0 for m in constant_methods)
    t = plan["total"]
    assert t["at_load_bytes"] == t["planned_bytes"] + t["constants_bytes"] + t["delegate_bytes"]
    assert t["biggest"] == {"part": "mutable_buffers", "name": "KV cache (mutable buffers)", "bytes": LONG * 1024}
    # rope tables [LONG, 16] x 2 fp32 and the embedding: the program's constant segment, mmapped
    assert t["constants_bytes"] <= plan["program"]["constant_segment_bytes"] and t["constants_bytes"] > 2 * LONG * 16 * 4


@pytest.mark.parametrize("bundle, storage, per_head", [
    ("fp32", "fp32", 32 * 4),
    # int8 values, an fp32 scale and an int8 zero point per token and head
    pytest.param("int8", "int8", 32 + 4 + 1, marks=pytest.mark.heavy),
    pytest.param("bf16", "bf16", 32 * 2, marks=pytest.mark.heavy),  # a --quant bf16 build keeps the cache in bf16
])
def test_the_prediction_before_building_matches_the_plan(bundle, storage, per_head, request):
    """The cache exactly; weights + rope tables within 2% of the constants and delegate blobs;
    the activations on the high side, within 1.5x; the total at load within 2%."""
    b = request.getfixturevalue(f"long_bundle_{bundle}")
    predicted, t = b["build"]["preflight"]["runtime"], b["memory_plan"]["total"]
    assert predicted["kv_cache"] == {"storage": storage, "positions": LONG, "bytes_per_position": 2 * 2 * 2 * per_head}
    assert predicted["kv_cache_bytes"] == t["mutable_buffers_bytes"] == LONG * 2 * 2 * 2 * per_head
    stored = t["constants_bytes"] + t["delegate_bytes"]
    assert predicted["weights_bytes"] + predicted["rope_tables_bytes"] == pytest.approx(stored, rel=0.02)
    assert t["activations_bytes"] <= predicted["activations_bytes"] <= 1.5 * t["activations_bytes"]
    assert predicted["at_load_bytes"] == pytest.approx(t["at_load_bytes"], rel=0.02)


def test_the_prediction_for_an_fp32_model(bundle_fp32):
    """--quant none at the suite's short context: the weights dominate, and are predicted within 5%."""
    predicted, t = bundle_fp32["build"]["preflight"]["runtime"], bundle_fp32["memory_plan"]["total"]
    assert predicted["kv_cache_bytes"] == t["mutable_buffers_bytes"]
    assert predicted["at_load_bytes"] == pytest.approx(t["at_load_bytes"], rel=0.05)


def test_arenas_of_several_methods_are_one_allocation_each():
    """As ExecuTorch's runtime shares a program's arenas between its methods (and a program planned
    with share_mutable_buffers needs it): arena N counts once, sized to the largest; a method that
    plans nothing into an arena (the vision encoder and the decoder's cache) says so."""
    from aot.memplan import _Method, _total

    encoder, decoder = _Method([36_416, 24_576]), _Method([16_448, 24_576])
    encoder.arenas[1]["other"] = 40
    decoder.arenas[1]["other"] = 30
    decoder.arenas[2]["mutable"] = {"layers.0.k_cache": 12_288, "layers.0.v_cache": 12_288}
    t = _total({"vision_encoder": encoder, "text_decoder": decoder}, {}, split=True)
    assert t["planned_bytes"] == 36_416 + 24_576 and t["planned_unshared_bytes"] == 36_416 + 16_448 + 2 * 24_576
    assert t["mutable_buffers_bytes"] == 24_576 and t["activations_bytes"] == 36_416
    assert [a["arena"] for a in t["shared_arenas"]] == [1, 2]
    assert encoder.record(split=True)["unused_arena_bytes"] == 24_576
    assert encoder.record(split=True)["activations_bytes"] == 36_416


# A fresh interpreter: ExecuTorch's Python runtime loads the bundle, then runs `forward` over every
# position of the context, CHUNK at a time. RssAnon (malloc'd memory: the planned arenas and
# XNNPACK's packed weights), before the load, after it and after the fill.
_MEASURE = """
import json, sys, torch
from aot.runner.pte import PteProgram, load_kernels

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

path, context, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
load_kernels()
before = anon()
forward = PteProgram(path).forward()
loaded = anon()
tokens = torch.ones((1, chunk), dtype=torch.long)
for pos in range(0, context, chunk):
    forward(tokens, torch.tensor([pos]))
print(json.dumps({"before": before, "loaded": loaded, "filled": anon()}))
"""


def measure_rss(pte: Path, context: int, chunk: int) -> dict:
    """RssAnon growth (bytes) of a fresh process at load and after filling `context` positions."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(pte), str(context), str(chunk)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    return {"at_load": r["loaded"] - r["before"], "filled": r["filled"] - r["before"]}


@pytest.mark.heavy  # 55 s; make test-all (CI keeps under 20 min)
def test_rss_at_load_and_after_the_whole_context_is_the_plan(long_bundle_fp32):
    """What is checkable: ExecuTorch allocates and zero-fills the planned arenas when the method
    loads, so the whole cache is resident before the first token (at least the planned bytes, at
    load); XNNPACK packs its weights into memory of its own then (about its blob's bytes); filling
    every position afterwards adds no cache memory (the plan holds the whole context), only the
    delegate's workspace and the runtime's small allocations, which the plan leaves unknown (a
    4 MiB allowance). Constants are mmapped (file-backed), so RssAnon does not count them."""
    plan = long_bundle_fp32["memory_plan"]["total"]
    rss = measure_rss(Path(long_bundle_fp32["path"]) / PTE_NAME, LONG, CHUNK)
    planned, delegate = plan["planned_bytes"], plan["delegate_bytes"]
    assert rss["at_load"] >= 0.97 * planned, rss
    assert rss["filled"] <= planned + delegate + 4 * 2**20, rss
    assert rss["filled"] - rss["at_load"] <= 4 * 2**20, rss


def test_inspect_shows_the_plan(long_bundle_fp32):
    result = run_cli("inspect", long_bundle_fp32["path"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "biggest: KV cache (mutable buffers) 16.0 MiB" in text
    assert "layers.{i}.attention.k_cache float32 [1, 16384, 2, 32] x 2: 8.0 MiB" in text
    assert "constant methods (get_max_seq_len" in text and "predicted before building" in text
    assert "not counted: XnnpackBackend: each subgraph's activation workspace" in text


# ---- --device-memory: refused before building ----------------------------------------------


def test_device_memory_refuses_before_building_and_writes_nothing(tmp_path):
    """The real 1B at 128K positions of fp32 cache asks for ~9 GiB; a 6 GiB phone is refused in
    one line that names the biggest part and three ways to fit (each checked in test_preflight)."""
    result = run_cli("build", "--model", "1b", "--random-weights", "--bos-id", 1, "--eos-id", 2,
                     "--max-context-len", 131072, "--device-memory", "6GiB", "--out", tmp_path / "b")
    assert result.exit_code == 3
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("aot: error: --device-memory 6GiB: the runtime plan of this bundle needs about 9.04 GiB")
    assert "the biggest part is the KV cache, 8.00 GiB (131072 positions x 64.0 KiB, fp32)" in line
    assert "--kv-cache int8 (about 3.19 GiB)" in line and "--max-context-len 80896" in line
    assert "--attention-sink 4," in line
    assert list(tmp_path.iterdir()) == []


def test_a_bad_device_memory_is_a_config_error(tmp_path):
    result = run_cli("build", "--model", "demo", "--device-memory", "6 apples", "--out", tmp_path / "b")
    assert result.exit_code == 3
    assert result.stderr.strip() == ("aot: error: --device-memory takes a size with a unit (6GiB, 512MiB, 3.5 GiB; "
                                     "GB = 10^9 bytes), but got '6 apples'")
    assert list(tmp_path.iterdir()) == []


def test_plan_shows_each_target_against_its_device_memory(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("""version: 1
defaults: {model: 1b, random_weights: true, bos_id: 1, eos_ids: [2], max_context_len: 131072}
targets:
  - {name: fp32-cache, device_memory: 6GiB}
  - {name: int8-cache, device_memory: 6GiB, kv_cache: int8}
  - {name: no-limit}
""")
    result = run_cli("plan", "--manifest", manifest)
    assert result.exit_code == 0, result.stderr
    jobs = {j["target"]: j for j in json.loads(result.stdout)["jobs"]}
    fp32, int8 = jobs["fp32-cache"]["memory"], jobs["int8-cache"]["memory"]
    assert fp32["fits"] is False and fp32["biggest"] == "kv_cache" and "--kv-cache int8" in fp32["reason"]
    assert int8["fits"] is True and int8["predicted_at_load_bytes"] < 3.5 * 2**30 <= int8["device_memory_bytes"]
    assert "memory" not in jobs["no-limit"]
