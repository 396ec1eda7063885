"""The Llama 3.2 text family: what a build of a Meta or Hugging Face Llama checkpoint reads,
how its model is loaded (streamed and quantized part by part, or whole for rotations and
prequantized checkpoints), its `forward` method, its runner metadata and its bundle.json fields;
and its fp32 reference for validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.export import Dim

from aot.errors import CheckpointError, ConfigError
from aot.adapters import Adapter, attached, default_quant, merge_, open_peft, parse_spec, program_file, read_peft
from aot.bundle import PTE_NAME
from aot.families.base import Family, Program, Source, Variant, checkpoint_dir, license_record
from aot.families.common import (
    LLAMA3_VOCAB,
    KVCacheSpec,
    kv_cache_record,
    random_init_,
    special_ids,
    stream_parts,
    zero_ring_caches,
)
from aot.families.text.checkpoint import (
    Checkpoint,
    WeightReader,
    load_weights,
    open_checkpoint,
    read_qlora,
    unpermute_rotary,
)
from aot.families.text.model import MODELS, ModelArgs, Transformer, rope_frequencies
from aot.methods import Method
from aot.quant import QuantPlan, apply_plan
from aot.quant.rotation import (
    Rotations,
    check_sizes,
    describe_r4,
    fuse_rotations,
    load_rotations,
    random_rotations,
)
from aot.tokenizer import find_tokenizer, tokenizer_info

if TYPE_CHECKING:
    from aot.config import BuildConfig
    from aot.hfcache import Snapshot

# Load and quantize part by part (False: the whole fp32 model first, then quantize; the same bytes).
STREAMED_LOAD = True


@dataclass(frozen=True)
class TextSource(Source):
    checkpoint: Checkpoint | None = None
    rotations: Rotations | None = None  # spinquant: R1/R2 to fuse before quantizing
    rotation_file: Path | None = None  # --rotation R.bin, an input
    snapshot: Snapshot | None = None  # the Hugging Face snapshot the checkpoint is (--hf-repo, --model)
    adapters: tuple[Adapter, ...] = ()  # --adapter's, or a QLoRA checkpoint's own
    adapter_mode: str | None = None  # merged or unmerged
    adapter_quant: str | None = None  # unmerged adapters' A and B: 8da8w or none

    def files(self) -> list[Path]:
        files = list(self.checkpoint.files()) if self.checkpoint else []
        if self.tokenizer is not None:
            files.append(self.tokenizer.path)
            if self.tokenizer.chat_file is not None:
                files.append(self.tokenizer.chat_file)
        if self.rotation_file is not None:
            files.append(self.rotation_file)
        for adapter in self.adapters:
            files.extend(adapter.files)
        return files

    def adapter_weights(self, adapter: Adapter) -> dict:
        if adapter.kind == "qlora":
            return read_qlora(self.checkpoint)
        return read_peft(adapter, self.args, unpermute_rotary)


class TextFamily(Family):
    name = "llama3.2"
    models = MODELS

    def claims(self, cfg: BuildConfig) -> bool:
        return True  # the default member: every build no other family claims

    def config_errors(self, cfg: BuildConfig) -> list[str]:
        if cfg.vision_quant is not None:
            return ["--vision-quant applies to vision models (11b-vision, 90b-vision or a Mllama --checkpoint); drop it"]
        return []

    # ---- resolve ----------------------------------------------------------------------------

    def resolve(self, cfg: BuildConfig, fetch: bool = True) -> TextSource:
        plan = cfg.quant.plan()
        path, snapshot = checkpoint_dir(cfg, fetch)
        ckpt = open_checkpoint(path) if path is not None else None
        if ckpt is not None:
            args = ckpt.args
            if cfg.model is not None:
                _check_model_matches(cfg.model, args, snapshot.repo_id if snapshot else f"--checkpoint {ckpt.path}")
        else:
            args = MODELS[cfg.model]
        name = next((n for n, a in MODELS.items() if _arch_diff(a, args) == []), "custom")
        tok_path = find_tokenizer(ckpt.path if ckpt else None, cfg.tokenizer)
        tok = tokenizer_info(tok_path, ckpt.path if ckpt and ckpt.layout == "hf" else None) if tok_path else None

        errors = plan.check_dims(args.dim, args.ffn_hidden)
        if tok is not None and tok.vocab_size > args.vocab_size:
            raise CheckpointError(
                f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocab is {args.vocab_size}; "
                "is it the tokenizer of another model?"
            )
        bos, eos, id_errors = special_ids(cfg.bos_id, cfg.eos_ids, tok, args.vocab_size, args.vocab_size == LLAMA3_VOCAB)
        errors += id_errors
        rotations = None
        if ckpt is not None and ckpt.prequantized is not None:
            errors += _prequantized_errors(cfg, ckpt)
            plan = ckpt.prequantized.plan()
        elif plan.scheme == "spinquant":
            errors += check_sizes(args)
            if not errors:
                rotations = load_rotations(cfg.rotation, args) if cfg.rotation else random_rotations(args, cfg.seed)
        if errors:
            raise ConfigError("; ".join(errors))
        adapters, mode, adapter_quant = _adapters(cfg, ckpt, args, plan)
        label = f"--model {name}" if ckpt is None else snapshot.repo_id if snapshot else f"--checkpoint {ckpt.path}"
        rotation_file = cfg.rotation.expanduser().absolute() if cfg.rotation is not None else None
        return TextSource(args, name, tok, bos, eos, plan, (label, args.params_by_kind(), plan), ckpt, rotations,
                          rotation_file, snapshot, adapters, mode, adapter_quant)

    # ---- load -------------------------------------------------------------------------------

    def load(self, src: TextSource, cfg: BuildConfig, backend, stages) -> Transformer:
        """The model quantized by src.plan (when the backend quantizes at load), rotations fused."""
        prequantized = src.checkpoint.prequantized if src.checkpoint else None
        quantize = backend.quantizes_at_load and prequantized is None
        source = "random weights" if src.checkpoint is None else src.checkpoint.layout
        merged = src.adapters[0] if src.adapter_mode == "merged" else None
        if merged is not None:
            source += f" + adapter {merged.path.name} (merged)"
        if STREAMED_LOAD and quantize and src.rotations is None:
            # each part quantized as it is loaded: the fp32 model never exists whole
            with stages.stage("load + quantize", f"{source}, {src.plan.scheme}"):
                return load_quantized(src, cfg, src.plan, stages.progress, backend, merged)
        with stages.stage("load", source):
            model = load_model(src, cfg)
            if merged is not None:
                merge_(model, src.adapter_weights(merged), merged.scale)
        if src.rotations is not None:
            with stages.stage("rotate", src.rotations.record["source"]):
                fuse_rotations(model, src.rotations)
        if quantize:
            with stages.stage("quantize", src.plan.scheme):
                apply_plan(model, src.plan)
        return model

    def variants(self, model: Transformer, src: TextSource, cfg: BuildConfig) -> list[Variant]:
        """model.pte; and with unmerged adapters: the one unnamed adapter in model.pte, or the
        foundation alone in model.pte and a program per named adapter beside it."""
        if not src.adapters or src.adapter_mode == "merged":
            return [Variant(None, PTE_NAME)]

        def attach(adapter: Adapter):
            return lambda: attached(model, src.adapter_weights(adapter), adapter.scale, src.adapter_quant)

        if src.adapters[0].name is None:
            only = src.adapters[0]
            return [Variant(None, PTE_NAME, attach(only), f"adapter {only.path.name}, unmerged")]
        return [Variant(None, PTE_NAME, label="foundation")] + [
            Variant(a.name, program_file(a.name), attach(a), f"adapter {a.name}") for a in src.adapters]

    def methods(self, model: Transformer, src: TextSource, cfg: BuildConfig) -> Program:
        return Program(text_methods(model, cfg.max_seq_len), share_mutable_buffers=False, target={"calibration": None},
                       initialized_buffers=model.cache.initialized_buffers())

    # ---- bundle -----------------------------------------------------------------------------

    def runner_metadata(self, src: TextSource, cfg: BuildConfig, static: bool) -> dict:
        """Constant methods ExecuTorch's LLM runners read (see LLAMA32.md). Static-shape (NPU)
        programs take a fixed prefill chunk and attend with plain ops over the cache."""
        return {
            "get_max_seq_len": cfg.max_seq_len,
            "get_max_context_len": cfg.max_context_len,
            "get_vocab_size": src.args.vocab_size,
            "get_n_layers": src.args.n_layers,
            "use_kv_cache": True,
            "use_sdpa_with_kv_cache": not static,
            "enable_dynamic_shape": cfg.max_seq_len > 1 and not static,
            "get_bos_id": src.bos_id,
            "get_eos_ids": list(src.eos_ids),
        }

    def manifest(self, src: TextSource, cfg: BuildConfig, program: Program) -> dict:
        ckpt = src.checkpoint
        return {
            "model": self.model_record(src, cfg, src.args.num_params()),
            "checkpoint": None if ckpt is None else self.checkpoint_record(ckpt.path, ckpt.layout, src.snapshot),
            "license": license_record(ckpt.path if ckpt else None),
            "tokenizer": self.tokenizer_record(src),
            "quant": {**cfg.quant.to_dict(), "plan": src.plan.to_dict(), "rotation": _rotation_record(src),
                      "prequantized": None if ckpt is None or ckpt.prequantized is None else ckpt.prequantized.to_dict()},
            "adapters": _adapter_records(src) if src.adapters else None,
            "export": {
                "methods": program.signatures(),
                "max_seq_len": cfg.max_seq_len,
                "max_context_len": cfg.max_context_len,
                "full_logits": cfg.full_logits,
                **kv_cache_record(cfg, src.args.n_layers, src.args.n_kv_heads, src.args.head_dim),
            },
        }

    # ---- the fp32 reference -----------------------------------------------------------------

    def reference_checkpoint(self, path: Path) -> Checkpoint:
        """The checkpoint to compare a bundle against; refuses a prequantized one (not a float
        reference)."""
        ckpt = open_checkpoint(path)
        if ckpt.prequantized is not None:
            raise ConfigError(
                f"{path} is a prequantized checkpoint, not a float reference; pass --reference the "
                "original bf16 checkpoint of the same model"
            )
        return ckpt

    def reference(self, checkpoint: Path | Checkpoint, max_context_len: int, full_logits: bool = False) -> Transformer:
        """The checkpoint's fp32 eager model, loaded as a build loads it (validate, on-device
        validation and simulate compare against it)."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else self.reference_checkpoint(checkpoint)
        model = _empty_model(ckpt.args, max_context_len, full_logits)
        load_weights(model, ckpt)
        return model.eval()


def text_methods(model: Transformer, max_seq_len: int) -> list[Method]:
    """`forward(tokens [1, S], input_pos [1]) -> logits`, S dynamic in 1..max_seq_len."""
    example_len = min(max_seq_len, 8)
    tokens = torch.zeros((1, example_len), dtype=torch.long)
    input_pos = torch.zeros((1,), dtype=torch.long)
    dynamic = ({1: Dim("seq_len", min=1, max=max_seq_len)}, None) if max_seq_len > 1 else None
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
    logits = f"[1, S, {model.args.vocab_size}]" if model.full_logits else f"[1, {model.args.vocab_size}]"
    signature = {
        "inputs": [f"tokens int64 [1, S], 1 <= S <= {max_seq_len}", "input_pos int64 [1]"],
        "output": f"logits {dtype} {logits}",
    }
    return [Method("forward", model, (tokens, input_pos), dynamic, signature)]


def _empty_model(args: ModelArgs, max_context_len: int, full_logits: bool, cache: KVCacheSpec = KVCacheSpec()) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args, max_context_len, full_logits=full_logits, cache=cache)
    model.to_empty(device="cpu")
    model.init_buffers()
    return model


def load_model(src: TextSource, cfg: BuildConfig) -> Transformer:
    """The whole model in fp32: the checkpoint's weights, or drawn (random weights)."""
    model = _empty_model(src.args, cfg.max_context_len, cfg.full_logits, cfg.kv_cache_spec())
    if src.checkpoint is None:
        random_init_(model, cfg.seed)
    else:
        load_weights(model, src.checkpoint)
    return model.eval()


def load_quantized(src: TextSource, cfg: BuildConfig, plan: QuantPlan, progress=None, backend=None,
                   merged: Adapter | None = None) -> Transformer:
    """The model materialised one part at a time (embedding, output projection and final norm;
    then each decoder layer), each part's weights read (or drawn) and quantized before the next is
    allocated (families.common.stream_parts). The tied embedding's fp32 table lives until both it
    and the output projection are quantized from it."""
    from contextlib import ExitStack

    args = src.args
    with torch.device("meta"):
        model = Transformer(args, cfg.max_context_len, full_logits=cfg.full_logits, cache=cfg.kv_cache_spec())
    model.freqs_cos, model.freqs_sin = rope_frequencies(args, cfg.max_context_len)
    parts = [("tok_embeddings", "output", "norm")] + [(f"layers.{i}",) for i in range(args.n_layers)]

    def materialise(name: str) -> None:
        if name == "output" and args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        else:
            model.get_submodule(name).to_empty(device="cpu")
            zero_ring_caches(model.get_submodule(name))

    def names_of(group) -> list[str]:
        return [n for n, _ in model.named_parameters() if any(n.startswith(g + ".") for g in group)]

    def quantize(group):
        apply_plan(model, plan, parts=group)
        return group

    deltas = src.adapter_weights(merged) if merged is not None else None
    with ExitStack() as stack:
        reader = WeightReader(model, src.checkpoint, stack) if src.checkpoint is not None else None

        def fill(names: list[str]) -> None:
            if reader is None:
                random_init_(model, cfg.seed, set(names))
            else:
                reader.fill(model, [n for n in reader.names if n in set(names)])
            if deltas is not None:  # each layer's adapter merged before the layer is quantized
                merge_(model, deltas, merged.scale, set(names))

        stream_parts(model, parts, materialise, names_of, fill, quantize, backend, progress)
    if plan.dtype == "bfloat16":  # as apply_plan's whole-model .to() does for the rope tables
        model.freqs_cos, model.freqs_sin = model.freqs_cos.bfloat16(), model.freqs_sin.bfloat16()
    return model.eval()


def _adapters(cfg: BuildConfig, ckpt: Checkpoint | None, args: ModelArgs, plan: QuantPlan):
    """(adapters, mode, quant of unmerged ones) for a build: --adapter's PEFT folders, or a QLoRA
    checkpoint's own adaptors."""
    qlora = ckpt.qlora if ckpt is not None else None
    if ckpt is not None and ckpt.prequantized is not None and cfg.adapters:
        what = "QLoRA release carries its own adaptors" if qlora else "prequantized checkpoint cannot be re-merged"
        raise ConfigError(f"--adapter: --checkpoint {ckpt.path} is a {what}; build adapters over the bf16 checkpoint")
    if qlora is not None:
        if cfg.adapter_mode == "merged":
            raise ConfigError(f"--adapter-mode merged: --checkpoint {ckpt.path} is Meta's QLoRA release, whose INT4 "
                              "weights were trained with the adaptors beside them; drop --adapter-mode")
        return (qlora,), "unmerged", cfg.adapter_quant or default_quant(qlora, True)
    if not cfg.adapters:
        return (), None, None
    specs = [parse_spec(s) for s in cfg.adapters]
    adapters = tuple(open_peft(name, Path(folder), args) for name, folder in specs)
    named = specs[0][0] is not None
    mode = cfg.adapter_mode or ("unmerged" if named else "merged")
    quantized = plan.linear is not None
    return adapters, mode, (cfg.adapter_quant or default_quant(adapters[0], quantized)) if mode == "unmerged" else None


def _adapter_records(src: TextSource) -> list[dict]:
    return [a.record(src.adapter_mode, src.adapter_quant,
                     program_file(a.name) if a.name is not None else PTE_NAME) for a in src.adapters]


def _rotation_record(src: TextSource) -> dict | None:
    prequantized = src.checkpoint.prequantized if src.checkpoint else None
    if prequantized is not None:
        return {"source": "prequantized checkpoint (rotations fused by its producer)",
                "r4": describe_r4(src.args)} if prequantized.spinquant else None
    if src.rotations is None:
        return None
    # what fuse_rotations does to the model: a tied embedding is stored apart, R4 runs online
    untied = {"untied_embedding": True} if src.args.tie_embeddings else {}
    return {**src.rotations.to_dict(), **untied, "r4": describe_r4(src.args)}


def _prequantized_errors(cfg: BuildConfig, ckpt: Checkpoint) -> list[str]:
    """A prequantized checkpoint is built as it is: the flags may only agree with it."""
    info, q = ckpt.prequantized, cfg.quant
    want = "spinquant" if info.spinquant else "8da4w"
    what = f"--checkpoint {ckpt.path} is prequantized ({'SpinQuant ' if info.spinquant else ''}INT4 g{info.group_size})"
    errors = []
    if q.scheme != want:
        errors.append(f"{what}: build it with --quant {want}, not --quant {q.scheme}")
    elif q.group_size != info.group_size:
        errors.append(f"{what}: pass --group-size {info.group_size} (or leave it out of a manifest's overrides)")
    if q.embedding != "default" or q.output != "default":
        errors.append(f"{what}: its embedding and output quantization are fixed; drop --embedding-quant/--output-quant")
    if cfg.rotation is not None:
        errors.append(f"{what}: its rotations are already fused; drop --rotation")
    return errors


_ARCH_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden")


def _arch_diff(want: ModelArgs, got: ModelArgs) -> list[str]:
    return [f"{f} {getattr(want, f)} vs {getattr(got, f)}" for f in _ARCH_FIELDS if getattr(want, f) != getattr(got, f)]


def _check_model_matches(model: str, args: ModelArgs, source: str) -> None:
    """`source`: the checkpoint as the user named it (--checkpoint DIR, --hf-repo ID)."""
    diff = _arch_diff(MODELS[model], args)
    if diff:
        match = next((n for n, a in MODELS.items() if not _arch_diff(a, args)), None)
        hint = f"use --model {match}" if match else "drop --model to take the checkpoint's own config"
        raise ConfigError(f"--model {model} does not match {source} ({', '.join(diff[:3])}); {hint}")
