"""Bad input: each a one-line error naming the flag or file, its exit code, and no output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import checkpoints
from conftest import run_cli


def fails(tmp_path: Path, code: int, *args, out: Path | None = None, contains: str = "") -> str:
    out = out or tmp_path / "out"
    result = run_cli("build", "--out", out, *args)
    assert result.exit_code == code, result.stderr + result.stdout
    # Progress lines may come first (stages that ran); the error itself is one line, the last.
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith(("[aot] ", "✓ ")) for line in lines[:-1]), result.stderr
    assert lines[-1].startswith("aot: error:") and contains in lines[-1], lines[-1]
    assert not out.exists() or out.is_file()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return lines[-1]


@pytest.fixture
def ckpt_copy(hf_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(hf_ckpt, tmp_path / "ckpt"))


def test_missing_checkpoint(tmp_path):
    fails(tmp_path, 4, "--checkpoint", tmp_path / "nope", contains="--checkpoint")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    fails(tmp_path, 4, "--checkpoint", tmp_path / "empty", contains="neither config.json")


def test_corrupt_safetensors(ckpt_copy, tmp_path):
    (ckpt_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    fails(tmp_path, 4, "--checkpoint", ckpt_copy, contains="model.safetensors")


def test_truncated_safetensors(ckpt_copy, tmp_path):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fails(tmp_path, 4, "--checkpoint", ckpt_copy, contains="model.safetensors")


def test_config_that_does_not_match_the_weights(ckpt_copy, tmp_path):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    cfg["intermediate_size"] = 256
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    line = fails(tmp_path, 4, "--checkpoint", ckpt_copy, contains="do not fit its config")
    assert "6 mis-shaped: model.layers.0.mlp.down_proj.weight: checkpoint [128, 384], model expects [128, 256]" in line
    assert "9 missing: layers.2.attention.wk.weight [64, 128]" in line


def test_not_a_llama_config(ckpt_copy, tmp_path):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    fails(tmp_path, 4, "--checkpoint", ckpt_copy, contains="model_type is 'mistral'")


def test_model_flag_must_match_checkpoint(hf_ckpt, tmp_path):
    fails(tmp_path, 3, "--checkpoint", hf_ckpt, "--model", "1b", contains="--model 1b does not match")


@pytest.mark.parametrize(
    "flags, contains",
    [
        (["--model", "7b", "--random-weights"], "unknown --model '7b'; choose one of: 1b, 3b"),
        (["--model", "tiny", "--random-weights", "--delegate", "coreml"], "unknown --delegate 'coreml'"),
        (["--model", "tiny", "--random-weights", "--quant", "int3"], "unknown --quant 'int3'"),
        (["--model", "tiny", "--random-weights", "--group-size", "48"], "--group-size must be one of"),
        (["--model", "tiny", "--random-weights", "--quant", "none", "--output-quant", "8da8w"], "needs a quantized"),
        (["--model", "tiny", "--random-weights", "--max-seq-len", "4096"], "--max-seq-len must be"),
        (["--model", "tiny"], "--random-weights"),
        (["--random-weights"], "needs --model"),
    ],
)
def test_bad_flags(tmp_path, flags, contains):
    fails(tmp_path, 3, *flags, contains=contains)


def test_checkpoint_and_random_weights_exclude_each_other(hf_ckpt, tmp_path):
    fails(tmp_path, 3, "--checkpoint", hf_ckpt, "--random-weights", "--model", "tiny", contains="exclude")


def test_group_size_that_does_not_divide_the_dims(hf_ckpt, tmp_path):
    line = fails(tmp_path, 3, "--checkpoint", hf_ckpt, "--group-size", "256", contains="--group-size 256")
    assert "dim (128)" in line and "choose one of: 32, 64, 128" in line


def test_eos_outside_vocab(hf_ckpt, tmp_path):
    fails(tmp_path, 3, "--checkpoint", hf_ckpt, "--eos-id", "5000", contains="outside the model's vocab")


def test_tokenizer_larger_than_the_vocab(hf_ckpt, tmp_path):
    big = checkpoints.write_tokenizer(tmp_path / "big.json", vocab_size=1100)
    fails(tmp_path, 4, "--checkpoint", hf_ckpt, "--tokenizer", big, contains="1100 tokens")


def test_existing_out_is_refused(hf_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("build", "--checkpoint", hf_ckpt, "--out", out)
    assert result.exit_code == 5 and "--force" in result.stderr
    forced = run_cli("build", "--checkpoint", hf_ckpt, "--out", out, "--force")
    assert forced.exit_code == 5 and "not an aot bundle" in forced.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_out(hf_ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    fails(tmp_path, 5, "--checkpoint", hf_ckpt, out=blocker / "bundle", contains="cannot write")


def test_pickle_that_runs_code_is_refused(meta_ckpt, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = Path(shutil.copytree(meta_ckpt, tmp_path / "meta"))
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Evil()}, bad / "consolidated.00.pth")
    line = fails(tmp_path, 4, "--checkpoint", bad, contains="consolidated.00.pth: refused to unpickle")
    assert "weights_only" in line
    assert not marker.exists()


def test_interrupt_leaves_nothing(hf_ckpt, tmp_path, monkeypatch):
    import aot.pipeline

    def interrupted(methods, weights_tag=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(aot.pipeline, "export_methods", interrupted)
    out = tmp_path / "out"
    result = run_cli("build", "--checkpoint", hf_ckpt, "--out", out)
    assert result.exit_code == 130
    assert "nothing was written" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_json_error_for_ci(tmp_path):
    result = run_cli("build", "--out", tmp_path / "o", "--model", "7b", "--random-weights", "--json")
    assert result.exit_code == 3
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["error"]["kind"] == "config"
    assert payload["error"]["exit_code"] == 3


def test_doctor_json():
    result = run_cli("doctor", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["delegates"]["xnnpack"]["available"] is True
    assert report["versions"]["executorch"] == "1.5.1"
    assert report["host"]["cores"] >= 1


# ---- defaults live in the config dataclasses; the CLI shows and passes theirs -------------------

# Lengths that default to what fits the bundle's context (None in the dataclasses) show their
# default numbers in the help text: tests/test_context_limit.py checks those.
HELP_DEFAULTS = [  # (command, flag, "module:Class.field")
    (["validate"], "--device-python", "aot.ondevice:DeviceConfig.python"),
    (["validate"], "--device-timeout", "aot.ondevice:DeviceConfig.timeout"),
    (["validate"], "--device-prompts", "aot.ondevice:DeviceConfig.prompts"),
    (["validate"], "--min-device-agreement", "aot.ondevice:DeviceConfig.min_agreement"),
    (["farm", "package"], "--repeats", "aot.ondevice:DeviceConfig.repeats"),
    (["simulate"], "--quant", "aot.simulate:SimulateConfig.scheme"),
    (["simulate"], "--group-size", "aot.simulate:SimulateConfig.group_size"),
    (["simulate"], "--max-tokens", "aot.simulate:SimulateConfig.max_tokens"),
    (["simulate"], "--calibration-windows", "aot.simulate:SimulateConfig.calibration_windows"),
    (["run"], "--max-new-tokens", "aot.generate:RunConfig.max_new_tokens"),
    (["run"], "--temperature", "aot.generate:RunConfig.temperature"),
    (["bench"], "--repeats", "aot.generate:BenchConfig.repeats"),
]


def _default_and_help_line(monkeypatch, columns: int, command: list[str], flag: str, where: str):
    """(the dataclass field's default named by `where` "module:Class.field", the --help line of `flag`)."""
    import importlib

    monkeypatch.setenv("COLUMNS", str(columns))
    module, _, attr = where.partition(":")
    cls, _, name = attr.partition(".")
    value = getattr(importlib.import_module(module), cls).__dataclass_fields__[name].default
    return value, next(ln for ln in run_cli(*command, "--help").stdout.splitlines() if f" {flag} " in ln)


@pytest.mark.parametrize("command, flag, where", HELP_DEFAULTS, ids=[f"{c[-1]} {f}" for c, f, _ in HELP_DEFAULTS])
def test_help_shows_the_dataclass_default(monkeypatch, command, flag, where):
    value, line = _default_and_help_line(monkeypatch, 200, command, flag, where)
    assert f"[default: {value}]" in line, line


def test_left_out_flags_take_the_dataclass_defaults(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import aot.benchmark
    import aot.farm
    import aot.gates
    import aot.generate
    import aot.simulate
    from aot.generate import RunConfig
    from aot.ondevice import DeviceConfig
    from aot.simulate import SimulateConfig
    from aot.texts import DEMO_CHECKPOINT
    from aot.validate import ValidateConfig

    seen = {}
    monkeypatch.setattr(aot.gates, "validate_bundle", lambda path, cfg, device, stages, images=None, junit=None, adapter=None:
                        seen.update(validate=(cfg, device)) or {"ok": True, "gates": []})
    assert run_cli("validate", "b", "--device", "ssh://board", "--json").exit_code == 0
    assert seen["validate"] == (ValidateConfig(), DeviceConfig(device="ssh://board"))
    assert run_cli("validate", "b", "--json").exit_code == 0
    assert seen["validate"] == (ValidateConfig(), None)

    monkeypatch.setattr(aot.generate, "generate", lambda path, prompt, cfg, on_text:
                        seen.update(run=cfg) or SimpleNamespace(to_dict=dict))
    assert run_cli("run", "b", "--prompt", "hi", "--json").exit_code == 0
    assert seen["run"] == RunConfig()

    monkeypatch.setattr(aot.benchmark, "bench_bundle", lambda *a: seen.update(bench=a[1:4]) or {})
    assert run_cli("bench", "b", "--json").exit_code == 0
    b = aot.generate.BenchConfig()
    assert seen["bench"] == (b.prompt_tokens, b.decode_tokens, b.repeats)

    monkeypatch.setattr(aot.simulate, "simulate", lambda cfg, stages: seen.update(simulate=cfg) or {})
    assert run_cli("simulate", "--delegate", "qnn", "--model", "demo", "--json").exit_code == 0
    assert seen["simulate"] == SimulateConfig(delegate="qnn", model="demo")
    assert seen["simulate"].checkpoint == DEMO_CHECKPOINT

    manifest = tmp_path / "m.yaml"
    manifest.write_text("version: 1\ntargets: [{name: a, model: demo}]\n")
    monkeypatch.setattr(aot.farm, "package", lambda *a: seen.update(farm=a[4:9]) or {})
    assert run_cli("farm", "package", "--manifest", manifest, "--out", tmp_path / "p", "--json").exit_code == 0
    d = DeviceConfig(device="farm")
    assert seen["farm"] == (d.prompts, d.prompt_tokens, d.new_tokens, d.repeats, d.min_agreement)


BRACKETED = [  # defaults written into help text as "[value]": they must stay the dataclasses'
    (["build"], "--seed", "aot.config:BuildConfig.seed"),
    (["build"], "--group-size", "aot.quant:QuantConfig.group_size"),
    (["build"], "--max-seq-len", "aot.config:BuildConfig.max_seq_len"),
    (["build"], "--max-context-len", "aot.config:BuildConfig.max_context_len"),
    (["build"], "--quant", "aot.quant:QuantConfig.scheme"),
    (["validate"], "--max-tokens", "aot.validate:ValidateConfig.max_tokens"),
    (["validate"], "--repeats", "aot.validate:ValidateConfig.repeats"),
    (["simulate"], "--group-size", "aot.simulate:SimulateConfig.group_size"),
]


@pytest.mark.parametrize("command, flag, where", BRACKETED, ids=[f"{c[-1]} {f}" for c, f, _ in BRACKETED])
def test_help_text_defaults_are_the_dataclasses(monkeypatch, command, flag, where):
    value, line = _default_and_help_line(monkeypatch, 250, command, flag, where)
    assert f"[{value}]" in line, line
