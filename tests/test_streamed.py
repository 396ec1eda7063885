"""The streamed build (each part loaded and quantized before the next is allocated) writes the
same model.pte, byte for byte, as loading the whole fp32 model and then quantizing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CTX, SEQ, _build


def _plain_build(monkeypatch, out: Path, *args) -> bytes:
    from aot.families.text import family

    monkeypatch.setattr(family, "STREAMED_LOAD", False)
    result = _build(out, *args)
    stage_names = [s["name"] for s in result["build"]["stages"]]
    assert "load" in stage_names and "quantize" in stage_names  # really the plain path
    return (out / "model.pte").read_bytes()


@pytest.mark.heavy
def test_streamed_checkpoint_build_is_byte_identical(bundle_8da4w, hf_ckpt, tmp_path, monkeypatch):
    assert "load + quantize" in [s["name"] for s in bundle_8da4w["build"]["stages"]]
    streamed = (Path(bundle_8da4w["path"]) / "model.pte").read_bytes()
    assert _plain_build(monkeypatch, tmp_path / "plain", hf_ckpt, "--quant", "8da4w") == streamed


@pytest.mark.heavy
@pytest.mark.e2e
@pytest.mark.parametrize("quant", ["bf16"])
def test_streamed_random_weights_build_is_byte_identical(quant, tmp_path, monkeypatch):
    """Also: the streamed build never writes its KV caches (families.common.stream_parts), so their
    contents must not reach the program. Here they are filled with NaN before each part is
    quantized; the plain build zeroes them; the bytes must be the same."""
    import torch
    from conftest import run_cli

    from aot.families.text import family

    filled, apply_plan = [], family.apply_plan

    def apply_plan_on_garbage(model, plan, parts=None, **kwargs):
        for name in parts or ():
            for buf in model.get_submodule(name).buffers():
                filled.append(buf.fill_(torch.nan).numel())
        return apply_plan(model, plan, parts=parts, **kwargs)

    monkeypatch.setattr(family, "apply_plan", apply_plan_on_garbage)
    flags = ["--model", "tiny", "--random-weights", "--quant", quant, "--max-seq-len", SEQ, "--max-context-len", CTX,
             "--bos-id", 0, "--eos-id", 1, "--json"]
    result = run_cli("build", *flags, "--out", tmp_path / "streamed")
    assert result.exit_code == 0, result.stderr
    assert len(filled) == 2 * 2  # k and v caches of both tiny layers
    streamed = (tmp_path / "streamed" / "model.pte").read_bytes()

    monkeypatch.setattr(family, "apply_plan", apply_plan)
    monkeypatch.setattr(family, "STREAMED_LOAD", False)
    result = run_cli("build", *flags, "--out", tmp_path / "plain")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "plain" / "model.pte").read_bytes() == streamed


def test_row_chunked_quantization_gives_the_same_tensors(hf_ckpt, monkeypatch):
    """The vocab-sized embedding and output projection are quantized a slice of rows at a time
    (peak memory); rows are independent, so the quantized data must equal quantizing at once."""
    import torch
    import torchao.quantization

    from aot import quant
    from aot.quant import QuantConfig, apply_plan
    from test_model import our_model

    plan = QuantConfig(scheme="8da4w").plan()
    whole, chunked = apply_plan(our_model(hf_ckpt), plan), our_model(hf_ckpt)
    monkeypatch.setattr(quant, "CHUNK_ABOVE_ROWS", 100)
    monkeypatch.setattr(quant, "CHUNK_ROWS", 100)  # 1024 rows: 10 full slices and a partial one
    slices, quantize_ = [], torchao.quantization.quantize_
    monkeypatch.setattr(torchao.quantization, "quantize_", lambda m, *a, **k: (slices.append(m), quantize_(m, *a, **k))[1])
    apply_plan(chunked, plan)
    assert sum(1 for m in slices if m.weight.shape == (100, 128)) >= 2 * 10  # really sliced
    for name in ("tok_embeddings", "output", "layers.0.feed_forward.w1"):
        a, b = whole.get_submodule(name).weight, chunked.get_submodule(name).weight
        assert type(a) is type(b) and a.block_size == b.block_size
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in a.tensor_data_names), name


@pytest.mark.heavy
def test_lowering_shares_weights_with_xnnpack_preprocess(bundle_8da4w, hf_ckpt, tmp_path, monkeypatch):
    """aot/backends/xnnpack_patches.py's workaround: ExecuTorch deep-copies each delegated subgraph (weights
    included) before XNNPACK preprocesses it; aot makes the copy share the weights. Fails if
    ExecuTorch stops calling that hook, or if sharing changes a byte of the program."""
    import contextlib
    import inspect

    from executorch.exir.backend import backend_api

    from aot.backends.registry import BACKENDS
    from aot.backends.xnnpack import Xnnpack

    assert "copy_exported_program_for_preprocess" in inspect.getsource(backend_api.lower_all_submodules_to_backend)
    monkeypatch.setattr(Xnnpack, "lowering_context", lambda self: contextlib.nullcontext())
    # held weights need the lowering context
    monkeypatch.setitem(BACKENDS, "xnnpack", lambda: Xnnpack(hold_int4_packed=False))
    result = _build(tmp_path / "copying", hf_ckpt, "--quant", "8da4w")
    assert (tmp_path / "copying" / "model.pte").read_bytes() == (Path(bundle_8da4w["path"]) / "model.pte").read_bytes()
    assert result["build"]["input_key"] == bundle_8da4w["build"]["input_key"]


@pytest.mark.heavy
def test_lowering_frees_weights_once_packed(bundle_fp32, hf_ckpt, tmp_path, monkeypatch):
    """aot/backends/xnnpack_patches.py frees each delegated weight once XNNPACK has packed it. The tied fp32
    model is the hard case: the output projection (delegated) and the embedding (a CPU op) share
    one tensor, which must be kept. Fails if the hooks stop being called (nothing freed), if a
    shared weight is freed, or if freeing changes a byte of the program."""
    import torch
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    from aot.backends.registry import BACKENDS
    from aot.backends.xnnpack import Xnnpack

    freed = []
    resize = torch.UntypedStorage.resize_
    monkeypatch.setattr(torch.UntypedStorage, "resize_", lambda s, n: (freed.append(s.nbytes()), resize(s, n))[1])
    _build(tmp_path / "freeing", hf_ckpt, "--quant", "none")
    monkeypatch.undo()
    assert "preprocess" in vars(XnnpackBackend) and not isinstance(vars(XnnpackBackend)["preprocess"], classmethod)
    embedding = 1024 * 128 * 4  # the tied table (vocab x dim fp32): kept
    assert len(freed) > 10 and embedding not in freed, freed
    assert (tmp_path / "freeing" / "model.pte").read_bytes() == (Path(bundle_fp32["path"]) / "model.pte").read_bytes()
    monkeypatch.setitem(BACKENDS, "xnnpack", lambda: Xnnpack(free_packed_weights=False))
    _build(tmp_path / "keeping", hf_ckpt, "--quant", "none")
    assert (tmp_path / "keeping" / "model.pte").read_bytes() == (Path(bundle_fp32["path"]) / "model.pte").read_bytes()


@pytest.mark.heavy
@pytest.mark.e2e
def test_int4_weights_are_held_packed_until_lowering(tmp_path, monkeypatch):
    """aot/backends/xnnpack_patches.py holds 4-bit weights two per byte between quantization and XNNPACK's
    preprocess. Fails if nothing is held (the hook stopped being called), if a held weight is never
    handed back, or if holding changes a byte of the program (the plain build holds nothing)."""
    from conftest import run_cli

    from aot.backends.xnnpack_patches import Int4Hold
    from aot.families.text import family

    held, holders, hold = [], [], Int4Hold.hold
    monkeypatch.setattr(Int4Hold, "hold", lambda self, m: holders.append(self) or held.append(hold(self, m)) or held[-1])
    flags = ["--model", "tiny", "--random-weights", "--quant", "8da4w", "--max-seq-len", SEQ, "--max-context-len", CTX,
             "--bos-id", 0, "--eos-id", 1, "--json"]
    result = run_cli("build", *flags, "--out", tmp_path / "held")
    assert result.exit_code == 0, result.stderr
    assert sum(held) == 2 * 7 and not any(h.held for h in holders)  # every decoder linear held, all handed back
    assert len({id(h) for h in holders}) == 1  # the build's own backend instance holds them
    monkeypatch.setattr(family, "STREAMED_LOAD", False)
    result = run_cli("build", *flags, "--out", tmp_path / "plain")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "plain" / "model.pte").read_bytes() == (tmp_path / "held" / "model.pte").read_bytes()


@pytest.mark.slow
def test_partitioners_use_compact_dependency_maps(hf_ckpt):
    """aot/backends/dependencies.py replaces the partitioners' quadratic `_DependencyViewer` (a set of
    every downstream node per node: 0.8 GiB at 3B, the build's peak) with bitsets during lowering.
    On the tiny model's real 8da4w edge graph it must answer exactly as torch's and ExecuTorch's
    originals do, for every node; fails if either class is renamed, or if the partitioners stop
    building theirs in __init__ (then the workaround would silently do nothing)."""
    import torch
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx.passes.infra import partitioner
    from torch.fx.passes.operator_support import OperatorSupport

    from aot.backends import get_backend
    from aot.backends.dependencies import CompactDependencies
    from aot.families.text.family import text_methods
    from aot.methods import export_methods
    from aot.quant import QuantConfig, apply_plan
    from test_model import our_model

    model = apply_plan(our_model(hf_ckpt), QuantConfig(scheme="8da4w").plan())
    edge = to_edge(export_methods(text_methods(model, 16)),
                   compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
    gm = edge.exported_program("forward").graph_module
    nodes = list(gm.graph.nodes)
    assert len(nodes) > 200

    ours, torch_viewer = CompactDependencies(gm), partitioner._DependencyViewer(gm)
    et_viewer = group_partitioner._DependencyViewer(gm)
    for node in nodes:
        down, up = ours.downstreams_of(node), ours.upstreams_of(node)
        assert set(down) == torch_viewer.downstreams_of(node) == et_viewer.downstreams_of(node), node
        assert set(up) == et_viewer.upstreams_of(node), node
        assert len(down) == len(set(down)) and bool(down) == bool(set(down))
        assert all(n in down for n in torch_viewer.downstreams_of(node))
        assert not any(n in down for n in nodes if n not in torch_viewer.downstreams_of(node))
    stranger = torch.fx.Graph().placeholder("x")  # a node of another graph: no dependencies
    assert stranger not in ours.downstreams_of(nodes[0]) and not ours.downstreams_of(stranger)

    support = OperatorSupport()
    with get_backend("xnnpack").lowering_context():
        assert isinstance(partitioner.CapabilityBasedPartitioner(gm, support).dependency_viewer, CompactDependencies)
        assert isinstance(group_partitioner.GroupBasedPartitioner(gm, support).dependency_viewer, CompactDependencies)
    assert isinstance(group_partitioner.GroupBasedPartitioner(gm, support).dependency_viewer,
                      group_partitioner._DependencyViewer)  # restored after lowering
