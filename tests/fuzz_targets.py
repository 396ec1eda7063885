"""Fuzz targets for the readers of what comes from outside: bundle.json (and the bundle it opens), the
.pte's header and flatbuffer, release manifests, the release index `aot pull` fetches. Each target
takes bytes and may raise only its reader's one-line error (anything else is a finding). Used by
tests/test_untrusted_readers.py (a bounded hypothesis run in `make test`) and bench/fuzz.py (a
longer mutation run that reports cases and findings)."""

from __future__ import annotations

import json
from pathlib import Path

from aot.errors import AotError, BundleError, ConfigError, IndexInvalid


class Finding(Exception):
    """A reader answered bytes with something other than its one-line error."""


def _one_line(e: AotError, allowed: type) -> None:
    if not isinstance(e, allowed):
        raise Finding(f"{type(e).__name__} where {allowed.__name__} was due: {e}") from e
    message = str(e)
    if "\n" in message or not message:
        raise Finding(f"not one line: {message[:300]!r}")


def _guard(allowed: type, call) -> str:
    """Run `call`; 'ok' or 'refused'; a Finding for any other exception."""
    try:
        call()
        return "ok"
    except AotError as e:
        _one_line(e, allowed)
        return "refused"
    except Finding:
        raise
    except Exception as e:  # noqa: BLE001 - exactly what is being looked for
        raise Finding(f"{type(e).__name__}: {str(e)[:300]}") from e


def bundle_json(data: bytes, folder: Path, pte: bytes) -> str:
    """bundle.json `data` beside a real model.pte `pte` and a tokenizer: read_bundle, then
    open_bundle (which verifies every file it lists)."""
    from aot.bundle import open_bundle, read_bundle

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pte").write_bytes(pte)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "bundle.json").write_bytes(data)
    return _guard(BundleError, lambda: (read_bundle(folder), open_bundle(folder)))


def pte_header(data: bytes, folder: Path) -> str:
    """A model.pte of `data`: its memory plan (the flatbuffer head) and its schema id."""
    from aot.dist.index import _schema_id
    from aot.memplan import read_memory_plan

    folder.mkdir(parents=True, exist_ok=True)
    pte = folder / "model.pte"
    pte.write_bytes(data)
    return _guard(BundleError, lambda: (read_memory_plan(pte), _schema_id(pte)))


def manifest(data: bytes, folder: Path) -> str:
    from aot.manifest import load_manifest

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "release.yaml"
    path.write_bytes(data)
    return _guard(ConfigError, lambda: load_manifest(path, folder / "out"))


def release_index(data: bytes, folder: Path | None = None) -> str:
    from aot.dist.check import parse_index

    return _guard(IndexInvalid, lambda: parse_index(data, "https://example.invalid/index.json"))


def tiny_pte() -> bytes:
    """A real ExecuTorch program (a 4x4 linear, no delegate), to mutate."""
    import torch
    from executorch.exir import to_edge

    model = torch.nn.Linear(4, 4).eval()
    program = to_edge(torch.export.export(model, (torch.zeros(1, 4),))).to_executorch()
    return program.buffer


def sample_bundle_json(pte: bytes) -> bytes:
    import hashlib

    return json.dumps({
        "format": "aot-bundle", "format_version": 1, "model": {"name": "tiny"},
        "files": {"model.pte": {"bytes": len(pte), "sha256": hashlib.sha256(pte).hexdigest(), "role": "program"},
                  "tokenizer.json": {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest(), "role": "tokenizer"}},
        "export": {"max_context_len": 64, "max_seq_len": 32}, "tokenizer": {"file": "tokenizer.json"},
    }, indent=1).encode()


def sample_index() -> bytes:
    return json.dumps({"format": "aot-index", "format_version": 1, "release": "r1", "targets": [
        {"name": "t1", "device": {"delegate": "xnnpack", "soc": None, "abis": ["arm64-v8a"]},
         "context": {"max_context_len": 2048}, "memory": {"at_load_bytes": 10},
         "files": [{"name": "model.pte", "sha256": "a" * 64, "size": 10, "role": "program"},
                   {"name": "bundle.json", "sha256": "b" * 64, "size": 5, "role": "manifest"}]}]}).encode()


SAMPLE_MANIFEST = (b"version: 1\ndefaults: {delegate: xnnpack, quant: 8da4w}\ntargets:\n  - name: demo-8da4w\n"
                   b"    model: demo\n    validate: {max_ppl_ratio: 1.05, min_top1: 0.85}\nmatrix:\n"
                   b"  - name: '{model}-{quant}-g{group_size}'\n    model: demo\n    quant: [8da4w, 8da8w]\n"
                   b"    group_size: [32, 128]\n")
