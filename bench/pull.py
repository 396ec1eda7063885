"""`aot pull` throughput against a plain copy of the same bytes, and what a resumed pull fetches again.
Targets: pull >= 0.8 x the plain copy's throughput; a pull cut at 50% and resumed re-fetches < 5%.

    .venv/bin/python bench/pull.py                 # 1 GiB synthetic bundle, 3 repeats
    .venv/bin/python bench/pull.py --size 256MiB --repeats 5 --link 50m

A synthetic release (one target: --size random bytes as model.ptd, a small model.pte, a tokenizer)
is published once into --work/www, which nginx serves on 127.0.0.1 (tests/dist_servers.py): at
loopback speed, and again behind nginx's limit_rate (--link, per connection) as a stand-in for a
real link. On each, --repeats times, alternating so the machine's load falls on both alike:
  (a) the plain copy: the blob streamed to a file by requests (1 MiB reads, no hash, no fsync), and
      by curl when it is installed;
  (b) aot.dist.pull.pull(...) into a fresh cache: every file fetched, sha256-checked (in a thread of
      its own), fsynced and renamed into blobs/, the snapshot written. This is the library call: the
      CLI also imports torch at start (aot.native.quiet_libraries), reported apart as the wall time
      of one `aot pull` at loopback speed.
Throughput is the whole target's bytes over wall time; the ratio is median(b) / median(a, requests).
Then, at loopback speed, a pull through a proxy (tests/dist_servers.FaultProxy) that cuts the
weights' response at 50% with one attempt allowed (the pull fails, keeping the .incomplete file),
and a second pull through the same proxy: the bytes both sent, over the target's, give what was
fetched again. Writes --out (default bench/results/pull.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

AOT = Path(sys.executable).with_name("aot")
TARGET_RATIO, TARGET_EXTRA = 0.8, 0.05


def write_random(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        left = nbytes
        while left:
            block = os.urandom(min(left, 4 << 20))
            f.write(block)
            left -= len(block)


def make_store(work: Path, nbytes: int) -> tuple[Path, int]:
    """The published store (reused when its weights have --size bytes) and the target's total bytes."""
    from dist_servers import PTE_HEAD, fake_bundle, fake_release

    rel, store = work / "rel", work / "www" / "store"
    weights = rel / "t" / "model.ptd"
    if not (weights.is_file() and weights.stat().st_size == nbytes and (store / "index.json").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        (rel / "t").mkdir(parents=True)
        print(f"[bench] writing {nbytes / 2**30:.2f} GiB of random weights ...", flush=True)
        write_random(weights, nbytes)
        manifest = fake_bundle(rel / "t", {"model.pte": PTE_HEAD + b"\0" * 4096, "tokenizer.json": b"{}"})
        files = manifest["files"]  # fake_bundle hashed what it wrote; add the weights to bundle.json
        from aot.files import sha256_file

        files["model.ptd"] = {"sha256": sha256_file(weights), "bytes": nbytes}
        manifest["files"] = dict(sorted(files.items()))
        (rel / "t" / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
        fake_release(rel, {"t": manifest})
        done = subprocess.run([str(AOT), "publish", str(rel), "--to", str(store), "--json"], capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
    index = json.loads((store / "index.json").read_text())
    return store, sum(f["size"] for f in index["targets"][0]["files"])


def plain_copy(url: str, dest: Path) -> float:
    import requests

    start = time.perf_counter()
    with requests.get(url, stream=True, headers={"Accept-Encoding": "identity"}) as r, open(dest, "wb") as f:
        r.raise_for_status()
        for chunk in r.iter_content(1 << 20):
            f.write(chunk)
    seconds = time.perf_counter() - start
    dest.unlink()
    return seconds


def curl_copy(url: str, dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "-o", str(dest), url], check=True)
    seconds = time.perf_counter() - start
    dest.unlink()
    return seconds


def timed_pull(url: str, cache: Path) -> float:
    from aot.dist.pull import pull

    start = time.perf_counter()
    pull(url, target="t", cache=cache, quiet=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(cache)
    return seconds


def resume(port: int, url_path: str, cache: Path, weights_bytes: int, total: int) -> dict:
    """A pull cut at half the weights (one attempt), then a second pull; bytes over the wire."""
    from dist_servers import FaultProxy

    from aot.dist.pull import pull
    from aot.errors import TransferFailed

    proxy = FaultProxy(port)
    url = f"http://127.0.0.1:{proxy.port}{url_path}"
    proxy.cut_after = weights_bytes // 2
    os.environ["AOT_TRANSFER_ATTEMPTS"] = "1"
    try:
        pull(url, target="t", cache=cache, quiet=True)
        raise AssertionError("the cut pull should have failed")
    except TransferFailed:
        pass
    finally:
        del os.environ["AOT_TRANSFER_ATTEMPTS"]
    first = proxy.sent
    held = sum(p.stat().st_size for p in (cache / "tmp").iterdir())
    result = pull(url, target="t", cache=cache, quiet=True)
    proxy.close()
    shutil.rmtree(cache)
    extra = proxy.sent - total
    return {"cut_at_bytes": weights_bytes // 2, "first_pull_sent_bytes": first, "partial_kept_bytes": held,
            "second_pull_sent_bytes": proxy.sent - first, "second_pull_fetched_bytes": result["fetched_bytes"],
            "total_sent_bytes": proxy.sent, "target_bytes": total, "extra_bytes": extra,
            "extra_fraction": round(extra / total, 5), "target_extra_fraction": TARGET_EXTRA,
            "ok": extra / total < TARGET_EXTRA}


def measure(base: str, blob_url: str, work: Path, repeats: int, label: str) -> dict:
    """Median seconds of the plain copies and of pull, alternating, and pull's throughput ratio."""
    runs = {"requests_s": [], "curl_s": [], "pull_s": []}
    curl = shutil.which("curl") is not None
    for i in range(repeats):
        runs["requests_s"].append(plain_copy(blob_url, work / "copy.bin"))
        if curl:
            runs["curl_s"].append(curl_copy(blob_url, work / "copy.bin"))
        runs["pull_s"].append(timed_pull(base, work / "cache"))
        print(f"[bench] {label} run {i + 1}: requests {runs['requests_s'][-1]:.2f} s, "
              + (f"curl {runs['curl_s'][-1]:.2f} s, " if curl else "") + f"pull {runs['pull_s'][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    return {"runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items() if v},
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "pull_vs_requests": round(med["requests_s"] / med["pull_s"], 3),
            "pull_vs_curl": round(med["curl_s"] / med["pull_s"], 3) if "curl_s" in med else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB", help="Bytes of random weights (model.ptd) [1GiB].")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--link", default="100m", help="Also measure behind nginx's limit_rate (bytes/s per "
                    "connection, nginx's units: 100m = 100 MiB/s) ['100m'; 'none' to skip].")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench-pull")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pull.json")
    a = ap.parse_args()

    from dist_servers import start_nginx, stop

    from aot.doctor import host_info
    from aot.preflight import parse_size

    store, total = make_store(a.work, parse_size(a.size))
    index = json.loads((store / "index.json").read_text())
    weights = next(f for f in index["targets"][0]["files"] if f["name"] == "model.ptd")
    result = {"host": host_info(), "load_average_start": list(os.getloadavg()), "target_bytes": total,
              "weights_bytes": weights["size"], "repeats": a.repeats, "target_ratio": TARGET_RATIO}
    links = [("loopback", None)] + ([] if a.link == "none" else [(f"limit_rate {a.link}", a.link)])
    for label, rate in links:
        nginx, port = start_nginx(a.work / "www", a.work / f"nginx-{rate or 'full'}", limit_rate=rate)
        base = f"http://127.0.0.1:{port}/store"
        try:
            m = measure(base, f"{base}/blobs/sha256/{weights['sha256']}", a.work, a.repeats, label)
            if rate is None:
                start = time.perf_counter()
                subprocess.run([str(AOT), "pull", base, "--target", "t", "--cache", str(a.work / "cache"), "--json"],
                               check=True, capture_output=True)
                m["cli_pull_wall_s"] = round(time.perf_counter() - start, 3)
                shutil.rmtree(a.work / "cache")
                result["resume"] = resume(port, "/store", a.work / "cache", weights["size"], total)
        finally:
            stop(nginx)
        m["throughput_mib_s"] = {k.replace("_s", ""): round(total / 2**20 / v, 1) for k, v in m["median_s"].items()}
        m["ratio_ok"] = m["pull_vs_requests"] >= TARGET_RATIO
        result[label] = m
        t = m["throughput_mib_s"]
        print(f"[bench] {label}, {total / 2**30:.2f} GiB: plain copy {t['requests']} MiB/s (requests)"
              + (f", {t['curl']} MiB/s (curl)" if "curl" in t else "")
              + f"; aot pull {t['pull']} MiB/s (verified, fsynced): {m['pull_vs_requests']:.2f}x the requests copy "
              f"(target >= {TARGET_RATIO})" + (f"; `aot pull` CLI {m['cli_pull_wall_s']:.2f} s wall"
                                                if "cli_pull_wall_s" in m else ""))
    r = result["resume"]
    print(f"[bench] cut at 50% and resumed: {r['extra_bytes']} bytes fetched again "
          f"({100 * r['extra_fraction']:.3f}% of {total}; target < {100 * TARGET_EXTRA:.0f}%)")
    result["load_average_end"] = list(os.getloadavg())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] wrote {a.out}")


if __name__ == "__main__":
    main()
