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
    return summarize(row_metrics(ref, got, target))


def row_metrics(ref: torch.Tensor, got: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row figures [n] (so long texts are scored chunk by chunk and summarized per depth):
    each side's negative log-likelihood of the target, KL(ref || got), top-1 agreement, and the
    largest logit error."""
    ref, got = ref.float(), got.float()
    ref_logp, got_logp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return {
        "nll_ref": -ref_logp.gather(1, target[:, None])[:, 0],
        "nll_got": -got_logp.gather(1, target[:, None])[:, 0],
        "kl": (ref_logp.exp() * (ref_logp - got_logp)).sum(-1),
        "top1": (ref.argmax(-1) == got.argmax(-1)).float(),
        "abs_err": (ref - got).abs().amax(-1),
    }


def summarize(rows: dict[str, torch.Tensor]) -> dict:
    nll_ref, nll_got = rows["nll_ref"].mean().item(), rows["nll_got"].mean().item()
    kl = max(rows["kl"].mean().item(), 0.0)  # >= 0 up to rounding
    return {
        "positions": int(rows["top1"].numel()),
        "ppl_reference": round(math.exp(nll_ref), 4),
        "ppl_bundle": round(math.exp(nll_got), 4),
        "ppl_ratio": round(math.exp(nll_got - nll_ref), 4),
        "kl_mean": round(kl, 5),
        "top1_agreement": round(rows["top1"].mean().item(), 4),
        "max_abs_logit_error": round(rows["abs_err"].max().item(), 4),
    }


# Depth buckets of `aot validate`: the row predicting token i+1 sits at depth i (tokens before it).
DEPTH_EDGES = (0, 1024, 4096, 16384, 32768, 65536, 131072)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def by_depth(rows: dict[str, torch.Tensor], edges: tuple[int, ...] = DEPTH_EDGES) -> list[dict]:
    """summarize() per depth bucket [lo, hi) that holds rows, labelled "0-1K", "1K-4K", ..."""
    n, out = rows["top1"].numel(), []
    for lo, hi in zip(edges, edges[1:]):
        if lo >= n:
            break
        part = {k: v[lo:hi] for k, v in rows.items()}
        out.append({"depth": f"{_k(lo)}-{_k(hi)}", "from": lo, "to": min(hi, n), **summarize(part)})
    return out


_GATES = {  # gate -> (where the figure lives, its key, "min" or "max")
    "max_ppl_ratio": ("accuracy", "ppl_ratio", "max"),
    "min_top1": ("accuracy", "top1_agreement", "min"),
    "max_kl": ("accuracy", "kl_mean", "max"),
    "min_prefill_tps": ("speed", "prefill_tps", "min"),
    "min_decode_tps": ("speed", "decode_tps", "min"),
}


def check_gates(gates: Gates, accuracy: dict, speed: dict | None) -> list[dict]:
    """Each gate on the overall figure; the accuracy gates also on each depth bucket when the text
    reaches past the first (accuracy["by_depth"]), so a long context is held to them throughout."""
    results = [{
        "name": "reference_matches",
        "value": accuracy["top1_agreement"], "threshold": MIN_REFERENCE_AGREEMENT, "op": ">=",
        "ok": accuracy["top1_agreement"] >= MIN_REFERENCE_AGREEMENT,
        "hint": "top-1 agreement this low means --reference is not the model this bundle was built from",
    }]
    buckets = accuracy.get("by_depth") or []
    for name, threshold in gates.given().items():
        where, key, kind = _GATES[name]
        if where == "speed" and speed is None:
            raise ConfigError(f"--{name.replace('_', '-')} needs the speed runs; drop --skip-speed")
        value = (accuracy if where == "accuracy" else speed)[key]
        value = value["median"] if isinstance(value, dict) else value
        results.append(_gate(name, value, threshold, kind))
        if where == "accuracy" and len(buckets) > 1:
            results += [_gate(f"{name}@{b['depth']}", b[key], threshold, kind) for b in buckets]
    return results


def _gate(name: str, value: float, threshold: float, kind: str) -> dict:
    ok = value >= threshold if kind == "min" else value <= threshold
    return {"name": name, "value": value, "threshold": threshold, "op": ">=" if kind == "min" else "<=", "ok": ok}


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
