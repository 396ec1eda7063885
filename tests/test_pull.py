"""`aot pull` against real servers on 127.0.0.1: nginx serving a published folder, behind a proxy
that cuts, fails, stalls or slows responses (tests/dist_servers.py), and moto's S3 server. What
must hold: every blob verified before it is visible in the cache, a cut download resumed (not
restarted), each failure its own exit code, nothing written outside the cache and --out whatever
the index says, and --device picking the target that fits."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from aot.dist.pull import pull as library_pull
from aot.dist.sources import open_source
from aot.dist.transfer import Transfer
from conftest import run_cli
from dist_servers import FaultProxy, env_with, error_line, fake_bundle, fake_release, synthetic_release, write_keys

WEIGHTS = 4 << 20  # the synthetic target's model.ptd


@pytest.fixture(scope="module")
def served(nginx_server, tmp_path_factory) -> dict:
    """A one-target synthetic release published twice under nginx (signed, and unsigned), and a
    fault proxy in front of nginx."""
    d = tmp_path_factory.mktemp("served")
    weights = os.urandom(WEIGHTS)
    root = synthetic_release(d / "rel", weights)
    priv, pub = write_keys(d / "keys")
    _, other = write_keys(d / "keys", "other")
    www = nginx_server["root"]
    for sub, flags in (("signed", ["--sign", priv]), ("unsigned", [])):
        r = run_cli("publish", root, "--to", www / sub, *flags)
        assert r.exit_code == 0, r.stderr
    proxy = FaultProxy(nginx_server["port"])
    yield {"root": root, "www": www, "pub": pub, "other": other, "priv": priv, "proxy": proxy,
           "weights": hashlib.sha256(weights).hexdigest(), "url": f"http://127.0.0.1:{proxy.port}",
           "direct": f"http://127.0.0.1:{nginx_server['port']}"}
    proxy.close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch, tmp_path):
    monkeypatch.setenv("AOT_TRANSFER_ATTEMPTS", "3")
    monkeypatch.setenv("AOT_TRANSFER_WAIT", "0.01")
    monkeypatch.setenv("AOT_TRANSFER_TIMEOUT", "2")
    monkeypatch.setenv("AOT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def proxy(served):
    served["proxy"].reset()
    yield served["proxy"]
    served["proxy"].reset()


def pull(*args) -> tuple[int, dict | None, object]:
    r = run_cli("pull", *args, "--json")
    return r.exit_code, json.loads(r.stdout.splitlines()[-1]) if r.stdout.strip() else None, r


def cache_state(cache: Path, digest: str) -> tuple[bool, bool]:
    """(blob in blobs/, partial in tmp/)."""
    return (cache / "blobs" / "sha256" / digest).exists(), (cache / "tmp" / f"{digest}.incomplete").exists()


def test_a_signed_pull_verifies_every_blob_and_lays_out_links(served, proxy, tmp_path):
    out = tmp_path / "bundle"
    code, result, r = pull(f"{served['url']}/signed/index.json", "--target", "t", "--verify-key", served["pub"],
                           "--out", out)
    assert code == 0, r.stderr
    assert result["verified"] and result["fetched_bytes"] == result["bytes"] > WEIGHTS
    cache = tmp_path / "cache"
    for f in result["files"]:
        blob = cache / "blobs" / "sha256" / f["sha256"]
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == f["sha256"]
        assert not blob.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)  # read-only
        assert (out / f["name"]).resolve() == blob.resolve()
        assert (Path(result["snapshot"]) / f["name"]).resolve() == blob.resolve()
    assert not any((cache / "tmp").iterdir())
    assert (out / "model.ptd").read_bytes() == (served["root"] / "t" / "model.ptd").read_bytes()

    code, again, r = pull(f"{served['url']}/signed", "--target", "t", "--out", out, "--force")
    assert code == 0 and again["fetched_bytes"] == 0 and again["cached_bytes"] == again["bytes"], r.stderr
    assert pull(f"{served['url']}/signed", "--target", "t", "--out", out)[0] == 5  # exists, no --force
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, r = pull(f"{served['url']}/signed", "--target", "t", "--out", tmp_path / "mine", "--force")
    assert code == 5 and "not an aot bundle" in error_line(r) and (tmp_path / "mine" / "notes.txt").exists()
    code, _, r = pull(f"{served['url']}/signed", "--target", "nope")
    assert code == 3 and "it has t" in error_line(r)


def test_a_cut_download_resumes_on_the_next_pull(served, proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("AOT_TRANSFER_ATTEMPTS", "1")
    proxy.cut_after = WEIGHTS // 2
    code, _, r = pull(f"{served['url']}/signed", "--target", "t")
    assert code == 16 and "connection" in error_line(r), r.stderr
    cache = tmp_path / "cache"
    assert cache_state(cache, served["weights"]) == (False, True)
    held = (cache / "tmp" / f"{served['weights']}.incomplete").stat().st_size
    assert WEIGHTS // 4 < held <= WEIGHTS // 2

    code, result, r = pull(f"{served['url']}/signed", "--target", "t")
    assert code == 0, r.stderr
    ptd = next(f for f in result["files"] if f["name"] == "model.ptd")
    assert ptd["resumed_at"] == held and cache_state(cache, served["weights"]) == (True, False)
    assert proxy.sent < 1.05 * result["bytes"]  # both pulls together: the first half was not fetched again


def test_a_cut_within_one_pull_is_retried_from_where_it_stopped(served, proxy, tmp_path):
    proxy.cut_after = WEIGHTS // 3
    code, result, r = pull(f"{served['url']}/signed", "--target", "t")
    assert code == 0, r.stderr
    ranges = [q for q in proxy.requests if served["weights"] in q]
    assert len(ranges) == 2 and proxy.sent < 1.05 * result["bytes"]


def test_server_errors_are_retried_then_reported(served, proxy, monkeypatch, tmp_path):
    proxy.fail_next = 2  # the index request, then its retry
    code, result, r = pull(f"{served['url']}/signed", "--target", "t")
    assert code == 0 and proxy.requests[:3] == ["GET /signed/index.json"] * 3, (r.stderr, proxy.requests)

    proxy.reset()
    proxy.fail_path = "/blobs/"
    monkeypatch.setenv("AOT_TRANSFER_ATTEMPTS", "2")
    code, _, r = pull(f"{served['url']}/signed", "--target", "t", "--cache", tmp_path / "second")
    assert code == 16 and "HTTP 500" in error_line(r) and "after 2 attempts" in error_line(r)


def test_a_missing_index_or_blob_is_not_found(served, proxy, tmp_path):
    code, _, r = pull(f"{served['url']}/nothing-here/index.json", "--target", "t")
    assert code == 15 and "HTTP 404" in error_line(r)
    proxy.missing_path = served["weights"]
    code, _, r = pull(f"{served['url']}/signed", "--target", "t")
    assert code == 15 and served["weights"] in error_line(r)
    assert cache_state(tmp_path / "cache", served["weights"]) == (False, False)


def test_a_corrupt_blob_on_the_server_is_refused_and_not_cached(served, proxy, tmp_path):
    store = served["www"] / "corrupt"
    assert run_cli("publish", served["root"], "--to", store).exit_code == 0
    blob = store / "blobs" / "sha256" / served["weights"]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    code, _, r = pull(f"{served['url']}/corrupt", "--target", "t")
    assert code == 17 and "sha256" in error_line(r)
    assert cache_state(tmp_path / "cache", served["weights"]) == (False, False)


def test_a_slow_server_completes_and_a_stalled_one_times_out(served, proxy, monkeypatch, tmp_path):
    proxy.rate = 8 << 20  # 8 MiB/s: half a second for the weights, reads far inside the timeout
    code, result, r = pull(f"{served['url']}/signed", "--target", "t", "--cache", tmp_path / "slow")
    assert code == 0 and result["fetched_bytes"] == result["bytes"], r.stderr

    proxy.reset()  # a stall: the read times out, and the retry resumes after what had come
    monkeypatch.setenv("AOT_TRANSFER_TIMEOUT", "0.5")
    proxy.stall_after = 100_000
    code, result, r = pull(f"{served['url']}/signed", "--target", "t", "--cache", tmp_path / "stalled")
    assert code == 0 and result["fetched_bytes"] == result["bytes"], r.stderr
    assert sum(served["weights"] in q for q in proxy.requests) == 2

    proxy.reset()  # and with no attempt left, one line
    monkeypatch.setenv("AOT_TRANSFER_ATTEMPTS", "1")
    proxy.stall_after = 100_000
    start = time.monotonic()
    code, _, r = pull(f"{served['url']}/signed", "--target", "t")
    assert code == 16 and "timed out" in error_line(r) and time.monotonic() - start < 10


def test_a_full_disk_is_one_line_and_leaves_no_partial(served, proxy, tmp_path):
    cache = tmp_path / "small"
    cache.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(cache)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a 1 MiB filesystem to fill")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs to fill (needs root): {done.stderr.decode().strip()}")
    try:
        code, _, r = pull(f"{served['url']}/signed", "--target", "t", "--cache", cache)
        assert code == 21 and "disk full" in error_line(r), r.stderr
        assert cache_state(cache, served["weights"]) == (False, False)
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_signatures_are_required_and_checked_with_verify_key(served, proxy):
    code, _, r = pull(f"{served['url']}/unsigned", "--target", "t", "--verify-key", served["pub"])
    assert code == 18 and "unsigned" in error_line(r)
    code, _, r = pull(f"{served['url']}/signed", "--target", "t", "--verify-key", served["other"])
    assert code == 18 and "another key" in error_line(r)

    # Tampered: a changed index under a copy of the old signature, named as the new digest wants.
    src, dst = served["www"] / "signed", served["www"] / "tampered"
    assert run_cli("publish", served["root"], "--to", dst, "--sign", served["priv"]).exit_code == 0
    raw = (dst / "index.json").read_bytes()
    sig = (dst / "signatures" / f"{hashlib.sha256(raw).hexdigest()}.sig").read_bytes()
    forged = raw.replace(b'"quant": "none"', b'"quant": "8da4w"')
    assert forged != raw
    (dst / "index.json").write_bytes(forged)
    (dst / "signatures" / f"{hashlib.sha256(forged).hexdigest()}.sig").write_bytes(sig)
    code, _, r = pull(f"{served['url']}/tampered", "--target", "t", "--verify-key", served["pub"])
    assert code == 18 and "does not match" in error_line(r)
    assert src.is_dir()


def test_plain_http_only_from_loopback_or_with_verify_key(served, tmp_path):
    for url in ("http://192.0.2.1/index.json", "http://example.com/r/index.json"):
        code, _, r = pull(url, "--target", "t")
        assert code == 3 and "loopback" in error_line(r)
    cfg = Transfer(attempts=1)
    for url in ("http://192.0.2.1/r/index.json", "https://example.com/r/index.json"):  # accepted, not yet read
        source, key = open_source(url, cfg, verify_key=url.startswith("http:"))
        assert source.where(key) == url
    for url in ("http://localhost:1/index.json", "http://[::1]:1/index.json", "http://127.1.2.3:1/index.json"):
        source, key = open_source(url, cfg, verify_key=False)
        assert key == "index.json"


def _unsafe_store(d: Path, mutate) -> Path:
    """A published synthetic store whose index.json `mutate(index)` has changed."""
    root = synthetic_release(d / "rel", b"w" * 1000)
    assert run_cli("publish", root, "--to", d / "store").exit_code == 0
    index = json.loads((d / "store" / "index.json").read_text())
    mutate(index)
    (d / "store" / "index.json").write_text(json.dumps(index))
    return d / "store"


def _file(index: dict, name: str) -> dict:
    return next(f for f in index["targets"][0]["files"] if f["name"] == name)


UNSAFE = {
    "dotdot": lambda i: _file(i, "model.ptd").update(name="../x"),
    "absolute": lambda i: _file(i, "model.ptd").update(name="/etc/passwd"),
    "backslash": lambda i: _file(i, "model.ptd").update(name="..\\x"),
    "nul": lambda i: _file(i, "model.ptd").update(name="a\0b"),
    "empty": lambda i: _file(i, "model.ptd").update(name=""),
    "target": lambda i: i["targets"][0].update(name="../t"),
    "upper-digest": lambda i: _file(i, "model.ptd").update(sha256=_file(i, "model.ptd")["sha256"].upper()),
    "short-digest": lambda i: _file(i, "model.ptd").update(sha256="abc"),
    "size-string": lambda i: _file(i, "model.ptd").update(size="1000"),
    "size-bool": lambda i: _file(i, "model.ptd").update(size=True),
    "twice": lambda i: i["targets"][0]["files"].append(dict(_file(i, "model.ptd"))),
    "newer": lambda i: i.update(format_version=2),
    "not-an-index": lambda i: i.update(format="something"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_an_unsafe_or_malformed_index_is_refused_and_nothing_is_written(tmp_path, case):
    store = _unsafe_store(tmp_path / "pub", UNSAFE[case])
    before = sorted(p for p in tmp_path.rglob("*"))
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    code, _, r = pull(store / "index.json", "--target", "../t" if case == "target" else "t",
                      "--out", work / "out", "--cache", work / "cache")
    assert code == 20 and "refusing the index" in error_line(r), r.stderr
    assert not (work / "out").exists() and not (tmp_path / "work" / "x").exists() and not (tmp_path / "x").exists()
    assert sorted(p for p in tmp_path.rglob("*") if "work" not in p.parts) == before
    assert not (work / "cache").exists() or not any((work / "cache" / "blobs" / "sha256").iterdir())


def test_two_pulls_at_once_share_the_cache(served, proxy, tmp_path):
    proxy.rate = 16 << 20
    results, errors = [], []

    def one(i: int) -> None:
        try:
            results.append(library_pull(f"{served['url']}/signed", target="t", quiet=True))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2
    assert sum(r["fetched_bytes"] for r in results) == results[0]["bytes"]  # each blob fetched once
    assert sum(1 for q in proxy.requests if served["weights"] in q) == 1


def test_device_picks_the_target_that_fits(tmp_path):
    pte = b"\x1c\x00\x00\x00ET12" + b"\0" * 24
    bundles = {
        "cpu-short": fake_bundle(tmp_path / "rel" / "cpu-short", {"model.pte": pte + b"1"}, ctx=2048, at_load=1 << 30),
        "cpu-long": fake_bundle(tmp_path / "rel" / "cpu-long", {"model.pte": pte + b"2"}, ctx=8192, at_load=3 << 30),
        "qnn-8650": fake_bundle(tmp_path / "rel" / "qnn-8650", {"model.pte": pte + b"3"}, delegate="qnn",
                                soc="SM8650", ctx=1024, at_load=2 << 30),
        "mtk-6989": fake_bundle(tmp_path / "rel" / "mtk-6989", {"model.pte": pte + b"4"}, delegate="mediatek",
                                soc="mt6989", ctx=4096, at_load=2 << 30),
    }
    root = fake_release(tmp_path / "rel", bundles)
    assert run_cli("publish", root, "--to", tmp_path / "store").exit_code == 0
    store = tmp_path / "store"

    def pick(device: str) -> dict:
        code, result, r = pull(store, "--device", device)
        assert code == 0, r.stderr
        return result["selection"]

    s = pick("soc=SM8650,ram=8GiB,abi=arm64-v8a")
    assert s["target"] == "qnn-8650" and "NPU" in s["why"]
    reasons = {x["name"]: x["reason"] for x in s["rejected"]}
    assert "mediatek" in reasons["mtk-6989"] and "runs on the SoC's NPU" in reasons["cpu-long"]
    s = pick("soc=SM8750,ram=8GiB,abi=arm64-v8a")
    assert s["target"] == "cpu-long" and "SM8650, not SM8750" in {x["name"]: x["reason"] for x in s["rejected"]}["qnn-8650"]
    assert pick("soc=mt6989,ram=8GiB,abi=arm64-v8a")["target"] == "mtk-6989"
    assert pick("ram=2GiB,abi=x86_64")["target"] == "cpu-short"  # cpu-long needs 3 GiB
    code, _, r = pull(store, "--device", "soc=SM8650,ram=512MiB,abi=arm64-v8a")
    assert code == 19 and "more than ram" in error_line(r)
    code, _, r = pull(store, "--device", "ram=8GiB,abi=armeabi-v7a")
    assert code == 19 and "not armeabi-v7a" in error_line(r)
    for bad in ("soc=SM8650", "ram=lots,abi=x86_64", "ram=8GiB,cpu=x"):
        assert pull(store, "--device", bad)[0] == 3
    assert pull(store)[0] == 3 and pull(store, "--target", "cpu-short", "--device", "ram=1GiB,abi=x86_64")[0] == 3


def test_s3_pull_resumes_through_a_cut(s3_env, tmp_path, monkeypatch):
    weights = os.urandom(2 << 20)
    root = synthetic_release(tmp_path / "rel", weights)
    url = f"s3://{s3_env['bucket']}/pull-test"
    assert run_cli("publish", root, "--to", url).exit_code == 0
    proxy = FaultProxy(int(s3_env["endpoint"].rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    proxy.cut_after = 1 << 20
    try:
        code, result, r = pull(f"{url}/index.json", "--target", "t", "--out", tmp_path / "b")
    finally:
        proxy.close()
    assert code == 0, r.stderr
    ptd = next(f for f in result["files"] if f["name"] == "model.ptd")
    assert ptd["sha256"] == hashlib.sha256(weights).hexdigest() and (tmp_path / "b" / "model.ptd").read_bytes() == weights
    assert result["fetched_bytes"] == result["bytes"]  # resumed at the cut, not restarted
    assert proxy.sent < 1.05 * result["bytes"] + 20_000  # S3 answers carry a few KiB of headers
    code, _, r = pull(f"s3://{s3_env['bucket']}/no-such-prefix", "--target", "t")
    assert code == 15 and "no such object" in error_line(r)


def test_ctrl_c_keeps_the_partial_download_and_a_rerun_completes(served, proxy, tmp_path):
    proxy.rate = 512 << 10  # 8 s for the weights: room to interrupt
    cache = tmp_path / "cache"
    partial = cache / "tmp" / f"{served['weights']}.incomplete"
    proc = subprocess.Popen([sys.executable, "-m", "aot.cli", "pull", f"{served['url']}/signed", "--target", "t",
                             "--cache", cache], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=env_with(AOT_TRANSFER_ATTEMPTS="1"))
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > 64 << 10):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr.decode()
    assert cache_state(cache, served["weights"]) == (False, True)
    held = partial.stat().st_size

    proxy.rate = None
    code, result, r = pull(f"{served['url']}/signed", "--target", "t", "--cache", cache)
    assert code == 0, r.stderr
    assert next(f for f in result["files"] if f["name"] == "model.ptd")["resumed_at"] == held
    assert cache_state(cache, served["weights"]) == (True, False)


@pytest.mark.e2e
def test_the_release_pulled_by_device_over_http_inspects_and_runs(release_bundles, nginx_server, tmp_path):
    priv, pub = write_keys(tmp_path)
    r = run_cli("publish", release_bundles["root"], "--to", nginx_server["root"] / "release", "--sign", priv)
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "phone"
    code, result, r = pull(f"http://127.0.0.1:{nginx_server['port']}/release/index.json",
                           "--device", "ram=1GiB,abi=arm64-v8a", "--verify-key", pub, "--out", out)
    assert code == 0, r.stderr
    assert result["target"] == "long" and "longest context" in result["selection"]["why"]
    inspected = run_cli("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert json.loads(inspected.stdout)["files"] == json.loads(
        (Path(release_bundles["root"]) / "long" / "bundle.json").read_text())["files"]
    ran = run_cli("run", out, "--prompt", "hi", "--max-new-tokens", "4", "--json")
    assert ran.exit_code == 0, ran.stderr
