"""aot/config.py: BuildConfig's defaults and cross-field rules, and build_config's one entry point,
which reports every problem (quantization and the rest) together in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from aot.config import DEMO_CHECKPOINT, BuildConfig, build_config
from aot.errors import ConfigError
from aot.quant import QuantConfig


def error(**fields) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(Path("out"), **fields)
    message = str(e.value)
    assert "\n" not in message
    return message


RANDOM_1B = dict(model="1b", random_weights=True)


def test_defaults():
    cfg = build_config(Path("out"), **RANDOM_1B)
    assert (cfg.delegate, cfg.quant, cfg.max_seq_len, cfg.max_context_len) == ("xnnpack", QuantConfig(), 128, 2048)
    assert cfg.quant.scheme == "8da4w" and cfg.soc is None and not cfg.force


def test_demo_ships_its_checkpoint():
    assert BuildConfig(out=Path("o"), model="demo").checkpoint == DEMO_CHECKPOINT
    assert BuildConfig(out=Path("o"), model="demo", random_weights=True).checkpoint is None


@pytest.mark.parametrize("fields, message", [
    (dict(model="7b", random_weights=True), "unknown --model '7b'; choose one of: 1b, 3b"),
    (dict(), "give --checkpoint DIR"),
    (dict(checkpoint="ckpt", **RANDOM_1B), "--checkpoint and --random-weights exclude each other"),
    (dict(random_weights=True), "--random-weights needs --model NAME"),
    (dict(rotation="R.bin", **RANDOM_1B), "--rotation applies to --quant spinquant, not --quant 8da4w"),
    (dict(delegate="tpu", **RANDOM_1B), "unknown --delegate 'tpu'; choose one of: mediatek, qnn, xnnpack"),
    (dict(max_seq_len=4096, **RANDOM_1B), "--max-seq-len must be between 1 and --max-context-len (2048)"),
    (dict(max_context_len=1, max_seq_len=1, **RANDOM_1B), "--max-context-len must be between 2 and 131072"),
    (dict(bos_id=-1, **RANDOM_1B), "--bos-id must be >= 0"),
    (dict(eos_ids=[], **RANDOM_1B), "--eos-id must be one or more ids >= 0"),
    (dict(soc="SM8650", **RANDOM_1B), "--soc applies to NPU delegates, not --delegate xnnpack"),
    (dict(kv_bits=8, **RANDOM_1B), "--kv-bits 8: --delegate xnnpack takes no --kv-bits"),
    (dict(calibration="c.txt", **RANDOM_1B), "--calibration applies to NPU delegates"),
    (dict(vision_quant="8da8w", **RANDOM_1B), "--vision-quant applies to vision models"),
    (dict(quant="16a4w", **RANDOM_1B), "--delegate xnnpack does not take --quant 16a4w"),
    (dict(quant="int3", **RANDOM_1B), "unknown --quant 'int3'"),
    (dict(group_size=48, **RANDOM_1B), "--group-size must be one of 32, 64, 128, 256, but got 48"),
    (dict(quant="none", output_quant="8da8w", **RANDOM_1B), "--output-quant 8da8w needs a quantized --quant"),
    (dict(colour="red"), "unknown build field 'colour'"),
])
def test_each_rule_names_the_flag(fields, message):
    assert message in error(**fields)


def test_every_problem_is_reported_together():
    message = error(model="7b", random_weights=True, group_size=48, max_seq_len=0, bos_id=-2)
    for part in ("--group-size must be", "unknown --model '7b'", "--max-seq-len must be", "--bos-id must be"):
        assert part in message
    assert message.count("; ") >= 3


def test_npu_delegates_get_their_own_defaults():
    cfg = build_config(Path("out"), delegate="qnn", **RANDOM_1B)
    assert cfg.quant.scheme == "16a4w" and cfg.soc == "SM8650"
    assert "unknown --soc 'SM0000' for --delegate qnn" in error(delegate="qnn", soc="SM0000", **RANDOM_1B)
    assert "--delegate qnn does not take --quant 8da4w" in error(delegate="qnn", quant="8da4w", **RANDOM_1B)
    assert "--kv-bits 4: --delegate qnn takes 8, 16" in error(delegate="qnn", kv_bits=4, **RANDOM_1B)


def test_fields_are_converted_like_flags():
    cfg = build_config(Path("out"), checkpoint="~/ckpt", eos_ids=[1, 2], embedding_quant=4, quant="8da8w")
    assert cfg.checkpoint == Path.home() / "ckpt"
    assert cfg.eos_ids == (1, 2) and cfg.quant.embedding == "4"
    d = cfg.to_dict()
    assert d["checkpoint"] == str(Path.home() / "ckpt") and d["out"] == "out" and d["eos_ids"] == [1, 2]
    assert d["quant"]["scheme"] == "8da8w"
