"""Manifests: every shipped one loads; targets build, skip when up to date, rebuild when an input
changes, reproduce byte for byte; bad manifests list every problem; locks keep runs apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aot.errors import ConfigError
from aot.manifest import load_manifest
from conftest import CTX, SEQ, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "manifests").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_manifest_loads(path, tmp_path):
    m = load_manifest(path, tmp_path)
    assert m.targets and len({t.name for t in m.targets}) == len(m.targets)
    assert all(t.build.out.is_relative_to(tmp_path) for t in m.targets)


def two_targets(tmp_path: Path, ckpt: Path, seq: int = SEQ) -> Path:
    path = tmp_path / "release.yaml"
    path.write_text(f"""
version: 1
defaults:
  checkpoint: {ckpt}
  max_context_len: {CTX}
targets:
  - name: fp32
    quant: none
    max_seq_len: {SEQ}
    validate: {{max_ppl_ratio: 1.01, min_top1: 0.99, skip_speed: true, max_tokens: 48}}
  - name: q4
    quant: 8da4w
    max_seq_len: {seq}
    out: quantized/q4
""")
    return path


def build_json(*args) -> tuple[int, dict]:
    result = run_cli("build", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def statuses(payload: dict) -> dict:
    return {t["name"]: t["status"] for t in payload["targets"]}


@pytest.mark.e2e
def test_build_skip_rebuild_and_reproduce(hf_ckpt, tmp_path):
    root = tmp_path / "out"
    manifest = two_targets(tmp_path, hf_ckpt)
    code, first = build_json("--manifest", manifest, "--out", root)
    assert code == 0 and statuses(first) == {"fp32": "built", "q4": "built"}
    assert (root / "fp32" / "model.pte").is_file() and (root / "quantized" / "q4" / "model.pte").is_file()
    pte = {t: json.loads((root / out / "bundle.json").read_text())["files"]["model.pte"]["sha256"]
           for t, out in (("fp32", "fp32"), ("q4", "quantized/q4"))}

    code, second = build_json("--manifest", manifest, "--out", root)
    assert code == 0 and statuses(second) == {"fp32": "skipped", "q4": "skipped"}

    two_targets(tmp_path, hf_ckpt, seq=SEQ // 2)  # one input of one target changes
    code, third = build_json("--manifest", manifest, "--out", root)
    assert code == 0 and statuses(third) == {"fp32": "skipped", "q4": "built"}

    code, forced = build_json("--manifest", manifest, "--out", root, "--target", "fp32", "--rebuild")
    assert code == 0 and statuses(forced) == {"fp32": "built"}
    again = json.loads((root / "fp32" / "bundle.json").read_text())["files"]["model.pte"]["sha256"]
    assert again == pte["fp32"]  # byte-identical rebuild

    release = run_cli("release", "--manifest", manifest, "--out", root, "--json")
    assert release.exit_code == 0, release.stderr
    index = json.loads((root / "release.json").read_text())
    by_name = {t["name"]: t for t in index["targets"]}
    assert by_name["fp32"]["validation"]["ok"] and by_name["q4"]["validation"] is None
    assert by_name["q4"]["bundle"] == "quantized/q4"
    assert by_name["fp32"]["files"]["model.pte"]["sha256"] == pte["fp32"]
    assert index["manifest"]["sha256"] and index["versions"]["executorch"] == "1.5.1"

    # A gate that cannot hold: the release fails and leaves no index behind.
    (root / "release.json").unlink()
    manifest.write_text(manifest.read_text().replace("min_top1: 0.99", "min_top1: 1.01"))
    failed = run_cli("release", "--manifest", manifest, "--out", root)
    assert failed.exit_code == 10 and "validation gates failed" in failed.stderr
    assert not (root / "release.json").exists()


@pytest.mark.heavy  # 55 s; make test-all (CI keeps under 20 min)
def test_failing_target_does_not_stop_the_others_unless_fail_fast(hf_ckpt, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""
version: 1
targets:
  - name: broken
    checkpoint: {tmp_path / 'missing'}
  - name: fine
    checkpoint: {hf_ckpt}
    quant: none
    max_seq_len: {SEQ}
    max_context_len: {CTX}
""")
    code, payload = build_json("--manifest", manifest, "--out", tmp_path / "o", "--fail-fast")
    assert code == 10 and statuses(payload) == {"broken": "failed", "fine": "not-built"}
    assert "not a directory" in payload["targets"][0]["error"]["message"]
    result = run_cli("build", "--manifest", manifest, "--out", tmp_path / "o")
    assert result.exit_code == 10
    assert "1 of 2 targets failed: broken: --checkpoint" in result.stderr.strip().splitlines()[-1]
    assert (tmp_path / "o" / "fine" / "model.pte").is_file()


def test_a_locked_target_is_refused(hf_ckpt, tmp_path):
    from aot.release import target_lock

    manifest = two_targets(tmp_path, hf_ckpt)
    root = tmp_path / "out"
    (root / ".aot-locks").mkdir(parents=True)
    with target_lock(root, "fp32"):
        code, payload = build_json("--manifest", manifest, "--out", root, "--target", "fp32")
    assert code == 10 and statuses(payload) == {"fp32": "locked"}
    assert "is being built by pid" in payload["targets"][0]["error"]["message"]
    assert not (root / "fp32").exists()


def test_plan_formats(hf_ckpt, tmp_path):
    manifest = two_targets(tmp_path, hf_ckpt)
    github = json.loads(run_cli("plan", "--manifest", manifest, "--format", "github").stdout)
    assert [j["target"] for j in github["include"]] == ["fp32", "q4"]
    assert github["include"][1]["command"] == f"aot build --manifest {manifest} --target q4"
    plan = json.loads(run_cli("plan", "--manifest", manifest, "--out", "rel").stdout)
    assert plan["collect"] == f"aot release --manifest {manifest} --out rel"
    assert run_cli("plan", "--manifest", manifest, "--format", "yaml").exit_code == 3
    # Device-validation jobs: one per target and device, each after its target's build.
    plan = json.loads(run_cli("plan", "--manifest", manifest, "--out", "rel", "--device", "ssh://pi@board:2222",
                              "--device", "adb:R5CT", "--device-runner", "bin/llama_main").stdout)
    device_jobs = [j for j in plan["jobs"] if j.get("kind") == "device-validation"]
    assert [(j["needs"], j["device"]) for j in device_jobs] == [
        ("fp32", "ssh://pi@board:2222"), ("fp32", "adb:R5CT"), ("q4", "ssh://pi@board:2222"), ("q4", "adb:R5CT")]
    assert device_jobs[3]["command"] == ("aot validate rel/quantized/q4 --device adb:R5CT --json --junit q4.adb-R5CT.xml "
                                         "--device-runner bin/llama_main")
    no_runner = run_cli("plan", "--manifest", manifest, "--device", "adb")
    assert no_runner.exit_code == 3 and "--device-runner" in no_runner.stderr


MALFORMED = [
    ("version: 1\ntargets: [{name: a, model: demo, colour: red}]", ["target 'a': unknown key 'colour'"]),
    ("version: 2\ntargets: [{name: a, model: demo}]", ["'version' must be 1, but got 2"]),
    ("targets: [{name: a, model: demo}]\nextra: 1", ["unknown top-level key 'extra'", "'version' must be 1"]),
    ("version: 1\ntargets: [{name: a, model: demo}, {name: a, model: demo}]", ["target 'a': duplicate name"]),
    ("version: 1\ntargets: [{name: a, model: demo, max_seq_len: long}]",
     ["target 'a': key 'max_seq_len' must be int, but got 'long'"]),
    ("version: 1\ntargets: [{name: a, model: demo, random_weights: 1}]", ["key 'random_weights' must be bool"]),
    ("version: 1\ntargets: [{name: a, model: demo, out: ../../etc}]", ["key 'out' (../../etc) escapes the output root"]),
    ("version: 1\ntargets: [{name: a, model: demo, out: /tmp/x}]", ["escapes the output root"]),
    ("version: 1\ntargets: [{model: demo}]", ["'name' is required"]),
    ("version: 1\ntargets: [{name: a, model: 7b}]", ["target 'a': unknown --model '7b'"]),
    ("version: 1\ntargets: [{name: a, model: demo, group_size: 48, quant: int3}]",
     ["unknown --quant 'int3'", "--group-size must be one of"]),
    ("version: 1\ntargets: [{name: a, model: demo, validate: {min_top1: high, mood: good}}]",
     ["target 'a' validate: unknown key 'mood'", "key 'min_top1' must be int or float"]),
    ("version: 1\nmatrix: [{name: '{size}-x', model: [demo]}]", ["neither an axis nor a field"]),
    ("version: 1\ntargets: []", ["no targets"]),
    ("version: 1\ntargets: [{name: a, model: demo}\n", ["not valid YAML at line"]),
    ("- just\n- a list\n", ["the document must be a mapping"]),
]


@pytest.mark.parametrize("text, expected", MALFORMED, ids=[m[1][0][:40] for m in MALFORMED])
def test_malformed_manifests_list_every_problem(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_manifest(path, tmp_path / "out")
    message = str(e.value)
    assert message.startswith(str(path)) and "\n" not in message
    for part in expected:
        assert part in message, message
    result = run_cli("build", "--manifest", path, "--out", tmp_path / "out")
    assert result.exit_code == 3 and not (tmp_path / "out").exists()


def test_matrix_expands_with_generated_names(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\nmatrix:\n  - {model: demo, quant: [8da4w, 8da8w], group_size: [32, 64],"
                    " name: '{model}-{quant}-g{group_size}'}\n")
    names = [t.name for t in load_manifest(path, tmp_path).targets]
    assert names == ["demo-8da4w-g32", "demo-8da4w-g64", "demo-8da8w-g32", "demo-8da8w-g64"]


def test_build_flags_and_manifest_do_not_mix(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\ntargets: [{name: a, model: demo}]\n")
    result = run_cli("build", "--manifest", path, "--quant", "none")
    assert result.exit_code == 3 and "--quant: set these in the manifest" in result.stderr
    assert run_cli("build", "--model", "demo", "--jobs", "2", "--out", tmp_path / "x").exit_code == 3


def test_rotation_files_are_found_beside_the_manifest(tmp_path):
    path = tmp_path / "sq.yaml"
    path.write_text("version: 1\ntargets:\n  - {name: sq, model: demo, quant: spinquant, rotation: rot/R.bin}\n"
                    "  - {name: plain, model: demo, quant: 8da4w, rotation: R.bin}\n")
    with pytest.raises(ConfigError) as e:
        load_manifest(path, tmp_path / "out")
    assert "target 'plain'" in str(e.value) and "--rotation applies to --quant spinquant" in str(e.value)
    path.write_text("version: 1\ntargets:\n  - {name: sq, model: demo, quant: spinquant, rotation: rot/R.bin}\n")
    (target,) = load_manifest(path, tmp_path / "out").targets
    assert target.build.rotation == tmp_path / "rot" / "R.bin"
    assert target.build.quant.scheme == "spinquant"
