"""End to end: checkpoints -> `aot build` -> model.pte, run by ExecuTorch's own runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import checkpoints
from conftest import CTX, SEQ, run_cli
from aot.bundle import BUNDLE_JSON, PTE_NAME
from aot.runner.pte import PteProgram, load_kernels
from test_model import TOKENS, hf_logits, our_model


def forward(bundle: dict):
    return PteProgram(Path(bundle["path"]) / PTE_NAME).forward()


@pytest.mark.oracle
def test_fp32_pte_matches_transformers(bundle_fp32, hf_ckpt):
    """Chunked prefill, then one token per call, against transformers' full-sequence logits."""
    ref = hf_logits(hf_ckpt)[0]
    fwd = forward(bundle_fp32)
    last = fwd(TOKENS[:, :7], torch.tensor([0]))
    assert (last[0] - ref[6]).abs().max().item() <= 1e-3
    for pos in range(7, TOKENS.shape[1]):
        step = fwd(TOKENS[:, pos : pos + 1], torch.tensor([pos]))
        assert (step[0] - ref[pos]).abs().max().item() <= 1e-3, pos


def test_meta_and_hf_layouts_build_the_same_program(bundle_fp32, bundle_fp32_meta):
    assert bundle_fp32["files"][PTE_NAME]["sha256"] == bundle_fp32_meta["files"][PTE_NAME]["sha256"]
    assert bundle_fp32_meta["checkpoint"]["layout"] == "meta"


@pytest.mark.oracle
def test_stock_runner_generates_transformers_greedy_tokens(bundle_fp32, hf_ckpt):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    prompt = "def load(fp, *, cls=None):"
    tok = Tokenizer.from_file(str(hf_ckpt / "tokenizer.json"))
    ids = torch.tensor([tok.encode(prompt).ids])  # the tokenizer adds <|begin_of_text|>
    model = LlamaForCausalLM.from_pretrained(hf_ckpt, dtype=torch.float32).eval()
    new = 20
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, do_sample=False)[0, ids.shape[1]:].tolist()
    expected = [tok.decode([t]) for t in out if t not in (checkpoints.EOS, checkpoints.EOT)]

    path = Path(bundle_fp32["path"])
    load_kernels()  # what an app links in: the LLM custom ops and quantized kernels
    runner = TextLLMRunner(str(path / PTE_NAME), str(path / "tokenizer.json"))
    pieces, stats = [], []
    config = GenerationConfig(max_new_tokens=new, temperature=0.0, num_bos=1, echo=False)
    runner.generate(prompt, config, token_callback=pieces.append, stats_callback=stats.append)
    assert stats[0].num_prompt_tokens == ids.shape[1]
    assert len(expected) >= 5
    assert pieces[: len(expected)] == expected


def test_8da4w_pte_matches_eager_quantized_model(bundle_8da4w, hf_ckpt):
    from aot.quant import QuantConfig, apply_plan

    eager = our_model(hf_ckpt, full_logits=False, max_context_len=CTX)
    apply_plan(eager, QuantConfig(scheme="8da4w").plan())
    fwd = forward(bundle_8da4w)
    with torch.no_grad():
        ref = eager(TOKENS[:, :SEQ], torch.tensor([0]))
    got = fwd(TOKENS[:, :SEQ], torch.tensor([0]))
    # The eager model keeps 4-bit scales in bf16 as XNNPACK does, so the two agree to float rounding.
    assert (got - ref).abs().max().item() <= 1e-3
    assert got.argmax().item() == ref.argmax().item()
    fp32 = our_model(hf_ckpt, full_logits=False)
    with torch.no_grad():
        exact = fp32(TOKENS[:, :SEQ], torch.tensor([0]))
    assert (got - exact).abs().max().item() > 1e-4  # it really is quantized


def test_8da4w_is_smaller_by_the_expected_ratio(bundle_fp32, bundle_8da4w):
    from aot.quant import estimate_weight_bytes
    from aot.families.text.model import ModelArgs

    args = ModelArgs.from_dict(bundle_fp32["model"]["args"])
    plan = bundle_8da4w["quant"]["plan"]
    fp32_size = bundle_fp32["files"][PTE_NAME]["bytes"]
    q_size = bundle_8da4w["files"][PTE_NAME]["bytes"]
    expected_fp32 = estimate_weight_bytes(args, bundle_fp32["quant"]["plan"])
    expected_q = estimate_weight_bytes(args, plan)
    # Weights dominate these files; the rest (program, rope tables) is small and fixed.
    assert abs(fp32_size - expected_fp32) <= 0.1 * expected_fp32
    assert abs(q_size - expected_q) <= 0.15 * expected_q
    assert fp32_size / q_size > 0.8 * expected_fp32 / expected_q


def test_bundle_json_says_what_went_in(bundle_8da4w, hf_ckpt):
    b = bundle_8da4w
    path = Path(b["path"])
    on_disk = json.loads((path / BUNDLE_JSON).read_text())
    assert on_disk["files"] == b["files"]
    assert set(b["files"]) == {PTE_NAME, "tokenizer.json"}
    assert b["model"]["args"]["n_kv_heads"] == 2 and b["model"]["random_weights"] is False
    plan = b["quant"]["plan"]
    assert plan["linear"] == {"bits": 4, "group_size": 32, "activations": "int8-dynamic"}
    assert plan["output"] == {"bits": 8, "group_size": 0, "activations": "int8-dynamic"}
    assert plan["embedding"] == {"bits": 8, "group_size": 0, "activations": "none"}
    assert b["delegate"] == "xnnpack"
    assert (b["bos_id"], b["eos_ids"]) == (checkpoints.BOS, [checkpoints.EOS, checkpoints.EOT])
    assert str(hf_ckpt / "model.safetensors") in b["inputs"]
    assert set(b["versions"]) >= {"torch", "executorch", "torchao", "aot"}
    d = b["delegation"]["forward"]
    assert 0 < d["delegated_ops"] < d["total_ops"] and d["cpu_ops"]["llama.custom_sdpa"] == 2
    names = [s["name"] for s in b["build"]["stages"]]
    assert names[:2] == ["resolve", "hash inputs"] and "lower" in names
    assert all(s["seconds"] >= 0 and s["peak_rss_mib"] > 0 for s in b["build"]["stages"])


def test_pte_metadata_is_what_the_runner_reads(bundle_8da4w):
    meta = PteProgram(Path(bundle_8da4w["path"]) / PTE_NAME).metadata()
    assert meta == {
        "get_max_seq_len": SEQ, "get_max_context_len": CTX, "get_vocab_size": checkpoints.VOCAB,
        "get_n_layers": 2, "use_kv_cache": True, "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": True, "get_bos_id": checkpoints.BOS,
        "get_eos_ids": [checkpoints.EOS, checkpoints.EOT],
    }


def test_inspect_verifies_and_refuses_tampered_bundles(bundle_8da4w, tmp_path):
    import shutil

    ok = run_cli("inspect", bundle_8da4w["path"], "--json")
    assert ok.exit_code == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert "forward" in report["program"]["methods"]

    copy = tmp_path / "tampered"
    shutil.copytree(bundle_8da4w["path"], copy)
    data = bytearray((copy / PTE_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / PTE_NAME).write_bytes(bytes(data))
    bad = run_cli("inspect", copy)
    assert bad.exit_code == 7
    assert "model.pte" in bad.stderr and "sha256" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1  # inspect prints no progress


@pytest.mark.heavy  # 44 s; make test-all (CI keeps under 20 min)
@pytest.mark.oracle
def test_bf16_bundle_runs_close_to_fp32(hf_ckpt, tmp_path):
    from conftest import _build

    bundle = _build(tmp_path / "bf16", hf_ckpt, "--quant", "bf16")
    assert "bfloat16" in bundle["export"]["methods"]["forward"]["output"]
    got = forward(bundle)(TOKENS[:, :SEQ], torch.tensor([0])).float()
    ref = hf_logits(hf_ckpt, TOKENS[:, :SEQ])[0, -1]
    assert (got[0] - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert got.argmax().item() == ref.argmax().item()


@pytest.mark.heavy
@pytest.mark.e2e
def test_8da8w_with_4bit_embedding_and_output_matches_eager(hf_ckpt, tmp_path):
    from conftest import _build
    from aot.quant import QuantConfig, apply_plan

    flags = ["--quant", "8da8w", "--embedding-quant", "4", "--output-quant", "8da4w", "--group-size", "64"]
    bundle = _build(tmp_path / "8da8w", hf_ckpt, *flags)
    plan = bundle["quant"]["plan"]
    assert plan["embedding"] == {"bits": 4, "group_size": 32, "activations": "none"}
    assert plan["output"] == {"bits": 4, "group_size": 64, "activations": "int8-dynamic"}
    assert "quantized_decomposed.embedding_4bit" in bundle["delegation"]["forward"]["cpu_ops"]
    eager = our_model(hf_ckpt, full_logits=False, max_context_len=CTX)
    apply_plan(eager, QuantConfig(scheme="8da8w", embedding="4", output="8da4w", group_size=64).plan())
    with torch.no_grad():
        ref = eager(TOKENS[:, :SEQ], torch.tensor([0]))
    got = forward(bundle)(TOKENS[:, :SEQ], torch.tensor([0]))
    assert (got - ref).abs().max().item() <= 1e-3
