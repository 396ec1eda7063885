"""aot/mllama.py against transformers' MllamaForConditionalGeneration (the oracle), on a tiny random
Mllama written in HF layout: the image state (per-cross-layer K/V), logits with an image, with text
before the image, text-only (zero state and mask), and decoding token by token over the KV cache."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aot.mllama import VISION_MODELS, args_from_hf_config, load_hf, zero_image_state  # noqa: E402

IMAGE_TOKEN = 300


def _config(rope: str):
    text = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=IMAGE_TOKEN, cross_attention_layers=[1, 3], rms_norm_eps=1e-5,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    if rope == "rope_parameters":
        text["rope_parameters"] = {**scaling, "rope_theta": 500000.0}
    else:
        text["rope_scaling"], text["rope_theta"] = scaling, 500000.0
    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  image_size=28, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3],
                  vision_output_dim=96, norm_eps=1e-5)
    return transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN)


def _checkpoint(rope: str, out):
    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(_config(rope)).eval()
    with torch.no_grad():  # gates start at zero in HF's init: open them so every path counts
        for name, p in hf.named_parameters():
            if "gate" in name:
                p.fill_(0.7)
    hf.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())["text_config"]
    assert ("rope_parameters" in saved) or ("rope_scaling" in saved)
    return out, hf


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


def test_two_method_program_runs_in_executorch(tmp_path):
    """vision_encoder and text_decoder lowered to XNNPACK in one .pte; ExecuTorch's runtime gives
    the eager model's image state and logits, and running the vision method between decoder
    calls leaves the KV cache alone (the methods share planned memory; the cache is planned apart)."""
    from executorch.runtime import Runtime

    from aot.mllama import export_methods, metadata, to_program

    path, _ = _checkpoint("rope_parameters", tmp_path / "ckpt")  # one layout: lowering is the slow part
    model = load_hf(path, max_context_len=32)
    program = to_program(export_methods(model, max_seq_len=16), metadata(model.args, 16, 32, 1, [2]))
    pte = tmp_path / "model.pte"
    with open(pte, "wb") as f:
        program.write_to_file(f)
    loaded = Runtime.get().load_program(str(pte))
    assert {"vision_encoder", "text_decoder", "get_image_token_id", "get_n_cross_layers"} <= set(loaded.method_names)
    assert list(loaded.load_method("get_image_token_id").execute([])) == [IMAGE_TOKEN]
    vision, text = loaded.load_method("vision_encoder"), loaded.load_method("text_decoder")
    pixel_values, ar_ids, ar_mask = _image_inputs()
    tokens = [1, 7, IMAGE_TOKEN, 9, 11, 13, 2, 17]
    mask = _cross_mask(tokens, tiles=3)[:, :, 0].float()
    with torch.no_grad():
        state = model.vision(pixel_values, ar_ids, ar_mask)
        model.text.reset_cache()
        want_first = model.text(torch.tensor([tokens[:-1]]), torch.arange(7), mask[:, :-1], *state)
        want_last = model.text(torch.tensor([tokens[-1:]]), torch.tensor([7]), mask[:, -1:], *state)
    got_state = vision.execute([pixel_values, ar_ids, ar_mask])
    assert max((a - b).abs().max().item() for a, b in zip(got_state, state)) < 5e-3
    got_first = text.execute([torch.tensor([tokens[:-1]]), torch.arange(7), mask[:, :-1], *got_state])[0]
    vision.execute([torch.randn_like(pixel_values), ar_ids, ar_mask])  # between decoder calls
    got_last = text.execute([torch.tensor([tokens[-1:]]), torch.tensor([7]), mask[:, -1:], *got_state])[0]
    assert torch.allclose(got_first, want_first, atol=1e-3), (got_first - want_first).abs().max()
    assert torch.allclose(got_last, want_last, atol=1e-3), (got_last - want_last).abs().max()
