"""`aot pull`: read an index (and, with --verify-key, check its signature before trusting any of
it), pick a target by name or by device, fetch its blobs into the cache (aot.dist.cache), and lay
the bundle out as links: the cache's snapshot, and with --out a bundle directory of its own that
`aot inspect` and `aot run` open like any other."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from aot.bundle import check_out
from aot.dist.cache import SNAPSHOT_DIGITS, Cache, cache_root, place_links
from aot.dist.check import parse_index
from aot.dist.fit import choose, parse_device
from aot.dist.layout import signature_key
from aot.dist.sign import check_public_key, verify_bytes
from aot.dist.sources import open_source, read_small
from aot.dist.transfer import ByteBar, Transfer
from aot.errors import ConfigError, NotFound, OutputError, SignatureError


def pull(index: str, target: str | None = None, device: str | None = None, out: Path | None = None,
         cache: Path | None = None, verify_key: Path | None = None, force: bool = False, quiet: bool = False) -> dict:
    start = time.perf_counter()
    if (target is None) == (device is None):
        raise ConfigError("give --target NAME or --device soc=...,ram=...,abi=... (one of the two)")
    fit_device = parse_device(device) if device is not None else None
    key = check_public_key(verify_key) if verify_key is not None else None
    if out is not None:
        _check_out(Path(out).expanduser().absolute(), force)  # before any download
    source, index_key = open_source(index, Transfer.from_env(), verify_key=key is not None)
    where = source.where(index_key)

    raw = read_small(source, index_key)
    digest = hashlib.sha256(raw).hexdigest()
    if key is not None:
        try:
            signature = read_small(source, signature_key(digest))
        except NotFound:
            raise SignatureError(f"{where}: unsigned (no {signature_key(digest)} beside it); publish it with --sign, "
                                 "or pull without --verify-key") from None
        verify_bytes(raw, signature, key, where)
    parsed = parse_index(raw, where)

    targets = {t["name"]: t for t in parsed["targets"]}
    selection = None
    if fit_device is not None:
        selection = choose(parsed["targets"], fit_device)
        target = selection["target"]
    elif target not in targets:
        raise ConfigError(f"--target {target}: not in {where}; it has {', '.join(targets)}")
    chosen = targets[target]

    c = Cache(cache_root(cache))
    files, fetched = [], 0
    with ByteBar(sum(f["size"] for f in chosen["files"]), "pulling", quiet) as bar:
        for f in chosen["files"]:
            got = c.fetch(source, f, bar)
            fetched += got["fetched_bytes"]
            files.append({**f, **got})
    snapshot = c.snapshot(digest, raw, chosen)
    bundle = None
    if out is not None:
        bundle = place_links(Path(out).expanduser().absolute(),
                             {f["name"]: c.blob(f["sha256"]).resolve() for f in chosen["files"]}, replace=True)
    return {
        "index": where,
        "index_sha256": digest,
        "verified": key is not None,
        "target": target,
        "selection": selection,
        "files": files,
        "bytes": sum(f["size"] for f in files),
        "fetched_bytes": fetched,
        "cached_bytes": sum(f["size"] for f in files if f["cached"]),
        "cache": str(c.root),
        "snapshot": str(snapshot),
        "snapshot_id": digest[:SNAPSHOT_DIGITS],
        "out": str(bundle) if bundle else None,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _check_out(out: Path, force: bool) -> None:
    """`aot build`'s rule for --out (aot.bundle.check_out), and a folder to write it in."""
    check_out(out, force)
    if not out.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--out {out}: cannot write in {out.parent} ({e.strerror}); choose a writable --out") from None
