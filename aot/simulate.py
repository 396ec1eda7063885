"""`aot simulate`: an NPU delegate's quantization recipe, run on the host in fake-quant.

Before touching a device (or without the vendor SDK at all), a team can see what the recipe costs
in accuracy: the model as the device runs it (static prefill and decode graphs sharing the KV cache,
aot.backends.static), the delegate's PT2E quantizer (QnnQuantizer or NeuropilotQuantizer), calibration on text,
convert, then the same metrics as `aot validate` against the fp32 model on held-out text: the first
--prefill-len tokens in one prefill call, the rest one decode call each.

The evaluated tokens are the first --max-tokens of --text; calibration uses --calibration-windows
windows of the same length from --calibration, skipping the evaluated tokens when both are the
same file, so the model is never calibrated on what it is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from aot.backends import get_backend
from aot.backends.static import export_static, quantize_static, windows_from
from aot.config import delegate_errors
from aot.errors import ConfigError
from aot.families.text.family import TextFamily
from aot.metrics import compare
from aot.native import native_output_silenced
from aot.texts import DEMO_CHECKPOINT, text_file
from aot.tokenizer import find_tokenizer, load_tokenizer, tokenizer_info


@dataclass(frozen=True)
class SimulateConfig:
    delegate: str
    checkpoint: Path | None = None  # --model demo: the embedded demo model
    scheme: str = "16a4w"  # the NPU delegates' first (qnn, mediatek)
    text: Path | None = None
    calibration: Path | None = None
    max_tokens: int = 256
    calibration_windows: int = 8
    group_size: int = 32  # block size of block-wise schemes
    prefill_len: int | None = None  # default: half of max_tokens
    kv_bits: int | None = None  # the old spelling of kv_cache (8 or 16)
    kv_cache: str | None = None  # int8 or int16; default: the activations' width
    soc: str | None = None  # recorded; the simulation is the same for every chip
    model: str | None = None  # only "demo" (the embedded model) stands in for --checkpoint

    def __post_init__(self):
        if self.checkpoint is None:
            if self.model != "demo":
                raise ConfigError("give --checkpoint DIR, or --model demo for the embedded demo model")
            object.__setattr__(self, "checkpoint", DEMO_CHECKPOINT)
        if self.kv_cache is not None:
            bits = {"int8": 8, "int16": 16}.get(self.kv_cache)
            if bits is None or (self.kv_bits is not None and self.kv_bits != bits):
                raise ConfigError(f"--kv-cache {self.kv_cache}: the NPU recipes store int8 or int16"
                                  + (f", and --kv-bits {self.kv_bits} disagrees" if bits else ""))
            object.__setattr__(self, "kv_bits", bits)


def simulate(cfg: SimulateConfig, stages) -> dict:
    backend = get_backend(cfg.delegate)
    if not backend.static_shapes:
        raise ConfigError(f"--delegate {backend.name}: nothing to simulate, its bundles run here; use `aot validate`")
    errors = delegate_errors(backend, cfg.scheme, cfg.soc, cfg.kv_bits)
    if errors:
        raise ConfigError("; ".join(errors))
    n = cfg.max_tokens
    P = cfg.prefill_len if cfg.prefill_len is not None else n // 2
    if n < 2 or cfg.calibration_windows < 1 or not 1 <= P < n:
        raise ConfigError("--max-tokens must be >= 2, --calibration-windows >= 1 and --prefill-len between 1 "
                          f"and --max-tokens - 1, but got {n}, {cfg.calibration_windows}, {P}")
    soc = cfg.soc or backend.socs()[0]
    text, calib = text_file(cfg.text), text_file(cfg.calibration or cfg.text)

    with stages.stage("load", "fp32"):
        family = TextFamily()
        ckpt = family.reference_checkpoint(cfg.checkpoint)
        tok_path = find_tokenizer(ckpt.path, None)
        if tok_path is None:
            raise ConfigError(f"--checkpoint {cfg.checkpoint}: has no tokenizer to read --text with")
        info = tokenizer_info(tok_path, ckpt.path if ckpt.layout == "hf" else None)
        tok, _ = load_tokenizer(info.path)
        model = family.reference(ckpt, n, full_logits=True)

        def encode(path: Path) -> list[int]:
            return [info.bos_id] + list(tok.encode(path.read_text(errors="replace"), 0, 0))

        ids = encode(text)[:n]
        if len(ids) < n:
            raise ConfigError(f"--text {text}: has {len(ids)} tokens, fewer than --max-tokens {n}")
        windows = windows_from(encode(calib)[n if calib == text else 0 :], n, cfg.calibration_windows)
        if not windows:
            raise ConfigError(f"--calibration {calib}: needs at least {n} tokens beyond the evaluated ones")
    with stages.stage("reference", "fp32"), torch.no_grad():
        ref = model(torch.tensor([ids]), torch.tensor([0]))[0]
        model.reset_cache()
    model.use_static_attention()
    with stages.stage("export", f"prefill [1, {P}], decode [1, 1]"):
        pair = export_static(model, P)
    pair = quantize_static(pair, backend, cfg.scheme, cfg.group_size, cfg.kv_bits, windows, stages)
    with stages.stage("simulate", f"prefill {P} + decode {n - P}"), torch.no_grad(), native_output_silenced():
        got = pair.run(ids)
    target = torch.tensor(ids)
    return {
        "delegate": backend.name,
        "soc": soc,
        "scheme": cfg.scheme,
        "group_size": cfg.group_size if cfg.scheme.endswith("-block") else None,
        "kv_bits": cfg.kv_bits,
        "prefill_len": P,
        "checkpoint": str(ckpt.path),
        "text": {"file": str(text), "tokens": len(ids)},
        "calibration": {"file": str(calib), "windows": len(windows), "tokens_each": n},
        "accuracy": compare(ref, got, target),
        # Positions scored by the prefill graph, and by the decode graph reading the shared cache.
        "accuracy_prefill": compare(ref[:P], got[:P], target[:P]),
        "accuracy_decode": compare(ref[P - 1 :], got[P - 1 :], target[P - 1 :]),
        "note": "fake-quant simulation of the delegate's PT2E recipe on the static prefill/decode graphs; "
                "the device's kernels and accumulation are not simulated",
    }
