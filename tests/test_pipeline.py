"""aot/pipeline.py's pure steps, without lowering: the input key (a build's content address) over
what the family resolves, and the runner metadata a bundle's constant methods return."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import checkpoints
from aot.backends import get_backend
from aot.config import build_config
from aot.errors import ConfigError
from aot.families import family_for
from aot.pipeline import fingerprint, hash_files, hash_inputs, input_key


def cfg_for(ckpt: Path, out: str = "out", **fields):
    return build_config(Path(out), checkpoint=str(ckpt), **{"max_seq_len": 16, "max_context_len": 64, **fields})


def resolve(cfg):
    return family_for(cfg).resolve(cfg)


def key(cfg) -> str:
    """As `build` computes it."""
    return input_key(cfg, hash_inputs(resolve(cfg), cfg, get_backend(cfg.delegate)))


def test_resolve_takes_ids_from_the_tokenizer_and_names_the_size(hf_ckpt):
    """(The text family's resolve, which the input key and the metadata are computed from.)"""
    cfg = cfg_for(hf_ckpt)
    src = resolve(cfg)
    assert (src.bos_id, src.eos_ids) == (checkpoints.BOS, (checkpoints.EOS, checkpoints.EOT))
    assert src.model_name == "tiny" and src.tokenizer.vocab_size == checkpoints.VOCAB
    flags = cfg_for(hf_ckpt, bos_id=5, eos_ids=[7])
    assert resolve(flags).eos_ids == (7,)


def test_resolve_collects_problems(hf_ckpt):
    cfg = cfg_for(hf_ckpt, group_size=256, eos_ids=[5000])
    with pytest.raises(ConfigError) as e:
        resolve(cfg)
    assert "--group-size 256 does not divide the model's dim (128)" in str(e.value)
    assert "bos/eos id(s) [5000] are outside the model's vocab (1024)" in str(e.value)


def test_input_key_is_stable_and_ignores_where_things_are(hf_ckpt, tmp_path):
    k = key(cfg_for(hf_ckpt))
    assert k == key(cfg_for(hf_ckpt)) and len(k) == 64
    assert key(cfg_for(hf_ckpt, out="elsewhere", no_preflight=True)) == k
    moved = Path(shutil.copytree(hf_ckpt, tmp_path / "moved"))
    assert key(cfg_for(moved)) == k  # a moved checkpoint is the same input
    assert fingerprint(cfg_for(hf_ckpt)) == k


@pytest.mark.parametrize("fields", [
    dict(quant="8da8w"), dict(group_size=64), dict(embedding_quant="4"), dict(output_quant="none"),
    dict(max_context_len=32), dict(full_logits=True), dict(bos_id=1), dict(seed=1),
])
def test_input_key_changes_with_the_config(hf_ckpt, fields):
    assert key(cfg_for(hf_ckpt, **fields)) != key(cfg_for(hf_ckpt))


def test_input_key_changes_with_the_bytes_of_any_input(hf_ckpt, tmp_path):
    k = key(cfg_for(hf_ckpt))
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        ckpt = Path(shutil.copytree(hf_ckpt, tmp_path / name))
        with open(ckpt / name, "ab") as f:
            f.write(b" ")
        assert key(cfg_for(ckpt)) != k, name


def test_hash_files_lists_each_file_once(hf_ckpt):
    f = hf_ckpt / "config.json"
    inputs = hash_files([f, f])
    assert list(inputs) == [str(f)] and inputs[str(f)]["bytes"] == f.stat().st_size


def test_runner_metadata_for_dynamic_and_static_delegates(hf_ckpt):
    cfg = cfg_for(hf_ckpt)
    src = resolve(cfg)
    family = family_for(cfg)
    assert family.runner_metadata(src, cfg, static=False) == {
        "get_max_seq_len": 16, "get_max_context_len": 64, "get_vocab_size": 1024, "get_n_layers": 2,
        "use_kv_cache": True, "use_sdpa_with_kv_cache": True, "enable_dynamic_shape": True,
        "get_bos_id": checkpoints.BOS, "get_eos_ids": [checkpoints.EOS, checkpoints.EOT],
    }
    one = cfg_for(hf_ckpt, max_seq_len=1)
    assert family.runner_metadata(src, one, static=False)["enable_dynamic_shape"] is False
    static = family.runner_metadata(src, cfg, static=True)  # fixed prefill chunk, plain-op attention
    assert static["use_sdpa_with_kv_cache"] is False and static["enable_dynamic_shape"] is False
