"""aot/families/vision/model.py against transformers' MllamaForConditionalGeneration (the oracle), on a tiny random
Mllama written in HF layout: the image state (per-cross-layer K/V), logits with an image, with text
before the image, text-only (zero state and mask), and decoding token by token over the KV cache."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from checkpoints import MLLAMA_VOCAB, write_mllama_checkpoint  # noqa: E402

from aot.families.vision.checkpoint import args_from_hf_config, load_hf  # noqa: E402
from aot.families.vision.model import VISION_MODELS, zero_image_state  # noqa: E402

IMAGE_TOKEN = MLLAMA_VOCAB


def _checkpoint(rope: str, out):
    path, hf = write_mllama_checkpoint(out, rope, tokenizer=False)
    saved = json.loads((path / "config.json").read_text())["text_config"]
    assert ("rope_parameters" in saved) or ("rope_scaling" in saved)
    return path, hf


@pytest.fixture(scope="module", params=["rope_parameters", "rope_scaling"])
def checkpoint(request, tmp_path_factory):
    return _checkpoint(request.param, tmp_path_factory.mktemp("mllama") / request.param)


def _image_inputs(tiles: int = 3):
    torch.manual_seed(1)
    pixel_values = torch.zeros(1, 1, 4, 3, 28, 28)
    pixel_values[0, 0, :tiles] = torch.randn(tiles, 3, 28, 28)
    ids = torch.tensor([[5 if tiles == 3 else 1]])
    mask = torch.zeros(1, 1, 4, dtype=torch.long)
    mask[0, 0, :tiles] = 1
    return pixel_values, ids, mask


def _cross_mask(tokens: list[int], tiles: int) -> torch.Tensor:
    m = torch.zeros(1, len(tokens), 1, 4, dtype=torch.long)
    first = tokens.index(IMAGE_TOKEN)
    m[0, first:, 0, :tiles] = 1
    return m


def test_config_and_registry(checkpoint):
    args = args_from_hf_config(checkpoint[0] / "config.json")
    assert args.text.cross_layers == (1, 3) and args.vision.patches == 5 and args.image_token_id == IMAGE_TOKEN
    assert args.text.rope_scaling.factor == 8.0 and args.text.rope_scaling.original_context == 64
    big = VISION_MODELS["11b-vision"]
    assert big.text.cross_layers == (3, 8, 13, 18, 23, 28, 33, 38) and big.vision.patches == 1601


@pytest.mark.oracle
def test_logits_match_transformers(checkpoint):
    path, hf = checkpoint
    ours = load_hf(path, max_context_len=32)
    pixel_values, ar_ids, ar_mask = _image_inputs()
    tokens = [1, 7, IMAGE_TOKEN, 9, 11, 13, 2, 17]  # two text tokens before the image: their rows see nothing
    cross = _cross_mask(tokens, tiles=3)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([tokens]), pixel_values=pixel_values, aspect_ratio_ids=ar_ids,
                  aspect_ratio_mask=ar_mask, cross_attention_mask=cross).logits[0]
        state = ours.vision(pixel_values, ar_ids, ar_mask)
        # The image state is each cross layer's K/V of the projected image features.
        features = hf.model.vision_model(pixel_values, ar_ids, ar_mask).last_hidden_state
        projected = hf.model.multi_modal_projector(features).reshape(1, -1, 64)
        attn = hf.model.language_model.layers[1].cross_attn
        k = attn.k_norm(attn.k_proj(projected).view(1, -1, 2, 16).transpose(1, 2))
        assert torch.allclose(state[0], k, atol=1e-5)
        # Prefill all but the last token, then the last one alone (the KV cache carries the rest).
        ours.text.reset_cache()
        m = cross[:, :, 0].float()
        first = ours.text(torch.tensor([tokens[:-1]]), torch.arange(len(tokens) - 1), m[:, :-1], *state)
        last = ours.text(torch.tensor([tokens[-1:]]), torch.tensor([len(tokens) - 1]), m[:, -1:], *state)
    assert torch.allclose(first[0], want[-2], atol=1e-4), (first[0] - want[-2]).abs().max()
    assert torch.allclose(last[0], want[-1], atol=1e-4), (last[0] - want[-1]).abs().max()
    # Sanity: the image changes the logits (a model that ignored it would not pass the check above).
    with torch.no_grad():
        ours.text.reset_cache()
        blind = ours.text(torch.tensor([tokens]), torch.arange(len(tokens)), torch.zeros(1, len(tokens), 4),
                          *zero_image_state(ours.args))
    assert (blind[0] - want[-1]).abs().max() > 1e-2


@pytest.mark.oracle
def test_text_only_turn_matches_transformers_skipping_cross_layers(checkpoint):
    path, hf = checkpoint
    ours = load_hf(path, max_context_len=32)
    tokens = [1, 7, 9, 11, 13]
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([tokens])).logits[0, -1]
        ours.text.reset_cache()
        got = ours.text(torch.tensor([tokens]), torch.arange(len(tokens)), torch.zeros(1, len(tokens), 4),
                        *zero_image_state(ours.args))
    assert torch.allclose(got[0], want, atol=1e-4), (got[0] - want).abs().max()


def test_legacy_saved_prefixes_load(checkpoint, tmp_path):
    """transformers 5 saves language_model.model.* / vision_model.* ...; in-memory names load too."""
    from safetensors.torch import load_file, save_file

    path, _ = checkpoint
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors.update(load_file(f))
    renamed = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
               if not k.startswith("model.") else k: v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "model.safetensors")
    a, b = load_hf(path, 16), load_hf(tmp_path, 16)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
