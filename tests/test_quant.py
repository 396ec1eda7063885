"""The scheme table: what each name resolves to, and the checks on group sizes."""

from __future__ import annotations

import pytest

from aot.errors import ConfigError
from aot.families.text.model import MODELS
from aot.quant import LayerQuant, QuantConfig, estimate_weight_bytes


def test_8da4w_default_is_metas_mobile_recipe():
    plan = QuantConfig(scheme="8da4w").plan()
    assert plan.linear == LayerQuant(4, 32, "int8-dynamic")
    assert plan.output == LayerQuant(8, 0, "int8-dynamic")  # 8da8w per-channel
    assert plan.embedding == LayerQuant(8, 0, "none")  # 8-bit per-channel
    assert plan.dtype == "float32"


@pytest.mark.parametrize(
    "kw, linear, embedding, output",
    [
        (dict(scheme="none"), None, None, None),
        (dict(scheme="bf16"), None, None, None),
        (dict(scheme="8da8w"), LayerQuant(8, 0, "int8-dynamic"), LayerQuant(8, 0, "none"), LayerQuant(8, 0, "int8-dynamic")),
        (dict(scheme="8da4w", group_size=128, embedding="4", output="8da4w"), LayerQuant(4, 128, "int8-dynamic"),
         LayerQuant(4, 32, "none"), LayerQuant(4, 128, "int8-dynamic")),
        (dict(scheme="8da4w", embedding="none", output="none"), LayerQuant(4, 32, "int8-dynamic"), None, None),
        (dict(scheme="8da4w", embedding="4", embedding_group_size=0), LayerQuant(4, 32, "int8-dynamic"),
         LayerQuant(4, 0, "none"), LayerQuant(8, 0, "int8-dynamic")),
    ],
)
def test_plans(kw, linear, embedding, output):
    plan = QuantConfig(**kw).plan()
    assert (plan.linear, plan.embedding, plan.output) == (linear, embedding, output)


def test_errors_are_collected_together():
    with pytest.raises(ConfigError) as e:
        QuantConfig(scheme="int3", group_size=48, output="fp8")
    msg = str(e.value)
    assert "unknown --quant 'int3'" in msg and "--group-size must be one of" in msg and "--output-quant" in msg
    assert "\n" not in msg


def test_group_size_must_divide_the_model():
    plan = QuantConfig(scheme="8da4w", group_size=256).plan()
    assert plan.check_dims(2048, 8192) == []
    errors = plan.check_dims(dim=64, ffn_hidden=192)
    assert errors == ["--group-size 256 does not divide the model's dim (64); choose one of: 32, 64",
                      "--group-size 256 does not divide the model's ffn_hidden (192); choose one of: 32, 64"]
    assert "8da8w" in QuantConfig(scheme="8da4w").plan().check_dims(dim=40, ffn_hidden=80)[0]


def test_estimate_for_the_real_1b():
    """fp32 1B: 1.24 B params + the untied copy of the 262 M-entry output projection."""
    args = MODELS["1b"]
    fp32 = estimate_weight_bytes(args, QuantConfig(scheme="none").plan())
    assert fp32 == 4 * (args.num_params() + args.vocab_size * args.dim)
    q = estimate_weight_bytes(args, QuantConfig(scheme="8da4w").plan())
    assert 1.0e9 < q < 1.25e9  # 4-bit linears + 8-bit embedding and output
