"""The index a release is published under (index.json, format aot-index): per target, its files as
content-addressed blobs and what a phone needs to know to pick it (runtime, delegate and SoC,
context, memory plan, tokenizer, chat format, validation, licence). docs/index.schema.json is its
schema. Made from a release root whose every file is checked against its bundle.json first, and
every bundle.json against release.json, so a modified release root is refused before any upload.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from aot import __version__
from aot.bundle import BUNDLE_JSON, PTE_NAME, verify_bundle
from aot.dist.layout import CPU_ABIS, INDEX_FORMAT, INDEX_VERSION, RELEASE_JSON, name_problem
from aot.errors import AotError, BundleError
from aot.files import sha256_file

# An ExecuTorch program is a flatbuffer: 4 bytes of root offset, then its 4-byte file identifier,
# which names the schema version ("ET12"). A runtime refuses programs of a schema it does not know.
_FILE_ID = slice(4, 8)


@dataclass(frozen=True)
class Blob:
    """A verified local file behind one digest (the same bytes in two bundles are one blob)."""

    path: Path
    sha256: str
    size: int


def build_index(root: Path) -> tuple[dict, dict[str, Blob]]:
    """The index of the release at `root` and the local file behind each of its digests."""
    root = Path(root).expanduser()
    release_file = root / RELEASE_JSON
    try:
        release_bytes = release_file.read_bytes()
        release = json.loads(release_bytes)
    except FileNotFoundError:
        raise BundleError(f"{root}: no {RELEASE_JSON}; publish the --out root of `aot release`") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{release_file}: not readable JSON ({e}); re-run `aot release`") from None
    if not isinstance(release, dict) or release.get("format") != "aot-release" or not release.get("targets"):
        raise BundleError(f"{release_file}: not an aot-release index with targets; re-run `aot release`")

    blobs: dict[str, Blob] = {}
    targets = []
    for entry in release["targets"]:
        files, manifest, schema = _bundle_files(root, entry)
        for f, path in files:
            blobs.setdefault(f["sha256"], Blob(path, f["sha256"], f["size"]))
        targets.append(_target(entry, manifest, [f for f, _ in files], schema))
    index = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_VERSION,
        # The release's own time, not the publish's: the same release always gives the same index
        # bytes, so re-publishing it changes nothing a cache keys on (the index digest).
        "created": release.get("created"),
        "aot_version": __version__,
        "release": {"sha256": hashlib.sha256(release_bytes).hexdigest(),
                    "manifest_sha256": (release.get("manifest") or {}).get("sha256")},
        "targets": targets,
    }
    return index, blobs


def index_bytes(index: dict) -> bytes:
    return (json.dumps(index, indent=2) + "\n").encode()


def _bundle_files(root: Path, entry: dict) -> tuple[list[tuple[dict, Path]], dict, str]:
    """A release target's files (bundle.json last) with their local paths, its manifest and the
    program's schema id; BundleError when anything differs from what the release recorded."""
    name, rel = entry.get("name"), entry.get("bundle")
    if name_problem(name) or not isinstance(rel, str):
        raise BundleError(f"{root / RELEASE_JSON}: target {name!r} has no plain name or bundle path; re-run `aot release`")
    bundle = (root / rel).resolve()
    if root.resolve() not in bundle.parents:
        raise BundleError(f"{root / RELEASE_JSON}: target '{name}' points outside the release root ({rel})")
    manifest_file = bundle / BUNDLE_JSON
    try:
        recorded = sha256_file(manifest_file)
    except OSError as e:
        raise BundleError(f"{manifest_file}: not readable ({e.strerror}); re-run `aot release`") from None
    if recorded != entry.get("bundle_json_sha256"):
        raise BundleError(f"{manifest_file}: differs from what release.json recorded (modified after the release); "
                          "re-run `aot release`")
    try:
        manifest = verify_bundle(bundle)  # every file's size and sha256 against bundle.json
    except AotError as e:
        raise BundleError(f"target '{name}': {e}") from None
    tokenizer = (manifest.get("tokenizer") or {}).get("file")
    files = []
    for fname, f in sorted(manifest["files"].items()):
        role = ("program" if fname.endswith(".pte") else "weights" if fname.endswith(".ptd")
                else "tokenizer" if fname == tokenizer else "other")
        files.append(({"name": fname, "sha256": f["sha256"], "size": f["bytes"], "role": role}, bundle / fname))
    files.append(({"name": BUNDLE_JSON, "sha256": recorded, "size": manifest_file.stat().st_size, "role": "manifest"},
                  manifest_file))
    return files, manifest, _schema_id(bundle / PTE_NAME)


def _schema_id(pte: Path) -> str:
    with open(pte, "rb") as f:
        head = f.read(8)
    ident = head[_FILE_ID]
    if len(ident) != 4 or not ident.isalnum():
        raise BundleError(f"{pte}: not an ExecuTorch program (no flatbuffer file identifier); rebuild the bundle")
    return ident.decode()


def _target(entry: dict, m: dict, files: list[dict], schema: str) -> dict:
    """One index target from its release.json entry and bundle.json."""
    versions = m.get("versions") or {}
    build = m.get("build") or {}
    config = build.get("config") or {}
    meta = m.get("metadata") or {}
    export = m.get("export") or {}
    soc = (m.get("target") or {}).get("soc")
    plan = (m.get("memory_plan") or {}).get("total")
    predicted = ((build.get("preflight") or {}).get("runtime") or {}).get("at_load_bytes")
    tokenizer = m.get("tokenizer")
    return {
        "name": entry["name"],
        "files": files,
        "runtime": {"executorch": versions.get("executorch"), "pte_schema": schema,
                    "torch": versions.get("torch"), "torchao": versions.get("torchao")},
        "device": {"delegate": m.get("delegate"), "soc": soc, "abis": list(CPU_ABIS) if soc is None else None},
        "model": entry.get("model"),
        "quant": entry.get("quant"),
        "context": {
            "max_context_len": meta.get("get_max_context_len"),
            "max_seq_len": meta.get("get_max_seq_len"),
            # The storage the build resolved (export.kv_cache), else the flag as given.
            "kv_cache": (export.get("kv_cache") or {}).get("storage") or config.get("kv_cache"),
            "attention_sink": config.get("attention_sink"),
        },
        "memory": {
            # What the phone must hold once the program is loaded: measured from the program
            # (memory_plan) when the bundle has one, else the build's prediction.
            "at_load_bytes": (plan or {}).get("at_load_bytes", predicted),
            "plan": plan,
            "predicted_at_load_bytes": predicted,
        },
        "tokenizer": {"file": tokenizer["file"], "kind": tokenizer.get("kind")} if tokenizer else None,
        "chat": m.get("chat"),
        "validation": entry.get("validation"),
        "license": m.get("license"),
    }
