"""The Llama 3.2 Vision family (Mllama): one .pte with `vision_encoder` and `text_decoder`.

The same pipeline as a text build (aot/pipeline.py) over this family's two methods: resolve ->
hash inputs -> load + quantize (part by part: the fp32 model never exists whole) -> export ->
lower (XNNPACK) -> serialize -> bundle. The text decoder takes --quant (8da4w by default:
linears 4-bit g32, output projection 8da8w, embedding 8-bit); the vision encoder takes
--vision-quant (8da8w by default; 8da4w or none). Quantization always runs on fp32 weights:
torchao's 8da4w ops on a bf16 graph stay undelegated and ExecuTorch cannot serialize them.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from aot import hfcache
from aot.errors import CheckpointError, ConfigError
from aot.families.base import Family, Program, Source, checkpoint_dir, license_record
from aot.families.common import LLAMA3_VOCAB, kv_cache_record, random_init_, special_ids, stream_parts, zero_ring_caches
from aot.families.vision.checkpoint import MllamaReader, args_from_hf_config, is_mllama_checkpoint, load_hf
from aot.families.vision.image import ImageSpec
from aot.families.vision.model import IMAGE_TOKEN, VISION_MODELS, Mllama, MllamaArgs, rope_tables, zero_image_state
from aot.methods import Method
from aot.quant import QuantConfig, QuantPlan, apply_plan
from aot.tokenizer import TokenizerInfo, find_tokenizer, tokenizer_info

if TYPE_CHECKING:
    from aot.config import BuildConfig

VISION_SCHEMES = ("8da8w", "8da4w", "none")
DEFAULT_VISION_QUANT = "8da8w"


@dataclass(frozen=True)
class VisionSource(Source):
    checkpoint: Path | None = None
    image: dict | None = None  # ImageSpec as a dict
    vision_plan: QuantPlan | None = None
    snapshot: hfcache.Snapshot | None = None  # the Hugging Face snapshot the checkpoint is (--hf-repo, --model)

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


class VisionFamily(Family):
    name = "llama3.2-vision"
    models = VISION_MODELS

    def claims(self, cfg: BuildConfig) -> bool:
        return cfg.model in VISION_MODELS or is_mllama_checkpoint(cfg.checkpoint) or _vision_repo(cfg.hf_repo)

    def config_errors(self, cfg: BuildConfig) -> list[str]:
        errors = []
        if cfg.vision_quant is not None and cfg.vision_quant not in VISION_SCHEMES:
            errors.append(f"unknown --vision-quant '{cfg.vision_quant}'; choose one of: {', '.join(VISION_SCHEMES)}")
        return errors

    def resolve(self, cfg: BuildConfig, fetch: bool = True) -> VisionSource:
        errors = []
        if cfg.delegate != "xnnpack":
            errors.append(f"vision models build for --delegate xnnpack only (not {cfg.delegate}); drop --delegate")
        if cfg.quant.scheme not in ("none", "8da4w", "8da8w"):
            errors.append(f"vision models take --quant none, 8da4w or 8da8w for the text decoder, not {cfg.quant.scheme}")
        if cfg.full_logits:
            errors.append("--full-logits applies to text models; the vision text_decoder returns the last position's logits")
        if errors:
            raise ConfigError("; ".join(errors))
        ckpt, snapshot = checkpoint_dir(cfg, fetch)
        if ckpt is not None:
            if not ckpt.is_dir():
                raise CheckpointError(f"--checkpoint {ckpt}: not a directory")
            args = args_from_hf_config(ckpt / "config.json")
            name = next((n for n, a in VISION_MODELS.items() if a == args), "custom")
            if cfg.model is not None and cfg.model != name:
                source = snapshot.repo_id if snapshot else f"--checkpoint {ckpt}"
                raise ConfigError(f"--model {cfg.model} does not match {source} (its config.json is "
                                  f"{'a ' + name if name != 'custom' else 'a custom size'}); drop --model")
        else:
            args, name = VISION_MODELS[cfg.model], cfg.model
        text_plan, vision_plan = plans(cfg)
        errors = [*text_plan.check_dims(args.text.dim, args.text.ffn_hidden)]
        if vision_plan.scheme != "none":
            errors += [e.replace("model's", "vision encoder's")
                       for e in vision_plan.check_dims(args.vision.dim, args.vision.ffn_hidden)]
        tok_path = find_tokenizer(ckpt, cfg.tokenizer)
        tok = tokenizer_info(tok_path, ckpt) if tok_path else None
        if tok is not None:
            errors += _tokenizer_errors(tok, args)
        vocab = args.text.vocab_size
        bos, eos, id_errors = special_ids(cfg.bos_id, cfg.eos_ids, tok, vocab, vocab == LLAMA3_VOCAB)
        errors += id_errors
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
        preflight = (f"--model {name}", params_by_kind(args), text_plan, vision_plan)
        return VisionSource(args, name, tok, bos, eos, text_plan, preflight, ckpt, spec.to_dict(), vision_plan, snapshot)

    def load(self, src: VisionSource, cfg: BuildConfig, backend, stages) -> Mllama:
        source = "random weights" if cfg.random_weights else "hf"
        with stages.stage("load + quantize", f"{source}, text {src.plan.scheme}, vision {src.vision_plan.scheme}"):
            return load_quantized(src, cfg, src.plan, src.vision_plan, stages.progress, backend)

    def methods(self, model: Mllama, src: VisionSource, cfg: BuildConfig) -> Program:
        # share_mutable_buffers: the KV cache is planned apart from the arenas both methods share,
        # so running vision_encoder between decoder calls cannot overwrite it.
        return Program(vision_methods(model, cfg.max_seq_len), share_mutable_buffers=True,
                       initialized_buffers=model.text.cache.initialized_buffers())

    def runner_metadata(self, src: VisionSource, cfg: BuildConfig, static: bool) -> dict:
        return metadata(src.args, cfg.max_seq_len, cfg.max_context_len, src.bos_id, list(src.eos_ids))

    def manifest(self, src: VisionSource, cfg: BuildConfig, program: Program) -> dict:
        return {
            "model": self.model_record(src, cfg, num_params(src.args)),
            "checkpoint": None if src.checkpoint is None else self.checkpoint_record(src.checkpoint, "hf", src.snapshot),
            "license": license_record(src.checkpoint),
            "tokenizer": self.tokenizer_record(src),
            "quant": {**cfg.quant.to_dict(), "plan": src.plan.to_dict(),
                      "vision": {"scheme": src.vision_plan.scheme, "plan": src.vision_plan.to_dict()}},
            "export": {"methods": program.signatures(), "max_seq_len": cfg.max_seq_len,
                       "max_context_len": cfg.max_context_len, "full_logits": False,
                       **kv_cache_record(cfg, src.args.text.n_layers - len(src.args.text.cross_layers), src.args.text.n_kv_heads,
                                         src.args.text.head_dim)},
            "image": {**src.image, "image_token": IMAGE_TOKEN, "image_token_id": src.args.image_token_id,
                      "patches_per_tile": src.args.vision.patches},
        }

    def reference(self, checkpoint: Path, max_context_len: int, **kw) -> Mllama:
        return load_hf(checkpoint, max_context_len)


def _vision_repo(hf_repo: str | None) -> bool:
    """Whether --hf-repo names a vision checkpoint: its cached config.json says so, or (not cached
    yet) its name does, as Meta's vision repos' names all do."""
    if hf_repo is None:
        return False
    path = hfcache.cached_path(hf_repo)
    if path is not None and (path / "config.json").is_file():
        return is_mllama_checkpoint(path)
    return "vision" in hf_repo.partition("@")[0].lower()


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
                   progress=None, backend=None) -> Mllama:
    """The Mllama model materialised a part at a time (`parts`), each part read (or drawn) in
    fp32 and quantized with its half's plan before the next is allocated (common.stream_parts)."""
    args = src.args
    with torch.device("meta"):
        model = Mllama(args, cfg.max_context_len, cfg.kv_cache_spec())
    model.text.rope_cos, model.text.rope_sin = rope_tables(args.text, cfg.max_context_len)

    def materialise(name: str) -> None:
        if name == "vision":
            model.vision.to_empty(device="cpu", recurse=False)
        else:
            model.get_submodule(name).to_empty(device="cpu")
            zero_ring_caches(model.get_submodule(name))

    def names_of(group) -> list[str]:
        return [n for n, _ in model.named_parameters() if in_group(n, group)]

    def quantize(group):
        modules = tuple(n for n in group if n != "vision")
        plan = vision_plan if group[0].startswith("vision") else text_plan
        if plan.scheme != "none":
            apply_plan(model, plan, output_name="text.lm_head", parts=modules)
        return modules

    with ExitStack() as stack:
        reader = MllamaReader(src.checkpoint, args, stack) if src.checkpoint is not None else None

        def fill(names: list[str]) -> None:
            if reader is None:
                random_init_(model, cfg.seed, set(names))
                _open_gates(model, names)
            else:
                reader.fill(model, names)

        stream_parts(model, parts(args), materialise, names_of, fill, quantize, backend, progress)
    return model.eval().requires_grad_(False)


def _open_gates(model, names) -> None:
    """Random weights: tanh gates at 0.5 instead of N(0, 0.02), so the image's path carries signal
    like a trained model's (zero gates would make a benchmark model ignore the image)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            if n.split(".")[-1].endswith("gate"):
                params[n].fill_(0.5)


def parts(args: MllamaArgs) -> list[tuple[str, ...]]:
    """The model's submodules in the order a streamed build materialises them, a group at a time:
    each group's weights are read and quantized before the next is allocated. "vision" stands for
    the encoder's own parameters (class and position embeddings, gates), not its submodules."""
    top = ("vision", *("vision." + n for n in ("patch_embedding", "layernorm_pre", "layernorm_post", "projector",
                                                "tile_pos_embedding", "pre_tile_embedding", "post_tile_embedding",
                                                "cross_k", "cross_v", "cross_k_norm")))
    groups = [top]
    groups += [(f"vision.layers.{i}",) for i in range(args.vision.n_layers)]
    groups += [(f"vision.global_layers.{i}",) for i in range(args.vision.n_global_layers)]
    groups += [("text.embed_tokens", "text.norm"), ("text.lm_head",)]
    groups += [(f"text.layers.{i}",) for i in range(args.text.n_layers)]
    return groups


def in_group(param: str, group: tuple[str, ...]) -> bool:
    return any(param.count(".") == 1 and param.startswith("vision.") if g == "vision" else param.startswith(g + ".")
               for g in group)


def params_by_kind(args: MllamaArgs) -> dict[str, int]:
    """Parameter counts by how a build stores them (aot.preflight): the text decoder's linears,
    embedding and output projection; the vision encoder's linears and tile embeddings; the rest."""
    with torch.device("meta"):
        model = Mllama(args, 8)
    kinds: dict[str, int] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            half = "vision." if name.startswith("vision") else ""
            if isinstance(module, nn.Linear):
                kind = "output" if name == "text.lm_head" else "linear"
            elif isinstance(module, nn.Embedding):
                kind = "embedding"
            else:
                kind = "other"
            kind = kind if p.dim() > 1 else "other"  # biases stay in float
            kinds[half + kind] = kinds.get(half + kind, 0) + p.numel()
    return kinds


def num_params(args: MllamaArgs) -> int:
    with torch.device("meta"):  # sizes only
        return sum(p.numel() for p in Mllama(args, 8).parameters())


# ---- methods ------------------------------------------------------------------------------


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


def metadata(args: MllamaArgs, max_seq_len: int, max_context_len: int, bos_id: int, eos_ids: list[int]) -> dict:
    """Constant methods of a vision bundle: the text runners' set plus what an image runner needs."""
    return {
        "get_max_seq_len": max_seq_len, "get_max_context_len": max_context_len,
        "get_vocab_size": args.text.vocab_size, "get_n_layers": args.text.n_layers,
        "use_kv_cache": True, "use_sdpa_with_kv_cache": False, "enable_dynamic_shape": max_seq_len > 1,
        "get_bos_id": bos_id, "get_eos_ids": list(eos_ids),
        "get_image_token_id": args.image_token_id, "get_max_num_tiles": args.vision.max_tiles,
        "get_tile_size": args.vision.image_size, "get_num_patches": args.vision.patches,
        "get_n_cross_layers": len(args.text.cross_layers),
    }


def example_inputs(args: MllamaArgs, seq: int = 2):
    a = args.vision
    vision = (torch.zeros(1, 1, a.max_tiles, a.channels, a.image_size, a.image_size), torch.ones(1, 1, dtype=torch.long),
              torch.ones(1, 1, a.max_tiles, dtype=torch.long))
    text = (torch.zeros(1, seq, dtype=torch.long), torch.arange(seq), torch.zeros(1, seq, a.max_tiles),
            *zero_image_state(args))
    return vision, text


def vision_methods(model: Mllama, max_seq_len: int) -> list[Method]:
    """`vision_encoder` (static shapes) and `text_decoder` (1..max_seq_len tokens)."""
    vision_in, text_in = example_inputs(model.args, seq=min(2, max_seq_len))
    seq = torch.export.Dim("seq", min=1, max=max_seq_len) if max_seq_len > 1 else None
    dims = ({1: seq}, {0: seq}, {1: seq}) if seq is not None else (None, None, None)
    text_in = text_in if seq is not None else (text_in[0][:, :1], text_in[1][:1], text_in[2][:, :1], *text_in[3:])
    sig = signatures(model.args, max_seq_len)
    return [Method("vision_encoder", model.vision, vision_in, None, sig["vision_encoder"]),
            Method("text_decoder", model.text, text_in, (*dims, tuple(None for _ in text_in[3:])), sig["text_decoder"])]
