"""NPU delegates (Qualcomm QNN, MediaTek) on a machine without their SDKs: detected, refused with
one clear line, never downloaded; and the QNN quantization recipe simulated on the host."""

from __future__ import annotations

import json
import socket

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
    ("mediatek", "no `mtk_converter` module"),
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


def test_plain_attention_computes_what_the_custom_ops_do(hf_ckpt):
    model = our_model(hf_ckpt)
    with torch.no_grad():
        ref = model(TOKENS, torch.tensor([0]))
        model.use_plain_attention()
        got = model(TOKENS, torch.tensor([0]))
    assert (got - ref).abs().max().item() <= 1e-4


def test_qnn_recipe_simulated_on_the_demo_model(no_network):
    def run(scheme):
        result = run_cli("simulate", "--delegate", "qnn", "--model", "demo", "--quant", scheme,
                         "--max-tokens", 128, "--calibration-windows", 4, "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    w8, w4 = run("16a8w"), run("16a4w")
    assert w8["accuracy"]["positions"] == 127 and w8["calibration"] == {
        "file": w8["text"]["file"], "windows": 4, "tokens_each": 128}
    # Quantization really happened, and 8-bit weights lose less than 4-bit ones.
    assert 0 < w8["accuracy"]["kl_mean"] < w4["accuracy"]["kl_mean"]
    assert w8["accuracy"]["top1_agreement"] > 0.8


def test_simulation_is_only_for_delegates_that_have_one(no_network):
    result = run_cli("simulate", "--delegate", "mediatek", "--model", "demo")
    assert result.exit_code == 6 and "no host simulation" in result.stderr


def test_only_the_output_projection_is_kept_at_8_bit(hf_ckpt):
    from aot.backends.qnn import is_output_projection

    model = our_model(hf_ckpt)
    model.use_plain_attention()
    graph = torch.export.export(model, (TOKENS, torch.tensor([0])), strict=False).module().graph
    linears = [n for n in graph.nodes if n.target == torch.ops.aten.linear.default]
    assert len(linears) == 7 * 2 + 1
    assert [n.args[1].name for n in linears if is_output_projection(n)] == ["output_weight"]


def test_block_wise_recipe_simulates(no_network):
    result = run_cli("simulate", "--delegate", "qnn", "--model", "demo", "--quant", "16a4w-block",
                     "--group-size", 16, "--max-tokens", 64, "--calibration-windows", 2, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["group_size"] == 16 and report["accuracy"]["kl_mean"] > 0
