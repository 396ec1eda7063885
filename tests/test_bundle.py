"""Bundle writing is atomic and verification names the bad file."""

from __future__ import annotations

import json

import pytest

from aot.bundle import BUNDLE_JSON, Staging, read_bundle, verify_bundle
from aot.errors import BundleError, OutputError

MANIFEST = {"format": "aot-bundle", "format_version": 1, "model": {"name": "t"}, "export": {"max_context_len": 64}}


def stage(out, force=False, content=b"program"):
    with Staging(out, force) as s:
        (s.dir / "model.pte").write_bytes(content)
        return s.commit(dict(MANIFEST))


def test_commit_writes_hashes_and_moves_into_place(tmp_path):
    manifest = stage(tmp_path / "b")
    assert manifest["files"]["model.pte"]["bytes"] == 7
    assert json.loads((tmp_path / "b" / BUNDLE_JSON).read_text()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert verify_bundle(tmp_path / "b") == manifest


def test_force_replaces_a_bundle_whole(tmp_path):
    stage(tmp_path / "b")
    with pytest.raises(OutputError, match="--force"):
        stage(tmp_path / "b")
    stage(tmp_path / "b", force=True, content=b"second")
    assert (tmp_path / "b" / "model.pte").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failure_inside_leaves_nothing_and_keeps_the_old_bundle(tmp_path):
    stage(tmp_path / "b")
    with pytest.raises(RuntimeError):
        with Staging(tmp_path / "b", force=True) as s:
            (s.dir / "model.pte").write_bytes(b"half")
            raise RuntimeError("lowering failed")
    assert (tmp_path / "b" / "model.pte").read_bytes() == b"program"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_verify_names_missing_and_modified_files(tmp_path):
    stage(tmp_path / "b")
    (tmp_path / "b" / "model.pte").write_bytes(b"PROGRAM")
    with pytest.raises(BundleError, match=r"model.pte: sha256 does not match"):
        verify_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.pte").unlink()
    with pytest.raises(BundleError, match=r"model.pte: missing"):
        verify_bundle(tmp_path / "b")


def test_read_rejects_non_bundles(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        read_bundle(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(BundleError, match="no bundle.json"):
        read_bundle(tmp_path / "d")
    (tmp_path / "d" / BUNDLE_JSON).write_text("{not json")
    with pytest.raises(BundleError, match="not readable JSON"):
        read_bundle(tmp_path / "d")
    (tmp_path / "d" / BUNDLE_JSON).write_text(json.dumps({**MANIFEST, "format_version": 99}))
    with pytest.raises(BundleError, match="upgrade aot"):
        read_bundle(tmp_path / "d")
