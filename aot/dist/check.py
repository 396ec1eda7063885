"""The strict check `aot pull` makes of an index before it uses any of it: an index comes from a
server, and its names become paths and its digests file names. What the schema
(docs/index.schema.json, checked in tests with jsonschema) says of the fields a pull reads, held
here without a schema library: every name a plain file name, every digest 64 lowercase hex, every
size a non-negative integer, no file or target named twice."""

from __future__ import annotations

import json

from aot.dist.layout import INDEX_FORMAT, INDEX_VERSION, ROLES, is_digest, name_problem
from aot.errors import IndexInvalid
from aot.files import is_int


def parse_index(raw: bytes, where: str) -> dict:
    """The index in `raw` (from `where`, for messages); IndexInvalid naming the first problem."""
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise IndexInvalid(f"{where}: not JSON ({e}); is this an index.json from `aot publish`?") from None
    problem = _problem(index)
    if problem:
        raise IndexInvalid(f"{where}: {problem}; refusing the index")
    return index


def _problem(index: object) -> str | None:
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return f"not an {INDEX_FORMAT} index"
    version = index.get("format_version")
    if not is_int(version) or version < 1:
        return "format_version must be a positive integer"
    if version > INDEX_VERSION:
        return f"format version {version} is newer than this aot reads ({INDEX_VERSION}): upgrade aot"
    targets = index.get("targets")
    if not isinstance(targets, list) or not targets:
        return "targets must be a non-empty list"
    names = set()
    for i, t in enumerate(targets):
        if not isinstance(t, dict):
            return f"targets[{i}] must be an object"
        problem = name_problem(t.get("name"))
        if problem:
            return f"targets[{i}] name {t.get('name')!r} {problem}"
        if t["name"] in names:
            return f"target '{t['name']}' is listed twice"
        names.add(t["name"])
        problem = _files_problem(t.get("files")) or _fields_problem(t)
        if problem:
            return f"target '{t['name']}': {problem}"
    return None


def _files_problem(files: object) -> str | None:
    if not isinstance(files, list) or not files:
        return "files must be a non-empty list"
    seen = set()
    for i, f in enumerate(files):
        if not isinstance(f, dict):
            return f"files[{i}] must be an object"
        problem = name_problem(f.get("name"))
        if problem:
            return f"file {f.get('name')!r} {problem}"
        if f["name"] in seen:
            return f"file '{f['name']}' is listed twice"
        seen.add(f["name"])
        if not is_digest(f.get("sha256")):
            return f"file '{f['name']}': sha256 must be 64 lowercase hex digits, but got {f.get('sha256')!r}"
        if not is_int(f.get("size")) or f["size"] < 0:
            return f"file '{f['name']}': size must be a non-negative integer, but got {f.get('size')!r}"
        if f.get("role") not in ROLES:
            return f"file '{f['name']}': role must be one of {', '.join(ROLES)}, but got {f.get('role')!r}"
    roles = [f["role"] for f in files]
    if roles.count("program") < 1 or roles.count("manifest") != 1:
        return "files must hold a program and exactly one manifest (bundle.json)"
    return None


def _fields_problem(t: dict) -> str | None:
    """The fields `--device` reads: their types, so a bad index is refused, not a crash."""
    device, context, memory = t.get("device"), t.get("context"), t.get("memory")
    if not isinstance(device, dict) or not isinstance(device.get("delegate"), str):
        return "device.delegate must be a string"
    if device.get("soc") is not None and not isinstance(device["soc"], str):
        return "device.soc must be a string or null"
    abis = device.get("abis")
    if abis is not None and not (isinstance(abis, list) and all(isinstance(a, str) for a in abis)):
        return "device.abis must be a list of strings or null"
    if not isinstance(context, dict) or not is_int(context.get("max_context_len")) or context["max_context_len"] < 1:
        return "context.max_context_len must be a positive integer"
    at_load = memory.get("at_load_bytes") if isinstance(memory, dict) else None
    if not isinstance(memory, dict) or not (at_load is None or (is_int(at_load) and at_load >= 0)):
        return "memory.at_load_bytes must be a non-negative integer or null"
    return None
