"""`aot build`: one straight line for every model family and backend.

    resolve -> hash inputs -> load(plan) -> backend.prepare -> export -> lower -> serialize -> write

The family (aot/families) knows its model: what it reads, how it loads and quantizes as weights
stream in, its methods, runner metadata and bundle.json fields. The backend (aot/backends) knows
its delegate: its prepare step (static prefill/decode graphs for NPUs), its partitioners and its
lowering context. Each stage is timed with its own peak RSS (aot/progress.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

from aot import __version__
from aot.adapters import parse_spec
from aot.backends import Backend, get_backend
from aot.bundle import BUNDLE_FORMAT, FORMAT_VERSION, PTD_NAME, PTE_NAME, Staging
from aot.config import PATH_FIELDS, BuildConfig
from aot.delegation import delegation_report
from aot.errors import BuildError
from aot.families import Family, Program, Source, family_for
from aot.files import sha256_file
from aot.methods import export_methods
from aot.native import native_output_silenced
from aot.memplan import read_memory_plan
from aot.preflight import check, runtime
from aot.progress import Stages, return_freed_memory
from aot.quant import QuantPlan
from aot.tokenizer import TokenizerInfo


def build(cfg: BuildConfig, stages: Stages) -> dict:
    """Build the bundle `cfg` describes; returns its bundle.json content."""
    family, backend = family_for(cfg), get_backend(cfg.delegate)
    backend.require()
    return_freed_memory()
    try:
        with Staging(cfg.out, cfg.force) as staging:
            with stages.stage("resolve"):
                src = family.resolve(cfg)
            # the phone's plan first (--device-memory: a config problem), then this machine's
            runtime_plan = runtime(cfg, src.args, *src.preflight[1:], backend=backend)
            preflight = {**check(*src.preflight, out_dir=staging.dir, enabled=not cfg.no_preflight),
                         "runtime": runtime_plan}
            with stages.stage("hash inputs"):
                inputs = hash_inputs(src, cfg, backend)
                key = input_key(cfg, inputs)
            model = family.load(src, cfg, backend, stages)
            variants = family.variants(model, src, cfg)
            delegation, ptd_sha = {}, None
            for i, variant in enumerate(variants):
                with variant.attach():
                    program = backend.prepare(family.methods(model, src, cfg), model, src, cfg, stages)
                    if i == len(variants) - 1:
                        del model  # the last program: the eager model goes with it
                    label = program.export_label() + (f" ({variant.label})" if variant.label else "")
                    with stages.stage("export", label):
                        programs = export_methods(program.methods, EXTERNAL_TAG if cfg.external_weights else None)
                program.release()  # the eager model goes: two copies of the weights are never alive
                metadata = family.runner_metadata(src, cfg, backend.static_shapes)
                last = i == len(variants) - 1
                with contextlib.nullcontext() if last else backend.keeping_weights():
                    report, sha = write_program(programs, backend, src.plan, metadata, stages, staging.dir,
                                                src.tokenizer, cfg.soc, program.share_mutable_buffers,
                                                program.initialized_buffers, cfg.external_weights, variant.file, ptd_sha)
                if not last:  # lowering unpacked the held weights; hold them compactly again until the next
                    backend.hold_weights(model)
                ptd_sha = ptd_sha or sha
                if variant.name is None:
                    delegation = report
            manifest = bundle_manifest(cfg, family, src, program, inputs, key, metadata, delegation, stages)
            manifest["target"] = {**backend.bundle_fields(cfg), **program.target}
            manifest["build"]["preflight"] = preflight
            manifest["data_file"] = PTD_NAME if cfg.external_weights else None  # the runner's data_path
            manifest["memory_plan"] = read_memory_plan(  # from the bytes just written
                staging.dir / PTE_NAME, staging.dir / PTD_NAME if cfg.external_weights else None)
            for record in manifest.get("adapters") or []:  # each adapter's own program: what it holds at load
                if record["file"] != PTE_NAME:
                    plan = read_memory_plan(staging.dir / record["file"], staging.dir / PTD_NAME)
                    record["at_load_bytes"] = plan["total"]["at_load_bytes"]
            manifest = staging.commit(manifest)
        return {**manifest, "path": str(staging.out)}
    finally:
        backend.forget_held()


def fingerprint(cfg: BuildConfig) -> str:
    """The input key `build` would record for `cfg`, without building (for up-to-date checks)."""
    return input_key(cfg, hash_inputs(family_for(cfg).resolve(cfg), cfg, get_backend(cfg.delegate)))


# ---- inputs ---------------------------------------------------------------------------------


def hash_inputs(src: Source, cfg: BuildConfig, backend: Backend) -> dict:
    """bundle.json's `inputs`: what the family reads and what the backend's own steps read."""
    return hash_files([*src.files(), *backend.input_files(cfg, src)])


def hash_files(files: list[Path]) -> dict:
    """bundle.json's `inputs`: sha256 and size of each file, once each, keyed by path."""
    return {str(f): {"sha256": sha256_file(f), "bytes": f.stat().st_size} for f in dict.fromkeys(files)}


def input_key(cfg: BuildConfig, inputs: dict) -> str:
    """Content address of a build: its configuration, the bytes of every input file and the
    toolchain. Paths do not count (a moved checkpoint is the same input); contents do."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "force", "no_preflight", *PATH_FIELDS)}
    config.pop("hf_repo", None)  # where the checkpoint came from: its bytes count (inputs), not its name
    if config.get("adapters"):  # adapters by name only: their folders' bytes are inputs
        config["adapters"] = [parse_spec(a)[0] or "" for a in config["adapters"]]
    for k in ("adapters", "adapter_mode", "adapter_quant"):  # added later: left out unset, so older keys hold
        if config.get(k) is None:
            config.pop(k, None)
    for k in ("external_weights",):  # added later: left out at its default, so older keys hold
        if not config.get(k):
            config.pop(k, None)
    toolchain = {k: v for k, v in versions().items() if k != "python"}
    files = sorted((Path(name).name, entry["sha256"]) for name, entry in inputs.items())
    payload = json.dumps({"config": config, "inputs": files, "toolchain": toolchain}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ---- lower and serialize --------------------------------------------------------------------


def write_program(programs: dict, backend: Backend, plan: QuantPlan, metadata: dict, stages: Stages, out: Path,
                  tokenizer: TokenizerInfo | None, soc: str | None = None, share_mutable_buffers: bool = False,
                  initialized_buffers: tuple[str, ...] = (), external_weights: bool = False,
                  pte_name: str = PTE_NAME, ptd_sha: str | None = None) -> tuple[dict, str | None]:
    """Lower and serialize `programs` into out/`pte_name` (the lower and serialize stages), copy the
    tokenizer beside it; returns the delegation report and the sha256 of the external weights.
    Takes `programs` over: each stage's input is dropped as soon as the next exists, so two of them
    are never alive at once. With `external_weights`, the weights (tagged by export_methods) go to
    out/model.ptd instead; when `ptd_sha` is given (a bundle's second program over the same
    foundation), model.ptd is already written and this program's weights must be those bytes."""
    with stages.stage("lower", backend.name + (f" {soc}" if soc else "") + ("" if pte_name == PTE_NAME else f", {pte_name}")):
        edge = lower(programs, backend, plan, metadata, soc)
    programs.clear()
    sha = None
    with stages.stage("serialize"):
        program = to_executorch(edge, share_mutable_buffers=share_mutable_buffers, initialized_buffers=initialized_buffers,
                                external_weights=external_weights)
        del edge
        delegation = delegation_report(program)
        with open(out / pte_name, "wb") as f:
            program.write_to_file(f)
        if external_weights:
            sha = write_external_weights(program, out, write=ptd_sha is None)
            if ptd_sha is not None and sha != ptd_sha:
                raise BuildError(f"{pte_name}: its foundation weights differ from model.ptd's (sha256 {sha[:12]} vs "
                                 f"{ptd_sha[:12]}); build the adapters as separate bundles and report this")
    del program
    if tokenizer is not None and pte_name == PTE_NAME:
        shutil.copyfile(tokenizer.path, out / tokenizer.path.name)
    return delegation, sha


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


def to_executorch(edge, share_mutable_buffers: bool = False, initialized_buffers: tuple[str, ...] = (),
                  external_weights: bool = False):
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    with native_output_silenced():  # out variants of quantized_decomposed ops (int8 KV cache, embeddings)
        import executorch.kernels.quantized  # noqa: F401
    try:
        return edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                # Fuses torchao's dequantize + embedding into quantized_decomposed::embedding_*.
                do_quant_fusion_and_const_prop=True,
                # Static-shape methods (prefill, decode) plan their KV-cache buffers in one place.
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False,
                                                        share_mutable_buffers=share_mutable_buffers),
                # The KV cache's tensors carry their names, so the memory plan (aot.memplan) tells
                # them apart from activations from the .pte alone; the runtime plans them the same.
                emit_mutable_buffer_names=True,
                sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
                passes=[InitializedMutableBufferPass(list(initialized_buffers))] if initialized_buffers else [],
                # The weights the delegate did not take (embeddings, a non-delegated output layer).
                external_constants=_external_tag if external_weights else False,
            )
        )
    except Exception as e:
        raise BuildError(f"serializing the program failed: {type(e).__name__}: {_first_line(e)}") from e


# ---- external weights ----------------------------------------------------------------------
# ExecuTorch's named data: a constant tagged "model" (aot.methods.export_methods tags the weights)
# is written to model.ptd and the program refers to it by key (XNNPACK: the sha256 of its bytes;
# other constants: their name), so equal weights give equal bytes.

EXTERNAL_TAG = PTD_NAME.removesuffix(".ptd")  # the file is named by the tag


def _external_tag(node) -> str | None:
    return (node.meta.get("custom") or {}).get("delegate_constant_tag")


def write_external_weights(program, out: Path, write: bool = True) -> str:
    """out/model.ptd: the named data tagged by aot.methods.tag_weights (a flat_tensor file); its
    sha256. `write` False: only hash it (the bundle's model.ptd is already written)."""
    data = program._tensor_data or {}  # filled by serializing; write_tensor_data_to_file names files by tag
    if set(data) != {EXTERNAL_TAG}:
        raise BuildError(f"--external-weights: expected the weights under one tag '{EXTERNAL_TAG}', got "
                         f"{sorted(data) or 'none'}; build without --external-weights")
    digest = hashlib.sha256()

    class Sink:  # streamed: the weights are never one more copy in memory
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            digest.update(chunk)
            if self.f is not None:
                self.f.write(chunk)
            return len(chunk)

    if write:
        with open(out / PTD_NAME, "wb") as f:
            data[EXTERNAL_TAG].write_to_file(Sink(f))
    else:
        data[EXTERNAL_TAG].write_to_file(Sink(None))
    return digest.hexdigest()


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


def bundle_manifest(cfg: BuildConfig, family: Family, src: Source, program: Program, inputs: dict, key: str,
                    metadata: dict, delegation: dict, stages: Stages) -> dict:
    """bundle.json: the fields every family writes around the family's own (model, checkpoint,
    tokenizer, quant, export[, image])."""
    fields = family.manifest(src, cfg, program)
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
        **fields,
        "bos_id": src.bos_id,
        "eos_ids": list(src.eos_ids),
        # the Instruct prompt format: template, turn-ending tokens, tool-call form (aot.chatformat)
        "chat": src.tokenizer.chat.record() if src.tokenizer is not None and src.tokenizer.chat else None,
    }
