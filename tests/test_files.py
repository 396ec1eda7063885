"""aot/files.py: the chunked sha256 and the atomic writer (a reader sees the old file or the new
one, never half of one, and no temporary file is left behind)."""

from __future__ import annotations

import hashlib
import os

import pytest

from aot import files
from aot.errors import OutputError
from aot.files import sha256_file, write_atomically


def test_sha256_is_the_same_in_any_chunk_size(tmp_path):
    data = os.urandom(10_000)
    f = tmp_path / "blob"
    f.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(f) == want
    assert sha256_file(f, chunk=7) == want and sha256_file(f, chunk=10_000) == want
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_writes_text_and_bytes_and_replaces(tmp_path):
    f = tmp_path / "out.json"
    assert write_atomically(f, "first\n") == f and f.read_text() == "first\n"
    write_atomically(f, b"\x00second")
    assert f.read_bytes() == b"\x00second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    f = tmp_path / "out.json"
    f.write_text("old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_rename)
    with pytest.raises(OutputError) as e:
        write_atomically(f, "new")
    assert str(e.value) == f"{f}: cannot write (No space left on device); choose a writable path"
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_unwritable_place_is_one_line(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        write_atomically(tmp_path / "missing-dir" / "x.json", "data")


def test_written_files_have_the_mode_open_would_give(tmp_path):
    """mkstemp makes 0600: release.json, devices.json and JUnit reports are for sharing."""
    umask = os.umask(0o022)
    try:
        f = write_atomically(tmp_path / "release.json", "{}\n")
        assert f.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)
