"""Where things live in a published store and in the pull cache, and the rules a name or digest
from an index must follow before it is used as part of a path."""

from __future__ import annotations

import re

INDEX_JSON = "index.json"
INDEX_FORMAT = "aot-index"
INDEX_VERSION = 1
RELEASE_JSON = "release.json"  # aot.release.RELEASE_JSON: that module sits on this one's layer
ROLES = ("program", "weights", "tokenizer", "manifest", "other")
CPU_ABIS = ("arm64-v8a", "x86_64")  # the ABIs ExecuTorch's XNNPACK runtime is built for (Android, emulators)
MAX_NAME = 255  # bytes in a file name on ext4, APFS, NTFS

_HEX64 = re.compile(r"[0-9a-f]{64}")


def blob_key(digest: str) -> str:
    return f"blobs/sha256/{digest}"


def signature_key(index_sha256: str) -> str:
    """Named by the digest of the index bytes it signs, so a reader never pairs a new index with an
    old signature (a store may serve index.json before a cached signature expires, or vice versa)."""
    return f"signatures/{index_sha256}.sig"


def name_problem(name: object) -> str | None:
    """Why `name` may not be a file or directory name taken from an index (None: it may): one plain
    component, never a path, so nothing an index says can be written outside its folder."""
    if not isinstance(name, str):
        return f"must be a string, but got {type(name).__name__}"
    if not name or name in (".", ".."):
        return "must be a plain file name, but is empty, '.' or '..'"
    if "/" in name or "\\" in name or "\0" in name:
        return "must be a plain file name, but holds '/', '\\' or NUL"
    if any(ord(c) < 32 for c in name):
        return "must be a plain file name, but holds control characters"
    if len(name.encode()) > MAX_NAME:
        return f"must be at most {MAX_NAME} bytes long"
    return None


def is_digest(value: object) -> bool:
    """A sha256 as the index writes it: 64 lowercase hex digits."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None
