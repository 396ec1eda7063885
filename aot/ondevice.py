"""`aot validate --device ssh://... | adb[:SERIAL]`: the bundle on the device it will ship to.

Correctness: K prompts cut from the validation text; the device's greedy continuation of N tokens
is compared with the same bundle's continuation on this host and (when the reference checkpoint
is at hand) with the fp32 reference model's: matched-prefix agreement and the first divergence.
Speed: the device's load time, time to first token, prefill and decode tok/s (median, min, max
over repeats), peak RSS of the runner process, thermal zones before and after.

ssh devices run aot/runner/device_runner.py (ExecuTorch's pybind runtime, token ids in and out; the
host baseline runs the same code). Android runs ExecuTorch's native llama_main (text in and out,
stats from its PyTorchObserver line); its host baseline is ExecuTorch's same C++ runner through
its Python bindings (StockEngine).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from aot.bundle import Bundle
from aot.devices import open_device, quote
from aot.devices.adb import DEVICE_ROOT, generated_text, parse_observer, require_runner, runner_command
from aot.errors import ConfigError, DeviceError
from aot.families.text.checkpoint import open_checkpoint
from aot.families.text.family import TextFamily
from aot.files import sha256_file
from aot.metrics import junit_suite
from aot.native import native_output_silenced
from aot.runner import device_runner
from aot.runner.engines import StockEngine
from aot.runner.text import TokenBytes
from aot.speed import fit_lengths, summary
from aot.tokenizer import load_tokenizer

RUNNER_SCRIPT = Path(device_runner.__file__)  # the one file copied to ssh devices
DEFAULT_MIN_AGREEMENT = 1.0  # the same program on the same ISA family: greedy tokens should match
# Device prompts' tokens (after BOS) and greedy tokens when not given: shrunk to fit a short context.
PROMPT_TOKENS, NEW_TOKENS = 32, 32
FLAGS = ("--device-prompt-tokens", "--new-tokens")


@dataclass(frozen=True)
class DeviceConfig:
    device: str
    prompts: int = 3
    prompt_tokens: int | None = None  # None: PROMPT_TOKENS, or what fits the bundle's context
    new_tokens: int | None = None  # None: NEW_TOKENS, or what fits
    repeats: int = 3
    runner: Path | None = None  # adb: ExecuTorch's llama_main for the device
    python: str = "python3"  # ssh: the device's Python with the ExecuTorch wheel
    ssh_options: tuple[str, ...] = ()
    adb: str | None = None
    timeout: float = 600.0
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    min_prefill_tps: float | None = None
    min_decode_tps: float | None = None
    skip_speed: bool = False

    def __post_init__(self):
        for name in ("prompts", "prompt_tokens", "new_tokens", "repeats"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(self, name)}")
        if not 0 <= self.min_agreement <= 1:
            raise ConfigError(f"--min-device-agreement must be between 0 and 1, but got {self.min_agreement}")


def device_lengths(bundle: Bundle, prompt_tokens: int | None, new_tokens: int | None) -> tuple[int, int, bool]:
    """(prompt tokens after BOS, new tokens, whether a default was shrunk) that fit the bundle's context."""
    return fit_lengths(bundle.manifest["export"]["max_context_len"], prompt_tokens, new_tokens,
                       (PROMPT_TOKENS, NEW_TOKENS), FLAGS)


def llama_main_lengths(prompt_tokens: int, new_tokens: int, context: int, slack: int = 0) -> tuple[int, int]:
    """(--seq_len, --max_new_tokens) for llama_main: a prompt of `prompt_tokens` (BOS included) and
    `new_tokens` more (plus `slack`, for a prompt that re-tokenizes longer), within the context.
    Both flags: ExecuTorch 1.5.1's runner takes a program whose max_seq_len is below its context for
    a sliding-window one and lets --seq_len alone run up to seq_len new tokens, past the context."""
    return min(prompt_tokens + new_tokens + slack, context), min(new_tokens + slack, context - prompt_tokens)


def prompts_from_text(ids: list[int], count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens (after BOS), spread evenly over the text's ids."""
    bos, body = ids[0], ids[1:]
    if len(body) < length:
        raise ConfigError(f"--text has {len(body)} tokens; each device prompt needs {length} (lower --device-prompt-tokens)")
    step = max(1, (len(body) - length) // max(count - 1, 1))
    starts = sorted({min(i * step, len(body) - length) for i in range(count)})
    return [[bos] + body[s : s + length] for s in starts]


def agreement(expected: list[int], got: list[int]) -> tuple[float, int | None]:
    """Matched-prefix fraction of `expected`, and the first position where they differ."""
    n = len(expected)
    for i in range(max(n, len(got))):
        if i >= n or i >= len(got) or expected[i] != got[i]:
            return (i / n if n else 1.0), i
    return 1.0, None


def reference_continuations(bundle: Bundle, reference: Path | None, prompts: list[list[int]], n: int) -> tuple[dict | None, list | None]:
    """Greedy continuations of the fp32 reference checkpoint (None when there is none to use)."""
    recorded = bundle.manifest.get("checkpoint")
    path = reference or (Path(recorded["path"]) if recorded else None)
    if path is None or not Path(path).exists():
        return None, None
    ckpt = open_checkpoint(path)
    if ckpt.prequantized is not None:
        return None, None
    context = max(len(p) for p in prompts) + n
    model = TextFamily().reference(ckpt, context)
    eos = set(bundle.manifest.get("eos_ids", []))
    out = []
    with torch.no_grad(), native_output_silenced():
        for prompt in prompts:
            model.reset_cache()
            logits = model(torch.tensor([prompt]), torch.tensor([0]))
            generated, pos = [], len(prompt)
            for _ in range(n):
                token = int(logits.reshape(-1, logits.shape[-1])[-1].argmax())
                generated.append(token)
                if token in eos:
                    break
                logits = model(torch.tensor([[token]]), torch.tensor([pos]))
                pos += 1
            out.append(generated)
    return {"checkpoint": str(ckpt.path), "layout": ckpt.layout}, out


def validate_on_device(bundle: Bundle, cfg: DeviceConfig, text: Path, reference: Path | None, stages) -> dict:
    bundle.require_host_runnable()
    bundle.require_text_runner("--device validation (llama_main, device_runner.py)")
    if cfg.device.startswith("adb"):
        require_runner(cfg.runner)  # a config error before any device is touched
    asked = (cfg.prompt_tokens or PROMPT_TOKENS, cfg.new_tokens or NEW_TOKENS)
    p, n, shrunk = device_lengths(bundle, cfg.prompt_tokens, cfg.new_tokens)
    cfg = replace(cfg, prompt_tokens=p, new_tokens=n)
    with stages.stage("connect", cfg.device):
        device = open_device(cfg.device, cfg.ssh_options, cfg.adb, min(cfg.timeout, 60))
        info = device.describe()
    tokenizer, _ = load_tokenizer(bundle.tokenizer)
    bos = bundle.manifest["bos_id"]
    ids = [bos] + list(tokenizer.encode(text.read_text(errors="replace"), 0, 0))
    prompts = prompts_from_text(ids, cfg.prompts, cfg.prompt_tokens)
    runs = 1 if cfg.skip_speed else cfg.repeats
    request = {"pte": "model.pte", "prompts": prompts, "new_tokens": cfg.new_tokens, "repeats": runs}
    if bundle.data_path is not None:
        request["data"] = bundle.data_path.name
    if device.kind == "adb":
        host_tokens, result, runner = _run_adb(bundle, device, cfg, tokenizer, prompts, stages)
    else:
        with stages.stage("host baseline", f"{len(prompts)} prompts"):
            with native_output_silenced():
                here = device_runner.run({**request, "pte": str(bundle.pte), "repeats": 1,
                                          **({"data": str(bundle.data_path)} if bundle.data_path else {})})
            if not here["ok"]:
                raise DeviceError(f"this host could not run {bundle.pte}: {here['message']}")
            host_tokens = here["tokens"]
        result, runner = _run_ssh(bundle, device, cfg, request, stages)
    with stages.stage("reference", "fp32 eager greedy"):
        ref_info, ref_tokens = reference_continuations(bundle, reference, prompts, cfg.new_tokens)
    rows = []
    for i, prompt in enumerate(prompts):
        dev = result["tokens"][i]
        agree, diverge = agreement(host_tokens[i], dev)
        row = {"prompt": i, "prompt_tokens": len(prompt), "device_tokens": dev, "host_tokens": host_tokens[i],
               "agreement_host": round(agree, 4), "first_divergence_host": diverge}
        if result.get("stop_reasons"):
            row["stop_reason"] = result["stop_reasons"][i]
        if ref_tokens is not None:
            r_agree, r_div = agreement(ref_tokens[i], dev)
            row.update(reference_tokens=ref_tokens[i], agreement_reference=round(r_agree, 4),
                       first_divergence_reference=r_div)
        rows.append(row)
    gates = device_gates(cfg, rows, result.get("speed"))
    return {
        "bundle": str(bundle.root),
        "model": bundle.manifest["model"]["name"],
        "quant": bundle.manifest["quant"]["scheme"],
        "device": {**info, **({"runtime": result["device"]} if "device" in result else {})},
        "runner": runner,
        "text": {"file": str(text), "prompts": len(prompts), "prompt_tokens": cfg.prompt_tokens,
                 "new_tokens": cfg.new_tokens, "prompt_tokens_requested": asked[0], "new_tokens_requested": asked[1],
                 "defaults_shrunk": shrunk},
        "reference": ref_info,
        "prompts": rows,
        "speed": None if cfg.skip_speed else result.get("speed"),
        "thermal": result.get("thermal"),
        "gates": gates,
        "ok": all(g["ok"] for g in gates),
    }


def device_gates(cfg: DeviceConfig, rows: list[dict], speed: dict | None) -> list[dict]:
    gates = [agreement_gate(r, cfg.min_agreement) for r in rows]
    for name, key, threshold in (("min_prefill_tps", "prefill_tps", cfg.min_prefill_tps),
                                 ("min_decode_tps", "decode_tps", cfg.min_decode_tps)):
        if threshold is None:
            continue
        if speed is None:
            raise ConfigError(f"--{name.replace('_', '-')} needs the speed runs; drop --skip-speed")
        gates.append(speed_gate(name, speed[key]["median"], threshold))
    return gates


def agreement_gate(row: dict, threshold: float) -> dict:
    """A prompt's device-vs-host gate (also `aot farm collect`'s); a row with a `problem` (no
    usable runner output) fails with it as the hint."""
    problem = row.get("problem")
    return {"name": f"prompt{row['prompt']}.agreement_host", "value": row["agreement_host"], "threshold": threshold,
            "op": ">=", "ok": problem is None and row["agreement_host"] >= threshold,
            "hint": problem or f"the device's tokens leave the host's at position {row['first_divergence_host']}"}


def speed_gate(name: str, value: float, threshold: float) -> dict:
    return {"name": name, "value": value, "threshold": threshold, "op": ">=", "ok": value >= threshold}


def _remote_dir(bundle: Bundle, root: str) -> str:
    return f"{root}/{bundle.manifest['files']['model.pte']['sha256'][:16]}"


def _push_if_changed(device, local: Path, remote: str) -> bool:
    if device.sha256(remote) == sha256_file(local):
        return False
    device.push(local, remote)
    return True


def _run_ssh(bundle: Bundle, device, cfg: DeviceConfig, request: dict, stages) -> tuple[dict, dict]:
    directory = _remote_dir(bundle, ".cache/aot")
    with stages.stage("push", device.name):
        done = device.run(f"mkdir -p {quote(directory)}")
        if done.code != 0:
            raise DeviceError(f"--device {device.name}: cannot create ~/{directory}: {done.stderr.strip()}")
        pushed = _push_if_changed(device, bundle.pte, f"{directory}/model.pte")
        if bundle.data_path is not None:
            pushed |= _push_if_changed(device, bundle.data_path, f"{directory}/{bundle.data_path.name}")
        _push_if_changed(device, RUNNER_SCRIPT, f"{directory}/device_runner.py")
        with tempfile.TemporaryDirectory(prefix="aot-device-") as tmp:
            req = Path(tmp) / "request.json"
            req.write_text(json.dumps(request))
            device.push(req, f"{directory}/request.json")
    with stages.stage("run on device", f"{len(request['prompts'])} prompts x {request['repeats']}"):
        done = device.run(f"cd {quote(directory)} && {cfg.python} device_runner.py request.json result.json",
                          timeout=cfg.timeout)
        if done.code == 127:
            raise DeviceError(f"--device {device.name}: '{cfg.python}' is not on the device; install Python 3 "
                              "there or pass --device-python PATH")
        with tempfile.TemporaryDirectory(prefix="aot-device-") as tmp:
            local = Path(tmp) / "result.json"
            try:
                device.pull(f"{directory}/result.json", local)
                result = json.loads(local.read_text())
            except (DeviceError, json.JSONDecodeError):
                tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [f"exit code {done.code}"]
                raise DeviceError(f"--device {device.name}: the device runner wrote no result ({tail[0]})") from None
    if not result.get("ok"):
        hint = {"runtime": f"install the ExecuTorch wheel there (`{cfg.python} -m pip install executorch`) or pass "
                           "--device-python PATH to a Python that has it",
                "load": "the device's ExecuTorch may be older than the one that built the bundle; match versions",
                "context": f"lower {FLAGS[0]} or {FLAGS[1]}"}
        raise DeviceError(f"--device {device.name}: {result.get('message')}; "
                          + hint.get(result.get("error"), "rerun with --debug"))
    runner = {"kind": "aot device_runner.py (ExecuTorch pybind)", "sha256": sha256_file(RUNNER_SCRIPT),
              "python": cfg.python, "executorch": result.get("runtime", {}).get("executorch"),
              "model_pushed": pushed}
    return result, runner


def _run_adb(bundle: Bundle, device, cfg: DeviceConfig, tokenizer, prompts, stages):
    runner_path = Path(cfg.runner).expanduser()
    token_bytes = TokenBytes(bundle.tokenizer)
    texts = [token_bytes(p[1:]).decode("utf-8", errors="ignore") for p in prompts]
    encode = lambda s: list(tokenizer.encode(s, 0, 0))[: cfg.new_tokens]  # noqa: E731
    with stages.stage("host baseline", "ExecuTorch's C++ runner"):
        engine = StockEngine(bundle)
        host = [encode(engine.generate(t, cfg.new_tokens).text) for t in texts]
    directory = _remote_dir(bundle, DEVICE_ROOT)
    with stages.stage("push", device.name):
        device.run(f"mkdir -p {quote(directory)}")
        _push_if_changed(device, bundle.pte, f"{directory}/model.pte")
        if bundle.data_path is not None:
            _push_if_changed(device, bundle.data_path, f"{directory}/{bundle.data_path.name}")
        _push_if_changed(device, bundle.tokenizer, f"{directory}/{bundle.tokenizer.name}")
        _push_if_changed(device, runner_path, f"{directory}/llama_main")
        device.run(f"chmod 755 {quote(directory)}/llama_main")
    tokens, stats = [], []
    with stages.stage("run on device", f"{len(texts)} prompts x {cfg.repeats}"):
        for repeat in range(1 if cfg.skip_speed else cfg.repeats):
            for i, prompt in enumerate(texts):
                seq_len, max_new = llama_main_lengths(len(prompts[i]), cfg.new_tokens,
                                                      bundle.manifest["export"]["max_context_len"])
                command = runner_command(directory, bundle.tokenizer.name, prompt, seq_len,
                                         data=bundle.data_path.name if bundle.data_path else None)
                done = device.run(f"{command} --max_new_tokens={max_new}", timeout=cfg.timeout)
                if done.code != 0:
                    tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or [str(done.code)]
                    raise DeviceError(f"--device {device.name}: llama_main failed: {tail[0]}")
                stats.append(parse_observer(done.stdout))
                if repeat == 0:
                    tokens.append(encode(generated_text(done.stdout, prompt)))

    speed = {
        "load_s": stats[0]["load_s"],
        "ttft_ms": summary([s["ttft_s"] * 1000 for s in stats]),
        "prefill_tps": summary([s["prefill_tps"] for s in stats]),
        "decode_tps": summary([s["decode_tps"] for s in stats]),
        "runs": len(stats),
        "peak_rss_mib": None,  # llama_main's stats line does not carry it
    }
    runner = {"kind": "ExecuTorch llama_main", "path": str(runner_path), "sha256": sha256_file(runner_path)}
    return host, {"ok": True, "tokens": tokens, "speed": speed}, runner


def junit_xml(result: dict) -> str:
    """One testcase per device x prompt x check (and per speed gate)."""
    device = result["device"].get("name", "device")
    properties = {f"device.{k}": v for k, v in result["device"].items() if not isinstance(v, dict)}
    for key, value in (result["speed"] or {}).items():
        properties[f"speed.{key}"] = value["median"] if isinstance(value, dict) else value
    return junit_suite(f"aot.validate.device.{device}", properties,
                       [(f"{device}.{result['model']}", g) for g in result["gates"]])
