"""`aot validate`: is a bundle as accurate and as fast as promised?

Accuracy: teacher-forced next-token distributions of the bundle (ExecuTorch runtime) against the
reference checkpoint run eagerly in fp32, on a text. Speed: ExecuTorch's own runner, repeated.
Gates turn the figures into one exit code. The result is a plain dict; the table, --json and
--junit are views of it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aot.bundle import Bundle
from aot.config import DEMO_DIR
from aot.errors import CheckpointError, ConfigError
from aot.native import native_output_silenced
from aot.speed import measure_speed

DEMO_TEXT = DEMO_DIR / "heldout.txt"
# Below this top-1 agreement the reference is not the model the bundle was built from, whatever
# the user's gates say (even 4-bit Llama keeps well above 0.8 on natural text).
MIN_REFERENCE_AGREEMENT = 0.5


@dataclass(frozen=True)
class Gates:
    max_ppl_ratio: float | None = None
    min_top1: float | None = None
    max_kl: float | None = None
    min_prefill_tps: float | None = None
    min_decode_tps: float | None = None

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class ValidateConfig:
    reference: Path | None = None  # default: the checkpoint recorded in bundle.json
    text: Path | None = None  # default: the demo model's held-out sample
    max_tokens: int = 512
    prompt_tokens: int = 128
    decode_tokens: int = 64
    repeats: int = 3
    skip_speed: bool = False
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self):
        for name in ("max_tokens", "prompt_tokens", "decode_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(self, name)}")


def validate(bundle: Bundle, cfg: ValidateConfig, stages, images: list[Path] | None = None) -> dict:
    if bundle.manifest.get("image") is not None:
        from aot.validate_vision import validate_vision

        gated = [k for k in ("min_prefill_tps", "min_decode_tps") if k in cfg.gates.given()]
        if gated:
            raise ConfigError(f"--{gated[0].replace('_', '-')}: vision bundles report the image encoder's time; "
                              "measure token speed with `aot run --image ... --json`")
        return validate_vision(bundle, cfg, stages, images)
    if images:
        raise ConfigError(f"--image: {bundle.root} is a text bundle; images need a vision bundle")
    source = text_file(cfg.text)
    from aot.runner.engines import PythonEngine

    with stages.stage("load bundle"):
        scorer = PythonEngine(bundle)
        ids = scorer.encode(source.read_text(errors="replace"))[: min(cfg.max_tokens, scorer.max_context_len)]
        if len(ids) < 2:
            raise ConfigError(f"--text {source}: needs at least one token of text")
    speed = None
    if not cfg.skip_speed:
        with stages.stage("speed", f"{cfg.repeats} runs"):
            speed = measure_speed(bundle, ids, scorer.token_bytes, cfg.prompt_tokens, cfg.decode_tokens, cfg.repeats)
    with stages.stage("reference", "fp32 eager"):
        reference, ref_logits = reference_logits(bundle, cfg.reference, ids)
    with stages.stage("score bundle", f"{len(ids)} tokens"):
        logits = scorer.score(ids)
    accuracy = compare(ref_logits, logits, torch.tensor(ids))
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


def text_file(given: Path | None) -> Path:
    path = Path(given).expanduser() if given else DEMO_TEXT
    if not path.is_file():
        raise ConfigError(f"--text {path}: no such file; give a UTF-8 text file to score on")
    return path


def reference_logits(bundle: Bundle, reference: Path | None, ids: list[int]) -> tuple[dict, torch.Tensor]:
    """Eager fp32 logits of the reference checkpoint, [len(ids), vocab], and what it was."""
    from aot.checkpoint import open_checkpoint
    from aot.files import sha256_file
    from aot.config import BuildConfig
    from aot.model import ModelArgs
    from aot.pipeline import load_model, resolve_source
    from aot.quant import QuantConfig

    recorded = bundle.manifest.get("checkpoint")
    if reference is None:
        if not recorded:
            raise ConfigError(
                f"{bundle.root} was built from random weights; pass --reference CHECKPOINT to validate it"
            )
        reference = Path(recorded["path"])
    ckpt = open_checkpoint(reference)
    if ckpt.prequantized is not None:
        raise ConfigError(
            f"{reference} is a prequantized checkpoint, not a float reference; pass --reference the "
            "original bf16 checkpoint of the same model"
        )
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
    cfg = BuildConfig(out=bundle.root, checkpoint=ckpt.path, tokenizer=bundle.tokenizer, quant=QuantConfig(scheme="none"),
                      max_seq_len=min(len(ids), bundle.manifest["export"]["max_context_len"]),
                      max_context_len=bundle.manifest["export"]["max_context_len"], full_logits=True)
    model = load_model(resolve_source(cfg, cfg.quant.plan()), cfg)
    with torch.no_grad(), native_output_silenced():  # the eager custom ops log per call
        logits = model(torch.tensor([ids]), torch.tensor([0]))[0]
    return {"checkpoint": str(ckpt.path), "layout": ckpt.layout, "is_build_input": same_files}, logits


def compare(ref: torch.Tensor, got: torch.Tensor, ids: torch.Tensor) -> dict:
    """Next-token metrics over positions 0..n-2 (each predicting the following token)."""
    return compare_rows(ref[:-1], got[:-1], ids[1:])


def compare_rows(ref: torch.Tensor, got: torch.Tensor, target: torch.Tensor) -> dict:
    """The metrics over logit rows [n, vocab], row i predicting target[i]."""
    ref, got = ref.float(), got.float()
    ref_logp, got_logp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    nll_ref = -ref_logp.gather(1, target[:, None]).mean().item()
    nll_got = -got_logp.gather(1, target[:, None]).mean().item()
    kl = max((ref_logp.exp() * (ref_logp - got_logp)).sum(-1).mean().item(), 0.0)  # >= 0 up to rounding
    return {
        "positions": int(target.numel()),
        "ppl_reference": round(math.exp(nll_ref), 4),
        "ppl_bundle": round(math.exp(nll_got), 4),
        "ppl_ratio": round(math.exp(nll_got - nll_ref), 4),
        "kl_mean": round(kl, 5),
        "top1_agreement": round((ref.argmax(-1) == got.argmax(-1)).float().mean().item(), 4),
        "max_abs_logit_error": round((ref - got).abs().max().item(), 4),
    }


_GATES = {  # gate -> (where the figure lives, its key, "min" or "max")
    "max_ppl_ratio": ("accuracy", "ppl_ratio", "max"),
    "min_top1": ("accuracy", "top1_agreement", "min"),
    "max_kl": ("accuracy", "kl_mean", "max"),
    "min_prefill_tps": ("speed", "prefill_tps", "min"),
    "min_decode_tps": ("speed", "decode_tps", "min"),
}


def check_gates(gates: Gates, accuracy: dict, speed: dict | None) -> list[dict]:
    results = [{
        "name": "reference_matches",
        "value": accuracy["top1_agreement"], "threshold": MIN_REFERENCE_AGREEMENT, "op": ">=",
        "ok": accuracy["top1_agreement"] >= MIN_REFERENCE_AGREEMENT,
        "hint": "top-1 agreement this low means --reference is not the model this bundle was built from",
    }]
    for name, threshold in gates.given().items():
        where, key, kind = _GATES[name]
        if where == "speed" and speed is None:
            raise ConfigError(f"--{name.replace('_', '-')} needs the speed runs; drop --skip-speed")
        value = (accuracy if where == "accuracy" else speed)[key]
        value = value["median"] if isinstance(value, dict) else value
        ok = value >= threshold if kind == "min" else value <= threshold
        results.append({"name": name, "value": value, "threshold": threshold,
                        "op": ">=" if kind == "min" else "<=", "ok": ok})
    return results


def junit_xml(result: dict) -> str:
    """JUnit XML for CI systems: one testcase per gate, every figure as a property."""
    figures = dict(result["accuracy"])
    for key, value in (result["speed"] or {}).items():
        figures[f"speed.{key}"] = value["median"] if isinstance(value, dict) else value
    return junit_suite("aot.validate", figures, [(f"aot.validate.{result['model']}", g) for g in result["gates"]])


def junit_suite(name: str, properties: dict, cases: list[tuple[str, dict]]) -> str:
    """One testsuite: `properties` as name/value pairs, one testcase per (classname, gate), a
    failure (with the gate's hint) for each gate that did not hold. Shared by `aot validate`,
    `aot validate --device` and `aot farm collect`."""
    from xml.etree import ElementTree as ET

    suite = ET.Element("testsuite", name=name, tests=str(len(cases)),
                       failures=str(sum(not g["ok"] for _, g in cases)), errors="0")
    props = ET.SubElement(suite, "properties")
    for key, value in properties.items():
        ET.SubElement(props, "property", name=key, value=str(value))
    for classname, g in cases:
        case = ET.SubElement(suite, "testcase", classname=classname, name=g["name"])
        if not g["ok"]:
            failure = ET.SubElement(case, "failure", message=f"{g['name']}: {g['value']} not {g['op']} {g['threshold']}")
            failure.text = g.get("hint", "")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
