"""sha256 of model.pte for the bundles the test suite builds, for refactors that must keep the bytes.

    .venv/bin/python tools/pte_hashes.py --out /tmp/hashes.json [--only demo-8da4w,tiny-fp32]

Builds each bundle through the CLI exactly as the tests do (same checkpoints, same flags), then
prints one line per bundle and writes {name: sha256}. Compare two runs with `diff`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import checkpoints  # noqa: E402
from aot.cli import app  # noqa: E402
from aot.files import sha256_file  # noqa: E402

SEQ, CTX = 16, 64


def _cli(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"{' '.join(map(str, args))}: exit {result.exit_code}: {result.stderr}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="pte-hashes-"))
    hf = checkpoints.write_hf_checkpoint(tmp / "hf")
    mllama = checkpoints.write_mllama_checkpoint(tmp / "mllama")[0]
    tiny = ("--checkpoint", hf, "--max-seq-len", SEQ, "--max-context-len", CTX)
    vision = ("--checkpoint", mllama, "--max-seq-len", 8, "--max-context-len", 48)
    demo = ("--model", "demo", "--max-seq-len", 64, "--max-context-len", 512)
    builds = {
        "demo-8da4w": (*demo,),
        "demo-fp32": (*demo, "--quant", "none"),
        "tiny-fp32": (*tiny, "--quant", "none"),
        "tiny-8da4w": (*tiny, "--quant", "8da4w"),
        "tiny-spinquant": (*tiny, "--quant", "spinquant", "--embedding-quant", "none"),
        "vision-fp32": (*vision, "--quant", "none", "--vision-quant", "none"),
        "vision-int4": (*vision, "--vision-quant", "8da4w"),
        "qnn-static": ("--checkpoint", hf, "--delegate", "qnn", "--quant", "16a8w", "--soc", "SM8750",
                       "--kv-bits", "8", "--max-seq-len", 8, "--max-context-len", 32, "--full-logits"),
    }
    hashes = {}
    for name, flags in builds.items():
        if only and name not in only:
            continue
        out = tmp / "bundles" / name
        if name == "qnn-static":  # as tests/test_npu.py's static_bundle: every step but QnnPartitioner
            from aot.backends import Availability
            from aot.backends.qnn import Qnn

            patch = pytest.MonkeyPatch()
            patch.setattr(Qnn, "availability", lambda self: Availability(True, "partitioner left out"))
            patch.setattr(Qnn, "partitioners", lambda self, method, plan, soc=None: [])
            try:
                _cli("build", *flags, "--out", out, "--json")
            finally:
                patch.undo()
        else:
            _cli("build", *flags, "--out", out, "--json")
        hashes[name] = {p.name: sha256_file(p) for p in sorted(out.glob("*.pte"))}
        print(name, json.dumps(hashes[name]), flush=True)
    args.out.write_text(json.dumps(hashes, indent=2) + "\n")


if __name__ == "__main__":
    main()
