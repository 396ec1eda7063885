"""Tiny checkpoints the tests write themselves: a random transformers Llama (GQA, llama3 rope
scaling, tied embeddings) with a byte-level BPE tokenizer, in both Hugging Face and Meta layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from aot.families.text.checkpoint import unpermute_rotary

VOCAB = 1024
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
BOS, EOS, EOT = 0, 1, 2


def corpus_files() -> list[str]:
    """Text present on every machine: the Python standard library's json package."""
    import json as json_pkg

    return sorted(str(p) for p in Path(json_pkg.__file__).parent.glob("*.py"))


def write_tokenizer(path: Path, vocab_size: int = VOCAB, all_bytes: bool = False) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Without the full byte alphabet (the default here) every token of this ASCII corpus decodes to
    # whole characters; with it, bytes >= 0x80 are tokens of their own, as in Llama 3's tokenizer,
    # and a model can emit part of a character.
    alphabet = pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet)
    tok.train(corpus_files(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL[0]} $A", special_tokens=[(SPECIAL[0], BOS)]
    )
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    tok.save(str(path))
    return path


def hf_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=[EOS, EOT], initializer_range=0.1,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def write_hf_checkpoint(path: Path, seed: int = 0, all_bytes: bool = False, **overrides) -> Path:
    """A random LlamaForCausalLM saved with save_pretrained, plus tokenizer.json."""
    from transformers import GenerationConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(**overrides)).eval()
    # transformers initialises RMSNorm weights to exactly 1; trained models never have that, and
    # with unit norms a quantized embedding feeds the first linear values on a grid, where 8-bit
    # dynamic activation quantization lands on rounding ties that XNNPACK and torchao break
    # differently (measured: 0.05 max abs logit difference, exact with non-unit norms).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=BOS, eos_token_id=[EOS, EOT]).save_pretrained(path)
    write_tokenizer(path / "tokenizer.json", all_bytes=all_bytes)
    return path


def hf_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def write_meta_checkpoint(hf_path: Path, path: Path) -> Path:
    """The same weights in Meta's layout: params.json, consolidated.00.pth (interleaved q/k)."""
    cfg = json.loads((hf_path / "config.json").read_text())
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = cfg.get("rope_parameters") or {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta")}
    sd = {}
    names = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2"}
    for name, w in hf_state_dict(hf_path).items():
        if name == "model.embed_tokens.weight":
            sd["tok_embeddings.weight"] = w
        elif name == "model.norm.weight":
            sd["norm.weight"] = w
        elif name == "lm_head.weight":
            sd["output.weight"] = w
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            rest = rest.removesuffix(".weight")
            if rest == "self_attn.q_proj":
                w = unpermute_rotary(w, n_heads)
            elif rest == "self_attn.k_proj":
                w = unpermute_rotary(w, n_kv)
            sd[f"layers.{i}.{names[rest]}.weight"] = w
    path.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path / "consolidated.00.pth")
    hidden = cfg["intermediate_size"]
    params = {"dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "n_heads": n_heads,
              "n_kv_heads": n_kv, "vocab_size": cfg["vocab_size"], "ffn_dim": hidden,
              "norm_eps": cfg["rms_norm_eps"], "rope_theta": rope["rope_theta"],
              "use_scaled_rope": rope.get("rope_type") == "llama3", "rope_scale_factor": rope.get("factor")}
    (path / "params.json").write_text(json.dumps(params))
    shutil.copyfile(hf_path / "tokenizer.json", path / "tokenizer.json")
    return path


def to_published_config(path: Path) -> None:
    """Rewrite config.json the way the published Llama 3.2 repos have it (rope_* at the top level)."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None)
    if rope is not None:
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(cfg, indent=2))



# ---- Llama 3.2 Vision (Mllama) ----------------------------------------------------------------

MLLAMA_VOCAB = 300  # text vocab; <|image|> is token 300 (an embedding row, no lm_head row)
MLLAMA_TILE = 28


def mllama_config(rope: str = "rope_parameters"):
    """A tiny MllamaConfig: 4 text layers (cross-attention at 1 and 3), a 4+2-layer ViT on 28-px
    tiles of 2x2 patches, up to 4 tiles."""
    import transformers

    text = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=MLLAMA_VOCAB, cross_attention_layers=[1, 3], rms_norm_eps=1e-5,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=BOS, eos_token_id=EOS)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    if rope == "rope_parameters":
        text["rope_parameters"] = {**scaling, "rope_theta": 500000.0}
    else:
        text["rope_scaling"], text["rope_theta"] = scaling, 500000.0
    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  image_size=MLLAMA_TILE, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3],
                  vision_output_dim=96, norm_eps=1e-5)
    return transformers.MllamaConfig(text_config=text, vision_config=vision, image_token_index=MLLAMA_VOCAB)


def write_mllama_checkpoint(out: Path, rope: str = "rope_parameters", tokenizer: bool = True):
    """save_pretrained of a random MllamaForConditionalGeneration with its tanh gates opened
    (transformers initialises them to 0, which would make the image irrelevant), plus a tokenizer
    with <|image|> and a preprocessor_config.json; returns (path, model)."""
    import transformers
    from tokenizers import Tokenizer

    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(mllama_config(rope)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "gate" in name:
                p.fill_(0.7)
    hf.save_pretrained(out)
    if tokenizer:
        write_tokenizer(out / "tokenizer.json", vocab_size=MLLAMA_VOCAB)
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        tok.add_special_tokens(["<|image|>"])
        assert tok.token_to_id("<|image|>") == MLLAMA_VOCAB
        tok.save(str(out / "tokenizer.json"))
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_normalize": True,
            "do_pad": True, "do_rescale": True, "do_resize": True, "resample": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "max_image_tiles": 4, "rescale_factor": 1 / 255, "size": {"height": MLLAMA_TILE, "width": MLLAMA_TILE}}))
    return out, hf


PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_peft_adapter(hf_path: Path, path: Path, seed: int = 1, r: int = 8, alpha: float = 16,
                       targets: list[str] | None = None, std: float = 0.05, **config) -> Path:
    """A LoRA adapter for the checkpoint at `hf_path`, written by PEFT itself (save_pretrained):
    adapter_config.json + adapter_model.safetensors. PEFT starts B at zero (a no-op adapter), so A
    and B are drawn here, as a fine-tune would have moved them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(hf_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or PEFT_TARGETS,
                                            lora_dropout=0.0, task_type="CAUSAL_LM", **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    model.save_pretrained(path)
    return path
