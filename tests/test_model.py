"""Our export-friendly model against transformers' LlamaForCausalLM, the independent oracle."""

from __future__ import annotations

import pytest
import torch

import checkpoints
from aot.families.common import RopeScaling, random_init_
from aot.families.text.checkpoint import open_checkpoint, permute_rotary, unpermute_rotary
from aot.families.text.family import TextFamily
from aot.families.text.model import MODELS, ModelArgs, Transformer

TOKENS = torch.tensor([[0, 17, 900, 5, 44, 1000, 3, 77, 250, 9, 512, 60]])


def hf_logits(path, tokens=TOKENS) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def our_model(path, full_logits=True, max_context_len=64) -> Transformer:
    """The checkpoint's fp32 eager model, as the text family loads its reference."""
    return TextFamily().reference(path, max_context_len, full_logits=full_logits)


@pytest.mark.oracle
def test_eager_matches_transformers(hf_ckpt):
    ref = hf_logits(hf_ckpt)
    model = our_model(hf_ckpt)
    with torch.no_grad():
        ours = model(TOKENS, torch.tensor([0]))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ref.abs().max().item() > 1.0  # the oracle's logits are not trivially flat


@pytest.mark.oracle
def test_kv_cache_decode_matches_full_sequence(hf_ckpt):
    """Prefill a chunk, then decode token by token: each step equals the full-sequence logits."""
    ref = hf_logits(hf_ckpt)[0]
    model = our_model(hf_ckpt, full_logits=False)
    with torch.no_grad():
        last = model(TOKENS[:, :5], torch.tensor([0]))
        assert (last[0] - ref[4]).abs().max().item() <= 1e-4
        for pos in range(5, TOKENS.shape[1]):
            step = model(TOKENS[:, pos : pos + 1], torch.tensor([pos]))
            assert (step[0] - ref[pos]).abs().max().item() <= 1e-4, pos


def test_meta_layout_identical_to_hf(hf_ckpt, meta_ckpt):
    hf, meta = our_model(hf_ckpt), our_model(meta_ckpt)
    assert hf.args == meta.args
    hf_sd, meta_sd = hf.state_dict(), meta.state_dict()
    assert hf_sd.keys() == meta_sd.keys()
    for name in hf_sd:
        assert torch.equal(hf_sd[name], meta_sd[name]), name


def test_published_config_layout_loads_the_same(hf_ckpt, tmp_path):
    """Published 3.2 repos keep rope_theta/rope_scaling top-level; transformers 5 nests them."""
    import shutil

    published = tmp_path / "published"
    shutil.copytree(hf_ckpt, published)
    checkpoints.to_published_config(published)
    a, b = open_checkpoint(hf_ckpt).args, open_checkpoint(published).args
    assert a == b
    assert a.rope_scaling == RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_context=8192)
    assert a.rope_theta == 500_000.0 and a.tie_embeddings


def test_rotary_permutation_roundtrip():
    w = torch.randn(8 * 16, 32)
    assert torch.equal(permute_rotary(unpermute_rotary(w, 8), 8), w)
    assert not torch.equal(unpermute_rotary(w, 8), w)


def test_registry_has_published_llama32_sizes():
    one, three = MODELS["1b"], MODELS["3b"]
    assert (one.dim, one.n_layers, one.n_heads, one.n_kv_heads, one.ffn_hidden) == (2048, 16, 32, 8, 8192)
    assert (three.dim, three.n_layers, three.n_heads, three.n_kv_heads, three.ffn_hidden) == (3072, 28, 24, 8, 8192)
    for args in (one, three):
        assert args.vocab_size == 128_256 and args.tie_embeddings and args.rope_theta == 500_000.0
        assert args.rope_scaling == RopeScaling(factor=32.0)
    # Published parameter counts: 1.24 B and 3.21 B.
    assert round(one.num_params() / 1e9, 2) == 1.24
    assert round(three.num_params() / 1e9, 2) == 3.21


def test_model_args_reject_bad_shapes():
    from aot.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of `n_kv_heads`"):
        ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, vocab_size=10, ffn_hidden=8)


def test_random_init_is_deterministic():
    a, b = Transformer(MODELS["tiny"], 8), Transformer(MODELS["tiny"], 8)
    random_init_(a, 3)
    random_init_(b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.oracle
@pytest.mark.parametrize("model", ["1b", "3b"])
def test_llama3_rope_scaling_matches_transformers(model):
    """Frequencies of the real 1B/3B configs, factor 32, against transformers' llama3 rope init
    (positions in a short test sequence barely exercise the scaled low frequencies)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from aot.families.text.model import rope_frequencies

    args = MODELS[model]
    config = LlamaConfig(hidden_size=args.dim, num_attention_heads=args.n_heads, rope_theta=args.rope_theta,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    cos, sin = rope_frequencies(args, max_context_len=2)
    ours = torch.atan2(sin[1], cos[1])  # angle at position 1 = the frequency
    assert torch.allclose(ours, inv_freq.float(), rtol=1e-6, atol=0)
    unscaled = rope_frequencies(ModelArgs(**{**args.to_dict(), "rope_scaling": None}), 2)
    assert not torch.allclose(torch.atan2(unscaled[1][1], unscaled[0][1]), inv_freq.float())


def test_sharded_safetensors_load_like_one_file(hf_ckpt, tmp_path):
    import shutil

    from transformers import LlamaForCausalLM

    sharded = tmp_path / "sharded"
    LlamaForCausalLM.from_pretrained(hf_ckpt).save_pretrained(sharded, max_shard_size="200KB")
    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copyfile(hf_ckpt / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(open_checkpoint(sharded).weight_files) > 1
    a, b = our_model(hf_ckpt).state_dict(), our_model(sharded).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
