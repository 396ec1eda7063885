"""Device farms: `aot farm package` and `aot farm collect`.

package: one folder and zip archive per manifest target holding what a farm host needs to validate
the bundle on each device of a pool, with nothing but `adb` and a POSIX shell: model.pte, the
tokenizer, ExecuTorch's llama_main (--device-runner), the prompts, the host's expected greedy tokens
and the gates (expected.json), run_on_device.sh (push, run each prompt, save the raw output and the
device's getprop/meminfo/cpuinfo) and the farm's test spec (aot/farm/aws.py).

collect: reads what the farm kept (every folder holding an expected.json: one device x target),
turns the raw runner output into tokens and speed figures with the same code as `aot validate
--device adb`, applies the gates and reports a device x target table, JSON and JUnit.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import zipfile
from pathlib import Path

from aot.bundle import open_bundle
from aot.devices.adb import DEVICE_ROOT, android_info, generated_text, parse_getprop, parse_observer, require_runner
from aot.errors import ConfigError, DeviceError, OutputError
from aot.farm import aws as farm_aws
from aot.files import sha256_file, write_atomically
from aot.gates import raise_if_gates_failed
from aot.metrics import junit_suite
from aot.ondevice import agreement, agreement_gate, device_lengths, llama_main_lengths, prompts_from_text, speed_gate
from aot.release import RELEASE_JSON
from aot.runner.engines import StockEngine
from aot.runner.text import TokenBytes
from aot.texts import text_file
from aot.tokenizer import load_tokenizer

FORMAT = "aot-farm-package"
# llama_main's --seq_len counts the prompt as it re-tokenizes the text; a little room keeps it from
# stopping short of --new-tokens (the surplus is cut off when collected), never past the context.
SEQ_SLACK = 8
RESULTS_FORMAT = "aot-farm-results"


def _script(target: str, directory: str, files: list[str], tokenizer: str, lengths: list[tuple[int, int]],
            repeats: int) -> str:
    lines = [
        "#!/bin/sh",
        f"# aot farm: validate target {target} on one Android device; raw outputs go to OUT.",
        "# usage: run_on_device.sh SERIAL OUT   (ADB=path/to/adb to use another client)",
        "set -u",
        'SERIAL="$1"; OUT="$2"',
        'HERE="$(cd "$(dirname "$0")" && pwd)"',
        'ADB="${ADB:-adb}"',
        f"DIR={directory}",
        'a() { "$ADB" -s "$SERIAL" "$@"; }',
        'mkdir -p "$OUT"',
        'cp "$HERE/expected.json" "$HERE/' + tokenizer + '" "$OUT/"',
        'a shell getprop > "$OUT/getprop.txt" 2>&1',
        'a shell cat /proc/meminfo > "$OUT/meminfo.txt" 2>&1',
        'a shell cat /proc/cpuinfo > "$OUT/cpuinfo.txt" 2>&1',
        'a shell mkdir -p "$DIR"',
    ]
    lines += [f'a push "$HERE/{f}" "$DIR/{f}" > /dev/null || {{ echo "push {f} failed" >&2; exit 1; }}' for f in files]
    lines.append('a shell chmod 755 "$DIR/llama_main"')
    for r in range(repeats):
        for i, (seq_len, max_new) in enumerate(lengths):
            lines.append(
                f'a shell "cd $DIR && ./llama_main --model_path=model.pte --tokenizer_path={tokenizer} '
                f'--prompt=\\"\\$(cat prompt{i}.txt)\\" --temperature=0 --seq_len={seq_len} --max_new_tokens={max_new}" '
                f'> "$OUT/prompt{i}.run{r}.out" 2> "$OUT/prompt{i}.run{r}.err" '
                f'|| echo "llama_main exit $?" >> "$OUT/prompt{i}.run{r}.err"')
    lines.append('echo "aot: results in $OUT"')
    return "\n".join(lines) + "\n"


def package(manifest, names, out: Path, runner: Path, prompts: int, prompt_tokens: int | None,
            new_tokens: int | None, repeats: int, min_agreement: float, stages) -> dict:
    """prompt_tokens/new_tokens None: aot.ondevice's defaults, shrunk to fit each target's context."""
    runner = require_runner(runner)
    targets = manifest.select(names)
    missing = [t.name for t in targets if not (manifest.root / t.out / "bundle.json").is_file()]
    if missing:
        raise ConfigError(f"not built yet: {', '.join(missing)}; run `aot build --manifest {manifest.path}` first "
                          f"(output root {manifest.root})")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise OutputError(f"--out {out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    written = []
    try:
        for target in targets:
            bundle = open_bundle(manifest.root / target.out)
            bundle.require_host_runnable()
            v = target.validate
            length, new, _ = device_lengths(bundle, prompt_tokens, new_tokens)
            context = bundle.manifest["export"]["max_context_len"]
            with stages.stage("expected", target.name):
                tokenizer, _ = load_tokenizer(bundle.tokenizer)
                text = text_file(v.text if v else None)
                ids = [bundle.manifest["bos_id"]] + list(tokenizer.encode(text.read_text(errors="replace"), 0, 0))
                cut = prompts_from_text(ids, prompts, length)
                token_bytes = TokenBytes(bundle.tokenizer)
                # The run script hands each prompt over as "$(cat promptN.txt)", which drops trailing
                # newlines: the host's expected tokens are computed from the same text.
                texts = [token_bytes(p[1:]).decode("utf-8", errors="ignore").rstrip("\n") for p in cut]
                engine = StockEngine(bundle)
                host = [list(tokenizer.encode(engine.generate(t, new).text, 0, 0))[:new] for t in texts]
            folder = staging / target.name
            folder.mkdir()
            tok = bundle.tokenizer.name
            for src, name in ((bundle.pte, "model.pte"), (bundle.tokenizer, tok), (runner, "llama_main")):
                shutil.copyfile(src, folder / name)
            for i, t in enumerate(texts):
                (folder / f"prompt{i}.txt").write_text(t)
            sha = bundle.manifest["files"]["model.pte"]["sha256"]
            expected = {
                "format": FORMAT, "target": target.name, "model": bundle.manifest["model"]["name"],
                "quant": bundle.manifest["quant"]["scheme"], "pte_sha256": sha, "tokenizer": tok,
                "runner_sha256": sha256_file(runner), "prompts": texts, "prompt_tokens": [len(p) for p in cut],
                "new_tokens": new, "repeats": repeats, "host_tokens": host,
                "gates": {"min_agreement": min_agreement,
                          "min_prefill_tps": getattr(v.gates, "min_prefill_tps", None) if v else None,
                          "min_decode_tps": getattr(v.gates, "min_decode_tps", None) if v else None},
            }
            (folder / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
            files = ["model.pte", tok, "llama_main"] + [f"prompt{i}.txt" for i in range(len(texts))]
            script = _script(target.name, f"{DEVICE_ROOT}/{sha[:16]}", files, tok,
                             [llama_main_lengths(len(p), new, context, SEQ_SLACK) for p in cut], repeats)
            (folder / "run_on_device.sh").write_text(script)
            (folder / "run_on_device.sh").chmod(0o755)
            spec = farm_aws.test_spec(target.name)
            (staging / f"{target.name}.{farm_aws.SPEC_NAME}").write_text(spec)
            with zipfile.ZipFile(staging / f"{target.name}.zip", "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(folder.iterdir()):
                    z.write(f, f"{target.name}/{f.name}")
                z.writestr(farm_aws.SPEC_NAME, spec)
                for name, text in farm_aws.package_files().items():
                    z.writestr(name, text)
            written.append({"target": target.name, "archive": f"{target.name}.zip",
                            "test_spec": f"{target.name}.{farm_aws.SPEC_NAME}", "prompts": len(texts)})
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"ok": True, "out": str(out), "packages": written}


def _device_info(folder: Path) -> dict:
    read = lambda name: (folder / name).read_text(errors="replace") if (folder / name).is_file() else ""  # noqa: E731
    cores = sum(1 for ln in read("cpuinfo.txt").splitlines() if ln.startswith("processor"))
    return {"serial": folder.name, **android_info(parse_getprop(read("getprop.txt")), read("meminfo.txt")),
            "cores": cores or None}


def _outputs(folder: Path, stem: str) -> tuple[str, str]:
    """(stdout, stderr) the runner left for one prompt run ("" where missing)."""
    read = lambda p: p.read_text(errors="replace") if p.is_file() else ""  # noqa: E731
    return read(folder / f"{stem}.out"), read(folder / f"{stem}.err")


def collect(artifacts: Path, junit: Path | None = None, manifest=None) -> dict:
    """The gates applied to what the farm kept; with `junit`, also JUnit XML there, and with
    `manifest` (aot.manifest.Manifest), the results recorded in its output root (record())."""
    result = _collect(artifacts)
    if junit is not None:
        write_atomically(junit, junit_xml(result))
    if manifest is not None:
        record(manifest, result)
    return result


def _collect(artifacts: Path) -> dict:
    artifacts = Path(artifacts).expanduser()
    found = sorted(p.parent for p in artifacts.rglob("expected.json"))
    if not found:
        raise ConfigError(f"{artifacts}: no expected.json anywhere below it; is this the artifacts folder "
                          "of a run of `aot farm package` archives?")
    runs = []
    for folder in found:
        expected = json.loads((folder / "expected.json").read_text())
        if expected.get("format") != FORMAT:
            raise ConfigError(f"{folder / 'expected.json'}: not written by `aot farm package`")
        tokenizer, _ = load_tokenizer(folder / expected["tokenizer"])
        gates_cfg, rows, stats, gates = expected["gates"], [], [], []
        for i, prompt in enumerate(expected["prompts"]):
            output, log = _outputs(folder, f"prompt{i}.run0")
            try:
                parse_observer(output + "\n" + log)
                tokens = list(tokenizer.encode(generated_text(output, prompt), 0, 0))[: expected["new_tokens"]]
                problem = None
            except (DeviceError, ValueError, KeyError) as e:
                tokens, problem = [], str(e)
            agree, diverge = agreement(expected["host_tokens"][i], tokens)
            rows.append({"prompt": i, "device_tokens": tokens, "host_tokens": expected["host_tokens"][i],
                         "agreement_host": round(agree, 4), "first_divergence_host": diverge, "problem": problem})
            gates.append(agreement_gate(rows[-1], gates_cfg["min_agreement"]))
            for r in range(expected["repeats"]):
                try:
                    stats.append(parse_observer("\n".join(_outputs(folder, f"prompt{i}.run{r}"))))
                except (DeviceError, ValueError, KeyError):
                    pass
        speed = None
        if stats:
            med = lambda key: round(statistics.median(s[key] for s in stats), 2)  # noqa: E731
            speed = {"load_s": med("load_s"), "ttft_ms": round(med("ttft_s") * 1000, 1),
                     "prefill_tps": med("prefill_tps"), "decode_tps": med("decode_tps"), "runs": len(stats)}
        for name, key in (("min_prefill_tps", "prefill_tps"), ("min_decode_tps", "decode_tps")):
            if gates_cfg.get(name) is not None:
                gates.append(speed_gate(name, speed[key] if speed else 0.0, gates_cfg[name]))
        runs.append({"target": expected["target"], "model": expected["model"], "quant": expected["quant"],
                     "device": _device_info(folder), "folder": str(folder), "prompts": rows, "speed": speed,
                     "gates": gates, "ok": all(g["ok"] for g in gates)})
    return {"format": RESULTS_FORMAT, "artifacts": str(artifacts), "runs": runs, "ok": all(r["ok"] for r in runs)}


def record(manifest, result: dict) -> None:
    """devices.json in the manifest's output root, and a summary in its release.json when there is one."""
    manifest.root.mkdir(parents=True, exist_ok=True)
    write_atomically(manifest.root / "devices.json", json.dumps(result, indent=2) + "\n")
    index_path = manifest.root / RELEASE_JSON
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["devices"] = {"results": "devices.json", "ok": result["ok"],
                            "runs": [{"target": r["target"], "device": r["device"], "ok": r["ok"]} for r in result["runs"]]}
        write_atomically(index_path, json.dumps(index, indent=2) + "\n")


def raise_if_failed(result: dict, result_printed: bool = False) -> None:
    """GatesFailed (exit 9) naming each failed gate as SERIAL/TARGET: GATE."""
    gates = [{**g, "name": f"{r['device']['serial']}/{r['target']}: {g['name']}"}
             for r in result["runs"] for g in r["gates"]]
    raise_if_gates_failed({"ok": result["ok"], "gates": gates}, result_printed)


def junit_xml(result: dict) -> str:
    return junit_suite("aot.farm", {}, [(f"{r['device']['serial']}.{r['target']}", g)
                                        for r in result["runs"] for g in r["gates"]])
