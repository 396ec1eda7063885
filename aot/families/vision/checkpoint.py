"""Read Llama 3.2 Vision checkpoints (Hugging Face Mllama: config.json + safetensors, sharded or
not, transformers 4 and 5 key prefixes): the architecture from config.json, and the weights
tensor by tensor through our parameter name -> theirs map, so a model fills one part at a time."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from aot.errors import CheckpointError
from aot.families.common import RopeScaling
from aot.families.vision.model import Mllama, MllamaArgs, TextArgs, VisionArgs


def is_mllama_checkpoint(path: Path | None) -> bool:
    if path is None:
        return False
    config = Path(path).expanduser() / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "mllama"
    except (OSError, ValueError, AttributeError):
        return False


def args_from_hf_config(path: Path) -> MllamaArgs:
    """config.json (model_type mllama) -> MllamaArgs; both rope layouts (rope_parameters, or
    rope_theta + rope_scaling)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable config.json ({e})") from None
    if cfg.get("model_type") != "mllama":
        raise CheckpointError(f"{path}: model_type is {cfg.get('model_type')!r}, not 'mllama' (Llama 3.2 Vision)")
    t, v = cfg["text_config"], cfg["vision_config"]
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 500_000.0))
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                              high_freq_factor=rope["high_freq_factor"],
                              original_context=rope["original_max_position_embeddings"])
    text = TextArgs(dim=t["hidden_size"], n_layers=t["num_hidden_layers"], n_heads=t["num_attention_heads"],
                    n_kv_heads=t["num_key_value_heads"], vocab_size=t["vocab_size"], ffn_hidden=t["intermediate_size"],
                    cross_layers=tuple(t["cross_attention_layers"]), norm_eps=t.get("rms_norm_eps", 1e-5),
                    rope_theta=theta, rope_scaling=scaling)
    vision = VisionArgs(dim=v["hidden_size"], n_layers=v["num_hidden_layers"], n_global_layers=v["num_global_layers"],
                        n_heads=v["attention_heads"], ffn_hidden=v["intermediate_size"], image_size=v["image_size"],
                        patch_size=v["patch_size"], max_tiles=v["max_num_tiles"],
                        intermediate_layers=tuple(v["intermediate_layers_indices"]), norm_eps=v.get("norm_eps", 1e-5),
                        channels=v.get("num_channels", 3))
    return MllamaArgs(text, vision, image_token_id=cfg.get("image_token_index", t["vocab_size"]))


# ---- Hugging Face weights -------------------------------------------------------------------


def _hf_names(args: MllamaArgs) -> dict[str, str]:
    """Our parameter name -> HF's in-memory name (transformers 5: model.language_model.*, lm_head.*)."""
    a, t = args.vision, args.text
    out = {
        "vision.patch_embedding.weight": "model.vision_model.patch_embedding.weight",
        "vision.class_embedding": "model.vision_model.class_embedding",
        "vision.pos_embedding": "model.vision_model.gated_positional_embedding.embedding",
        "vision.pos_gate": "model.vision_model.gated_positional_embedding.gate",
        "vision.tile_pos_embedding.weight": "model.vision_model.gated_positional_embedding.tile_embedding.weight",
        "vision.pre_tile_embedding.weight": "model.vision_model.pre_tile_positional_embedding.embedding.weight",
        "vision.pre_tile_gate": "model.vision_model.pre_tile_positional_embedding.gate",
        "vision.post_tile_embedding.weight": "model.vision_model.post_tile_positional_embedding.embedding.weight",
        "vision.post_tile_gate": "model.vision_model.post_tile_positional_embedding.gate",
        "vision.projector.weight": "model.multi_modal_projector.weight",
        "vision.projector.bias": "model.multi_modal_projector.bias",
        "text.embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "text.norm.weight": "model.language_model.norm.weight",
        "text.lm_head.weight": "lm_head.weight",
    }
    for p in ("weight", "bias"):
        out[f"vision.layernorm_pre.{p}"] = f"model.vision_model.layernorm_pre.{p}"
        out[f"vision.layernorm_post.{p}"] = f"model.vision_model.layernorm_post.{p}"
    for ours, theirs, n in (("layers", "transformer.layers", a.n_layers), ("global_layers", "global_transformer.layers", a.n_global_layers)):
        for i in range(n):
            src, dst = f"model.vision_model.{theirs}.{i}", f"vision.{ours}.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{dst}.{proj}.weight"] = f"{src}.self_attn.{proj}.weight"
            for fc in ("fc1", "fc2"):
                for p in ("weight", "bias"):
                    out[f"{dst}.{fc}.{p}"] = f"{src}.mlp.{fc}.{p}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                for p in ("weight", "bias"):
                    out[f"{dst}.{norm}.{p}"] = f"{src}.{norm}.{p}"
            if ours == "global_layers":
                out[f"{dst}.gate_attn"], out[f"{dst}.gate_ffn"] = f"{src}.gate_attn", f"{src}.gate_ffn"
    for i in range(t.n_layers):
        src, dst = f"model.language_model.layers.{i}", f"text.layers.{i}"
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"{dst}.mlp.{ours}.weight"] = f"{src}.mlp.{theirs}.weight"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{dst}.{norm}.weight"] = f"{src}.{norm}.weight"
        if i in t.cross_layers:
            c = t.cross_layers.index(i)
            out[f"{dst}.q_proj.weight"] = f"{src}.cross_attn.q_proj.weight"
            out[f"{dst}.o_proj.weight"] = f"{src}.cross_attn.o_proj.weight"
            out[f"{dst}.q_norm.weight"] = f"{src}.cross_attn.q_norm.weight"
            out[f"{dst}.attn_gate"] = f"{src}.cross_attn_attn_gate"
            out[f"{dst}.mlp_gate"] = f"{src}.cross_attn_mlp_gate"
            out[f"vision.cross_k.{c}.weight"] = f"{src}.cross_attn.k_proj.weight"
            out[f"vision.cross_v.{c}.weight"] = f"{src}.cross_attn.v_proj.weight"
            out[f"vision.cross_k_norm.{c}.weight"] = f"{src}.cross_attn.k_norm.weight"
        else:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{dst}.{proj}.weight"] = f"{src}.self_attn.{proj}.weight"
    return out


def _canonical(name: str) -> str:
    """Saved names (transformers' legacy prefixes) -> in-memory names."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


class MllamaReader:
    """The weights of an HF Mllama checkpoint (config.json + safetensors, sharded with an index or
    not), read tensor by tensor so a model can be filled one part at a time."""

    def __init__(self, directory: Path, args: MllamaArgs, stack):
        from safetensors import safe_open

        directory = Path(directory)
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no *.safetensors files")
        wanted = {theirs: ours for ours, theirs in _hf_names(args).items()}
        self.where: dict[str, tuple] = {}  # our name -> (open file, saved name, path)
        extra = []
        for f in files:
            try:
                st = stack.enter_context(safe_open(str(f), framework="pt"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: not a readable safetensors file ({e}); re-download it") from None
            for name in st.keys():
                ours = wanted.get(_canonical(name))
                if ours is None:
                    extra.append(name)
                else:
                    self.where[ours] = (st, name, f)
        missing = sorted(set(wanted.values()) - set(self.where))
        if missing or extra:
            raise CheckpointError(f"{directory}: weights do not fit config.json: {len(missing)} missing "
                                  f"({', '.join(missing[:2])}), {len(extra)} unexpected ({', '.join(extra[:2])})")

    def fill(self, model: nn.Module, names) -> None:
        """Copy the named parameters' weights in (as float32: quantization runs in fp32)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for ours in names:
                st, name, f = self.where[ours]
                tensor = st.get_tensor(name)
                if tuple(tensor.shape) != tuple(params[ours].shape):
                    raise CheckpointError(f"{f}: {name} has shape {list(tensor.shape)}, expected {list(params[ours].shape)}")
                params[ours].copy_(tensor)
                del tensor


def load_hf(directory: Path, max_context_len: int) -> Mllama:
    """An HF Mllama checkpoint, whole, in float32."""
    directory = Path(directory)
    args = args_from_hf_config(directory / "config.json")
    model = Mllama(args, max_context_len)
    with ExitStack() as stack:
        reader = MllamaReader(directory, args, stack)
        reader.fill(model, [n for n, _ in model.named_parameters()])
    return model.eval().requires_grad_(False)


