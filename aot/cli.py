"""The `aot` command line. Thin: parse flags once into the config objects, call the library,
render its result (a plain dict) as a table or as --json. Errors users can cause are AotError
subclasses: one line on stderr and their exit code; tracebacks only with --debug."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from aot import __version__
from aot.bundle import PTE_NAME
from aot.errors import EXIT_CODES, EXIT_INTERRUPTED, AotError
from aot.native import quiet_libraries

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Ahead-of-time compiler for on-device LLMs: Llama 3.2 checkpoints to ExecuTorch bundles.",
    epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON on stdout (progress stays on stderr).")
DEBUG_OPT = typer.Option(False, "--debug", help="Show full tracebacks and library warnings.")


@contextmanager
def _command(as_json: bool, debug: bool):
    """Run a command body: AotError -> one line + its exit code; Ctrl-C -> 130."""
    quiet_libraries(debug)
    try:
        yield
    except AotError as e:
        if debug:
            raise
        if as_json and not getattr(e, "result_printed", False):
            print(json.dumps({"ok": False, "error": {"kind": e.kind, "message": str(e), "exit_code": e.exit_code}}))
        from rich.markup import escape

        err.print(f"[red]aot: error:[/red] {escape(str(e))}", soft_wrap=True)  # messages hold [brackets]
        raise typer.Exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("aot: interrupted; nothing was written")
        raise typer.Exit(EXIT_INTERRUPTED)


def _version(value: bool) -> None:
    if value:
        out.print(f"aot {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    pass


def _given(**kw) -> dict:
    """Only the flags the user set: defaults live in the config dataclasses, nowhere else."""
    return {k: v for k, v in kw.items() if v is not None}


@app.command()
def build(
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Bundle directory to write (atomically); with --manifest the output root."
    ),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Build a manifest's targets instead."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="With --manifest: only these (repeatable)."),
    jobs: int = typer.Option(1, "--jobs", help="With --manifest: targets built at once."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="With --manifest: stop at the first failure."),
    rebuild: bool = typer.Option(False, "--rebuild", help="With --manifest: build even when up to date."),
    model: Optional[str] = typer.Option(None, "--model", help="1b, 3b, 11b-vision, 90b-vision (or tiny, small). With --checkpoint: a check."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Meta or Hugging Face Llama 3.2 folder."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json/.model (default: the checkpoint's)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Untrained weights, for benchmarking only."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for --random-weights and spinquant's random rotations [0]."),
    delegate: Optional[str] = typer.Option(None, "--delegate", help="Backend: xnnpack, qnn, mediatek [xnnpack]."),
    soc: Optional[str] = typer.Option(None, "--soc", help="qnn: SM8650, SM8750, ... [SM8650]; mediatek: mt6989, mt6991 [mt6989]."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="qnn: KV cache 8 or 16 bits [the activations' width]."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="qnn/mediatek: calibration text [demo held-out text]."),
    quant: Optional[str] = typer.Option(None, "--quant", help="xnnpack: none, bf16, 8da4w, 8da8w, spinquant [8da4w]; "
                                        "qnn: 16a4w, 16a4w-block, 16a8w, 8a8w; mediatek: 16a4w, 16a8w, 8a8w [16a4w]."),
    rotation: Optional[Path] = typer.Option(None, "--rotation", help="spinquant: learned R1/R2 (SpinQuant's R.bin) [random Hadamard]."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="4-bit group: 32, 64, 128, 256 [32]."),
    embedding_quant: Optional[str] = typer.Option(None, "--embedding-quant", help="none, 8, 4 [8 for 8da4w/8da8w]."),
    embedding_group_size: Optional[int] = typer.Option(
        None, "--embedding-group-size", help="0 = per-channel [0 for 8-bit, 32 for 4-bit]."
    ),
    output_quant: Optional[str] = typer.Option(None, "--output-quant", help="none, 8da8w, 8da4w [8da8w when quantized]."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Longest prefill chunk; NPUs: the fixed prefill length [128]."),
    max_context_len: Optional[int] = typer.Option(None, "--max-context-len", help="KV cache length [2048]."),
    bos_id: Optional[int] = typer.Option(None, "--bos-id", help="Override the tokenizer's BOS id."),
    eos_id: Optional[List[int]] = typer.Option(None, "--eos-id", help="Override EOS ids (repeatable)."),
    full_logits: bool = typer.Option(False, "--full-logits", help="forward returns logits for every position."),
    vision_quant: Optional[str] = typer.Option(None, "--vision-quant", help="Vision models: the image encoder's scheme: "
                                               "8da8w, 8da4w, none [8da8w]."),
    no_preflight: bool = typer.Option(False, "--no-preflight", help="Build even if the memory/disk estimate says it will not fit."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Build a bundle (model.pte, tokenizer, bundle.json) from a checkpoint."""
    with _command(as_json, debug):
        from aot.config import build_config
        from aot.errors import ConfigError
        from aot.pipeline import build as run_build
        from aot.progress import Stages

        fields = _given(
            model=model, checkpoint=checkpoint, tokenizer=tokenizer, rotation=rotation, seed=seed, delegate=delegate, quant=quant,
            soc=soc, kv_bits=kv_bits, calibration=calibration,
            group_size=group_size, embedding_quant=embedding_quant, embedding_group_size=embedding_group_size,
            output_quant=output_quant, max_seq_len=max_seq_len, max_context_len=max_context_len, bos_id=bos_id,
            eos_ids=eos_id or None, random_weights=random_weights or None, full_logits=full_logits or None,
            vision_quant=vision_quant, no_preflight=no_preflight or None,
        )
        if manifest is not None:
            if fields or force:
                flags = ", ".join("--" + k.replace("_", "-") for k in [*fields, *(["force"] if force else [])])
                raise ConfigError(f"{flags}: set these in the manifest's targets or defaults, not with --manifest")
            return _build_manifest(manifest, out_dir, target, jobs, fail_fast, rebuild, as_json)
        if target or jobs != 1 or fail_fast or rebuild:
            raise ConfigError("--target, --jobs, --fail-fast and --rebuild need --manifest")
        if out_dir is None:
            raise ConfigError("--out DIR is required: where to write the bundle")
        cfg = build_config(out_dir, force=force, **fields)
        result = run_build(cfg, Stages())
        if as_json:
            print(json.dumps({"ok": True, **result}))
        else:
            _print_bundle(result, verified=False)


@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="Bundle directory (or its model.pte)."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Show a bundle's metadata, methods, sizes and delegation; verify every sha256."""
    with _command(as_json, debug):
        from aot.inspect import inspect_bundle

        result = inspect_bundle(bundle)
        if as_json:
            print(json.dumps({"ok": True, **result}))
        else:
            _print_bundle(result, verified=True)


def _build_manifest(path, root, targets, jobs, fail_fast, rebuild, as_json) -> None:
    from aot.manifest import load_manifest
    from aot.release import build_targets, raise_if_failed

    m = load_manifest(path, root)
    results = build_targets(m, targets, jobs=jobs, fail_fast=fail_fast, rebuild=rebuild, quiet=as_json)
    if as_json:
        print(json.dumps({"ok": not any(r["status"] not in ("built", "skipped") for r in results),
                          "root": str(m.root), "targets": results}))
    else:
        _print_targets(m.root, results)
    try:
        raise_if_failed(results)
    except AotError as e:
        e.result_printed = as_json  # the JSON above already says which targets failed
        raise


def _print_targets(root: Path, results: list[dict]) -> None:
    out.print(f"[bold]{root}[/bold]")
    for r in results:
        color = {"built": "green", "skipped": "cyan"}.get(r["status"], "red")
        size = f"{r['pte_bytes'] / 2**20:9.2f} MiB" if "pte_bytes" in r else " " * 13
        secs = f"{r['seconds']:7.1f} s" if "seconds" in r else " " * 9
        note = r.get("reason") or (r.get("error") or {}).get("message", "")
        out.print(f"  [{color}]{r['status']:<9}[/{color}] {r['name']:<36} {secs} {size}  {r['out']}  {note}")


@app.command()
def release(
    manifest: Path = typer.Option(..., "--manifest", help="Release manifest (YAML)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output root [build/<manifest name>]."),
    jobs: int = typer.Option(1, "--jobs", help="Targets built at once."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build even targets that are up to date."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Build (or skip) every target, validate those with gates, write release.json."""
    with _command(as_json, debug):
        from aot.manifest import load_manifest
        from aot.release import release as run_release

        index = run_release(load_manifest(manifest, out_dir), jobs=jobs, rebuild=rebuild, quiet=as_json)
        if as_json:
            print(json.dumps({"ok": True, **index}))
            return
        out.print(f"[bold]{index['path']}[/bold]  ({len(index['targets'])} targets)")
        for t in index["targets"]:
            v = t["validation"]
            gates = "no gates" if v is None else ("gates pass" if v["ok"] else "GATES FAIL")
            out.print(f"  {t['name']:<36} {t['build']['status']:<8} "
                      f"{t['files'][PTE_NAME]['bytes'] / 2**20:9.2f} MiB  {gates}")


@app.command()
def plan(
    manifest: Path = typer.Option(..., "--manifest", help="Release manifest (YAML)."),
    fmt: str = typer.Option("json", "--format", help="json, or github (a GitHub Actions matrix)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output root the jobs should use."),
    device: List[str] = typer.Option([], "--device", help="Also a device-validation job per target on this device "
                                                          "(ssh://... or adb[:SERIAL]; repeatable)."),
    device_runner: Optional[str] = typer.Option(None, "--device-runner", help="adb jobs: llama_main's path on the CI runner."),
    debug: bool = DEBUG_OPT,
):
    """Print the targets as a CI job matrix: one `aot build --manifest F --target N` per job (and with
    --device, one `aot validate BUNDLE --device D` per target and device)."""
    with _command(False, debug):
        from aot.manifest import load_manifest
        from aot.release import plan as make_plan

        print(make_plan(load_manifest(manifest, out_dir), fmt, str(manifest), str(out_dir) if out_dir else None,
                        tuple(device), device_runner))


@app.command()
def run(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed (--engine python)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="stock (ExecuTorch's TextLLMRunner) or python "
                                         "[stock; vision bundles: python]."),
    image: Optional[Path] = typer.Option(None, "--image", help="Vision bundles: an image file (PNG, JPEG, ...); "
                                         "<|image|> in --prompt marks its place [start]."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Generate from a bundle, streaming text; then load time, TTFT, prefill and decode tok/s."""
    with _command(as_json, debug):
        from aot.bundle import open_bundle
        from aot.errors import ConfigError
        from aot.runner.engines import make_engine
        from aot.runner.mllama import VisionEngine, is_vision_bundle

        b = open_bundle(bundle)
        on_text = None if as_json else (lambda text: print(text, end="", flush=True))
        if is_vision_bundle(b):
            if engine not in (None, "python"):
                raise ConfigError(f"--engine {engine}: ExecuTorch's text runners do not run vision bundles "
                                  "(cross-attention image state); drop --engine to use aot's runner")
            g = VisionEngine(b).generate(prompt, max_new_tokens, temperature, seed, on_text, image=image)
        else:
            if image is not None:
                raise ConfigError(f"--image: {b.root} is a text bundle ({b.manifest['model']['name']}); images need a "
                                  "vision bundle (aot build --model 11b-vision or a Mllama --checkpoint)")
            g = make_engine(engine or "stock", b).generate(prompt, max_new_tokens, temperature, seed, on_text)
        if as_json:
            print(json.dumps({"ok": True, "prompt": prompt, **g.to_dict()}))
            return
        print(flush=True)
        if g.image_s:
            err.print(f"[dim]image encoder {g.image_s * 1000:.0f} ms[/dim]")
        err.print(f"[dim]{g.engine}: load {g.load_s * 1000:.0f} ms, first token {g.ttft_s * 1000:.1f} ms, "
                  f"prefill {g.prefill_tps:.1f} tok/s ({g.prompt_tokens} tokens), "
                  f"decode {g.decode_tps:.1f} tok/s ({g.generated_tokens} tokens)[/dim]")


@app.command()
def simulate(
    delegate: str = typer.Option(..., "--delegate", help="NPU delegate whose recipe to simulate: qnn, mediatek."),
    quant: str = typer.Option("16a4w", "--quant", help="qnn: 16a4w, 16a4w-block, 16a8w, 8a8w; mediatek: 16a4w, 16a8w, 8a8w [16a4w]."),
    group_size: int = typer.Option(32, "--group-size", help="Block size of 16a4w-block [32]."),
    soc: Optional[str] = typer.Option(None, "--soc", help="Target chip, recorded [the delegate's default]."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", help="qnn: KV cache 8 or 16 bits [the activations' width]."),
    prefill_len: Optional[int] = typer.Option(None, "--prefill-len", help="Tokens in the prefill call; the rest decode [max-tokens / 2]."),
    model: Optional[str] = typer.Option(None, "--model", help="demo (the embedded model), or give --checkpoint."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Meta or Hugging Face Llama folder."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to score on [the demo's held-out sample]."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration text [--text, past the scored tokens]."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens scored, and the length of each calibration window."),
    calibration_windows: int = typer.Option(8, "--calibration-windows", help="Calibration windows."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Simulate an NPU delegate's quantization recipe on the host (fake-quant) and report its accuracy vs fp32."""
    with _command(as_json, debug):
        from aot.config import DEMO_CHECKPOINT
        from aot.errors import ConfigError
        from aot.progress import Stages
        from aot.simulate import SimulateConfig
        from aot.simulate import simulate as run_simulate

        if checkpoint is None and model != "demo":
            raise ConfigError("give --checkpoint DIR, or --model demo for the embedded demo model")
        cfg = SimulateConfig(delegate=delegate, checkpoint=checkpoint or DEMO_CHECKPOINT, scheme=quant, text=text,
                             calibration=calibration, max_tokens=max_tokens, calibration_windows=calibration_windows,
                             group_size=group_size, prefill_len=prefill_len, kv_bits=kv_bits, soc=soc)
        result = run_simulate(cfg, Stages(quiet=as_json))
        if as_json:
            print(json.dumps(result))
        else:
            a = result["accuracy"]
            kv = f", {result['kv_bits']}-bit KV cache" if result["kv_bits"] else ""
            out.print(f"[bold]{result['delegate']} {result['soc']} {result['scheme']}{kv}[/bold] (simulated) vs "
                      f"{result['checkpoint']} fp32")
            out.print(f"  text       {result['text']['file']} ({result['text']['tokens']} tokens: prefill "
                      f"{result['prefill_len']}, then decode); calibration "
                      f"{result['calibration']['windows']} x {result['calibration']['tokens_each']} tokens")
            _print_accuracy(a, "simulated")
            out.print(f"  top-1 in prefill {result['accuracy_prefill']['top1_agreement']:.2%}, in decode "
                      f"{result['accuracy_decode']['top1_agreement']:.2%}")


@app.command()
def validate(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Checkpoint to compare with [bundle.json's]."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to score on [the demo's held-out sample]."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Tokens of --text scored [512]."),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", help="Prompt length for speed [128]."),
    decode_tokens: Optional[int] = typer.Option(None, "--decode-tokens", help="Tokens generated for speed [64]."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Speed runs [3]; median and spread reported."),
    skip_speed: bool = typer.Option(False, "--skip-speed", help="Accuracy only."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", help="Gate: bundle ppl / reference ppl."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", help="Gate: top-1 agreement with the reference."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Gate: mean KL(reference || bundle)."),
    min_prefill_tps: Optional[float] = typer.Option(None, "--min-prefill-tps", help="Gate: median prefill tok/s."),
    min_decode_tps: Optional[float] = typer.Option(None, "--min-decode-tps", help="Gate: median decode tok/s."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write JUnit XML here (one testcase per gate)."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="Vision bundles: score with these images "
                                               "(repeatable) [4 generated test images, 1-4 tiles]."),
    device: str = typer.Option("host", "--device", help="host, ssh://[user@]host[:port] or adb[:SERIAL]."),
    device_runner: Optional[Path] = typer.Option(None, "--device-runner", help="adb: ExecuTorch's llama_main for arm64-v8a."),
    device_python: str = typer.Option("python3", "--device-python", help="ssh: the device's Python with ExecuTorch."),
    ssh_option: List[str] = typer.Option([], "--ssh-option", help="ssh: extra -o KEY=VALUE (repeatable)."),
    adb: Optional[str] = typer.Option(None, "--adb", help="adb: the adb client [$ADB, then PATH]."),
    device_timeout: float = typer.Option(600.0, "--device-timeout", help="Seconds one device command may take."),
    device_prompts: int = typer.Option(3, "--device-prompts", help="Prompts cut from --text for the device."),
    device_prompt_tokens: int = typer.Option(32, "--device-prompt-tokens", help="Tokens per device prompt."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Greedy tokens generated per device prompt."),
    min_device_agreement: float = typer.Option(1.0, "--min-device-agreement",
                                               help="Gate: matched-prefix share of the host's tokens, per prompt."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Prove a bundle's accuracy against its reference checkpoint and measure its speed, here or on a
    device (--device); gates set the exit code."""
    with _command(as_json, debug):
        from aot.bundle import open_bundle
        from aot.errors import ConfigError
        from aot.progress import Stages
        from aot.validate import Gates, ValidateConfig, junit_xml
        from aot.validate import validate as run_validate

        if device != "host":
            from aot import ondevice
            from aot.validate import text_file

            teacher_forced = _given(max_ppl_ratio=max_ppl_ratio, min_top1=min_top1, max_kl=max_kl)
            if teacher_forced:
                raise ConfigError(f"--{next(iter(teacher_forced)).replace('_', '-')} is scored on the host (teacher-forced "
                                  "logits); run `aot validate` without --device for it, and gate the device on "
                                  "--min-device-agreement and speed")
            cfg = ondevice.DeviceConfig(
                device=device, prompts=device_prompts, prompt_tokens=device_prompt_tokens, new_tokens=new_tokens,
                repeats=repeats or 3, runner=device_runner, python=device_python, ssh_options=tuple(ssh_option),
                adb=adb, timeout=device_timeout, min_agreement=min_device_agreement,
                min_prefill_tps=min_prefill_tps, min_decode_tps=min_decode_tps, skip_speed=skip_speed)
            result = ondevice.validate_on_device(open_bundle(bundle), cfg, text_file(text), reference,
                                                 Stages(quiet=as_json))
            if junit is not None:
                _write_atomically(junit, ondevice.junit_xml(result))
            if as_json:
                print(json.dumps(result))
            else:
                _print_device_validation(result)
            _raise_if_failed(result, as_json)
            return
        gates = Gates(**_given(max_ppl_ratio=max_ppl_ratio, min_top1=min_top1, max_kl=max_kl,
                               min_prefill_tps=min_prefill_tps, min_decode_tps=min_decode_tps))
        cfg = ValidateConfig(gates=gates, skip_speed=skip_speed, **_given(
            reference=reference, text=text, max_tokens=max_tokens, prompt_tokens=prompt_tokens,
            decode_tokens=decode_tokens, repeats=repeats))
        result = run_validate(open_bundle(bundle), cfg, Stages(quiet=as_json), images=image or None)
        if junit is not None:
            _write_atomically(junit, junit_xml(result))
        if as_json:
            print(json.dumps(result))
        else:
            _print_validation(result)
        _raise_if_failed(result, as_json)


def _raise_if_failed(result: dict, as_json: bool) -> None:
    from aot.errors import GatesFailed

    if not result["ok"]:
        failed = [g for g in result["gates"] if not g["ok"]]
        error = GatesFailed("gates failed: " + "; ".join(
            f"{g['name']}: {g['value']} not {g['op']} {g['threshold']}"
            + (f" ({g['hint']})" if g.get("hint") else "") for g in failed))
        error.result_printed = as_json  # the JSON result above says "ok": false
        raise error


def _print_device_validation(result: dict) -> None:
    d = result["device"]
    out.print(f"[bold]{result['model']}[/bold] ({result['quant']}) on {d.get('name')}: "
                  f"{d.get('model') or d.get('uname', '')} {d.get('cpu', '')}, {d.get('cores', '?')} cores, "
                  f"{d.get('memory_mib', '?')} MiB")
    for r in result["prompts"]:
        ref = f", reference {r['agreement_reference']:.0%}" if "agreement_reference" in r else ""
        div = "" if r["first_divergence_host"] is None else f" (differs from token {r['first_divergence_host']})"
        out.print(f"  prompt {r['prompt']}: {len(r['device_tokens'])} tokens, host agreement "
                      f"{r['agreement_host']:.0%}{div}{ref}")
    s = result["speed"]
    if s:
        out.print(f"  load {s['load_s']:.2f} s, first token {s['ttft_ms']['median']:.1f} ms, prefill "
                      f"{s['prefill_tps']['median']:.1f} tok/s, decode {s['decode_tps']['median']:.1f} tok/s "
                      f"(median of {s['runs']}), peak RSS {s.get('peak_rss_mib')} MiB")
    for g in result["gates"]:
        mark = "[green]PASS[/green]" if g["ok"] else "[red]FAIL[/red]"
        out.print(f"  {mark} {g['name']}: {g['value']} {g['op']} {g['threshold']}")


@app.command()
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    prompt_tokens: int = typer.Option(128, "-p", "--prompt-tokens", help="pp N: prompt length."),
    decode_tokens: int = typer.Option(64, "-n", "--decode-tokens", help="tg N: tokens generated."),
    repeats: int = typer.Option(5, "-r", "--repeats", help="Measured runs (after one warm-up)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Where prompts come from [the demo's held-out sample]."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """llama-bench style speed rows (pp N, tg N: mean ± std tok/s) from ExecuTorch's runner."""
    with _command(as_json, debug):
        from aot.benchmark import bench_bundle, markdown

        result = bench_bundle(bundle, prompt_tokens, decode_tokens, repeats, text)
        print(json.dumps({"ok": True, **result}) if as_json else markdown(result))


@app.command()
def doctor(as_json: bool = JSON_OPT, debug: bool = DEBUG_OPT):
    """Versions, CPU features, and which delegates can run here (and why not)."""
    with _command(as_json, debug):
        from aot.doctor import diagnose

        report = diagnose()
        if as_json:
            print(json.dumps({"ok": True, **report}))
            return
        for key, value in report["versions"].items():
            out.print(f"{key:<12} {value}")
        host = report["host"]
        out.print(f"{'cpu':<12} {host['cpu']} ({host['cores']} cores, {host['arch']})")
        out.print(f"{'features':<12} {', '.join(host['cpu_features']) or '-'}")
        out.print(f"{'memory':<12} {host['memory_gib']} GiB")
        out.print("delegates:")
        for name, d in report["delegates"].items():
            mark = "[green]ok[/green]" if d["available"] else "[red]no[/red]"
            out.print(f"  {name:<10} {mark}  {d['reason']}")


def _print_bundle(b: dict, verified: bool) -> None:
    m = b["model"]
    q = b["quant"]["plan"]
    out.print(f"[bold]{b['path']}[/bold]" + ("  [green]sha256 ok[/green]" if verified else ""))
    weights = "random weights" if m["random_weights"] else (b.get("checkpoint") or {}).get("path", "?")
    out.print(f"  model     {m['name']} ({m['num_params'] / 1e6:.1f} M params) from {weights}")
    recipe = ", ".join(f"{k} {v['bits']}-bit" + (f" g{v['group_size']}" if v["group_size"] else " per-channel")
                       for k, v in (("linear", q["linear"]), ("embedding", q["embedding"]), ("output", q["output"])) if v)
    out.print(f"  quant     {q['scheme']} ({recipe or q['dtype']})   delegate {b['delegate']}")
    image = b.get("image")
    if image:
        out.print(f"  image     up to {image['max_tiles']} tiles of {image['tile_size']} px, {image['image_token']} = "
                  f"{image['image_token_id']}; vision encoder {b['quant']['vision']['scheme']}")
    rot = b["quant"].get("rotation")
    if rot:
        if rot["source"] == "file":
            source = f"learned, {rot['file']} sha256 {rot['sha256'][:16]}"
        else:
            source = rot["source"] + (f", seed {rot['seed']}" if "seed" in rot else "")
        extra = "; embedding and output stored apart" if rot.get("untied_embedding") else ""
        out.print(f"  rotation  {source}; {rot.get('r4', 'no R4')}{extra}")
    e = b["export"]
    out.print(f"  lengths   max_seq_len {e['max_seq_len']}, max_context_len {e['max_context_len']}   "
              f"bos {b['bos_id']} eos {b['eos_ids']}")
    for name, f in b["files"].items():
        out.print(f"  {name:<16} {f['bytes'] / 2**20:10.2f} MiB  sha256 {f['sha256'][:16]}")
    for name, d in b["delegation"].items():
        cpu = ", ".join(f"{op} x{n}" for op, n in d["cpu_ops"].items()) or "none"
        out.print(f"  {name}: {d['delegated_ops']}/{d['total_ops']} ops delegated in "
                  f"{d['delegated_subgraphs']} subgraphs; on CPU: {cpu}")
    if "build" in b:
        out.print(f"  built in {b['build']['total_seconds']:.1f} s, peak RSS {b['build']['peak_rss_mib'] / 1024:.2f} GiB")


def _print_validation(r: dict) -> None:
    a, s = r["accuracy"], r["speed"]
    ref = r["reference"]
    out.print(f"[bold]{r['bundle']}[/bold]  ({r['model']}, {r['quant']})  vs  {ref['checkpoint']} fp32"
              + ("" if ref["is_build_input"] else "  [yellow](not the build's input files)[/yellow]"))
    out.print(f"  text       {r['text']['file']} ({r['text']['tokens']} tokens, {a['positions']} predictions)")
    _print_accuracy(a, "bundle")
    effect = r.get("image_effect")
    if effect:
        out.print(f"  image      without it the reference moves by mean KL {effect['kl_mean']:.5f}, top-1 "
                  f"{effect['top1_agreement']:.2%}; encoder {s['image_encoder_s']['median'] * 1000:.0f} ms per image")
        for i in r["images"]:
            out.print(f"    {i['image']:<20} {i['tiles']} tiles  KL {i['kl_mean']:.5f}  top-1 {i['top1_agreement']:.2%}  "
                      f"image effect KL {i['image_effect_kl']:.5f}")
        s = None
    if s:
        out.print(f"  speed      load {s['load_s'] * 1000:.0f} ms; prefill {s['prefill_tps']['median']:.1f} tok/s "
                  f"({s['prompt_tokens']} tokens), decode {s['decode_tps']['median']:.1f} tok/s "
                  f"({s['generated_tokens']} tokens), median of {len(s['decode_tps']['runs'])} "
                  f"(decode {s['decode_tps']['min']:.1f}-{s['decode_tps']['max']:.1f}); peak RSS {s['peak_rss_mib']:.0f} MiB")
    for g in r["gates"]:
        mark = "[green]pass[/green]" if g["ok"] else "[red]FAIL[/red]"
        out.print(f"  gate       {mark} {g['name']}: {g['value']} {g['op']} {g['threshold']}")


def _print_accuracy(a: dict, label: str) -> None:
    out.print(f"  perplexity reference {a['ppl_reference']:.3f}  {label} {a['ppl_bundle']:.3f}  ratio {a['ppl_ratio']:.4f}")
    out.print(f"  agreement  top-1 {a['top1_agreement']:.2%}  mean KL {a['kl_mean']:.5f}  "
              f"max |logit error| {a['max_abs_logit_error']:.4f}")


farm = typer.Typer(help="Device farms: package targets for a farm run, collect its results.", no_args_is_help=True)
app.add_typer(farm, name="farm")


@farm.command("package")
def farm_package(
    manifest: Path = typer.Option(..., "--manifest", help="Release manifest (YAML) whose targets are built."),
    out_dir: Path = typer.Option(..., "--out", help="New directory for the archives and test specs."),
    device_runner: Optional[Path] = typer.Option(None, "--device-runner", help="ExecuTorch's llama_main for arm64-v8a."),
    root: Optional[Path] = typer.Option(None, "--root", help="The manifest's output root [build/<manifest name>]."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="Only these targets (repeatable)."),
    device_prompts: int = typer.Option(3, "--device-prompts", help="Prompts cut from the target's validation text."),
    device_prompt_tokens: int = typer.Option(32, "--device-prompt-tokens", help="Tokens per prompt."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Greedy tokens generated per prompt."),
    repeats: int = typer.Option(3, "--repeats", help="Runs of each prompt on each device (speed: median)."),
    min_device_agreement: float = typer.Option(1.0, "--min-device-agreement", help="Gate, per prompt."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """One archive per target (bundle, llama_main, prompts, expected host tokens, run script) and its
    AWS Device Farm test spec."""
    with _command(as_json, debug):
        from aot.devices.farm import package
        from aot.manifest import load_manifest
        from aot.progress import Stages

        result = package(load_manifest(manifest, root), target, out_dir, device_runner, device_prompts,
                         device_prompt_tokens, new_tokens, repeats, min_device_agreement, Stages(quiet=as_json))
        if as_json:
            print(json.dumps(result))
            return
        out.print(f"[bold]{result['out']}[/bold]")
        for p in result["packages"]:
            out.print(f"  {p['target']:<32} {p['archive']}  {p['test_spec']}  ({p['prompts']} prompts)")


@farm.command("collect")
def farm_collect(
    artifacts: Path = typer.Argument(..., help="The farm run's artifacts folder (downloaded)."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Also record the results in its output root."),
    root: Optional[Path] = typer.Option(None, "--root", help="The manifest's output root [build/<manifest name>]."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write JUnit XML (one testcase per device x check)."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Apply the gates to a farm run's results: device x target table, JSON, JUnit; exit 9 on a failed gate."""
    with _command(as_json, debug):
        from aot.devices.farm import collect, junit_xml, table

        result = collect(artifacts)
        if junit is not None:
            _write_atomically(junit, junit_xml(result))
        if manifest is not None:
            _record_farm_results(manifest, root, result)
        if as_json:
            print(json.dumps(result))
        else:
            out.print(table(result))
        gates = [{**g, "name": f"{r['device']['serial']}/{r['target']}: {g['name']}"}
                 for r in result["runs"] for g in r["gates"]]
        _raise_if_failed({"ok": result["ok"], "gates": gates}, as_json)


def _record_farm_results(manifest: Path, root: Optional[Path], result: dict) -> None:
    """devices.json in the manifest's output root, and a summary in release.json when there is one."""
    from aot.manifest import load_manifest

    m = load_manifest(manifest, root)
    m.root.mkdir(parents=True, exist_ok=True)
    _write_atomically(m.root / "devices.json", json.dumps(result, indent=2) + "\n")
    index_path = m.root / "release.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        index["devices"] = {"results": "devices.json", "ok": result["ok"],
                            "runs": [{"target": r["target"], "device": r["device"], "ok": r["ok"]} for r in result["runs"]]}
        _write_atomically(index_path, json.dumps(index, indent=2) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    import os
    import tempfile

    from aot.errors import OutputError

    path = Path(path).expanduser()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror}); choose a writable path") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
