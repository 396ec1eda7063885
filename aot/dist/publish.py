"""`aot publish`: a release root into a store, in the one order that keeps readers safe.

1. every local file checked against its bundle.json, every bundle.json against release.json;
2. each blob the store lacks uploaded (content-addressed: a blob already there is the same bytes,
   so a re-publish uploads only what changed, and bytes two targets share go up once);
3. the signature, named by the new index's digest;
4. index.json, last and whole: a reader sees the previous release or this one, complete.
A failure anywhere before 4 leaves the old index in place, pointing at blobs that are all there.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from aot.dist.index import build_index, index_bytes
from aot.dist.layout import INDEX_JSON, blob_key, signature_key
from aot.dist.sign import check_private_key, sign_bytes
from aot.dist.stores import open_store
from aot.dist.transfer import ByteBar, Transfer


def publish(root: Path, dest: str, sign: Path | None = None, quiet: bool = False) -> dict:
    start = time.perf_counter()
    key = check_private_key(sign) if sign is not None else None  # before any work
    index, blobs = build_index(root)
    raw = index_bytes(index)
    digest = hashlib.sha256(raw).hexdigest()
    store = open_store(dest, Transfer.from_env())
    store.prepare()

    names = {f["sha256"]: f"{t['name']}/{f['name']}" for t in reversed(index["targets"]) for f in t["files"]}
    missing = [b for b in blobs.values() if not store.has(blob_key(b.sha256), b.size)]
    with ByteBar(sum(b.size for b in missing), "uploading", quiet) as bar:
        for b in missing:
            bar.file(names[b.sha256], b.size)
            store.put_file(blob_key(b.sha256), b.path, b.sha256)
            bar.advance(b.size)
    signature = None
    if key is not None:
        signature = store.where(signature_key(digest))
        store.put_bytes(signature_key(digest), sign_bytes(raw, key))
    store.put_bytes(INDEX_JSON, raw)

    uploaded = {b.sha256 for b in missing}
    return {
        "root": str(root),
        "to": dest,
        "index": {"path": store.where(INDEX_JSON), "sha256": digest, "bytes": len(raw)},
        "signature": signature,
        "targets": [{"name": t["name"], "files": len(t["files"]),
                     "uploaded": sum(f["sha256"] in uploaded for f in t["files"])} for t in index["targets"]],
        "uploaded": len(missing),  # blobs (each sha256 once)
        "skipped": len(blobs) - len(missing),
        "uploaded_bytes": sum(b.size for b in missing),
        "skipped_bytes": sum(b.size for b in blobs.values()) - sum(b.size for b in missing),
        "uploaded_files": [{"name": names[b.sha256], "sha256": b.sha256, "size": b.size} for b in missing],
        "seconds": round(time.perf_counter() - start, 2),
    }
