"""`aot simulate`: an NPU delegate's quantization recipe, run on the host in fake-quant.

Before touching a device (or without the vendor SDK at all), a team can see what the recipe costs
in accuracy: the model in whole-sequence form with standard ops (what PT2E quantizers annotate),
`torch.export`, the delegate's quantizer (`prepare_pt2e`), calibration on text, `convert_pt2e`, then
the same metrics as `aot validate` against the fp32 model on held-out text.

The evaluated tokens are the first --max-tokens of --text; calibration uses --calibration-windows
windows of the same length from --calibration, skipping the evaluated tokens when both are the
same file, so the model is never calibrated on what it is scored on.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from aot.errors import ConfigError, DelegateUnavailable
from aot.native import native_output_silenced


@dataclass(frozen=True)
class SimulateConfig:
    delegate: str
    checkpoint: Path
    scheme: str
    text: Path | None = None
    calibration: Path | None = None
    max_tokens: int = 256
    calibration_windows: int = 8
    group_size: int = 32  # block size of block-wise schemes


def simulate(cfg: SimulateConfig, stages) -> dict:
    from aot.backends import get_backend
    from aot.config import BuildConfig
    from aot.pipeline import load_model, resolve_source
    from aot.quant import QuantConfig
    from aot.tokenizer import load_tokenizer
    from aot.validate import compare, text_file

    backend = get_backend(cfg.delegate)
    if backend.name != "qnn":
        raise DelegateUnavailable(f"--delegate {backend.name}: no host simulation of its quantizer yet (qnn has one)")
    if cfg.scheme not in backend.schemes:
        raise ConfigError(f"--quant {cfg.scheme}: --delegate {backend.name} takes {', '.join(backend.schemes)}")
    if cfg.max_tokens < 2 or cfg.calibration_windows < 1:
        raise ConfigError("--max-tokens must be >= 2 and --calibration-windows >= 1")
    text, calib = text_file(cfg.text), text_file(cfg.calibration or cfg.text)

    with stages.stage("load", "fp32"):
        build = BuildConfig(out=Path("unused"), checkpoint=cfg.checkpoint, quant=QuantConfig(scheme="none"),
                            max_seq_len=cfg.max_tokens, max_context_len=cfg.max_tokens, full_logits=True)
        src = resolve_source(build, build.quant.plan())
        if src.tokenizer is None:
            raise ConfigError(f"--checkpoint {cfg.checkpoint}: has no tokenizer to read --text with")
        tok, _ = load_tokenizer(src.tokenizer.path)
        model = load_model(src, build)
        model.use_plain_attention()

        def encode(path: Path) -> list[int]:
            return [src.bos_id] + list(tok.encode(path.read_text(errors="replace"), 0, 0))

        n = cfg.max_tokens
        ids = encode(text)[:n]
        if len(ids) < n:
            raise ConfigError(f"--text {text}: has {len(ids)} tokens, fewer than --max-tokens {n}")
        calib_ids = encode(calib)[n if calib == text else 0 :]
        windows = [calib_ids[i : i + n] for i in range(0, len(calib_ids) - n + 1, n)][: cfg.calibration_windows]
        if not windows:
            raise ConfigError(f"--calibration {calib}: needs at least {n} tokens beyond the evaluated ones")
    pos = torch.tensor([0])
    with stages.stage("reference", "fp32"), torch.no_grad():
        ref = model(torch.tensor([ids]), pos)[0]
    with stages.stage("export"):
        program = torch.export.export(model, (torch.tensor([ids]), pos), strict=False)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from aot.backends.qnn import qnn_quantizer

    label = cfg.scheme + (f" g{cfg.group_size}" if cfg.scheme.endswith("-block") else "")
    with stages.stage("quantize", f"{backend.name} {label}"), contextlib.redirect_stdout(io.StringIO()):
        # The quantizer prints a line per op it leaves in float (repeat_interleave, type_as).
        module = program.module()
        prepared = prepare_pt2e(module, qnn_quantizer(cfg.scheme, module.graph, cfg.group_size))
    with stages.stage("calibrate", f"{len(windows)} x {n} tokens"), torch.no_grad(), native_output_silenced():
        for i, window in enumerate(windows):
            prepared(torch.tensor([window]), pos)
            stages.progress(i + 1, len(windows))
    with stages.stage("simulate"), torch.no_grad():
        converted = convert_pt2e(prepared)
        got = converted(torch.tensor([ids]), pos)[0]
    return {
        "delegate": backend.name,
        "scheme": cfg.scheme,
        "group_size": cfg.group_size if cfg.scheme.endswith("-block") else None,
        "checkpoint": str(src.checkpoint.path),
        "text": {"file": str(text), "tokens": len(ids)},
        "calibration": {"file": str(calib), "windows": len(windows), "tokens_each": n},
        "accuracy": compare(ref, got, torch.tensor(ids)),
        "note": "fake-quant simulation of the delegate's PT2E recipe on whole-sequence attention; "
                "the device kernels and KV-cache quantization are not simulated",
    }
