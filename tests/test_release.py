"""Release and manifest helpers without building anything: the one field schema, the per-target
locks, the farm's records and test spec, and how failures become exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from aot.errors import ConfigError, GatesFailed, TargetLocked, TargetsFailed

# The tables the schema replaced, as they were written by hand: the derived schema must say the same.
HAND_KEPT_FIELDS = {
    "model": ((str,), "build", "model"), "checkpoint": ((str,), "build", "checkpoint"),
    "hf_repo": ((str,), "build", "hf_repo"),
    "tokenizer": ((str,), "build", "tokenizer"), "rotation": ((str,), "build", "rotation"),
    "random_weights": ((bool,), "build", "random_weights"), "seed": ((int,), "build", "seed"),
    "delegate": ((str,), "build", "delegate"), "soc": ((str,), "build", "soc"),
    "kv_bits": ((int,), "build", "kv_bits"), "calibration": ((str,), "build", "calibration"),
    "quant": ((str,), "quant", "scheme"), "group_size": ((int,), "quant", "group_size"),
    "embedding_quant": ((str, int), "quant", "embedding"),
    "embedding_group_size": ((int,), "quant", "embedding_group_size"),
    "output_quant": ((str,), "quant", "output"), "max_seq_len": ((int,), "build", "max_seq_len"),
    "max_context_len": ((int,), "build", "max_context_len"), "kv_cache": ((str,), "build", "kv_cache"),
    "attention_sink": ((str,), "build", "attention_sink"), "device_memory": ((str,), "build", "device_memory"),
    "bos_id": ((int,), "build", "bos_id"),
    "eos_ids": ((list,), "build", "eos_ids"), "full_logits": ((bool,), "build", "full_logits"),
    "external_weights": ((bool,), "build", "external_weights"),
    "adapters": ((list,), "build", "adapters"), "adapter_mode": ((str,), "build", "adapter_mode"),
    "adapter_quant": ((str,), "build", "adapter_quant"),
    "vision_quant": ((str,), "build", "vision_quant"), "no_preflight": ((bool,), "build", "no_preflight"),
}
HAND_KEPT_VALIDATE = {"reference": (str,), "text": (str,), "max_tokens": (int,), "prompt_tokens": (int,),
                      "decode_tokens": (int,), "repeats": (int,), "skip_speed": (bool,),
                      **{k: (int, float) for k in ("max_ppl_ratio", "min_top1", "max_kl", "min_prefill_tps",
                                                   "min_decode_tps")}}


def test_the_schema_is_the_hand_kept_tables():
    from aot.config import FIELDS, PATH_FIELDS
    from aot.manifest import VALIDATE_FIELDS

    assert [(k, (f.type.yaml, f.config, f.attr)) for k, f in FIELDS.items()] == list(HAND_KEPT_FIELDS.items())
    assert PATH_FIELDS == ("checkpoint", "tokenizer", "rotation", "calibration")
    assert [(k, t.yaml) for k, t in VALIDATE_FIELDS.items()] == list(HAND_KEPT_VALIDATE.items())


def test_field_types_check_and_parse():
    from aot.config import FIELDS

    eos, emb, seed, ckpt = (FIELDS[k].type for k in ("eos_ids", "embedding_quant", "seed", "checkpoint"))
    assert eos.accepts([1, 2]) and not eos.accepts([1, True]) and not eos.accepts("1")
    assert eos.describe() == "list of ints" and eos.parse([1, 2]) == (1, 2)
    assert emb.accepts(8) and emb.accepts("none") and not emb.accepts(8.5) and emb.parse(8) == "8"
    assert seed.accepts(0) and not seed.accepts(True) and seed.describe() == "int"
    assert ckpt.parse("~/x") == Path("~/x").expanduser() and ckpt.parse(None) is None


def test_given_fields_drops_what_was_left_out():
    from aot.config import given_fields

    params = {"model": "demo", "seed": 0, "random_weights": False, "eos_ids": [], "quant": None, "out_dir": "x",
              "full_logits": True}
    assert given_fields(params) == {"model": "demo", "seed": 0, "full_logits": True}


def test_build_config_names_unknown_fields():
    from aot.config import build_config

    with pytest.raises(ConfigError, match="unknown build field 'colour'; choose one of: model, checkpoint"):
        build_config(Path("out"), colour="red")
    cfg = build_config(Path("out"), model="demo", eos_ids=[5], embedding_quant=8)
    assert cfg.eos_ids == (5,) and cfg.quant.embedding == "8"


# ---- per-target locks ---------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from aot.release import target_lock
with target_lock(Path(sys.argv[1]), "t"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_process_is_refused_at_once_and_told_the_holder(tmp_path):
    from aot.release import LOCKS, target_lock

    (tmp_path / LOCKS).mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with pytest.raises(TargetLocked) as e, target_lock(tmp_path, "t"):
            pass
        assert time.perf_counter() - start < 1.0
        assert str(e.value) == f"target 't' is being built by pid {holder.pid}; wait for it or pick other targets"
        assert e.value.exit_code == 11
        with target_lock(tmp_path, "u"):  # other targets are free
            pass
    finally:
        holder.kill()
        holder.wait()
    with target_lock(tmp_path, "t"):  # the kernel dropped the dead holder's lock
        assert (tmp_path / LOCKS / "t.lock").read_text() == f"pid {__import__('os').getpid()}"
        with pytest.raises(TargetLocked), target_lock(tmp_path, "t"):  # a second hold here is refused too
            pass
    assert (tmp_path / LOCKS / "t.lock").read_text() == ""  # released: names nobody


# ---- farm records and spec ----------------------------------------------------------------------

def _farm_result(ok: bool) -> dict:
    gate = {"name": "prompt0.agreement_host", "value": 0.5, "op": ">=", "threshold": 1.0, "ok": ok}
    run = {"target": "demo", "device": {"serial": "SIM-1", "model": "Pixel"}, "ok": ok, "gates": [gate],
           "prompts": [{"agreement_host": 0.5}], "speed": None}
    return {"format": "aot-farm-results", "runs": [run], "ok": ok}


def test_farm_results_are_recorded_beside_the_release(tmp_path):
    from aot.farm import record

    manifest = SimpleNamespace(root=tmp_path / "root")
    record(manifest, _farm_result(True))
    assert json.loads((manifest.root / "devices.json").read_text())["ok"] is True
    assert not (manifest.root / "release.json").exists()  # only a summary in an existing index
    (manifest.root / "release.json").write_text(json.dumps({"format": "aot-release", "targets": []}))
    record(manifest, _farm_result(False))
    index = json.loads((manifest.root / "release.json").read_text())
    assert index["targets"] == [] and index["devices"] == {
        "results": "devices.json", "ok": False,
        "runs": [{"target": "demo", "device": {"serial": "SIM-1", "model": "Pixel"}, "ok": False}]}
    assert sorted(p.name for p in manifest.root.iterdir()) == ["devices.json", "release.json"]  # no temp files


# The spec as it was written by hand (a template string) before yaml.safe_dump.
HAND_WRITTEN_SPEC = """\
# AWS Device Farm test spec for aot target {target} (written by `aot farm package`).
version: 0.1
android_test_host: amazon_linux_2
phases:
  install:
    commands:
      - adb version
  pre_test:
    commands:
      - adb -s "$DEVICEFARM_DEVICE_UDID" wait-for-device
  test:
    commands:
      - sh "$DEVICEFARM_TEST_PACKAGE_PATH/{target}/run_on_device.sh" "$DEVICEFARM_DEVICE_UDID" "$DEVICEFARM_LOG_DIR/aot/{target}/$DEVICEFARM_DEVICE_UDID"
  post_test:
    commands:
      - ls -R "$DEVICEFARM_LOG_DIR/aot"
artifacts:
  - $DEVICEFARM_LOG_DIR
"""


@pytest.mark.parametrize("target", ["demo-8da4w", "1b-xnnpack-8da4w-g128", "3b_qnn.16a4w"])
def test_the_dumped_spec_reads_as_the_hand_written_one(target):
    from aot.farm.aws import test_spec

    spec = test_spec(target)
    assert yaml.safe_load(spec) == yaml.safe_load(HAND_WRITTEN_SPEC.format(target=target))
    assert spec.splitlines()[0] == HAND_WRITTEN_SPEC.format(target=target).splitlines()[0]


def test_the_spec_quotes_what_yaml_would_misread():
    from aot.farm.aws import test_spec

    (command,) = yaml.safe_load(test_spec("odd: name #1"))["phases"]["test"]["commands"]
    assert command.startswith('sh "$DEVICEFARM_TEST_PACKAGE_PATH/odd: name #1/run_on_device.sh"')


# ---- failures -> exit codes ---------------------------------------------------------------------

def test_failed_gates_name_each_gate():
    from aot.farm import raise_if_failed
    from aot.gates import raise_if_gates_failed

    raise_if_gates_failed({"ok": True, "gates": []})
    gates = [{"name": "min_top1", "value": 0.5, "op": ">=", "threshold": 0.9, "ok": False, "hint": "try 8da8w"},
             {"name": "max_kl", "value": 0.01, "op": "<=", "threshold": 0.1, "ok": True}]
    with pytest.raises(GatesFailed) as e:
        raise_if_gates_failed({"ok": False, "gates": gates}, result_printed=True)
    assert str(e.value) == "gates failed: min_top1: 0.5 not >= 0.9 (try 8da8w)" and e.value.result_printed
    with pytest.raises(GatesFailed) as e:
        raise_if_failed(_farm_result(False))
    assert str(e.value) == "gates failed: SIM-1/demo: prompt0.agreement_host: 0.5 not >= 1.0"
    assert e.value.exit_code == 9 and not e.value.result_printed


def test_failed_targets_are_summed_up():
    from aot.release import raise_if_failed

    raise_if_failed([{"name": "a", "status": "skipped"}])
    with pytest.raises(TargetsFailed) as e:
        raise_if_failed([{"name": "a", "status": "built"},
                         {"name": "b", "status": "locked", "error": {"message": "held"}}], result_printed=True)
    assert str(e.value) == "1 of 2 targets failed: b: held" and e.value.result_printed and e.value.exit_code == 10


def test_teacher_forced_gates_are_refused_on_a_device():
    from aot.gates import device_config
    from aot.metrics import Gates

    with pytest.raises(ConfigError, match=r"^--max-ppl-ratio is scored on the host \(teacher-forced logits\)"):
        device_config("ssh://board", Gates(min_top1=0.9, max_ppl_ratio=1.1))
    cfg = device_config("adb", Gates(min_decode_tps=5.0), prompts=2)
    assert (cfg.device, cfg.prompts, cfg.min_decode_tps, cfg.min_prefill_tps, cfg.repeats) == ("adb", 2, 5.0, None, 3)
