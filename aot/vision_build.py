"""`aot build` for Llama 3.2 Vision (Mllama): one .pte with `vision_encoder` and `text_decoder`.

The same stages as a text build (aot/pipeline.py), over the two methods of aot/mllama.py:
resolve -> hash inputs -> load + quantize (part by part: the fp32 model never exists whole) ->
export -> lower (XNNPACK) -> serialize -> bundle. The text decoder takes --quant (8da4w by default:
linears 4-bit g32, output projection 8da8w, embedding 8-bit); the vision encoder takes
--vision-quant (8da8w by default; 8da4w or none). Quantization always runs on fp32 weights:
torchao's 8da4w ops on a bf16 graph stay undelegated and ExecuTorch cannot serialize them.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from aot.backends import Backend
from aot.bundle import Staging
from aot.config import BuildConfig, QuantConfig
from aot.errors import CheckpointError, ConfigError
from aot.preflight import check
from aot.progress import Stages
from aot.quant import QuantPlan, apply_plan
from aot.tokenizer import LLAMA3_BOS, LLAMA3_EOS, TokenizerInfo, find_tokenizer, tokenizer_info

IMAGE_TOKEN = "<|image|>"
VISION_SCHEMES = ("8da8w", "8da4w", "none")
DEFAULT_VISION_QUANT = "8da8w"


def is_mllama_checkpoint(path: Path | None) -> bool:
    if path is None:
        return False
    config = Path(path).expanduser() / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "mllama"
    except (OSError, ValueError, AttributeError):
        return False


def is_vision_build(cfg: BuildConfig) -> bool:
    from aot.mllama import VISION_MODELS

    return cfg.model in VISION_MODELS or is_mllama_checkpoint(cfg.checkpoint)


@dataclass(frozen=True)
class VisionSource:
    args: object  # MllamaArgs
    model_name: str
    checkpoint: Path | None
    tokenizer: TokenizerInfo | None
    bos_id: int
    eos_ids: tuple[int, ...]
    image: dict  # runner.vision.ImageSpec as a dict

    def files(self) -> list[Path]:
        out = []
        if self.checkpoint is not None:
            out += sorted(p for p in self.checkpoint.iterdir() if p.is_file() and (
                p.suffix in (".safetensors", ".json") and p.name != "tokenizer.json"))
        if self.tokenizer is not None:
            out.append(self.tokenizer.path)
        return out


def plans(cfg: BuildConfig) -> tuple[QuantPlan, QuantPlan]:
    """(text decoder plan, vision encoder plan). The vision encoder's tile embeddings are 8-bit
    whenever its linears are quantized."""
    text = cfg.quant.plan()
    vision = QuantConfig(scheme=cfg.vision_quant or DEFAULT_VISION_QUANT, group_size=cfg.quant.group_size).plan()
    return text, vision


def resolve(cfg: BuildConfig) -> VisionSource:
    from aot.mllama import VISION_MODELS, args_from_hf_config
    from aot.runner.vision import ImageSpec

    errors = []
    if cfg.delegate != "xnnpack":
        errors.append(f"vision models build for --delegate xnnpack only (not {cfg.delegate}); drop --delegate")
    if cfg.quant.scheme not in ("none", "8da4w", "8da8w"):
        errors.append(f"vision models take --quant none, 8da4w or 8da8w for the text decoder, not {cfg.quant.scheme}")
    if cfg.full_logits:
        errors.append("--full-logits applies to text models; the vision text_decoder returns the last position's logits")
    if errors:
        raise ConfigError("; ".join(errors))
    ckpt = Path(cfg.checkpoint).expanduser() if cfg.checkpoint is not None else None
    if ckpt is not None:
        if not ckpt.is_dir():
            raise CheckpointError(f"--checkpoint {ckpt}: not a directory")
        args = args_from_hf_config(ckpt / "config.json")
        name = next((n for n, a in VISION_MODELS.items() if a == args), "custom")
        if cfg.model is not None and cfg.model != name:
            raise ConfigError(f"--model {cfg.model} does not match --checkpoint {ckpt} (its config.json is "
                              f"{'a ' + name if name != 'custom' else 'a custom size'}); drop --model")
    else:
        args, name = VISION_MODELS[cfg.model], cfg.model
    errors = [*cfg.quant.plan().check_dims(args.text.dim, args.text.ffn_hidden)]
    if (cfg.vision_quant or DEFAULT_VISION_QUANT) != "none":
        errors += [e.replace("model's", "vision encoder's") for e in plans(cfg)[1].check_dims(args.vision.dim, args.vision.ffn_hidden)]
    tok_path = find_tokenizer(ckpt, cfg.tokenizer)
    tok = tokenizer_info(tok_path, ckpt) if tok_path else None
    if tok is not None:
        errors += _tokenizer_errors(tok, args)
    bos = cfg.bos_id if cfg.bos_id is not None else (tok.bos_id if tok else None)
    eos = cfg.eos_ids if cfg.eos_ids is not None else (tok.eos_ids if tok else None)
    if tok is None and args.text.vocab_size == 128_256:
        bos = LLAMA3_BOS if bos is None else bos
        eos = LLAMA3_EOS if eos is None else eos
    if bos is None or eos is None:
        errors.append("no tokenizer to take bos/eos ids from: pass --bos-id and --eos-id")
    elif any(i >= args.text.vocab_size for i in (bos, *eos)):
        errors.append(f"bos/eos ids are outside the model's vocab ({args.text.vocab_size}); fix --bos-id/--eos-id")
    spec = ImageSpec(tile_size=args.vision.image_size, max_tiles=args.vision.max_tiles)
    pre = ckpt / "preprocessor_config.json" if ckpt is not None else None
    if pre is not None and pre.is_file():
        try:
            spec = ImageSpec.from_preprocessor_config(json.loads(pre.read_text()))
        except (ValueError, TypeError, AttributeError) as e:
            errors.append(f"{pre}: not a readable preprocessor config ({e})")
        if spec.tile_size != args.vision.image_size or spec.max_tiles != args.vision.max_tiles:
            errors.append(f"{pre}: tiles of {spec.tile_size} px, at most {spec.max_tiles}, but config.json says "
                          f"{args.vision.image_size} px, at most {args.vision.max_tiles}; use the checkpoint's own file")
    if errors:
        raise ConfigError("; ".join(errors))
    return VisionSource(args, name, ckpt, tok, int(bos), tuple(int(e) for e in eos), spec.to_dict())


def _tokenizer_errors(tok: TokenizerInfo, args) -> list[str]:
    rows = args.text.vocab_size + 8  # embed_tokens' rows: the vocab, <|image|> and padding
    if tok.vocab_size > rows:
        return [f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model embeds {rows}; "
                "is it the tokenizer of another model?"]
    if tok.kind != "hf-json":
        return [f"tokenizer {tok.path}: vision bundles need the checkpoint's tokenizer.json (with {IMAGE_TOKEN})"]
    from tokenizers import Tokenizer

    got = Tokenizer.from_file(str(tok.path)).token_to_id(IMAGE_TOKEN)
    if got != args.image_token_id:
        return [f"tokenizer {tok.path}: {IMAGE_TOKEN} is token {got}, but the model's image token is "
                f"{args.image_token_id}; use the checkpoint's own tokenizer.json"]
    return []


def load_quantized(src: VisionSource, cfg: BuildConfig, text_plan: QuantPlan, vision_plan: QuantPlan,
                   progress=None, backend: Backend | None = None):
    """The Mllama model materialised a part at a time (aot.mllama.parts), each part read (or
    drawn) in fp32 and quantized with its half's plan before the next is allocated."""
    from aot.mllama import Mllama, MllamaReader, in_group, parts, rope_tables
    from aot.model import random_init_

    args = src.args
    with torch.device("meta"):
        model = Mllama(args, cfg.max_context_len)
    model.text.rope_cos, model.text.rope_sin = rope_tables(args.text, cfg.max_context_len)
    groups = parts(args)
    with ExitStack() as stack:
        reader = MllamaReader(src.checkpoint, args, stack) if src.checkpoint is not None else None
        for done, group in enumerate(groups):
            for name in group:
                if name == "vision":
                    model.vision.to_empty(device="cpu", recurse=False)
                else:
                    model.get_submodule(name).to_empty(device="cpu")
            names = [n for n, _ in model.named_parameters() if in_group(n, group)]
            if reader is None:
                random_init_(model, cfg.seed, set(names))
                _open_gates(model, names)
            else:
                reader.fill(model, names)
            modules = tuple(n for n in group if n != "vision")
            # The parts' only buffers are KV caches, never written (see pipeline.load_quantized).
            plan = vision_plan if group[0].startswith("vision") else text_plan
            if plan.scheme != "none":
                apply_plan(model, plan, output_name="text.lm_head", parts=modules)
            if backend is not None:
                for name in modules:
                    backend.hold_weights(model.get_submodule(name))
            if progress is not None:
                progress(done + 1, len(groups))
    return model.eval().requires_grad_(False)


def _open_gates(model, names) -> None:
    """Random weights: tanh gates at 0.5 instead of N(0, 0.02), so the image's path carries signal
    like a trained model's (zero gates would make a benchmark model ignore the image)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            if n.split(".")[-1].endswith("gate"):
                params[n].fill_(0.5)


def signatures(args, max_seq_len: int) -> dict:
    v, t = args.vision, args.text
    n = len(t.cross_layers)
    state = f"{2 * n} tensors: (K, V) per cross layer, float32 [1, {t.n_kv_heads}, T*{v.patches}, {t.head_dim}]"
    return {
        "vision_encoder": {
            "inputs": [f"pixel_values float32 [1, 1, {v.max_tiles}, 3, {v.image_size}, {v.image_size}]",
                       "aspect_ratio_ids int64 [1, 1]", f"aspect_ratio_mask int64 [1, 1, {v.max_tiles}]"],
            "output": f"image state: {state}, T = {v.max_tiles}",
        },
        "text_decoder": {
            "inputs": [f"tokens int64 [1, S], 1 <= S <= {max_seq_len}", "input_pos int64 [S]",
                       f"cross_attention_mask float32 [1, S, {v.max_tiles}]", f"image state ({2 * n} tensors)"],
            "output": f"logits float32 [1, {t.vocab_size}]",
        },
    }


def build(cfg: BuildConfig, stages: Stages, backend: Backend) -> dict:
    from aot import mllama
    from aot.pipeline import bundle_manifest_common, hash_files, input_key, write_program

    text_plan, vision_plan = plans(cfg)
    with Staging(cfg.out, cfg.force) as staging:
        with stages.stage("resolve"):
            src = resolve(cfg)
        preflight = check(f"--model {src.model_name}", mllama.params_by_kind(src.args), text_plan, vision_plan,
                          staging.dir, enabled=not cfg.no_preflight)
        with stages.stage("hash inputs"):
            inputs = hash_files(src.files())
            key = input_key(cfg, inputs)
        source = "random weights" if cfg.random_weights else "hf"
        with stages.stage("load + quantize", f"{source}, text {text_plan.scheme}, vision {vision_plan.scheme}"):
            model = load_quantized(src, cfg, text_plan, vision_plan, stages.progress, backend)
        with stages.stage("export", "vision_encoder, text_decoder"):
            programs = mllama.export_methods(model, cfg.max_seq_len)
        del model
        metadata = mllama.metadata(src.args, cfg.max_seq_len, cfg.max_context_len, src.bos_id, list(src.eos_ids))
        # share_mutable_buffers: the KV cache is planned apart from the arenas both methods share,
        # so running vision_encoder between decoder calls cannot overwrite it.
        delegation = write_program(programs, backend, text_plan, metadata, stages, staging.dir, src.tokenizer,
                                   share_mutable_buffers=True)
        manifest = bundle_manifest_common(cfg, inputs, key, metadata, delegation, stages)
        manifest.update({
            "model": {"name": src.model_name, "family": "llama3.2-vision", "args": src.args.to_dict(),
                      "num_params": mllama.num_params(src.args), "random_weights": cfg.random_weights,
                      "seed": cfg.seed if cfg.random_weights else None},
            "checkpoint": None if src.checkpoint is None else {"path": str(src.checkpoint.absolute()), "layout": "hf"},
            "tokenizer": None if src.tokenizer is None else {
                "file": src.tokenizer.path.name, "kind": src.tokenizer.kind, "vocab_size": src.tokenizer.vocab_size},
            "quant": {**cfg.quant.to_dict(), "plan": text_plan.to_dict(),
                      "vision": {"scheme": vision_plan.scheme, "plan": vision_plan.to_dict()}},
            "export": {"methods": signatures(src.args, cfg.max_seq_len), "max_seq_len": cfg.max_seq_len,
                       "max_context_len": cfg.max_context_len, "full_logits": False},
            "image": {**src.image, "image_token": IMAGE_TOKEN, "image_token_id": src.args.image_token_id,
                      "patches_per_tile": src.args.vision.patches},
            "bos_id": src.bos_id,
            "eos_ids": list(src.eos_ids),
        })
        manifest["target"] = backend.bundle_fields(cfg)
        manifest["build"]["preflight"] = preflight
        manifest = staging.commit(manifest)
    return {**manifest, "path": str(staging.out)}
