"""`aot validate` and `aot bench` on the embedded demo model."""

from __future__ import annotations

import json
import shutil
from xml.etree import ElementTree as ET

import pytest

from conftest import run_cli

# The thresholds README states for the demo model's 8da4w bundle.
DEMO_GATES = ["--max-ppl-ratio", "1.05", "--min-top1", "0.85", "--max-kl", "0.05"]


def test_demo_bundle_validates_within_readme_thresholds(demo_bundle, tmp_path):
    junit = tmp_path / "validate.xml"
    result = run_cli("validate", demo_bundle["path"], *DEMO_GATES, "--repeats", "2",
                     "--decode-tokens", "32", "--prompt-tokens", "64", "--json", "--junit", junit)
    assert result.exit_code == 0, result.stderr + result.stdout
    r = json.loads(result.stdout)
    a = r["accuracy"]
    assert r["ok"] and r["reference"]["is_build_input"]
    assert 1.0 < a["ppl_reference"] < 200  # a trained model: far below the 2048-token vocabulary
    assert a["ppl_bundle"] > 0 and a["positions"] == 511
    assert r["speed"]["decode_tps"]["median"] > 0 and r["speed"]["prefill_tps"]["median"] > 0
    assert len(r["speed"]["decode_tps"]["runs"]) == 2 and r["speed"]["peak_rss_mib"] > 0
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "0"
    assert {c.get("name") for c in suite.iter("testcase")} == {"reference_matches", "max_ppl_ratio", "min_top1", "max_kl"}
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert float(props["ppl_ratio"]) == a["ppl_ratio"] and "speed.decode_tps" in props


def test_gates_set_the_exit_code(demo_bundle):
    result = run_cli("validate", demo_bundle["path"], "--skip-speed", "--max-ppl-ratio", "1.0000001", "--min-top1", "0.999")
    assert result.exit_code == 9
    assert "min_top1" in result.stderr.strip().splitlines()[-1]


def test_a_different_checkpoint_fails_clearly(demo_bundle, tmp_path):
    """Same architecture, other (random) weights: the reference check fails whatever the gates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from aot.config import DEMO_CHECKPOINT

    other = tmp_path / "other"
    config = LlamaConfig.from_pretrained(DEMO_CHECKPOINT)
    LlamaForCausalLM(config).save_pretrained(other)
    shutil.copyfile(DEMO_CHECKPOINT / "tokenizer.json", other / "tokenizer.json")
    result = run_cli("validate", demo_bundle["path"], "--reference", other, "--skip-speed", "--json")
    assert result.exit_code == 9
    r = json.loads(result.stdout)
    assert not r["ok"] and not r["reference"]["is_build_input"]
    assert "not the model this bundle was built from" in result.stderr


def test_a_different_architecture_is_refused(demo_bundle, hf_ckpt):
    result = run_cli("validate", demo_bundle["path"], "--reference", hf_ckpt, "--skip-speed")
    assert result.exit_code == 4
    assert "is a different model" in result.stderr and "dim 256 vs 128" in result.stderr


def test_bench_rows(demo_bundle):
    result = run_cli("bench", demo_bundle["path"], "-p", "32", "-n", "16", "-r", "2", "--json")
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    assert [row["test"][:2] for row in r["rows"]] == ["pp", "tg"]
    assert all(row["tps_mean"] > 0 and len(row["runs"]) == 2 for row in r["rows"])
    table = run_cli("bench", demo_bundle["path"], "-p", "32", "-n", "16", "-r", "2").stdout
    assert table.startswith("| model |") and "| demo |" in table and " ± " in table


@pytest.mark.oracle
def test_demo_checkpoint_loads_in_transformers():
    """The shipped demo model is an ordinary Llama checkpoint (HF layout, bf16)."""
    from transformers import LlamaForCausalLM

    from aot.config import DEMO_CHECKPOINT

    model = LlamaForCausalLM.from_pretrained(DEMO_CHECKPOINT)
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert sum(f.stat().st_size for f in DEMO_CHECKPOINT.iterdir()) < 8.5e6

