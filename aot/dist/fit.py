"""`aot pull --device soc=SM8650,ram=8GiB,abi=arm64-v8a`: the target in an index that suits a phone.

A target fits when the phone can run its delegate (qnn: a Qualcomm SM* SoC, the bundle's own;
mediatek: a MediaTek mt* SoC, the bundle's own; xnnpack: any CPU whose ABI the bundle lists) and
its runtime plan at load is within `ram` (the memory the app may use, as `aot build --device-memory`).
Of those, the best: an NPU bundle for the phone's own SoC, then the longest context, then the least
memory. The answer says why, and why each other target was passed over.
"""

from __future__ import annotations

from dataclasses import dataclass

from aot.errors import ConfigError, NoTargetFits
from aot.memplan import size
from aot.preflight import parse_size

_NPUS = {"qnn": ("sm", "Qualcomm (soc=SM...)"), "mediatek": ("mt", "MediaTek (soc=mt...)")}
_KEYS = ("soc", "ram", "abi")


@dataclass(frozen=True)
class Device:
    ram: int  # bytes the app may use
    soc: str | None = None
    abi: str | None = None
    text: str = ""


def parse_device(text: str) -> Device:
    given = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in _KEYS or not value.strip():
            raise ConfigError(f"--device {text}: each part is KEY=VALUE with KEY one of {', '.join(_KEYS)}, "
                              f"but got '{part}' (e.g. soc=SM8650,ram=8GiB,abi=arm64-v8a)")
        given[key] = value.strip()
    if "ram" not in given:
        raise ConfigError(f"--device {text}: give ram=SIZE, the memory the app may use (e.g. ram=8GiB)")
    if "soc" not in given and "abi" not in given:
        raise ConfigError(f"--device {text}: give soc=... (NPU bundles) and/or abi=... (CPU bundles, e.g. arm64-v8a)")
    try:
        ram = parse_size(given["ram"])
    except ValueError as e:
        raise ConfigError(str(e).replace("--device-memory", f"--device ram=")) from None
    return Device(ram=ram, soc=given.get("soc"), abi=given.get("abi"), text=text)


def choose(targets: list[dict], device: Device) -> dict:
    """{"target": name, "why": ..., "rejected": [{"name", "reason"}]}; NoTargetFits when none fits."""
    fits, rejected = [], []
    for t in targets:
        reason = _cannot_run(t, device)
        if reason:
            rejected.append({"name": t["name"], "reason": reason})
        else:
            fits.append(t)
    if not fits:
        raise NoTargetFits(f"--device {device.text}: no target fits: "
                           + "; ".join(f"{r['name']}: {r['reason']}" for r in rejected))
    ranked = sorted(fits, key=lambda t: (not _npu(t), -_ctx(t), t["memory"]["at_load_bytes"], t["name"]))
    best = ranked[0]
    for t in ranked[1:]:
        rejected.append({"name": t["name"], "reason": f"fits, but {_worse(t, best)}"})
    return {"target": best["name"], "why": _why(best, ranked, device), "rejected": rejected}


def _cannot_run(t: dict, device: Device) -> str | None:
    d = t["device"]
    delegate = d["delegate"]
    if delegate in _NPUS:
        prefix, vendor = _NPUS[delegate]
        if not device.soc or not device.soc.lower().startswith(prefix):
            return f"a {delegate} bundle for {d.get('soc')}: needs a {vendor} SoC"
        if device.soc.lower() != str(d.get("soc")).lower():
            return f"a {delegate} bundle for {d.get('soc')}, not {device.soc}"
    elif d.get("soc") is None:  # a CPU bundle (xnnpack)
        if not device.abi:
            return f"a CPU ({delegate}) bundle: give abi=... ({', '.join(d.get('abis') or [])})"
        if device.abi not in (d.get("abis") or []):
            return f"built for {', '.join(d.get('abis') or []) or 'no ABI'}, not {device.abi}"
    else:
        return f"delegate '{delegate}' is not one this aot can place on a device"
    at_load = t["memory"]["at_load_bytes"]
    if at_load is None:
        return "the index gives no runtime memory plan to check against ram"
    if at_load > device.ram:
        return f"needs {size(at_load)} at load, more than ram {size(device.ram)}"
    return None


def _npu(t: dict) -> bool:
    return t["device"]["delegate"] in _NPUS


def _ctx(t: dict) -> int:
    return t["context"]["max_context_len"]


def _worse(t: dict, best: dict) -> str:
    if _npu(best) and not _npu(t):
        return f"{best['name']} runs on the SoC's NPU"
    if _ctx(best) > _ctx(t):
        return f"{best['name']} has a longer context ({_ctx(best)} vs {_ctx(t)} positions)"
    return f"{best['name']} needs less memory ({size(best['memory']['at_load_bytes'])} vs " \
           f"{size(t['memory']['at_load_bytes'])})"


def _why(best: dict, ranked: list[dict], device: Device) -> str:
    where = f"on {device.soc}'s NPU" if _npu(best) else f"on the CPU ({device.abi})"
    what = (f"{best['device']['delegate']} {where}, {_ctx(best)} positions, {size(best['memory']['at_load_bytes'])} "
            f"at load of ram {size(device.ram)}")
    if len(ranked) == 1:
        return f"{what}: the only target that fits"
    runner_up = ranked[1]
    if _npu(best) and not _npu(runner_up):
        return f"{what}: an NPU bundle for this SoC is preferred over CPU bundles"
    if _ctx(best) > _ctx(runner_up):
        return f"{what}: the longest context of the {len(ranked)} that fit"
    return f"{what}: the least memory of the {len(ranked)} that fit with this context"
