"""aot/families/text/checkpoint.py: open_checkpoint on the tests' tiny Hugging Face and Meta folders, the
architecture read from each layout's config, and one-line errors for missing or garbled files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aot.families.text.checkpoint import HF, META, load_weights, open_checkpoint
from aot.errors import CheckpointError
from aot.families.text.model import RopeScaling, Transformer


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def edit_json(file: Path, **changes) -> None:
    """Set keys; a value of None removes the key."""
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


def refused(path: Path, needle: str) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def test_hf_layout(hf_ckpt):
    ckpt = open_checkpoint(hf_ckpt)
    a = ckpt.args
    assert ckpt.layout == HF and ckpt.path == hf_ckpt.absolute() and ckpt.prequantized is None
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_hidden) == (128, 2, 4, 2, 1024, 384)
    assert a.tie_embeddings and a.rope_theta == 500000.0 and a.norm_eps == 1e-5
    assert a.rope_scaling == RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context=8192)
    assert [f.name for f in ckpt.weight_files] == ["model.safetensors"]
    assert [f.name for f in ckpt.files()] == ["config.json", "generation_config.json", "model.safetensors"]


def test_meta_layout_reads_the_same_architecture(hf_ckpt, meta_ckpt):
    ckpt = open_checkpoint(meta_ckpt)
    assert ckpt.layout == META and [f.name for f in ckpt.files()] == ["params.json", "consolidated.00.pth"]
    assert ckpt.args == open_checkpoint(hf_ckpt).args


def test_meta_ffn_size_from_multiple_of(meta_ckpt, tmp_path):
    """Without ffn_dim, Meta's rule: 2/3 of 4*dim times the multiplier, rounded up to multiple_of."""
    ckpt = copy(meta_ckpt, tmp_path / "m")
    params = json.loads((ckpt / "params.json").read_text())
    del params["ffn_dim"]
    (ckpt / "params.json").write_text(json.dumps({**params, "multiple_of": 128, "ffn_dim_multiplier": 1.5}))
    assert open_checkpoint(ckpt).args.ffn_hidden == 512  # int(1.5 * 341) = 511 -> 512


def test_not_a_checkpoint_folder(tmp_path):
    refused(tmp_path / "nope", "not a directory")
    refused(tmp_path, "found neither config.json (Hugging Face) nor params.json (Meta)")


@pytest.mark.parametrize("changes, needle", [
    (dict(model_type="mistral"), "model_type is 'mistral', not 'llama'"),
    (dict(attention_bias=True), "attention_bias=true is not a Llama 3.2 layout"),
    (dict(head_dim=16), "head_dim 16 != hidden_size / num_attention_heads"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "rope type 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "llama3 rope scaling lacks 'low_freq_factor'"),
    (dict(vocab_size=None), "missing 'vocab_size'; is this a Llama checkpoint?"),
])
def test_hf_config_problems(hf_ckpt, tmp_path, changes, needle):
    ckpt = copy(hf_ckpt, tmp_path / "c")
    edit_json(ckpt / "config.json", **changes)
    refused(ckpt, needle)


def test_hf_missing_and_garbled_files(hf_ckpt, tmp_path):
    ckpt = copy(hf_ckpt, tmp_path / "c")
    (ckpt / "config.json").write_text("{ not json")
    refused(ckpt, "config.json: not readable JSON")
    (ckpt / "config.json").write_text("[1, 2]")
    refused(ckpt, "expected a JSON object, got list")
    shutil.copyfile(hf_ckpt / "config.json", ckpt / "config.json")
    (ckpt / "model.safetensors").unlink()
    refused(ckpt, "config.json found but no *.safetensors weights")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    refused(ckpt, "lists shard(s) that are missing: model-00001-of-00002.safetensors")


def test_meta_missing_and_garbled_files(meta_ckpt, tmp_path):
    ckpt = copy(meta_ckpt, tmp_path / "m")
    shutil.copyfile(ckpt / "consolidated.00.pth", ckpt / "consolidated.01.pth")
    refused(ckpt, "2 consolidated.*.pth shards (model-parallel)")
    (ckpt / "consolidated.01.pth").unlink()
    (ckpt / "consolidated.00.pth").write_bytes(b"garbage" * 10)
    refused(ckpt, "consolidated.00.pth: not a readable PyTorch checkpoint")
    torch.save([torch.zeros(2)], ckpt / "consolidated.00.pth")
    refused(ckpt, "expected a dict of tensors, got list")
    (ckpt / "consolidated.00.pth").unlink()
    refused(ckpt, "params.json found but no consolidated.00.pth")
    edit_json(ckpt / "params.json", vision_chunk_size=560)
    refused(ckpt, "Meta's original Llama 3.2 Vision layout is not read")


def test_weights_that_do_not_fit_are_listed_together(hf_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = copy(hf_ckpt, tmp_path / "c")
    sd = load_file(ckpt / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(8, 8)
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, ckpt / "model.safetensors")
    opened = open_checkpoint(ckpt)  # the header is fine: the mismatch shows when weights are mapped
    with torch.device("meta"):
        model = Transformer(opened.args, 64)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, opened)
    message = str(e.value)
    assert "weights do not fit its config" in message
    assert "1 mis-shaped: model.layers.0.mlp.gate_proj.weight: checkpoint [8, 8], model expects [384, 128]" in message
    assert "1 missing: layers.1.feed_forward.w3.weight [384, 128]" in message
    assert "1 unexpected: model.extra.weight [3]" in message


def test_hf_and_meta_load_the_same_weights(hf_ckpt, meta_ckpt):
    def loaded(path):
        ckpt = open_checkpoint(path)
        model = Transformer(ckpt.args, 64)
        load_weights(model, ckpt)
        return model.state_dict()

    hf, meta = loaded(hf_ckpt), loaded(meta_ckpt)
    assert hf.keys() == meta.keys()
    assert all(torch.equal(hf[k], meta[k]) for k in hf)
