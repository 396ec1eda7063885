"""Scoring a bundle against its reference: the accuracy metrics over logit rows, the gates, and
JUnit XML. Pure functions on tensors and result dicts, shared by `aot validate` (text and vision),
`aot validate --device`, `aot simulate` and `aot farm collect`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from xml.etree import ElementTree as ET

import torch

from aot.errors import ConfigError

# Below this top-1 agreement the reference is not the model the bundle was built from, whatever
# the user's gates say (even 4-bit Llama keeps well above 0.8 on natural text).
MIN_REFERENCE_AGREEMENT = 0.5


@dataclass(frozen=True)
class Gates:
    max_ppl_ratio: float | None = None
    min_top1: float | None = None
    max_kl: float | None = None
    min_prefill_tps: float | None = None
    min_decode_tps: float | None = None

    def given(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def compare(ref: torch.Tensor, got: torch.Tensor, ids: torch.Tensor) -> dict:
    """Next-token metrics over positions 0..n-2 (each predicting the following token)."""
    return compare_rows(ref[:-1], got[:-1], ids[1:])


def compare_rows(ref: torch.Tensor, got: torch.Tensor, target: torch.Tensor) -> dict:
    """The metrics over logit rows [n, vocab], row i predicting target[i]."""
    ref, got = ref.float(), got.float()
    ref_logp, got_logp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    nll_ref = -ref_logp.gather(1, target[:, None]).mean().item()
    nll_got = -got_logp.gather(1, target[:, None]).mean().item()
    kl = max((ref_logp.exp() * (ref_logp - got_logp)).sum(-1).mean().item(), 0.0)  # >= 0 up to rounding
    return {
        "positions": int(target.numel()),
        "ppl_reference": round(math.exp(nll_ref), 4),
        "ppl_bundle": round(math.exp(nll_got), 4),
        "ppl_ratio": round(math.exp(nll_got - nll_ref), 4),
        "kl_mean": round(kl, 5),
        "top1_agreement": round((ref.argmax(-1) == got.argmax(-1)).float().mean().item(), 4),
        "max_abs_logit_error": round((ref - got).abs().max().item(), 4),
    }


_GATES = {  # gate -> (where the figure lives, its key, "min" or "max")
    "max_ppl_ratio": ("accuracy", "ppl_ratio", "max"),
    "min_top1": ("accuracy", "top1_agreement", "min"),
    "max_kl": ("accuracy", "kl_mean", "max"),
    "min_prefill_tps": ("speed", "prefill_tps", "min"),
    "min_decode_tps": ("speed", "decode_tps", "min"),
}


def check_gates(gates: Gates, accuracy: dict, speed: dict | None) -> list[dict]:
    results = [{
        "name": "reference_matches",
        "value": accuracy["top1_agreement"], "threshold": MIN_REFERENCE_AGREEMENT, "op": ">=",
        "ok": accuracy["top1_agreement"] >= MIN_REFERENCE_AGREEMENT,
        "hint": "top-1 agreement this low means --reference is not the model this bundle was built from",
    }]
    for name, threshold in gates.given().items():
        where, key, kind = _GATES[name]
        if where == "speed" and speed is None:
            raise ConfigError(f"--{name.replace('_', '-')} needs the speed runs; drop --skip-speed")
        value = (accuracy if where == "accuracy" else speed)[key]
        value = value["median"] if isinstance(value, dict) else value
        ok = value >= threshold if kind == "min" else value <= threshold
        results.append({"name": name, "value": value, "threshold": threshold,
                        "op": ">=" if kind == "min" else "<=", "ok": ok})
    return results


def junit_xml(result: dict) -> str:
    """JUnit XML for CI systems: one testcase per gate, every figure as a property."""
    figures = dict(result["accuracy"])
    for key, value in (result["speed"] or {}).items():
        figures[f"speed.{key}"] = value["median"] if isinstance(value, dict) else value
    return junit_suite("aot.validate", figures, [(f"aot.validate.{result['model']}", g) for g in result["gates"]])


def junit_suite(name: str, properties: dict, cases: list[tuple[str, dict]]) -> str:
    """One testsuite: `properties` as name/value pairs, one testcase per (classname, gate), a
    failure (with the gate's hint) for each gate that did not hold. Shared by `aot validate`,
    `aot validate --device` and `aot farm collect`."""
    suite = ET.Element("testsuite", name=name, tests=str(len(cases)),
                       failures=str(sum(not g["ok"] for _, g in cases)), errors="0")
    props = ET.SubElement(suite, "properties")
    for key, value in properties.items():
        ET.SubElement(props, "property", name=key, value=str(value))
    for classname, g in cases:
        case = ET.SubElement(suite, "testcase", classname=classname, name=g["name"])
        if not g["ok"]:
            failure = ET.SubElement(case, "failure", message=f"{g['name']}: {g['value']} not {g['op']} {g['threshold']}")
            failure.text = g.get("hint", "")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
