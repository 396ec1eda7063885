"""`aot validate`'s one entry point, on this host or on a device, and what failed gates mean.

The host scores teacher-forced logits against the reference (aot.validate); a device runs greedy
generation and is gated on agreement with the host and on speed (aot.ondevice). Which one runs is
decided by the configs given, so the CLI only builds them.
"""

from __future__ import annotations

from pathlib import Path

from aot import ondevice
from aot.bundle import open_bundle
from aot.errors import ConfigError, GatesFailed
from aot.files import write_atomically
from aot.metrics import junit_xml
from aot.ondevice import DeviceConfig
from aot.progress import Stages
from aot.texts import text_file
from aot.validate import validate

TEACHER_FORCED = ("max_ppl_ratio", "min_top1", "max_kl")  # gates scored on the host's logits


def device_config(device: str, gates, **options):
    """aot.ondevice.DeviceConfig for `device`, gated by the speed thresholds of `gates` (Gates);
    a teacher-forced gate there is a ConfigError: the device does not produce logits to score."""

    teacher_forced = [k for k in TEACHER_FORCED if getattr(gates, k) is not None]
    if teacher_forced:
        raise ConfigError(f"--{teacher_forced[0].replace('_', '-')} is scored on the host (teacher-forced "
                          "logits); run `aot validate` without --device for it, and gate the device on "
                          "--min-device-agreement and speed")
    return DeviceConfig(device=device, min_prefill_tps=gates.min_prefill_tps, min_decode_tps=gates.min_decode_tps,
                        **options)


def validate_bundle(path: Path, cfg, device=None, stages=None, images: list[Path] | None = None,
                    junit: Path | None = None, adapter: str | None = None) -> dict:
    """Validate the bundle at `path`: on this host with `cfg` (ValidateConfig), or with `device`
    (DeviceConfig) on it, taking the reference and the text from `cfg`. With `junit`, also write
    the JUnit XML there (one testcase per gate)."""
    stages = stages or Stages()
    if device is None:
        result, to_xml = validate(open_bundle(path).with_adapter(adapter), cfg, stages, images=images), junit_xml
    else:
        result = ondevice.validate_on_device(open_bundle(path).with_adapter(adapter), device, text_file(cfg.text), cfg.reference, stages)
        to_xml = ondevice.junit_xml
    if junit is not None:
        write_atomically(junit, to_xml(result))
    return result


def raise_if_gates_failed(result: dict, result_printed: bool = False) -> None:
    """GatesFailed (exit 9) naming each failed gate, when `result["ok"]` is false;
    `result_printed`: the --json result on stdout says so already."""
    if not result["ok"]:
        failed = [g for g in result["gates"] if not g["ok"]]
        error = GatesFailed("gates failed: " + "; ".join(
            f"{g['name']}: {g['value']} not {g['op']} {g['threshold']}"
            + (f" ({g['hint']})" if g.get("hint") else "") for g in failed))
        error.result_printed = result_printed
        raise error
