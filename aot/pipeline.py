"""`aot build`: load -> quantize -> export -> lower -> serialize -> write bundle.

Each stage is a plain function; `build` reads top to bottom. The model family yields methods
(aot/methods.py); export, lowering and bundling work on that set and never branch on the model.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from aot import __version__
from aot.backends import Backend, get_backend
from aot.bundle import BUNDLE_FORMAT, FORMAT_VERSION, PTE_NAME, Staging
from aot.checkpoint import Checkpoint, load_weights, open_checkpoint
from aot.files import sha256_file
from aot.config import PATH_FIELDS, BuildConfig
from aot.delegation import delegation_report
from aot.errors import BuildError, CheckpointError, ConfigError
from aot.methods import export_methods, text_methods
from aot.model import MODELS, ModelArgs, Transformer, random_init_
from aot.preflight import check
from aot.progress import Stages, return_freed_memory
from aot.quant import QuantPlan, apply_plan
from aot.quant.rotation import (
    Rotations, check_sizes, describe_r4, fuse_rotations, load_rotations, random_rotations,
)
from aot.tokenizer import LLAMA3_BOS, LLAMA3_EOS, TokenizerInfo, find_tokenizer, tokenizer_info


@dataclass(frozen=True)
class Source:
    """What the build reads: architecture, weights (or none: random), tokenizer, special ids."""

    args: ModelArgs
    model_name: str  # registry name whose sizes match, or "custom"
    checkpoint: Checkpoint | None
    tokenizer: TokenizerInfo | None
    bos_id: int
    eos_ids: tuple[int, ...]
    rotations: Rotations | None = None  # spinquant: R1/R2 to fuse before quantizing


def build(cfg: BuildConfig, stages: Stages) -> dict:
    """Build the bundle `cfg` describes; returns its bundle.json content."""
    backend = get_backend(cfg.delegate)
    backend.require()
    return_freed_memory()
    plan = cfg.quant.plan()
    try:
        from aot.vision_build import is_vision_build

        if is_vision_build(cfg):
            from aot import vision_build

            return vision_build.build(cfg, stages, backend)
        return _build(cfg, stages, backend, plan)
    finally:
        backend.forget_held()


def _build(cfg: BuildConfig, stages: Stages, backend: Backend, plan: QuantPlan) -> dict:
    with Staging(cfg.out, cfg.force) as staging:
        with stages.stage("resolve"):
            src = resolve_source(cfg, plan)
        prequantized = src.checkpoint.prequantized if src.checkpoint else None
        if prequantized is not None:
            plan = prequantized.plan()
        preflight = check(f"--model {src.model_name}" if src.checkpoint is None else f"--checkpoint {src.checkpoint.path}",
                          src.args.params_by_kind(), plan, out_dir=staging.dir, enabled=not cfg.no_preflight)
        with stages.stage("hash inputs"):
            inputs = hash_inputs(src, cfg)
            key = input_key(cfg, inputs)
        streamed = STREAMED_LOAD and not backend.static_shapes and prequantized is None and src.rotations is None
        source = "random weights" if cfg.random_weights else src.checkpoint.layout
        if streamed:  # each part quantized as it is loaded: the fp32 model never exists whole
            with stages.stage("load + quantize", f"{source}, {plan.scheme}"):
                model = load_quantized(src, cfg, plan, stages.progress, backend)
        else:
            with stages.stage("load", source):
                model = load_model(src, cfg)
        rotation, calibration = None, None
        if src.rotations is not None:
            with stages.stage("rotate", src.rotations.record["source"]):
                rotation = fuse_rotations(model, src.rotations)
        if prequantized is not None:
            rotation = {"source": "prequantized checkpoint (rotations fused by its producer)",
                        "r4": describe_r4(src.args)} if prequantized.spinquant else None
        if backend.static_shapes:  # NPUs: PT2E-quantized prefill/decode graphs sharing the KV cache
            from aot.npu import static_programs

            programs, signatures, calibration = static_programs(model, src, cfg, backend, stages)
        else:
            if prequantized is None and not streamed:
                with stages.stage("quantize", plan.scheme):
                    apply_plan(model, plan)
            methods = text_methods(model, cfg.max_seq_len)
            signatures = {m.name: m.signature for m in methods}
            with stages.stage("export", ", ".join(signatures)):
                programs = export_methods(methods)
            del methods
        del model
        metadata = runner_metadata(src, cfg, backend)
        delegation = write_program(programs, backend, plan, metadata, stages, staging.dir, src.tokenizer, cfg.soc,
                                   share_mutable_buffers=backend.static_shapes)
        manifest = bundle_manifest(cfg, src, plan, rotation, inputs, key, signatures, metadata, delegation, stages)
        manifest["target"] = {**backend.bundle_fields(cfg), "calibration": calibration}
        manifest["build"]["preflight"] = preflight
        manifest = staging.commit(manifest)
    return {**manifest, "path": str(staging.out)}


# ---- resolve --------------------------------------------------------------------------------


def resolve_source(cfg: BuildConfig, plan: QuantPlan) -> Source:
    ckpt = open_checkpoint(cfg.checkpoint) if cfg.checkpoint is not None else None
    if ckpt is not None:
        args = ckpt.args
        if cfg.model is not None:
            _check_model_matches(cfg.model, args, ckpt.path)
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
    bos = cfg.bos_id if cfg.bos_id is not None else (tok.bos_id if tok else None)
    eos = cfg.eos_ids if cfg.eos_ids is not None else (tok.eos_ids if tok else None)
    if tok is None and args.vocab_size == MODELS["1b"].vocab_size:
        bos = LLAMA3_BOS if bos is None else bos
        eos = LLAMA3_EOS if eos is None else eos
    if bos is None or eos is None:
        errors.append("no tokenizer to take bos/eos ids from: pass --bos-id and --eos-id")
    else:
        bad = [i for i in (bos, *eos) if i >= args.vocab_size]
        if bad:
            errors.append(f"bos/eos id(s) {bad} are outside the model's vocab ({args.vocab_size}); fix --bos-id/--eos-id")
    rotations = None
    if ckpt is not None and ckpt.prequantized is not None:
        errors += _prequantized_errors(cfg, ckpt)
    elif plan.scheme == "spinquant":
        errors += check_sizes(args)
        if not errors:
            rotations = load_rotations(cfg.rotation, args) if cfg.rotation else random_rotations(args, cfg.seed)
    if errors:
        raise ConfigError("; ".join(errors))
    return Source(args, name, ckpt, tok, int(bos), tuple(int(e) for e in eos), rotations)


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


def _check_model_matches(model: str, args: ModelArgs, path: Path) -> None:
    diff = _arch_diff(MODELS[model], args)
    if diff:
        match = next((n for n, a in MODELS.items() if not _arch_diff(a, args)), None)
        hint = f"use --model {match}" if match else "drop --model to take the checkpoint's own config"
        raise ConfigError(
            f"--model {model} does not match --checkpoint {path} ({', '.join(diff[:3])}); {hint}"
        )


def hash_inputs(src: Source, cfg: BuildConfig) -> dict:
    files = list(src.checkpoint.files()) if src.checkpoint else []
    if src.tokenizer is not None:
        files.append(src.tokenizer.path)
    if cfg.rotation is not None:
        files.append(cfg.rotation.expanduser().absolute())
    if get_backend(cfg.delegate).static_shapes and src.tokenizer is not None:
        from aot.validate import text_file

        files.append(text_file(cfg.calibration).absolute())  # PT2E calibration text
    return hash_files(files)


def hash_files(files: list[Path]) -> dict:
    """bundle.json's `inputs`: sha256 and size of each file, once each, keyed by path."""
    return {str(f): {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in dict.fromkeys(files)}


def input_key(cfg: BuildConfig, inputs: dict) -> str:
    """Content address of a build: its configuration, the bytes of every input file and the
    toolchain. Paths do not count (a moved checkpoint is the same input); contents do."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "force", "no_preflight", *PATH_FIELDS)}
    toolchain = {k: v for k, v in versions().items() if k != "python"}
    files = sorted((Path(name).name, entry["sha256"]) for name, entry in inputs.items())
    payload = json.dumps({"config": config, "inputs": files, "toolchain": toolchain}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def fingerprint(cfg: BuildConfig) -> str:
    """The input key `build` would record for `cfg`, without building (for up-to-date checks)."""
    from aot import vision_build

    if vision_build.is_vision_build(cfg):
        return input_key(cfg, hash_files(vision_build.resolve(cfg).files()))
    return input_key(cfg, hash_inputs(resolve_source(cfg, cfg.quant.plan()), cfg))


# ---- load -----------------------------------------------------------------------------------


def load_model(src: Source, cfg: BuildConfig) -> Transformer:
    with torch.device("meta"):
        model = Transformer(src.args, cfg.max_context_len, full_logits=cfg.full_logits)
    model.to_empty(device="cpu")
    model.init_buffers()
    if src.checkpoint is None:
        random_init_(model, cfg.seed)
    else:
        load_weights(model, src.checkpoint)
    return model.eval()


# Load and quantize part by part (False: the whole fp32 model first, then quantize; the same bytes).
STREAMED_LOAD = True


def load_quantized(src: Source, cfg: BuildConfig, plan: QuantPlan, progress=None,
                   backend: Backend | None = None) -> Transformer:
    """The model materialised one part at a time (embedding, output projection and final norm;
    then each decoder layer), each part's weights read (or drawn) and quantized before the next is
    allocated. Peak memory: the quantized model plus one part in fp32 (the tied embedding's fp32
    table until both it and the output projection are quantized from it)."""
    from contextlib import ExitStack

    from aot.checkpoint import WeightReader
    from aot.model import rope_frequencies

    args = src.args
    with torch.device("meta"):
        model = Transformer(args, cfg.max_context_len, full_logits=cfg.full_logits)
    model.freqs_cos, model.freqs_sin = rope_frequencies(args, cfg.max_context_len)
    parts = [("tok_embeddings", "output", "norm")] + [(f"layers.{i}",) for i in range(args.n_layers)]
    with ExitStack() as stack:
        reader = WeightReader(model, src.checkpoint, stack) if src.checkpoint is not None else None
        for done, group in enumerate(parts):
            for name in group:
                if name == "output" and args.tie_embeddings:
                    model.output.weight = model.tok_embeddings.weight
                else:
                    model.get_submodule(name).to_empty(device="cpu")
            names = {n for n, _ in model.named_parameters() if any(n.startswith(g + ".") for g in group)}
            if reader is None:
                random_init_(model, cfg.seed, names)
            else:
                reader.fill(model, [n for n in reader.names if n in names])
            # The parts' only buffers are KV caches: never written here. ExecuTorch serializes a
            # buffer the graph mutates by shape and dtype only (its contents are the runtime's),
            # export and lowering read only the buffers' shapes, and an allocation of at least the
            # 1 MiB mmap threshold is pages the kernel backs when first written: left unwritten,
            # the caches (0.44 GiB for the 3B at a 2048 context) never become resident; zeroed,
            # as the eager model does, they stayed resident to the end of serialization.
            # tests/test_streamed.py fills them with garbage: the .pte bytes do not change.
            apply_plan(model, plan, parts=group)
            if backend is not None:
                for name in group:
                    backend.hold_weights(model.get_submodule(name))
            if progress is not None:
                progress(done + 1, len(parts))
    if plan.dtype == "bfloat16":  # as apply_plan's whole-model .to() does for the rope tables
        model.freqs_cos, model.freqs_sin = model.freqs_cos.bfloat16(), model.freqs_sin.bfloat16()
    return model.eval()


# ---- lower and serialize --------------------------------------------------------------------


def runner_metadata(src: Source, cfg: BuildConfig, backend: Backend) -> dict:
    """Constant methods ExecuTorch's LLM runners read (see LLAMA32.md)."""
    static = backend.static_shapes  # fixed prefill chunk and plain-op attention over the cache
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


def write_program(programs: dict, backend: Backend, plan: QuantPlan, metadata: dict, stages: Stages, out: Path,
                  tokenizer: TokenizerInfo | None, soc: str | None = None, share_mutable_buffers: bool = False) -> dict:
    """Lower and serialize `programs` into out/model.pte (the lower and serialize stages), copy the
    tokenizer beside it; returns the delegation report. Takes `programs` over: each stage's input
    is dropped as soon as the next exists, so two of them are never alive at once."""
    with stages.stage("lower", backend.name + (f" {soc}" if soc else "")):
        edge = lower(programs, backend, plan, metadata, soc)
    programs.clear()
    with stages.stage("serialize"):
        program = to_executorch(edge, share_mutable_buffers=share_mutable_buffers)
        del edge
        delegation = delegation_report(program)
        with open(out / PTE_NAME, "wb") as f:
            program.write_to_file(f)
    del program
    if tokenizer is not None:
        shutil.copyfile(tokenizer.path, out / tokenizer.path.name)
    return delegation


def lower(programs: dict, backend: Backend, plan: QuantPlan, metadata: dict, soc: str | None = None):
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    try:
        with backend.lowering_context():
            return to_edge_transform_and_lower(
                programs,
                partitioner={name: backend.partitioners(name, plan, soc) for name in programs},
                compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
                constant_methods=metadata,
            )
    except Exception as e:  # surface lowering failures as one line; --debug shows the traceback
        raise BuildError(f"lowering to {backend.name} failed: {type(e).__name__}: {_first_line(e)}") from e


def to_executorch(edge, share_mutable_buffers: bool = False):
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    try:
        return edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                # Fuses torchao's dequantize + embedding into quantized_decomposed::embedding_*.
                do_quant_fusion_and_const_prop=True,
                # Static-shape methods (prefill, decode) plan their KV-cache buffers in one place.
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False,
                                                        share_mutable_buffers=share_mutable_buffers),
                emit_mutable_buffer_names=share_mutable_buffers,
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
            )
        )
    except Exception as e:
        raise BuildError(f"serializing the program failed: {type(e).__name__}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


# ---- bundle.json ----------------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import version

    out = {"aot": __version__, "python": platform.python_version()}
    for pkg in ("torch", "executorch", "torchao"):
        out[pkg] = version(pkg)
    return out


def bundle_manifest_common(cfg, inputs, key, metadata, delegation, stages) -> dict:
    """bundle.json fields every model family writes; the family adds model, checkpoint,
    tokenizer, quant, export and its special ids."""
    return {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "delegate": cfg.delegate,
        "metadata": metadata,
        "delegation": delegation,
        "versions": versions(),
        "build": {
            "stages": [r.to_dict() for r in stages.records],
            "total_seconds": round(stages.total_seconds, 3),
            "peak_rss_mib": round(stages.peak_rss_mib, 1),
            "input_key": key,
            "config": cfg.to_dict(),
        },
    }


def bundle_manifest(cfg, src: Source, plan: QuantPlan, rotation: dict | None, inputs, key, signatures, metadata, delegation, stages) -> dict:
    ckpt = src.checkpoint
    return {
        **bundle_manifest_common(cfg, inputs, key, metadata, delegation, stages),
        "model": {
            "name": src.model_name,
            "family": "llama3.2",
            "args": src.args.to_dict(),
            "num_params": src.args.num_params(),
            "random_weights": cfg.random_weights,
            "seed": cfg.seed if cfg.random_weights else None,
        },
        "checkpoint": None if ckpt is None else {"path": str(ckpt.path.absolute()), "layout": ckpt.layout},
        "tokenizer": None if src.tokenizer is None else {
            "file": src.tokenizer.path.name,
            "kind": src.tokenizer.kind,
            "vocab_size": src.tokenizer.vocab_size,
        },
        "quant": {**cfg.quant.to_dict(), "plan": plan.to_dict(), "rotation": rotation,
                  "prequantized": None if ckpt is None or ckpt.prequantized is None else ckpt.prequantized.to_dict()},
        "export": {
            "methods": signatures,
            "max_seq_len": cfg.max_seq_len,
            "max_context_len": cfg.max_context_len,
            "full_logits": cfg.full_logits,
        },
        "bos_id": src.bos_id,
        "eos_ids": list(src.eos_ids),
    }
