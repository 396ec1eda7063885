"""adb[:SERIAL]: an Android phone, running ExecuTorch's native LLM runner (llama_main).

aot cannot build llama_main here (ExecuTorch's Android build, arm64-v8a); the user supplies it
with --device-runner FILE. Files go to /data/local/tmp/aot/<bundle>/, skipped when the device
already has them with the same sha256. The runner prints the generated text and one stats line,
`PyTorchObserver {json}` (ExecuTorch's Stats::to_json_string), which `parse_observer` reads into the
same speed figures as the other transports.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from aot.devices.base import Completed, Device, quote, run_local
from aot.errors import ConfigError, DeviceError

DEVICE_ROOT = "/data/local/tmp/aot"
OBSERVER = "PyTorchObserver "


def find_adb(given: str | None) -> str:
    adb = given or os.environ.get("ADB") or shutil.which("adb")
    if adb is None:
        raise DeviceError("--device adb: the adb client is not installed; install Android's platform-tools "
                          "(or `pip install adbutils`, which ships it) and put adb on PATH, or pass --adb PATH")
    return adb


class AdbDevice(Device):
    kind = "adb"

    def __init__(self, spec: str, adb: str | None = None, timeout: float = 60.0):
        self.name, self.timeout = spec, timeout
        self.adb = find_adb(adb)
        serial = spec.partition(":")[2] or None
        attached = self.devices()
        if serial is None:
            if not attached:
                raise DeviceError("--device adb: no Android device is attached (`adb devices` lists none); "
                                  "connect one with USB debugging on and accept its prompt, then check `adb devices`")
            if len(attached) > 1:
                raise DeviceError(f"--device adb: {len(attached)} devices are attached ({', '.join(attached)}); "
                                  "pick one with --device adb:SERIAL")
            serial = next(iter(attached))
        elif serial not in attached:
            listed = ", ".join(f"{s} ({state})" for s, state in attached.items()) or "none"
            raise DeviceError(f"--device {spec}: no such device attached (`adb devices` lists: {listed})")
        if attached[serial] != "device":
            raise DeviceError(f"--device adb:{serial} is '{attached[serial]}', not ready; unlock it and accept "
                              "the USB debugging prompt (unauthorized), or reconnect it (offline)")
        self.serial = serial

    def devices(self) -> dict[str, str]:
        """serial -> state from `adb devices` (starts adb's server if needed; bounded by a timeout)."""
        done = run_local([self.adb, "devices"], min(self.timeout, 30), "adb devices")
        if done.code != 0:
            raise DeviceError(f"--device {self.name}: `adb devices` failed: {done.stderr.strip() or done.code}")
        out = {}
        for line in done.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
        return out

    def _adb(self, *args: str, timeout: float | None = None) -> Completed:
        return run_local([self.adb, "-s", self.serial, *args], timeout or self.timeout, f"--device adb:{self.serial}")

    def run(self, command: str, timeout: float | None = None) -> Completed:
        return self._adb("shell", command, timeout=timeout)

    def push(self, local: Path, remote: str) -> None:
        done = self._adb("push", str(local), remote, timeout=max(self.timeout, 600))
        if done.code != 0:
            raise DeviceError(f"--device adb:{self.serial}: pushing {local.name} failed: {done.stderr.strip()}")

    def pull(self, remote: str, local: Path) -> None:
        done = self._adb("pull", remote, str(local))
        if done.code != 0:
            raise DeviceError(f"--device adb:{self.serial}: pulling {remote} failed: {done.stderr.strip()}")

    def describe(self) -> dict:
        cores = self.run("nproc").stdout.strip()
        return {"transport": "adb", "name": f"adb:{self.serial}",
                **android_info(parse_getprop(self.run("getprop").stdout), self.run("cat /proc/meminfo").stdout),
                "cores": int(cores) if cores.isdigit() else None}


def parse_getprop(text: str) -> dict[str, str]:
    """`getprop`'s "[key]: [value]" lines -> dict."""
    props = {}
    for line in text.splitlines():
        if line.startswith("[") and "]: [" in line:
            key, _, value = line[1:].partition("]: [")
            props[key] = value.rstrip("]")
    return props


def android_info(props: dict, meminfo: str) -> dict:
    """The device description from its properties and /proc/meminfo (adb and farm results alike)."""
    mem = next((ln.split() for ln in meminfo.splitlines() if ln.startswith("MemTotal")), [])
    return {
        "model": f"{props.get('ro.product.manufacturer', '')} {props.get('ro.product.model', '')}".strip(),
        "soc": f"{props.get('ro.soc.manufacturer', '')} {props.get('ro.soc.model', '')}".strip()
        or props.get("ro.board.platform", ""),
        "abi": props.get("ro.product.cpu.abi", ""),
        "android": props.get("ro.build.version.release", ""),
        "sdk": props.get("ro.build.version.sdk", ""),
        "memory_mib": round(int(mem[1]) / 1024) if len(mem) > 1 and mem[1].isdigit() else None,
    }


def require_runner(runner: Path | None) -> Path:
    if runner is None:
        raise ConfigError("--device adb needs --device-runner FILE: ExecuTorch's llama_main built for "
                          "arm64-v8a (its Android build: examples/models/llama, see README 'Validate on devices')")
    runner = Path(runner).expanduser()
    if not runner.is_file():
        raise ConfigError(f"--device-runner {runner}: no such file")
    return runner


def runner_command(directory: str, tokenizer: str, prompt: str, seq_len: int, threads: int | None = None,
                   data: str | None = None) -> str:
    """llama_main's command line: greedy, the prompt as text, seq_len positions in all (prompt +
    generated: its --seq_len), on --cpu_threads threads (default: its performant cores), with the
    external weights file `data` (--data_paths) when the bundle has one."""
    return (f"cd {quote(directory)} && ./llama_main --model_path=model.pte --tokenizer_path={quote(tokenizer)} "
            + (f"--data_paths={quote(data)} " if data else "")
            + f"--prompt={quote(prompt)} --temperature=0 --seq_len={seq_len}"
            + (f" --cpu_threads={threads}" if threads else ""))


def parse_observer(output: str) -> dict:
    """The runner's stats line -> speed figures (ExecuTorch's own report arithmetic, in seconds)."""
    line = next((ln for ln in reversed(output.splitlines()) if OBSERVER in ln), None)
    if line is None:
        raise DeviceError(f"the device runner printed no '{OBSERVER.strip()}' stats line; is it ExecuTorch's "
                          "llama_main? Its output ended: " + " | ".join(output.strip().splitlines()[-3:]))
    stats = json.loads(line.split(OBSERVER, 1)[1])
    unit = stats.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000)

    def seconds(a: str, b: str) -> float:
        return (stats[b] - stats[a]) / unit

    prompt, generated = stats["prompt_tokens"], stats["generated_tokens"]
    prefill_s, decode_s = seconds("inference_start_ms", "prompt_eval_end_ms"), seconds("prompt_eval_end_ms", "inference_end_ms")
    return {
        "prompt_tokens": prompt,
        "generated_tokens": generated,
        "load_s": round(seconds("model_load_start_ms", "model_load_end_ms"), 4),
        "ttft_s": round(seconds("inference_start_ms", "first_token_ms"), 4),
        "prefill_tps": round(prompt / prefill_s, 2) if prefill_s > 0 else 0.0,
        "decode_tps": round(generated / decode_s, 2) if decode_s > 0 else 0.0,
        "sampling_s": round(stats.get("aggregate_sampling_time_ms", 0) / unit, 4),
        "raw": stats,
    }


def generated_text(output: str, prompt: str) -> str:
    """llama_main's generated text: what it printed before the stats line, less an echoed prompt."""
    text = output.split(OBSERVER, 1)[0]
    text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(("I ", "E ", "W ", "[")))
    return text[len(prompt):] if text.startswith(prompt) else text
