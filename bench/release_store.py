"""What a release stores and what a re-publish uploads, with and without external weights.

One model and recipe (the demo model, 8da4w) as two targets, 2K and 128K positions, released twice:
single-file bundles, and with --external-weights. Each release is published (`aot publish`, content
addressed) into a fresh directory store; then one target changes (the 128K target's KV cache becomes
int8), `aot release` rebuilds only it, and the re-publish counts what it uploads.

    .venv/bin/python bench/release_store.py            # 6 builds of the demo model
    .venv/bin/python bench/release_store.py --model 1b --kinds external --out bench/results/release_store_1b.json
                                                       # the real 1B architecture, random weights (seed 0)

Writes --out (JSON; default bench/results/release_store.json) and the table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AOT = str(ROOT / ".venv" / "bin" / "aot")

MANIFEST = """version: 1
defaults:
  model: {model}
  quant: 8da4w
  max_seq_len: 64
  external_weights: {external}
targets:
  - name: ctx2k
    max_context_len: 2048
  - name: ctx128k
    max_context_len: 131072
{extra}"""


def aot(*args: str) -> dict:
    start = time.perf_counter()
    done = subprocess.run([AOT, *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"aot {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return {**json.loads(done.stdout), "wall_s": round(time.perf_counter() - start, 1)}


def store_bytes(store: Path) -> tuple[int, int]:
    blobs = [p for p in (store / "blobs").rglob("*") if p.is_file()]
    return len(blobs), sum(p.stat().st_size for p in blobs)


def run(work: Path, external: bool, model: str) -> dict:
    kind = "external" if external else "single"
    manifest, root, store = work / f"{kind}.yaml", work / kind, work / f"{kind}-store"
    text = MANIFEST.format(model=model, external=str(external).lower(), extra="")
    if model != "demo":  # the real architecture with random weights: the same seed, the same weights
        text = text.replace("  quant: 8da4w", "  quant: 8da4w\n  random_weights: true")
    manifest.write_text(text)
    release = aot("release", "--manifest", str(manifest), "--out", str(root))
    first = aot("publish", str(root), "--to", str(store))
    blobs, stored = store_bytes(store)
    # one target changes: the 128K target's cache becomes int8; only it rebuilds
    manifest.write_text(text.replace("    max_context_len: 131072", "    max_context_len: 131072\n    kv_cache: int8"))
    again = aot("release", "--manifest", str(manifest), "--out", str(root))
    second = aot("publish", str(root), "--to", str(store))
    files = {t["name"]: {n: f["bytes"] for n, f in t["files"].items()} for t in release["targets"]}
    return {
        "kind": kind,
        "model": model,
        "release_s": release["wall_s"],
        "files": files,
        "release_bytes": release["storage"]["bytes"],
        "stored_blobs": blobs,
        "stored_bytes": stored,
        "first_publish": {k: first.get(k) for k in ("uploaded", "skipped", "uploaded_bytes", "wall_s")},
        "rebuilt": [t["name"] for t in again["targets"] if t["build"]["status"] == "built"],
        "republish": {k: second.get(k) for k in ("uploaded", "skipped", "uploaded_bytes", "wall_s")},
        "republished_files": second.get("uploaded_files"),
    }


def table(results: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:.2f} MiB" if n is not None else "?"  # noqa: E731
    lines = ["| release | .pte (2K / 128K) | .ptd | stored | re-publish after one target changed |",
             "|---|---|---|---|---|"]
    for r in results:
        pte = " / ".join(mib(r["files"][t]["model.pte"]) for t in ("ctx2k", "ctx128k"))
        ptd = mib(r["files"]["ctx2k"].get("model.ptd", 0)) if "model.ptd" in r["files"]["ctx2k"] else "-"
        rp = r["republish"]
        lines.append(f"| {r['kind']} | {pte} | {ptd} | {mib(r['stored_bytes'])} of {mib(r['release_bytes'])} "
                     f"| {rp['uploaded']} blobs, {mib(rp['uploaded_bytes'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="[build/bench-release-store-MODEL]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "release_store.json")
    ap.add_argument("--model", default="demo", help="demo (its weights), or 1b/3b (random weights) [demo]")
    ap.add_argument("--kinds", default="single,external", help="which releases: single, external [both]")
    args = ap.parse_args()
    import shutil

    args.work = args.work or ROOT / "build" / f"bench-release-store-{args.model}"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    kinds = args.kinds.split(",")
    results = [run(args.work, kind == "external", args.model) for kind in ("single", "external") if kind in kinds]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(results))
    print(table(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
