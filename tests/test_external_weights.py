"""External weights (--external-weights): the weights in model.ptd beside a small model.pte, loaded
by ExecuTorch's stock runner; one model and recipe at two contexts and two KV-cache types write the
same .ptd bytes, and run as the single-file bundle does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from aot.errors import ConfigError
from conftest import CTX, SEQ, run_cli


class _Block(nn.Module):
    """A quantized linear, a norm weight, a rope-like table, a cache written in place."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32, bias=False)
        self.norm = nn.Parameter(torch.ones(64))
        self.register_buffer("scale", torch.full((32,), 2.0))  # persistent: a weight
        self.register_buffer("freqs", torch.arange(64.0), persistent=False)  # follows from the context
        self.register_buffer("cache", torch.zeros(4, 32))  # state

    def forward(self, x, pos):
        y = self.proj(x * self.norm + self.freqs) * self.scale
        self.cache.index_copy_(0, pos, y)
        return self.cache.sum(0, keepdim=True)


def test_only_weights_are_tagged_for_the_data_file():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    from aot.methods import Method, export_methods

    block = _Block().eval()
    quantize_(block, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)),
              filter_fn=lambda m, _: isinstance(m, nn.Linear))
    ep = export_methods([Method("forward", block, (torch.randn(1, 64), torch.tensor([1])), None, {})], "model")["forward"]
    tags = {n.name: (n.meta.get("custom") or {}).get("delegate_constant_tag") for n in ep.graph.nodes if n.op == "placeholder"}
    tagged = {name for name, tag in tags.items() if tag == "model"}
    # torchao's int4 weight is flattened into its data tensors, each tagged; so are the norm and the scale
    assert {"p_norm", "b_scale"} <= tagged and sum(name.startswith("p_proj") for name in tagged) >= 2
    assert not {"b_freqs", "b_cache", "x", "pos"} & tagged


def test_npu_delegates_refuse_external_weights(tmp_path):
    from aot.config import build_config

    with pytest.raises(ConfigError, match="--external-weights: --delegate qnn"):
        build_config(tmp_path / "b", model="tiny", random_weights=True, delegate="qnn", external_weights=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_contexts_and_cache_types_share_one_data_file(release_bundles):
    root = Path(release_bundles["root"])
    short, long = (json.loads((root / name / "bundle.json").read_text()) for name in ("short", "long"))
    assert short["data_file"] == long["data_file"] == "model.ptd"
    assert short["files"]["model.ptd"] == long["files"]["model.ptd"]  # sha256 and size: one blob to ship
    assert short["files"]["model.pte"]["sha256"] != long["files"]["model.pte"]["sha256"]
    assert long["build"]["config"]["kv_cache"] == "int8" and long["export"]["max_context_len"] == 2 * CTX
    # the weights left the program: the .pte is a fraction of the .ptd, and the plan counts the .ptd at load
    ptd, pte = short["files"]["model.ptd"]["bytes"], short["files"]["model.pte"]["bytes"]
    assert pte < ptd / 3
    total = short["memory_plan"]["total"]
    assert total["external_bytes"] == ptd and total["at_load_bytes"] >= ptd


def test_the_tied_embedding_and_output_are_stored_once(release_bundles):
    """The test model ties its embedding and output: 8-bit per-channel both, the same int8 bytes
    and scales, which the single-file .pte holds twice (the embedding as a constant, the output in
    XNNPACK's blob) and the .ptd once (two keys, one segment)."""
    from executorch.extension.flat_tensor.serialize.serialize import _deserialize_to_flat_tensor

    ptd = _deserialize_to_flat_tensor((Path(release_bundles["root"]) / "short" / "model.ptd").read_bytes())
    by_segment: dict[int, list[str]] = {}
    for entry in ptd.named_data:
        by_segment.setdefault(entry.segment_index, []).append(entry.key)
    shared = [keys for keys in by_segment.values() if len(keys) > 1]
    assert any(k.startswith("tok_embeddings.") for keys in shared for k in keys)


def test_an_external_weights_bundle_runs_as_the_single_file_one(release_bundles, bundle_8da4w):
    """`short` is bundle_8da4w's recipe and lengths with the weights outside: same logits, same text
    from ExecuTorch's TextLLMRunner (aot run's stock engine), which is given the .ptd as data_path."""
    from aot.bundle import open_bundle
    from aot.runner.pte import PteProgram

    split, single = open_bundle(Path(release_bundles["root"]) / "short"), open_bundle(Path(bundle_8da4w["path"]))
    assert split.data_path is not None and single.data_path is None
    tokens, pos = torch.tensor([[3, 17, 42, 5, 9]]), torch.tensor([0])
    a = PteProgram(split.pte, split.data_path).forward()(tokens, pos)
    b = PteProgram(single.pte).forward()(tokens, pos)
    assert torch.equal(a, b)
    texts = []
    for bundle in (split.root, single.root):
        result = run_cli("run", bundle, "--prompt", "the quick brown fox", "--max-new-tokens", SEQ, "--json")
        assert result.exit_code == 0, result.stderr
        texts.append(json.loads(result.stdout)["text"])
    assert texts[0] == texts[1] and texts[0]
    result = run_cli("inspect", split.root)
    assert result.exit_code == 0 and "model.ptd" in result.stdout and "external weights" in result.stdout


def test_a_missing_or_altered_data_file_is_refused(release_bundles, tmp_path):
    import shutil

    copy = tmp_path / "short"
    shutil.copytree(Path(release_bundles["root"]) / "short", copy)
    (copy / "model.ptd").unlink()
    result = run_cli("run", copy, "--prompt", "hi")
    assert result.exit_code == 7 and "model.ptd: missing from the bundle" in result.stderr


def test_the_release_counts_the_shared_weights_once(release_bundles):
    index = release_bundles["index"]
    short, long = (t["files"] for t in index["targets"])
    shared = [name for name in short if short[name] == long[name]]
    assert sorted(shared) == ["model.ptd", "tokenizer.json"]  # the weights and the tokenizer, not the programs
    s = index["storage"]
    assert s["files"] == s["unique_files"] + 2 and s["unique_bytes"] == s["bytes"] - sum(short[n]["bytes"] for n in shared)
