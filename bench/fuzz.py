"""Untrusted inputs, the long run: the fuzz targets of tests/fuzz_targets.py (bundle.json, the .pte
header, manifests, the release index) fed random mutations of valid samples for --seconds each, and
every hostile manifest and image of the tests, each loaded in a fresh process to measure what its
rejection costs (wall time, the peak of what Python allocated for it, and the process's RSS growth).

    .venv/bin/python bench/fuzz.py                 # 60 s per target (~6 min)
    .venv/bin/python bench/fuzz.py --seconds 600   # the long run

Prints a table; writes --out (JSON; default bench/results/fuzz.json). Findings (a reader answering
with anything but its one-line error) are listed with the input that caused them, saved under
--work; the exit code is 1 if there are any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PY = str(ROOT / ".venv" / "bin" / "python")


def mutate(rng: random.Random, sample: bytes) -> bytes:
    """Byte edits (set, insert, delete, cut, splice a run of itself, an interesting value) on `sample`."""
    raw = bytearray(sample)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(len(raw) + 1) if raw else 0
        kind = rng.randrange(6)
        if kind == 0 and raw:
            raw[min(at, len(raw) - 1)] = rng.randrange(256)
        elif kind == 1:
            raw[at:at] = bytes([rng.randrange(256)])
        elif kind == 2 and raw:
            del raw[min(at, len(raw) - 1)]
        elif kind == 3:
            raw = raw[:at]
        elif kind == 4 and raw:
            start = rng.randrange(len(raw))
            raw[at:at] = raw[start:start + rng.randint(1, 64)]
        else:
            raw[at:at] = rng.choice([b"\xff\xff\xff\xff", b"\x00" * 8, b"-1", b"1e999", b"NaN", b"[", b"{", b"&a",
                                     b"*a", b'"', b"\\u0000", str(2**64).encode(), b"../"])
    return bytes(raw)


def replace_field(rng: random.Random, sample: bytes) -> bytes:
    """JSON samples: one field (at any depth) replaced by an odd value."""
    doc = json.loads(sample)
    paths, stack = [], [((), doc)]
    while stack:
        path, node = stack.pop()
        if path:
            paths.append(path)
        if isinstance(node, dict):
            stack += [((*path, k), v) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [((*path, i), v) for i, v in enumerate(node)]
    path = rng.choice(paths)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = rng.choice([None, True, -1, 0, 2**70, 1.5, float("1e308"), "", "x" * 5000, "../../etc/passwd",
                                 [], {}, [None], {"a": [1]}, "\u0000", "model.pte"])
    return json.dumps(doc).encode()


def fuzz(seconds: float, seed: int, work: Path) -> list[dict]:
    import fuzz_targets as F

    pte = F.tiny_pte()
    targets = [
        ("bundle.json", F.sample_bundle_json(pte), lambda data, d: F.bundle_json(data, d, pte), True),
        (".pte header", pte, F.pte_header, False),
        ("manifest", F.SAMPLE_MANIFEST, F.manifest, False),
        ("release index", F.sample_index(), F.release_index, True),
    ]
    rows = []
    for name, sample, target, is_json in targets:
        rng = random.Random(seed)
        cases, outcomes, findings, worst = 0, {"ok": 0, "refused": 0}, [], 0.0
        end = time.monotonic() + seconds
        with tempfile.TemporaryDirectory() as tmp:
            while time.monotonic() < end:
                data = replace_field(rng, sample) if is_json and rng.random() < 0.5 else mutate(rng, sample)
                start = time.perf_counter()
                try:
                    outcomes[target(data, Path(tmp) / str(cases))] += 1
                except F.Finding as e:
                    digest = hashlib.sha256(data).hexdigest()[:16]
                    saved = work / f"{name.replace(' ', '_').strip('.')}-{digest}.bin"
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    saved.write_bytes(data)
                    findings.append({"error": str(e)[:300], "input": str(saved)})
                worst = max(worst, time.perf_counter() - start)
                cases += 1
        rows.append({"target": name, "cases": cases, **outcomes, "findings": len(findings),
                     "worst_case_s": round(worst, 4), "examples": findings[:5]})
        print(f"  {name:14} {cases:7} cases  ok {outcomes['ok']:6}  refused {outcomes['refused']:6}  "
              f"findings {len(findings)}  worst {worst * 1000:.1f} ms", flush=True)
    return rows


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
kind, path = sys.argv[1], Path(sys.argv[2])
from aot.errors import AotError
if kind == "manifest":
    from aot.manifest import load_manifest as load
    call = lambda: load(path, path.parent / "out")
elif kind == "image":
    from aot.families.vision.image import ImageSpec
    from aot.runner.mllama import load_image
    call = lambda: load_image(path, ImageSpec())
else:
    call = lambda: None
import tracemalloc
import psutil
proc = psutil.Process()
call_ = call
def run():
    try:
        call_(); return "accepted", ""
    except AotError as e:
        return "refused", str(e)
rss0 = proc.memory_info().rss
start = time.perf_counter()
outcome, message = run()
seconds = time.perf_counter() - start
rss1 = proc.memory_info().rss
tracemalloc.start()  # again, traced: the peak of what Python allocated for it
run()
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"outcome": outcome, "seconds": seconds, "rss_growth_mb": (rss1 - rss0) / 2**20,
                  "peak_alloc_mb": peak / 2**20, "one_line": "\n" not in message, "message_chars": len(message)}))
"""


def hostile(work: Path) -> list[dict]:
    from test_untrusted_images import HOSTILE as IMAGES
    from test_untrusted_manifests import HOSTILE as MANIFESTS

    rows = []
    work.mkdir(parents=True, exist_ok=True)
    for kind, cases in (("manifest", MANIFESTS), ("image", IMAGES)):
        for name, (raw, _) in cases.items():
            path = work / f"{kind}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
            path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
            done = subprocess.run([PY, "-c", CHILD, kind, str(path)], capture_output=True, text=True, timeout=300)
            try:
                row = json.loads(done.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                row = {"outcome": "crashed", "stderr": done.stderr[-500:]}
            rows.append({"kind": kind, "case": name, **row})
            print(f"  {kind:8} {name:40} {row['outcome']:8} {row.get('seconds', 0) * 1000:8.1f} ms "
                  f"{row.get('peak_alloc_mb', 0):7.1f} MB allocated {row.get('rss_growth_mb', 0):7.1f} MB RSS growth", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="fuzzing time per target [60]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-fuzz")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    args = ap.parse_args()
    print(f"fuzzing 4 readers, {args.seconds:g} s each (seed {args.seed})", flush=True)
    readers = fuzz(args.seconds, args.seed, args.work / "findings")
    print("hostile manifests and images, each in a fresh process", flush=True)
    cases = hostile(args.work / "cases")
    refused = [c for c in cases if c["outcome"] == "refused"]
    summary = {
        "fuzz_cases": sum(r["cases"] for r in readers), "fuzz_findings": sum(r["findings"] for r in readers),
        "hostile_cases": len(cases), "hostile_refused": len(refused),
        "hostile_not_refused": [c["case"] for c in cases if c["outcome"] != "refused"],
        "worst_rejection_s": round(max(c["seconds"] for c in refused), 3) if refused else None,
        "worst_rejection_alloc_mb": round(max(c["peak_alloc_mb"] for c in refused), 1) if refused else None,
        "worst_rejection_rss_growth_mb": round(max(c["rss_growth_mb"] for c in refused), 1) if refused else None,
        "messages_one_line": all(c.get("one_line") for c in refused),
    }
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds_per_target": args.seconds,
              "seed": args.seed, "summary": summary, "readers": readers, "hostile": cases,
              "machine_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 1 if summary["fuzz_findings"] or summary["hostile_not_refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
