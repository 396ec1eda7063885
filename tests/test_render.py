"""The human-readable views (aot.render): what each prints for a given result, nothing computed."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from aot import render


def printed(view, *args) -> str:
    console = Console(file=io.StringIO(), width=200, highlight=False, soft_wrap=True)
    view(console, *args)
    return console.file.getvalue()


def test_targets():
    results = [{"name": "a", "status": "built", "out": "a", "seconds": 12.34, "pte_bytes": 3 * 2**20},
               {"name": "b", "status": "failed", "out": "q/b", "error": {"message": "no checkpoint"}}]
    assert printed(render.targets, Path("/r"), results).splitlines() == [
        "/r",
        "  built     a                                       12.3 s      3.00 MiB  a  ",
        "  failed    b                                    " + " " * 9 + " " + " " * 13 + "  q/b  no checkpoint",
    ]


def test_release():
    index = {"path": "/r/release.json", "targets": [
        {"name": "a", "build": {"status": "skipped"}, "files": {"model.pte": {"bytes": 2**20}}, "validation": None},
        {"name": "b", "build": {"status": "built"}, "files": {"model.pte": {"bytes": 2**21}},
         "validation": {"ok": True}}]}
    assert printed(render.release, index).splitlines() == [
        "/r/release.json  (2 targets)",
        "  a                                    skipped       1.00 MiB  no gates",
        "  b                                    built         2.00 MiB  gates pass",
    ]


def test_farm_table():
    result = {"runs": [{"device": {"serial": "S1", "model": None}, "target": "t", "ok": False, "speed": None,
                        "prompts": [{"agreement_host": 0.5}, {"agreement_host": 1.0}],
                        "gates": [{"name": "prompt0.agreement_host", "ok": False}]}]}
    assert render.farm_table(result).splitlines()[2] == "| S1 (S1) | t | 50% | - | - | FAIL: prompt0.agreement_host |"


def test_doctor():
    report = {"versions": {"aot": "0.1.0"}, "host": {"cpu": "x", "cores": 2, "arch": "x86_64", "cpu_features": [],
                                                     "memory_gib": 8},
              "delegates": {"qnn": {"available": False, "reason": "no SDK"}}}
    assert printed(render.doctor, report).splitlines() == [
        "aot          0.1.0", "cpu          x (2 cores, x86_64)", "features     -", "memory       8 GiB",
        "delegates:", "  qnn        no  no SDK"]
    report["hf_cache"] = {"path": "/c", "checkpoints": [
        {"hf_repo": "meta-llama/Llama-3.2-1B-Instruct", "revision": "a" * 40, "state": "complete", "model": "1b"}]}
    assert printed(render.doctor, report).splitlines()[-2:] == [
        "hf cache:    /c", "  meta-llama/Llama-3.2-1B-Instruct           aaaaaaaaaaaa  --model 1b"]
