"""The `aot` command line. Thin: each command parses its flags into config objects, calls one library
function and renders its result (a plain dict: aot.render, or --json). Defaults live in the config
dataclasses only; the help shows theirs. Errors users can cause are AotError subclasses: one line on
stderr and their exit code; tracebacks only with --debug."""

# Each command imports the library it calls inside its body: those modules import torch and
# ExecuTorch (~3 s), and `aot --help` or a usage error should not wait for them. The only other
# lazy imports of aot's own modules are cli_support's flag defaults and aot.generate's runners, for
# the same reason (tools/lazy_imports.py lists them).

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from aot import render
from aot.cli_support import (
    BENCH,
    DEBUG_OPT,
    DEVICE,
    JSON_OPT,
    RUN,
    OneLineGroup,
    SIMULATE,
    _command,
    _Defaults,
    _given,
    _json,
    _version,
    err,
    out,
)
from aot.errors import EXIT_CODES

app = typer.Typer(
    cls=OneLineGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Ahead-of-time compiler for on-device LLMs: Llama 3.2 checkpoints to ExecuTorch bundles.",
    epilog="Exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
)
@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    pass


@app.command()
def build(
    ctx: typer.Context,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Bundle directory to write (atomically); with --manifest the output root."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Build a manifest's targets instead."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="With --manifest: only these (repeatable)."),
    jobs: int = typer.Option(1, "--jobs", min=1, max=64, help="With --manifest: targets built at once."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="With --manifest: stop at the first failure."),
    rebuild: bool = typer.Option(False, "--rebuild", help="With --manifest: build even when up to date."),
    # The build fields: named as in aot.config.FIELDS (manifests use the same names).
    model: Optional[str] = typer.Option(None, "--model", help="1b, 3b, 11b-vision, 90b-vision (or tiny, small). Alone: its "
                                "published checkpoint from the HF cache. With --checkpoint or --hf-repo: a check."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Meta or Hugging Face Llama 3.2 folder."),
    hf_repo: Optional[str] = typer.Option(None, "--hf-repo", help="Hugging Face repo ID[@revision]: from the HF cache, "
                                          "else downloaded (HF_TOKEN for gated repos) [--model's, cached only]."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json/.model (default: the checkpoint's)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Untrained weights, for benchmarking only."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**32 - 1, help="Seed for --random-weights and spinquant's random rotations [0]."),
    delegate: Optional[str] = typer.Option(None, "--delegate", help="Backend: xnnpack, qnn, mediatek [xnnpack]."),
    soc: Optional[str] = typer.Option(None, "--soc", help="qnn: SM8650, SM8750, ... [SM8650]; mediatek: mt6989, mt6991 [mt6989]."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="KV cache storage. xnnpack: fp32, int8 [fp32]; "
                                           "qnn: int8, int16 [the activations' width]."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", min=4, max=16, help="qnn: --kv-cache int8/int16, the old spelling (8 or 16)."),
    attention_sink: Optional[str] = typer.Option(None, "--attention-sink", help="SINK,WINDOW: keep the first SINK and the "
                                                 "last WINDOW positions in a fixed ring; the context goes on [none]."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="qnn/mediatek: calibration text [demo held-out text]."),
    quant: Optional[str] = typer.Option(None, "--quant", help="xnnpack: none, bf16, 8da4w, 8da8w, spinquant [8da4w]; "
                                        "qnn: 16a4w, 16a4w-block, 16a8w, 8a8w; mediatek: 16a4w, 16a8w, 8a8w [16a4w]."),
    rotation: Optional[Path] = typer.Option(None, "--rotation", help="spinquant: learned R1/R2 (SpinQuant's R.bin) [random Hadamard]."),
    group_size: Optional[int] = typer.Option(None, "--group-size", min=1, max=4096, help="4-bit group: 32, 64, 128, 256 [32]."),
    embedding_quant: Optional[str] = typer.Option(None, "--embedding-quant", help="none, 8, 4 [8 for 8da4w/8da8w]."),
    embedding_group_size: Optional[int] = typer.Option(None, "--embedding-group-size", min=0, max=4096, help="0 = per-channel [0 for 8-bit, 32 for 4-bit]."),
    output_quant: Optional[str] = typer.Option(None, "--output-quant", help="none, 8da8w, 8da4w [8da8w when quantized]."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", min=1, max=131072, help="Longest prefill chunk; NPUs: the fixed prefill length [128]."),
    max_context_len: Optional[int] = typer.Option(None, "--max-context-len", min=1, max=131072, help="Positions a sequence may reach, up to "
                                                  "131072 (the KV cache's length without a sink) [2048]."),
    bos_id: Optional[int] = typer.Option(None, "--bos-id", min=0, max=2**31 - 1, help="Override the tokenizer's BOS id."),
    eos_ids: Optional[List[int]] = typer.Option(None, "--eos-id", min=0, max=2**31 - 1, help="Override EOS ids (repeatable)."),
    full_logits: bool = typer.Option(False, "--full-logits", help="forward returns logits for every position."),
    external_weights: bool = typer.Option(False, "--external-weights", help="xnnpack: the weights in model.ptd beside a "
                                          "small model.pte; equal weights give a byte-identical .ptd [one file]."),
    adapters: Optional[List[str]] = typer.Option(None, "--adapter", help="A PEFT LoRA folder (merged into the weights), "
                                                 "or NAME=DIR (repeatable): a program per adapter over one shared "
                                                 "foundation in model.ptd."),
    adapter_mode: Optional[str] = typer.Option(None, "--adapter-mode", help="merged or unmerged (low-rank matmuls "
                                               "beside the quantized weights) [merged; NAME=DIR: unmerged]."),
    adapter_quant: Optional[str] = typer.Option(None, "--adapter-quant", help="Unmerged adapters' weights: 8da8w or "
                                                "none (fp32) [8da8w on a quantized model; QLoRA: none]."),
    vision_quant: Optional[str] = typer.Option(None, "--vision-quant", help="Vision models: the image encoder's scheme: "
                                               "8da8w, 8da4w, none [8da8w]."),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="The phone's memory for the app (6GiB, 512MiB; "
                                                "GB = 10^9): refuse, before building, a bundle whose runtime plan does not fit."),
    no_preflight: bool = typer.Option(False, "--no-preflight", help="Build even if the memory/disk estimate says it will not fit."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Build a bundle (model.pte, tokenizer, bundle.json) from a checkpoint."""
    with _command(as_json, debug):
        from aot.config import build_config, given_fields
        from aot.errors import ConfigError

        fields = given_fields(ctx.params)
        if manifest is not None:
            if fields or force:
                flags = ", ".join("--" + k.replace("_", "-") for k in [*fields, *(["force"] if force else [])])
                raise ConfigError(f"{flags}: set these in the manifest's targets or defaults, not with --manifest")
            return _build_manifest(manifest, out_dir, target, jobs, fail_fast, rebuild, as_json)
        if target or jobs != 1 or fail_fast or rebuild:
            raise ConfigError("--target, --jobs, --fail-fast and --rebuild need --manifest")
        if out_dir is None:
            raise ConfigError("--out DIR is required: where to write the bundle")
        from aot.pipeline import build as run_build
        from aot.progress import Stages

        result = run_build(build_config(out_dir, force=force, **fields), Stages())
        _json({"ok": True, **result}) if as_json else render.bundle(out, result, verified=False)


def _build_manifest(path, root, targets, jobs, fail_fast, rebuild, as_json) -> None:
    from aot.manifest import load_manifest
    from aot.release import build_targets, failures, raise_if_failed

    m = load_manifest(path, root)
    results = build_targets(m, targets, jobs=jobs, fail_fast=fail_fast, rebuild=rebuild, quiet=as_json)
    if as_json:
        _json({"ok": not failures(results), "root": str(m.root), "targets": results})
    else:
        render.targets(out, m.root, results)
    raise_if_failed(results, result_printed=as_json)  # the JSON above already says which targets failed


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
        _json({"ok": True, **result}) if as_json else render.bundle(out, result, verified=True)


@app.command()
def release(
    manifest: Path = typer.Option(..., "--manifest", help="Release manifest (YAML)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output root [build/<manifest name>]."),
    jobs: int = typer.Option(1, "--jobs", min=1, max=64, help="Targets built at once."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Build even targets that are up to date."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Also sign release.json with this EC private key "
                                        "(PEM; model-signing, offline): release.json.sig beside it."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Build (or skip) every target, validate those with gates, write release.json."""
    with _command(as_json, debug):
        from aot.dist.sign import check_private_key, sign_file
        from aot.manifest import load_manifest
        from aot.release import release as run_release

        key = check_private_key(sign) if sign is not None else None  # a bad key fails before the builds
        index = run_release(load_manifest(manifest, out_dir), jobs=jobs, rebuild=rebuild, quiet=as_json)
        if key is not None:
            index["signature"] = str(sign_file(Path(index["path"]), key, Path(index["path"] + ".sig")))
        if as_json:
            return _json({"ok": True, **index})
        render.release(out, index)
        if key is not None:
            render.signed(out, index["signature"])


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
def publish(
    release_root: Path = typer.Argument(..., help="The --out root of `aot release` (holds release.json)."),
    to: str = typer.Option(..., "--to", help="A directory (which a static HTTP host can serve) or s3://BUCKET/PREFIX "
                           "(endpoint: $AWS_ENDPOINT_URL)."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the index with this EC private key (PEM; "
                                        "model-signing, offline)."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Publish a release: each bundle file as a content-addressed blob (only those the store lacks),
    then the signature, then index.json last, so readers never see half a release."""
    with _command(as_json, debug, torch=False, interrupted="the store's index.json is as it was (blobs already "
                  "uploaded stay; a re-publish skips them)"):
        from aot.dist.publish import publish as run_publish

        result = run_publish(release_root, to, sign, quiet=as_json)
        _json({"ok": True, **result}) if as_json else render.published(out, result)


@app.command()
def pull(
    index: str = typer.Argument(..., help="https://.../index.json, s3://BUCKET/PREFIX (or .../index.json), or a "
                                "local path (a directory: its index.json); plain http:// for loopback or --verify-key."),
    target: Optional[str] = typer.Option(None, "--target", help="The target to pull, by name."),
    device: Optional[str] = typer.Option(None, "--device", help="Or the best target for a phone: soc=SM8650,ram=8GiB,"
                                         "abi=arm64-v8a (ram: the memory the app may use, as --device-memory)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Also a bundle directory of links into the cache."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder [$AOT_CACHE, $XDG_CACHE_HOME/aot, "
                                         "~/.cache/aot]."),
    verify_key: Optional[Path] = typer.Option(None, "--verify-key", help="Refuse the index unless this EC public "
                                              "key (PEM) signed it."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle at --out."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Fetch a published target into the shared cache (resumed, retried, every blob's sha256
    checked) and lay it out as a bundle. Retries: $AOT_TRANSFER_ATTEMPTS, $AOT_TRANSFER_WAIT,
    $AOT_TRANSFER_TIMEOUT."""
    with _command(as_json, debug, torch=False, interrupted="no blob or bundle was written; the partial download "
                  "is kept and the same pull resumes it"):
        from aot.dist.pull import pull as run_pull

        result = run_pull(index, target=target, device=device, out=out_dir, cache=cache, verify_key=verify_key,
                          force=force, quiet=as_json)
        _json({"ok": True, **result}) if as_json else render.pulled(out, result)


@app.command()
def run(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to continue; with --chat, the user's message."),
    max_new_tokens: int = typer.Option(RUN.max_new_tokens, "--max-new-tokens", min=1, max=131072, help="Tokens to generate at most (per turn)."),
    temperature: float = typer.Option(RUN.temperature, "--temperature", min=0.0, max=100.0, help="0 = greedy."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**32 - 1, help="Sampling seed (--engine python, --chat)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="stock (ExecuTorch's TextLLMRunner) or python "
                                         "[stock; vision bundles and --chat: python]."),
    image: Optional[Path] = typer.Option(None, "--image", help="Vision bundles: an image file (PNG, JPEG, ...); "
                                         "<|image|> in --prompt marks its place [start]."),
    truncate_prompt: bool = typer.Option(False, "--truncate-prompt", help="A prompt too long for the bundle's context "
                                         "keeps BOS and its last tokens (room for --max-new-tokens) instead of failing."),
    chat: bool = typer.Option(False, "--chat", help="Chat in the bundle's own format: turns from stdin (or --prompt), "
                              "the KV cache kept between turns."),
    system: Optional[str] = typer.Option(None, "--system", help="--chat: the system message."),
    messages: Optional[Path] = typer.Option(None, "--messages", help="Answer this OpenAI-style message list (JSON) "
                                            "with one assistant turn."),
    tools: Optional[Path] = typer.Option(None, "--tools", help="--chat/--messages: OpenAI-style function schemas "
                                         "(JSON); calls are written under their grammar."),
    tool_choice: str = typer.Option("auto", "--tool-choice", help="auto, none, required, or a tool's name."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="--chat/--messages: stop string (repeatable)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Run this named adapter's program (a bundle built "
                                          "with --adapter NAME=DIR) [model.pte]."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Generate from a bundle, streaming text; then load time, TTFT, prefill and decode tok/s, and why
    it stopped (EOS, --max-new-tokens, or the bundle's context). With --chat or --messages: an
    Instruct conversation in the bundle's chat format, tool calls as {name, arguments}."""
    with _command(as_json, debug):
        from aot.errors import ConfigError
        from aot.generate import ChatConfig, RunConfig, generate

        cfg = RunConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, engine=engine, image=image,
                        truncate_prompt=truncate_prompt, adapter=adapter)
        if chat or messages is not None:
            if chat and messages is not None and prompt is not None:
                raise ConfigError("--prompt and --messages: give the conversation one way")
            ccfg = ChatConfig(system=system, messages=messages, tools=tools, tool_choice=tool_choice, stop=tuple(stop or ()))
            return _chat(bundle, cfg, ccfg, prompt, interactive=messages is None and prompt is None, as_json=as_json)
        chat_flags = [f for f, v in (("--system", system), ("--tools", tools), ("--stop", stop)) if v]
        if chat_flags or tool_choice != "auto":
            raise ConfigError(f"{', '.join(chat_flags) or '--tool-choice'}: needs --chat or --messages")
        if prompt is None:
            raise ConfigError("--prompt TEXT is required (or --chat for a conversation, --messages FILE for one turn)")
        g = generate(bundle, prompt, cfg, None if as_json else render.text_chunk)
        _json({"ok": True, "prompt": prompt, **g.to_dict()}) if as_json else render.generation(err, g)


def _chat(bundle, cfg, ccfg, prompt, interactive: bool, as_json: bool) -> None:
    """One answered turn (--messages, or --chat --prompt), or a conversation on stdin: each line a
    user message; after a tool call, the next line is the tool's result."""
    import sys

    from aot.generate import Chat

    session = Chat(bundle, cfg, ccfg)
    stream = None if as_json else render.text_chunk

    def show(turn) -> None:
        if as_json:
            print(json.dumps({"ok": True, **turn.to_dict()}), flush=True)
        else:
            render.chat_turn(out, err, turn)

    if not interactive:
        turn = session.answer(stream) if prompt is None else session.say("user", prompt, stream)
        return show(turn)
    role = "user"
    while True:
        if sys.stdin.isatty():
            err.print("[bold]tool result>[/bold] " if role == "tool" else "[bold]>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        turn = session.say(role, line.rstrip("\n"), stream)
        show(turn)
        role = "tool" if turn.tool_call is not None else "user"


@app.command()
def simulate(
    delegate: str = typer.Option(..., "--delegate", help="NPU delegate whose recipe to simulate: qnn, mediatek."),
    quant: str = typer.Option(SIMULATE.scheme, "--quant",
                              help="qnn: 16a4w, 16a4w-block, 16a8w, 8a8w; mediatek: 16a4w, 16a8w, 8a8w [16a4w]."),
    group_size: int = typer.Option(SIMULATE.group_size, "--group-size", min=1, max=4096, help="Block size of 16a4w-block [32]."),
    soc: Optional[str] = typer.Option(None, "--soc", help="Target chip, recorded [the delegate's default]."),
    kv_cache: Optional[str] = typer.Option(None, "--kv-cache", help="qnn: KV cache int8 or int16 [the activations' width]."),
    kv_bits: Optional[int] = typer.Option(None, "--kv-bits", min=4, max=16, help="qnn: --kv-cache, the old spelling (8 or 16)."),
    prefill_len: Optional[int] = typer.Option(None, "--prefill-len", min=1, max=131072, help="Tokens in the prefill call; the rest decode [max-tokens / 2]."),
    model: Optional[str] = typer.Option(None, "--model", help="demo (the embedded model), or give --checkpoint."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Meta or Hugging Face Llama folder."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to score on [the demo's held-out sample]."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration text [--text, past the scored tokens]."),
    max_tokens: int = typer.Option(SIMULATE.max_tokens, "--max-tokens", min=1, max=10**7,
                                   help="Tokens scored, and the length of each calibration window."),
    calibration_windows: int = typer.Option(SIMULATE.calibration_windows, "--calibration-windows", min=1, max=10**5, help="Calibration windows."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Simulate an NPU delegate's quantization recipe on the host (fake-quant) and report its accuracy vs fp32."""
    with _command(as_json, debug):
        from aot.progress import Stages
        from aot.simulate import SimulateConfig
        from aot.simulate import simulate as run_simulate

        cfg = SimulateConfig(delegate=delegate, checkpoint=checkpoint, model=model, scheme=quant, text=text,
                             calibration=calibration, max_tokens=max_tokens, calibration_windows=calibration_windows,
                             group_size=group_size, prefill_len=prefill_len, kv_bits=kv_bits, kv_cache=kv_cache,
                             soc=soc)
        result = run_simulate(cfg, Stages(quiet=as_json))
        _json(result) if as_json else render.simulation(out, result)


@app.command()
def validate(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Checkpoint to compare with [bundle.json's]."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to score on [the demo's held-out sample]."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, max=10**7, help="Tokens of --text scored [512]."),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", min=1, max=131072, help="Prompt length for speed [128, or "
                                                "what fits the bundle's context]."),
    decode_tokens: Optional[int] = typer.Option(None, "--decode-tokens", min=1, max=131072, help="Tokens generated for speed [64, or "
                                                "what fits]."),
    repeats: Optional[int] = typer.Option(None, "--repeats", min=1, max=1000, help="Speed runs [3]; median and spread reported."),
    skip_speed: bool = typer.Option(False, "--skip-speed", help="Accuracy only."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-ppl-ratio", min=0.0, max=1e9, help="Gate: bundle ppl / reference ppl."),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", min=0.0, max=1.0, help="Gate: top-1 agreement with the reference."),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", min=0.0, max=1e9, help="Gate: mean KL(reference || bundle)."),
    min_prefill_tps: Optional[float] = typer.Option(None, "--min-prefill-tps", min=0.0, max=1e9, help="Gate: median prefill tok/s."),
    min_decode_tps: Optional[float] = typer.Option(None, "--min-decode-tps", min=0.0, max=1e9, help="Gate: median decode tok/s."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write JUnit XML here (one testcase per gate)."),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="Vision bundles: score with these images "
                                               "(repeatable) [4 generated test images, 1-4 tiles]."),
    device: str = typer.Option("host", "--device", help="host, ssh://[user@]host[:port] or adb[:SERIAL]."),
    device_runner: Optional[Path] = typer.Option(None, "--device-runner", help="adb: ExecuTorch's llama_main for arm64-v8a."),
    device_python: str = typer.Option(DEVICE.python, "--device-python", help="ssh: the device's Python with ExecuTorch."),
    ssh_option: List[str] = typer.Option([], "--ssh-option", help="ssh: extra -o KEY=VALUE (repeatable)."),
    adb: Optional[str] = typer.Option(None, "--adb", help="adb: the adb client [$ADB, then PATH]."),
    device_timeout: float = typer.Option(DEVICE.timeout, "--device-timeout", min=0.1, max=86400.0, help="Seconds one device command may take."),
    device_prompts: int = typer.Option(DEVICE.prompts, "--device-prompts", min=1, max=1000, help="Prompts cut from --text for the device."),
    device_prompt_tokens: Optional[int] = typer.Option(None, "--device-prompt-tokens", min=1, max=131072, help="Tokens per device prompt "
                                                       "[32, or what fits the bundle's context]."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", min=1, max=131072, help="Greedy tokens generated per device prompt "
                                             "[32, or what fits]."),
    min_device_agreement: float = typer.Option(DEVICE.min_agreement, "--min-device-agreement", min=0.0, max=1.0,
                                               help="Gate: matched-prefix share of the host's tokens, per prompt."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Validate this named adapter's program against the reference with the adapter merged in fp32 (a bundle built "
                                          "with --adapter NAME=DIR) [model.pte]."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Prove a bundle's accuracy against its reference checkpoint and measure its speed, here or on a
    device (--device); gates set the exit code."""
    with _command(as_json, debug):
        from aot.gates import device_config, raise_if_gates_failed, validate_bundle
        from aot.metrics import Gates
        from aot.progress import Stages
        from aot.validate import ValidateConfig

        gates = Gates(**_given(max_ppl_ratio=max_ppl_ratio, min_top1=min_top1, max_kl=max_kl,
                               min_prefill_tps=min_prefill_tps, min_decode_tps=min_decode_tps))
        cfg = ValidateConfig(gates=gates, skip_speed=skip_speed, **_given(
            reference=reference, text=text, max_tokens=max_tokens, prompt_tokens=prompt_tokens,
            decode_tokens=decode_tokens, repeats=repeats))
        on_device = None if device == "host" else device_config(
            device, gates, prompts=device_prompts, runner=device_runner, python=device_python,
            ssh_options=tuple(ssh_option), adb=adb, timeout=device_timeout, min_agreement=min_device_agreement,
            skip_speed=skip_speed, **_given(prompt_tokens=device_prompt_tokens, new_tokens=new_tokens, repeats=repeats))
        result = validate_bundle(bundle, cfg, on_device, Stages(quiet=as_json), images=image or None, junit=junit,
                                 adapter=adapter)
        if as_json:
            _json(result)
        else:
            (render.validation if on_device is None else render.device_validation)(out, result)
        raise_if_gates_failed(result, result_printed=as_json)  # the JSON result above says "ok": false


@app.command()
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    prompt_tokens: Optional[int] = typer.Option(None, "-p", "--prompt-tokens", min=1, max=131072, help="pp N: prompt length [128, or "
                                                "what fits the bundle's context]."),
    decode_tokens: Optional[int] = typer.Option(None, "-n", "--decode-tokens", min=1, max=131072, help="tg N: tokens generated [64, or "
                                                "what fits]."),
    repeats: int = typer.Option(BENCH.repeats, "-r", "--repeats", min=1, max=1000, help="Measured runs (after one warm-up)."),
    depth: Optional[str] = typer.Option(None, "-d", "--depth", help="D[,D...]: decode -n tokens after a D-token "
                                        "context, per D (llama-bench's -d); rows ppD and tgN @ dD, with TTFT and RSS."),
    text: Optional[Path] = typer.Option(None, "--text", help="Where prompts come from, repeated for a deeper --depth "
                                        "[the demo's held-out sample]."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Time this named adapter's program (a bundle built "
                                          "with --adapter NAME=DIR) [model.pte]."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """llama-bench style speed rows (pp N, tg N: mean ± std tok/s) from ExecuTorch's runner."""
    with _command(as_json, debug):
        from aot.benchmark import bench_bundle, markdown, parse_depths

        result = bench_bundle(bundle, prompt_tokens, decode_tokens, repeats, text, parse_depths(depth), adapter)
        print(json.dumps({"ok": True, **result}) if as_json else markdown(result))


SERVE = _Defaults("aot.serve_api:ServeConfig")


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    host: str = typer.Option(SERVE.host, "--host", help="Address to listen on; beyond loopback needs --api-key."),
    port: int = typer.Option(SERVE.port, "--port", min=0, max=65535, help="Port; 0 picks a free one (the start line gives it)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="AOT_API_KEY", show_envvar=True,
                                          help="Clients must send Authorization: Bearer KEY [none: no check]."),
    queue: int = typer.Option(SERVE.queue, "--queue", min=0, max=10**4, help="Requests that may wait while one generates; more get 429."),
    max_request_bytes: int = typer.Option(SERVE.max_request_bytes, "--max-request-bytes", min=1, max=2**30,
                                          help="Larger request bodies get 413."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, max=131072, help="Cap on a request's max_tokens [the "
                                             "bundle's context]."),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", min=0.1, max=86400.0, help="Seconds a request may wait "
                                                    "in the queue, then 503 [no limit]."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="The model name clients use [the "
                                             "bundle's model name]."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """Serve a bundle over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models), one generation at a time; Ctrl-C stops."""
    with _command(as_json, debug):
        import sys

        from aot.serve import serve as run_server
        from aot.serve_api import ServeConfig

        cfg = ServeConfig(host=host, port=port, queue=queue, max_request_bytes=max_request_bytes, **_given(
            api_key=api_key or None, max_tokens=max_tokens, request_timeout=request_timeout, model_name=model_name))

        def listening(info: dict) -> None:
            _json({"ok": True, **info}) if as_json else render.serve_listening(out, info)
            sys.stdout.flush()  # scripts wait for this line

        counts = run_server(bundle, cfg, listening, debug)
        _json({"ok": True, "stopped": True, "requests": counts}) if as_json else render.serve_stopped(err, counts)


@app.command()
def doctor(as_json: bool = JSON_OPT, debug: bool = DEBUG_OPT):
    """Versions, CPU features, and which delegates can run here (and why not)."""
    with _command(as_json, debug):
        from aot.doctor import diagnose

        report = diagnose()
        _json({"ok": True, **report}) if as_json else render.doctor(out, report)


farm = typer.Typer(help="Device farms: package targets for a farm run, collect its results.", no_args_is_help=True)
app.add_typer(farm, name="farm")


@farm.command("package")
def farm_package(
    manifest: Path = typer.Option(..., "--manifest", help="Release manifest (YAML) whose targets are built."),
    out_dir: Path = typer.Option(..., "--out", help="New directory for the archives and test specs."),
    device_runner: Optional[Path] = typer.Option(None, "--device-runner", help="ExecuTorch's llama_main for arm64-v8a."),
    root: Optional[Path] = typer.Option(None, "--root", help="The manifest's output root [build/<manifest name>]."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="Only these targets (repeatable)."),
    device_prompts: int = typer.Option(DEVICE.prompts, "--device-prompts", min=1, max=1000, help="Prompts cut from the target's validation text."),
    device_prompt_tokens: Optional[int] = typer.Option(None, "--device-prompt-tokens", min=1, max=131072, help="Tokens per prompt [32, or "
                                                       "what fits the target's context]."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", min=1, max=131072, help="Greedy tokens generated per prompt [32, or "
                                             "what fits]."),
    repeats: int = typer.Option(DEVICE.repeats, "--repeats", min=1, max=1000, help="Runs of each prompt on each device (speed: median)."),
    min_device_agreement: float = typer.Option(DEVICE.min_agreement, "--min-device-agreement", min=0.0, max=1.0, help="Gate, per prompt."),
    as_json: bool = JSON_OPT,
    debug: bool = DEBUG_OPT,
):
    """One archive per target (bundle, llama_main, prompts, expected host tokens, run script) and its
    AWS Device Farm test spec."""
    with _command(as_json, debug):
        from aot.farm import package
        from aot.manifest import load_manifest
        from aot.progress import Stages

        result = package(load_manifest(manifest, root), target, out_dir, device_runner, device_prompts,
                         device_prompt_tokens, new_tokens, repeats, min_device_agreement, Stages(quiet=as_json))
        _json(result) if as_json else render.farm_packages(out, result)


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
        from aot.farm import collect, raise_if_failed
        from aot.manifest import load_manifest

        m = load_manifest(manifest, root) if manifest is not None else None
        result = collect(artifacts, junit=junit, manifest=m)
        _json(result) if as_json else render.farm_results(out, result)
        raise_if_failed(result, result_printed=as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
