"""NPU delegates (Qualcomm QNN, MediaTek) on a machine without their SDKs: detected, refused with
one clear line, never downloaded; their recipes simulated on the host on the static prefill/decode
graphs; and the whole static build path up to the vendor partitioner, run in ExecuTorch's runtime.
Tests that need a vendor SDK run only where it is installed."""

from __future__ import annotations

import importlib.util
import copy
import json
import os
import socket
import sys

import pytest
import torch

from conftest import run_cli
from test_model import TOKENS, our_model


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: ExecuTorch's QNN setup downloads an SDK otherwise."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("aot: error")]


@pytest.mark.parametrize("delegate, needle", [
    ("qnn", "QNN_SDK_ROOT is not set: install the Qualcomm AI Runtime SDK (QAIRT) 2.37"),
    ("mediatek", "no `mtk_converter`, `mtk_neuron` module"),
])
def test_npu_build_without_sdk_stops_with_one_line(delegate, needle, hf_ckpt, tmp_path, no_network):
    out = tmp_path / "out"
    result = run_cli("build", "--checkpoint", hf_ckpt, "--delegate", delegate, "--out", out)
    assert result.exit_code == 6, result.stderr
    (line,) = _error_lines(result)
    assert f"--delegate {delegate} is not available here" in line and needle in line and "never downloads" in line
    assert not out.exists()


def test_qnn_sdk_root_without_the_sdk_is_named(hf_ckpt, tmp_path, no_network, monkeypatch):
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    result = run_cli("build", "--checkpoint", hf_ckpt, "--delegate", "qnn", "--quant", "16a8w", "--out", tmp_path / "o")
    assert result.exit_code == 6 and "has no lib/x86_64-linux-clang/libQnnHtp.so" in result.stderr


def test_doctor_reports_the_npu_delegates(no_network):
    result = run_cli("doctor", "--json")
    report = json.loads(result.stdout)
    assert report["delegates"]["qnn"]["available"] is False
    assert "QNN_SDK_ROOT" in report["delegates"]["qnn"]["reason"]
    assert "mtk_converter" in report["delegates"]["mediatek"]["reason"]
    assert report["delegates"]["xnnpack"]["available"] is True


def test_npu_schemes_are_not_for_xnnpack(hf_ckpt, tmp_path):
    result = run_cli("build", "--checkpoint", hf_ckpt, "--quant", "16a4w", "--out", tmp_path / "o")
    assert result.exit_code == 3 and "--delegate xnnpack does not take --quant 16a4w" in result.stderr


@pytest.mark.oracle
def test_static_attention_computes_what_the_custom_ops_do(hf_ckpt):
    """A prefill chunk then one-token decodes over the static cache == the custom-op model."""
    model = our_model(hf_ckpt)
    with torch.no_grad():
        ref = model(TOKENS, torch.tensor([0]))[0]
        model.reset_cache()
        model.use_static_attention()
        P = TOKENS.shape[1] - 3
        rows = [model(TOKENS[:, :P], torch.tensor([0]))[0]]
        rows += [model(TOKENS[:, i : i + 1], torch.tensor([i]))[0] for i in range(P, TOKENS.shape[1])]
    assert (torch.cat(rows) - ref).abs().max().item() <= 1e-4


@pytest.mark.heavy  # 97 s; make test-all (CI keeps under 20 min)
def test_qnn_recipe_simulated_on_the_demo_model(no_network):
    def run(scheme):
        result = run_cli("simulate", "--delegate", "qnn", "--model", "demo", "--quant", scheme,
                         "--max-tokens", 128, "--prefill-len", 64, "--calibration-windows", 4, "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    w8, w4 = run("16a8w"), run("16a4w")
    assert w8["accuracy"]["positions"] == 127 and w8["calibration"] == {
        "file": w8["text"]["file"], "windows": 4, "tokens_each": 128}
    assert w8["soc"] == "SM8650" and w8["prefill_len"] == 64 and w8["accuracy_decode"]["positions"] == 64
    # Quantization really happened, and 8-bit weights lose less than 4-bit ones.
    assert 0 < w8["accuracy"]["kl_mean"] < w4["accuracy"]["kl_mean"]
    # The one-token decode graph is as good as prefill (a moving-average observer calibrated on
    # single tokens clipped outliers: decode top-1 fell to ~62%).
    assert w8["accuracy_prefill"]["top1_agreement"] > 0.9 and w8["accuracy_decode"]["top1_agreement"] > 0.9


@pytest.mark.heavy
@pytest.mark.slow
def test_mediatek_recipe_simulated_without_its_sdk(no_network):
    assert importlib.util.find_spec("mtk_converter") is None  # what this test is about
    result = run_cli("simulate", "--delegate", "mediatek", "--model", "demo", "--quant", "16a8w", "--soc", "mt6991",
                     "--max-tokens", 96, "--prefill-len", 48, "--calibration-windows", 2, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["soc"] == "mt6991" and 0 < report["accuracy"]["kl_mean"] < 0.1
    assert report["accuracy_decode"]["top1_agreement"] > 0.85
    # The quantizer came without the package __init__ (which needs mtk_converter), and left no stub.
    assert "executorch.backends.mediatek.quantizer" in sys.modules
    assert "executorch.backends.mediatek" not in sys.modules


@pytest.mark.slow
def test_qnn_8bit_kv_cache_quantizes_what_is_written_to_the_cache(hf_ckpt):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from aot.backends.qnn import qnn_quantizer

    model = our_model(hf_ckpt)
    model.use_static_attention()
    graph = torch.export.export(model, (TOKENS[:, :1], torch.tensor([0])), strict=False).module()

    def cache_write_ranges(kv_bits):
        gm = prepare_pt2e(copy.deepcopy(graph), qnn_quantizer("16a4w", kv_bits=kv_bits))
        with torch.no_grad():
            gm(TOKENS[:, :1], torch.tensor([0]))
        gm = convert_pt2e(gm)
        writes = [n for n in gm.graph.nodes if n.target == torch.ops.aten.index_copy_.default]
        assert len(writes) == 2 * 2  # k and v, two layers
        # The value written is a dequantize whose integer range says the width.
        return {(n.args[3].args[3], n.args[3].args[4]) for n in writes}

    assert cache_write_ranges(8) == {(0, 255)}
    assert cache_write_ranges(None) == {(0, 65535)}


@pytest.mark.parametrize("flags, needle", [
    (["--delegate", "qnn", "--soc", "SM9999"], "unknown --soc 'SM9999' for --delegate qnn; choose one of: SM8650,"),
    (["--soc", "SM8650"], "--soc applies to NPU delegates, not --delegate xnnpack"),
    (["--delegate", "mediatek", "--kv-bits", "8"], "--kv-bits 8: --delegate mediatek takes no --kv-bits"),
    (["--delegate", "qnn", "--kv-bits", "4"], "--kv-bits 4: --delegate qnn takes 8, 16"),
    (["--calibration", "x.txt"], "--calibration applies to NPU delegates (PT2E), not --delegate xnnpack"),
])
def test_npu_flags_are_checked_before_anything_else(flags, needle, hf_ckpt, tmp_path, no_network):
    result = run_cli("build", "--checkpoint", hf_ckpt, *flags, "--out", tmp_path / "o")
    assert result.exit_code == 3 and needle in result.stderr, result.stderr


def test_simulation_is_only_for_npu_delegates(no_network):
    result = run_cli("simulate", "--delegate", "xnnpack", "--model", "demo")
    assert result.exit_code == 3 and "nothing to simulate" in result.stderr


def test_only_the_output_projection_is_kept_at_8_bit(hf_ckpt):
    from aot.backends.qnn import is_output_projection

    model = our_model(hf_ckpt)
    model.use_static_attention()
    graph = torch.export.export(model, (TOKENS, torch.tensor([0])), strict=False).module().graph
    linears = [n for n in graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 7 * 2 + 1
    assert [n.args[1].name for n in linears if is_output_projection(n)] == ["output_weight"]


@pytest.mark.heavy
@pytest.mark.slow
def test_block_wise_recipe_simulates(no_network):
    result = run_cli("simulate", "--delegate", "qnn", "--model", "demo", "--quant", "16a4w-block",
                     "--group-size", 16, "--max-tokens", 64, "--calibration-windows", 2, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["group_size"] == 16 and report["accuracy"]["kl_mean"] > 0


@pytest.fixture(scope="module")
def static_bundle(hf_ckpt, tmp_path_factory):
    """`aot build --delegate qnn` with the SDK check passed and QnnPartitioner, the one piece that
    needs the SDK, replaced by none: every other step of the NPU build runs for real, and the
    program runs on ExecuTorch's portable (and quantized) CPU kernels."""
    from aot.backends import Availability
    from aot.backends.qnn import Qnn

    patch = pytest.MonkeyPatch()
    patch.setattr(Qnn, "availability", lambda self: Availability(True, "test: partitioner left out"))
    patch.setattr(Qnn, "partitioners", lambda self, method, plan, soc=None: [])
    out = tmp_path_factory.mktemp("bundles") / "qnn"
    try:
        result = run_cli("build", "--checkpoint", hf_ckpt, "--delegate", "qnn", "--quant", "16a8w", "--soc", "SM8750",
                         "--kv-bits", "8", "--max-seq-len", 8, "--max-context-len", 32, "--full-logits",
                         "--out", out, "--json")
    finally:
        patch.undo()
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_static_bundle_records_its_target(static_bundle):
    b = static_bundle
    assert b["target"]["delegate"] == "qnn" and b["target"]["soc"] == "SM8750"
    assert (b["target"]["prefill_len"], b["target"]["decode_len"], b["target"]["kv_bits"]) == (8, 1, 8)
    assert b["target"]["calibration"]["file"].endswith("heldout.txt")
    assert any(name.endswith("heldout.txt") for name in b["inputs"])  # its sha256 is an input
    assert set(b["export"]["methods"]) == {"prefill", "decode"}
    assert b["metadata"]["get_max_seq_len"] == 8 and b["metadata"]["use_sdpa_with_kv_cache"] is False
    assert b["metadata"]["enable_dynamic_shape"] is False


def test_static_methods_share_the_kv_cache_in_executorch(static_bundle, hf_ckpt):
    import executorch.kernels.quantized  # noqa: F401  (quantize/dequantize kernels)
    from executorch.runtime import Runtime

    with torch.no_grad():
        ref = our_model(hf_ckpt, max_context_len=32)(TOKENS, torch.tensor([0]))[0]
    P = 8
    program = Runtime.get().load_program(os.path.join(static_bundle["path"], "model.pte"))
    prefill, decode = program.load_method("prefill"), program.load_method("decode")
    rows = [prefill.execute([TOKENS[:, :P], torch.tensor([0])])[0][0]]
    rows += [decode.execute([TOKENS[:, i : i + 1], torch.tensor([i])])[0][0] for i in range(P, TOKENS.shape[1])]
    got = torch.cat(rows)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() > 0.99, cos  # 16-bit activations, 8-bit weights and KV cache
    # Decode saw prefill's cache: the same call on a fresh program (empty cache) differs.
    fresh = Runtime.get().load_program(os.path.join(static_bundle["path"], "model.pte")).load_method("decode")
    alone = fresh.execute([TOKENS[:, P : P + 1], torch.tensor([P])])[0].reshape(-1)
    assert torch.nn.functional.cosine_similarity(alone, ref[P], dim=0) < cos[P] - 0.01


def test_static_bundles_do_not_run_on_the_host(static_bundle):
    result = run_cli("run", static_bundle["path"], "--prompt", "hi")
    assert result.exit_code == 6 and "runs on the device with ExecuTorch's qnn runtime" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("delegate", [
    pytest.param("qnn", marks=pytest.mark.skipif(
        not os.environ.get("QNN_SDK_ROOT"), reason="needs Qualcomm's QAIRT SDK (QNN_SDK_ROOT)")),
    pytest.param("mediatek", marks=pytest.mark.skipif(
        importlib.util.find_spec("mtk_converter") is None,
        reason="needs MediaTek's NeuroPilot SDK (mtk_converter, mtk_neuron)")),
])
def test_npu_build_lowers_with_the_sdk(delegate, hf_ckpt, tmp_path):
    result = run_cli("build", "--checkpoint", hf_ckpt, "--delegate", delegate, "--max-seq-len", 8,
                     "--max-context-len", 32, "--out", tmp_path / delegate, "--json")
    assert result.exit_code == 0, result.stderr
    delegation = json.loads(result.stdout)["delegation"]
    assert all(m["delegated_ops"] > 0 for m in delegation.values())


def test_mobile_manifest_has_npu_targets():
    from pathlib import Path

    from aot.manifest import load_manifest

    manifest = load_manifest(Path(__file__).parents[1] / "manifests" / "llama32-mobile.yaml")
    npu = {t.name: t for t in manifest.targets if t.build.delegate in ("qnn", "mediatek")}
    assert {t.build.soc for t in npu.values()} == {"SM8650", "SM8750", "mt6989", "mt6991"}
    assert "llama3.2-3b-instruct-qnn-SM8750-16a4w" in npu
    assert all(t.validate is None and t.build.quant.scheme == "16a4w" for t in npu.values())
    assert all(t.build.kv_bits == 8 for t in npu.values() if t.build.delegate == "qnn")
