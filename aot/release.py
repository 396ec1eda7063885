"""Building a manifest's targets, the release index, and the CI job matrix.

Each target builds in a fresh worker process (memory is returned between targets and several can
run at once with --jobs), under a per-target lock, and is skipped when its bundle is intact and
its input key (config, input file hashes, toolchain) is unchanged.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shlex
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from aot.backends import get_backend
from aot.bundle import BUNDLE_JSON, PTE_NAME, open_bundle, read_bundle
from aot.errors import AotError, ConfigError, OutputError, TargetLocked, TargetsFailed
from aot.families import family_for
from aot.files import sha256_file, write_atomically
from aot.manifest import Manifest, Target
from aot.native import quiet_libraries
from aot.pipeline import build, fingerprint, versions
from aot.preflight import parse_size, runtime
from aot.progress import Stages
from aot.validate import validate

RELEASE_JSON = "release.json"
LOCKS = ".aot-locks"


def build_targets(manifest: Manifest, names: list[str] | None = None, jobs: int = 1,
                  fail_fast: bool = False, rebuild: bool = False, quiet: bool = False) -> list[dict]:
    """Build the selected targets; one result per target, in manifest order."""
    targets = manifest.select(names)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, but got {jobs}")
    _prepare_root(manifest.root)
    results: dict[str, dict] = {}
    pending = list(targets)
    context = multiprocessing.get_context("spawn")  # a clean interpreter per target
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, max_tasks_per_child=1) as pool:
        running = {}
        while pending or running:
            while pending and len(running) < jobs and not (fail_fast and _any_failed(results)):
                t = pending.pop(0)
                running[pool.submit(run_target, manifest.root, t, rebuild, quiet)] = t
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                t = running.pop(future)
                results[t.name] = future.result()
        for t in pending:  # left out by --fail-fast
            results[t.name] = {"name": t.name, "status": "not-built", "out": t.out,
                               "error": {"message": "not built: an earlier target failed (--fail-fast)"}}
    return [results[t.name] for t in targets]


def _any_failed(results: dict) -> bool:
    return any(r["status"] in ("failed", "locked") for r in results.values())


def _prepare_root(root: Path) -> None:
    try:
        (root / LOCKS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {root}: cannot write there ({e.strerror}); choose a writable --out") from None


@contextmanager
def target_lock(root: Path, name: str):
    """An exclusive lock per target, so concurrent runs on one output root never interleave.

    filelock's native lock (flock) on <root>/.aot-locks/<name>.lock, never waited for: a second
    process (or a second hold in this one) is refused at once, told the holder's pid, which the
    holder writes into the lock file. The kernel drops the lock when its holder dies.
    """
    path = root / LOCKS / f"{name}.lock"
    lock = FileLock(path, timeout=0, on_acquired=_write_owner)  # on_acquired: native flock only
    try:
        lock.acquire()
    except Timeout:
        raise TargetLocked(f"target '{name}' is being built by {_owner(path)}; "
                           "wait for it or pick other targets") from None
    try:
        yield
    finally:
        with suppress(OSError):
            path.write_text("")  # while still held: a later refusal never names a finished process
        lock.release()


def _write_owner(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:  # released (and removed) meanwhile
        return "another process"


def run_target(root: Path, target: Target, rebuild: bool, quiet: bool) -> dict:
    """Worker: build one target unless it is up to date. Never raises for user errors."""
    quiet_libraries(debug=False)
    start = time.perf_counter()
    out = root / target.out
    result = {"name": target.name, "out": target.out}
    try:
        with target_lock(root, target.name):
            key = fingerprint(target.build)
            if not rebuild and _up_to_date(out, key):
                manifest = read_bundle(out)
                return {**result, "status": "skipped", "reason": "up to date (same input key)",
                        "seconds": round(time.perf_counter() - start, 1),
                        "pte_bytes": manifest["files"][PTE_NAME]["bytes"], "input_key": key}
            manifest = build(target.build, Stages(quiet=quiet, prefix=target.name))
            return {**result, "status": "built", "seconds": round(time.perf_counter() - start, 1),
                    "pte_bytes": manifest["files"][PTE_NAME]["bytes"], "input_key": key}
    except TargetLocked as e:
        return {**result, "status": "locked", "error": _error(e)}
    except AotError as e:
        return {**result, "status": "failed", "seconds": round(time.perf_counter() - start, 1), "error": _error(e)}


def _error(e: AotError) -> dict:
    return {"kind": e.kind, "message": str(e), "exit_code": e.exit_code}


def _up_to_date(out: Path, key: str) -> bool:
    try:
        manifest = open_bundle(out).manifest  # every sha256 checked
    except AotError:
        return False
    return manifest.get("build", {}).get("input_key") == key


def failures(results: list[dict]) -> list[dict]:
    return [r for r in results if r["status"] not in ("built", "skipped")]


def raise_if_failed(results: list[dict], result_printed: bool = False) -> None:
    """TargetsFailed naming each failed target; `result_printed`: the --json result says it already."""
    bad = failures(results)
    if bad:
        error = TargetsFailed(
            f"{len(bad)} of {len(results)} targets failed: "
            + "; ".join(f"{r['name']}: {r['error']['message']}" for r in bad)
        )
        error.result_printed = result_printed
        raise error


def release(manifest: Manifest, jobs: int = 1, rebuild: bool = False, quiet: bool = False) -> dict:
    """Build (or skip) every target, validate those with gates, then write release.json.

    The index is written only when every target built and every gate held, so a release.json
    on disk always describes a complete, validated release.
    """

    results = build_targets(manifest, jobs=jobs, rebuild=rebuild, quiet=quiet)
    raise_if_failed(results)
    entries, failed_gates = [], []
    for target, built in zip(manifest.targets, results):
        bundle = open_bundle(manifest.root / target.out)
        validation = None
        if target.validate is not None:
            validation = validate(bundle, target.validate, Stages(quiet=quiet, prefix=target.name))
            if not validation["ok"]:
                failed_gates.append(f"{target.name}: " + ", ".join(g["name"] for g in validation["gates"] if not g["ok"]))
        m = bundle.manifest
        entries.append({
            "name": target.name,
            "bundle": target.out,
            "bundle_json_sha256": sha256_file(bundle.root / BUNDLE_JSON),
            "files": m["files"],
            "model": m["model"]["name"], "quant": m["quant"]["scheme"], "delegate": m["delegate"],
            "input_key": m["build"]["input_key"],
            "build": {k: built.get(k) for k in ("status", "seconds")},
            "validation": validation,
        })
    if failed_gates:
        raise TargetsFailed("validation gates failed, no release.json written: " + "; ".join(failed_gates))

    index = {
        "format": "aot-release",
        "format_version": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "manifest": {"path": str(manifest.path), "sha256": manifest.sha256},
        "versions": versions(),
        "targets": entries,
        "storage": storage(entries),
    }
    write_atomically(manifest.root / RELEASE_JSON, json.dumps(index, indent=2) + "\n")
    return {**index, "path": str(manifest.root / RELEASE_JSON)}


def storage(entries: list[dict]) -> dict:
    """What the release's files weigh in all, and stored by content (each sha256 once, as `aot
    publish` stores them): targets with external weights of one model and recipe share a .ptd."""
    files = [f for e in entries for f in e["files"].values()]
    unique = {f["sha256"]: f["bytes"] for f in files}
    return {"files": len(files), "bytes": sum(f["bytes"] for f in files),
            "unique_files": len(unique), "unique_bytes": sum(unique.values())}


def device_fit(cfg) -> dict:
    """A target's predicted runtime plan against its device_memory, as `aot build` would check it
    before building (aot.preflight.runtime); resolving the model reads its checkpoint's config."""
    fit = {"device_memory_bytes": parse_size(cfg.device_memory)}
    try:
        src = family_for(cfg).resolve(cfg, fetch=False)  # `aot plan` reads the cache, never the network
        predict = {"args": src.args, "kinds": src.preflight[1], "text_plan": src.preflight[2],
                   "vision_plan": (src.preflight[3:] or (None,))[0], "backend": get_backend(cfg.delegate)}
        est = runtime(replace(cfg, device_memory=None), **predict)
    except AotError as e:
        return {**fit, "fits": None, "reason": f"not predicted: {e}"}
    fit.update(predicted_at_load_bytes=est["at_load_bytes"], biggest=est["biggest"],
               fits=est["at_load_bytes"] <= fit["device_memory_bytes"])
    if not fit["fits"]:
        try:
            runtime(cfg, **predict)
        except ConfigError as e:  # the refusal `aot build` would print, with what would make it fit
            fit["reason"] = str(e)
    return fit


def plan(manifest: Manifest, fmt: str, manifest_arg: str, root_arg: str | None, devices: tuple[str, ...] = (),
         device_runner: str | None = None) -> str:
    """The target list as a CI job matrix: one `aot build --manifest F --target N` per job, and with
    `devices`, one `aot validate BUNDLE --device D` job per host-runnable target and device (each
    needs its target's build job; NPU bundles run with their vendor runtime and are left out). In
    the json format, a target with device_memory also shows its predicted runtime plan against it."""
    if fmt not in ("json", "github"):
        raise ConfigError(f"--format must be json or github, but got '{fmt}'")

    jobs = []
    for t in manifest.targets:
        command = ["aot", "build", "--manifest", manifest_arg, "--target", t.name]
        if root_arg:
            command += ["--out", root_arg]
        cfg = t.build
        jobs.append({"target": t.name, "model": cfg.model, "delegate": cfg.delegate, "quant": cfg.quant.scheme,
                     "out": t.out, "command": shlex.join(command)})
        if cfg.device_memory is not None and fmt == "json":
            jobs[-1]["memory"] = device_fit(cfg)
    for t in manifest.targets:
        if get_backend(t.build.delegate).static_shapes:
            continue
        for device in devices:
            bundle = str(Path(root_arg or manifest.root) / t.out)
            slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
            command = ["aot", "validate", bundle, "--device", device, "--json", "--junit", f"{t.name}.{slug}.xml"]
            if device.startswith("adb"):
                if device_runner is None:
                    raise ConfigError(f"--device {device}: adb jobs need --device-runner (ExecuTorch's llama_main)")
                command += ["--device-runner", device_runner]
            gates = t.validate.gates if t.validate else None
            for flag, value in (("--min-prefill-tps", getattr(gates, "min_prefill_tps", None)),
                                ("--min-decode-tps", getattr(gates, "min_decode_tps", None))):
                if value is not None:
                    command += [flag, str(value)]
            jobs.append({"target": t.name, "device": device, "needs": t.name, "kind": "device-validation",
                         "command": shlex.join(command)})
    if fmt == "github":  # `echo "matrix=$(aot plan ...)" >> $GITHUB_OUTPUT`, then fromJSON(...)
        return json.dumps({"include": jobs}, separators=(",", ":"))
    release = ["aot", "release", "--manifest", manifest_arg] + (["--out", root_arg] if root_arg else [])
    return json.dumps({"manifest": str(manifest.path), "root": str(manifest.root), "jobs": jobs,
                       "collect": shlex.join(release)}, indent=2)
