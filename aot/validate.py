"""`aot validate`: is a bundle as accurate and as fast as promised?

Accuracy: teacher-forced next-token distributions of the bundle (ExecuTorch runtime) against the
reference checkpoint run eagerly in fp32, on a text. Speed: ExecuTorch's own runner, repeated.
Gates turn the figures into one exit code. The result is a plain dict; the table, --json and
--junit are views of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from aot.bundle import Bundle
from aot.errors import CheckpointError, ConfigError
from aot.families.text.family import TextFamily
from aot.families.text.model import ModelArgs
from aot.adapters import Adapter, merge_, open_peft, read_peft
from aot.families.text.checkpoint import unpermute_rotary
from aot.files import sha256_file
from aot.metrics import Gates, by_depth, check_gates, row_metrics, summarize
from aot.native import native_output_silenced
from aot.runner.engines import PythonEngine
from aot.speed import PROMPT_TOKENS, measure_speed
from aot.texts import text_file
from aot.validate_vision import validate_vision


@dataclass(frozen=True)
class ValidateConfig:
    reference: Path | None = None  # default: the checkpoint recorded in bundle.json
    text: Path | None = None  # default: the demo model's held-out sample
    max_tokens: int = 512
    prompt_tokens: int | None = None  # speed: None = aot.speed's default (128), or what fits the context
    decode_tokens: int | None = None  # speed: None = 64, or what fits
    repeats: int = 3
    skip_speed: bool = False
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self):
        for name in ("max_tokens", "prompt_tokens", "decode_tokens", "repeats"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(self, name)}")


def validate(bundle: Bundle, cfg: ValidateConfig, stages, images: list[Path] | None = None) -> dict:
    if bundle.manifest.get("image") is not None:

        gated = [k for k in ("min_prefill_tps", "min_decode_tps") if k in cfg.gates.given()]
        if gated:
            raise ConfigError(f"--{gated[0].replace('_', '-')}: vision bundles report the image encoder's time; "
                              "measure token speed with `aot run --image ... --json`")
        return validate_vision(bundle, replace(cfg, prompt_tokens=cfg.prompt_tokens or PROMPT_TOKENS), stages, images)
    if images:
        raise ConfigError(f"--image: {bundle.root} is a text bundle; images need a vision bundle")
    source = text_file(cfg.text)

    with stages.stage("load bundle"):
        scorer = PythonEngine(bundle)
        ids = scorer.encode(source.read_text(errors="replace"))[: min(cfg.max_tokens, scorer.max_context_len)]
        if len(ids) < 2:
            raise ConfigError(f"--text {source}: needs at least one token of text")
    speed = None
    if not cfg.skip_speed:
        with stages.stage("speed", f"{cfg.repeats} runs"):
            speed = measure_speed(bundle, ids, cfg.prompt_tokens, cfg.decode_tokens, cfg.repeats)
    with stages.stage("reference", "fp32 eager"):
        reference, ref_model = reference_model(bundle, cfg.reference, len(ids))
    chunk = scorer.max_seq_len
    with stages.stage("score", f"{len(ids)} tokens, teacher-forced in {chunk}-token chunks"):
        rows = score_rows(scorer, ref_model, ids, chunk)
    accuracy = {**summarize(rows), "by_depth": by_depth(rows)}
    gates = check_gates(cfg.gates, accuracy, speed)
    return {
        "bundle": str(bundle.root),
        "model": bundle.manifest["model"]["name"],
        "quant": bundle.manifest["quant"]["scheme"],
        "text": {"file": str(source), "tokens": len(ids)},
        "reference": reference,
        "accuracy": accuracy,
        "speed": speed,
        "gates": gates,
        "ok": all(g["ok"] for g in gates),
    }


def reference_model(bundle: Bundle, reference: Path | None, positions: int) -> tuple[dict, torch.nn.Module]:
    """The reference checkpoint's eager fp32 model (full logits, a cache of `positions`), and what
    it was."""
    recorded = bundle.manifest.get("checkpoint")
    if reference is None:
        if not recorded:
            raise ConfigError(
                f"{bundle.root} was built from random weights; pass --reference CHECKPOINT to validate it"
            )
        reference = Path(recorded["path"])
    family = TextFamily()
    ckpt = family.reference_checkpoint(reference)
    built = ModelArgs.from_dict(bundle.manifest["model"]["args"])
    # Tying is storage, not function: a prequantized or rotated model stores its output apart.
    fields = [k for k in built.to_dict() if k != "tie_embeddings"]
    diff = [f"{k} {getattr(built, k)} vs {getattr(ckpt.args, k)}" for k in fields
            if getattr(built, k) != getattr(ckpt.args, k)]
    if diff:
        raise CheckpointError(
            f"--reference {reference} is a different model from the one {bundle.root} was built from "
            f"({', '.join(diff[:3])}); give the checkpoint the bundle was built from"
        )
    inputs = bundle.manifest.get("inputs", {})
    same_files = all(inputs.get(str(f), {}).get("sha256") == sha256_file(f) for f in ckpt.weight_files)
    # rotary tables depend on the position only: a cache as long as the text gives the same logits
    model = family.reference(ckpt, max(positions, 2), full_logits=True)
    record = {"checkpoint": str(ckpt.path), "layout": ckpt.layout, "is_build_input": same_files}
    adapter = reference_adapter(bundle, ckpt.args)
    if adapter is not None:
        merge_(model, read_peft(adapter, ckpt.args, unpermute_rotary), adapter.scale)
        record["adapter"] = {"name": adapter.name, "path": str(adapter.path), "merged": "fp32",
                             "is_build_input": all(inputs.get(str(f), {}).get("sha256") == sha256_file(f)
                                                   for f in adapter.files)}
    return record, model


def reference_adapter(bundle: Bundle, args) -> Adapter | None:
    """The PEFT adapter in the program `bundle` runs (read again from the folder it was built
    from), to merge into the reference in fp32; None for the foundation, or a QLoRA bundle (whose
    reference is the bf16 original: its adaptors belong to its INT4 weights)."""
    record = next((a for a in bundle.adapters() if a.get("file") == bundle.program), None)
    if record is None or record.get("kind") != "peft":
        return None
    path = Path(str(record.get("path")))
    try:
        return open_peft(record.get("name"), path, args)
    except CheckpointError as e:
        raise CheckpointError(f"the reference needs adapter {record.get('name') or path.name} merged, from the folder "
                              f"it was built from: {e}") from None


def score_rows(scorer: PythonEngine, reference: torch.nn.Module, ids: list[int], chunk: int) -> dict[str, torch.Tensor]:
    """Teacher-forced, chunk by chunk (the bundle's prefill length): the bundle's and the
    reference's logits for each chunk, reduced to per-position figures (metrics.row_metrics) before
    the next, so a 128K-token text never holds 128K rows of logits."""
    parts = []
    with torch.no_grad(), native_output_silenced():  # the eager custom ops log per call
        for pos in range(0, len(ids) - 1, chunk):
            window = ids[pos : pos + chunk]
            target = torch.tensor(ids[pos + 1 : pos + chunk + 1])
            ref = reference(torch.tensor([window]), torch.tensor([pos]))[0]
            got = scorer.score_chunk(window, pos)
            n = target.numel()  # the text's last row predicts nothing
            parts.append(row_metrics(ref[:n], got[:n], target))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
