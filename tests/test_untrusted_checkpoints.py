"""Hostile checkpoint folders: absurd or inconsistent config.json sizes, safetensors headers that lie,
shard indexes and symlinks that point out of the folder, malformed or enormous tokenizers,
generation_config ids outside the vocabulary. `aot build` answers each with one line and exit 4
(checkpoint) or 3 (configuration) before it exports anything, writes no bundle, and reads nothing
outside the folder."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from conftest import run_cli


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, symlinks=True))


def _config(folder: Path, **changes) -> None:
    file = folder / "config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(file: Path, header: dict, data: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _overlap(folder: Path) -> None:
    f = folder / "model.safetensors"
    h, data = _header(f)
    a, b = _tensors(h)[:2]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (h[b]["data_offsets"][1] - h[b]["data_offsets"][0])]
    _write_header(f, h, data)


def _past_the_end(folder: Path) -> None:
    f = folder / "model.safetensors"
    h, data = _header(f)
    last = _tensors(h)[-1]
    h[last]["data_offsets"][1] += 1 << 40
    _write_header(f, h, data)


def _wrong_dtype(folder: Path) -> None:
    f = folder / "model.safetensors"
    h, data = _header(f)
    h[_tensors(h)[0]]["dtype"] = "F64"  # the same bytes claimed as twice as wide
    _write_header(f, h, data)


def _huge_shape(folder: Path) -> None:
    f = folder / "model.safetensors"
    h, data = _header(f)
    h[_tensors(h)[0]]["shape"] = [1 << 40, 1 << 20]
    _write_header(f, h, data)


def _huge_header_length(folder: Path) -> None:
    f = folder / "model.safetensors"
    h, data = _header(f)
    _write_header(f, h, data, length=(1 << 63) - 1)


def _garbage_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json here!!" + b"\0" * 64)


def _index(folder: Path, name) -> None:
    h, _ = _header(folder / "model.safetensors")
    weight_map = {k: name for k in h if k != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _outside(tmp: Path) -> Path:
    secret = tmp / "secret.safetensors"
    secret.write_bytes(b"not for aot to read")
    return secret


def _symlink_out(folder: Path) -> None:
    real = folder / "model.safetensors"
    moved = folder.parent / "elsewhere.safetensors"
    real.rename(moved)
    real.symlink_to(moved)


def _sparse(file: Path, size: int) -> None:
    with open(file, "wb") as f:
        f.truncate(size)


def _generation(folder: Path, **ids) -> None:
    (folder / "generation_config.json").write_text(json.dumps(ids))


CASES = {
    # config.json
    "vocab 10^12": (lambda d: _config(d, vocab_size=10**12), 4, "vocab_size"),
    "a million layers": (lambda d: _config(d, num_hidden_layers=10**6), 4, "num_hidden_layers"),
    "negative width": (lambda d: _config(d, hidden_size=-128), 4, "hidden_size"),
    "fractional width": (lambda d: _config(d, hidden_size=128.5), 4, "hidden_size"),
    "width as text": (lambda d: _config(d, hidden_size="128"), 4, "hidden_size"),
    "width as bool": (lambda d: _config(d, num_hidden_layers=True), 4, "num_hidden_layers"),
    "heads do not divide": (lambda d: _config(d, num_attention_heads=3), 4, "num_attention_heads"),
    "kv heads do not divide": (lambda d: _config(d, num_key_value_heads=3), 4, "num_key_value_heads"),
    "ffn 10^15": (lambda d: _config(d, intermediate_size=10**15), 4, "intermediate_size"),
    "layers claimed past the file": (lambda d: _config(d, num_hidden_layers=64), 4, "weight"),
    "rope theta NaN": (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace(
        '"rope_theta": 500000.0', '"rope_theta": NaN')), 4, "rope_theta"),
    "rope factor as text": (lambda d: _config(d, rope_parameters={**json.loads((d / "config.json").read_text())[
        "rope_parameters"], "factor": "x"}), 4, "rope"),
    "norm eps negative": (lambda d: _config(d, rms_norm_eps=-1.0), 4, "rms_norm_eps"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), 4, "JSON object"),
    "config enormous": (lambda d: _sparse(d / "config.json", 200 << 20), 4, "config.json"),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), 4, "config.json"),
    # safetensors
    "overlapping offsets": (_overlap, 4, "model.safetensors"),
    "offsets past the end": (_past_the_end, 4, "model.safetensors"),
    "dtype disagrees with the bytes": (_wrong_dtype, 4, "model.safetensors"),
    "shape of 2^60 elements": (_huge_shape, 4, "model.safetensors"),
    "header length 2^63": (_huge_header_length, 4, "model.safetensors"),
    "header not JSON": (_garbage_header, 4, "model.safetensors"),
    # shard index and symlinks
    "index names a file above the folder": (lambda d: _index(d, "../secret.safetensors"), 4, "outside"),
    "index names an absolute path": (lambda d: _index(d, str(_outside(d.parent))), 4, "outside"),
    "index names a non-string": (lambda d: _index(d, 5), 4, "weight_map"),
    "weights a symlink out of the folder": (_symlink_out, 4, "outside"),
    "weights a symlink to /dev/zero": (lambda d: ((d / "model.safetensors").unlink(),
                                                  (d / "model.safetensors").symlink_to("/dev/zero")), 4, "model.safetensors"),
    "weights a directory": (lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir(),
                                       (d / "x.safetensors").write_bytes(b"")), 4, "safetensors"),
    # tokenizer
    "tokenizer malformed": (lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}}'), 4,
                            "tokenizer"),
    "tokenizer enormous": (lambda d: _sparse(d / "tokenizer.json", 2 << 30), 4, "tokenizer.json"),
    "tokenizer a symlink out of the folder": (lambda d: ((d / "tokenizer.json").rename(d.parent / "tok.json"),
                                                        (d / "tokenizer.json").symlink_to(d.parent / "tok.json")), 4,
                                              "outside"),
    "tokenizer empty": (lambda d: (d / "tokenizer.json").write_bytes(b""), 4, "tokenizer"),
    "tokenizer_config chat template not text": (lambda d: (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": {"a": 1}})), 4, "tokenizer_config.json"),
    "tokenizer_config enormous": (lambda d: _sparse(d / "tokenizer_config.json", 200 << 20), 4, "tokenizer_config.json"),
    # generation_config
    "eos outside the vocabulary": (lambda d: _generation(d, bos_token_id=1, eos_token_id=[10**9]), 3, "eos"),
    "bos outside the vocabulary": (lambda d: _generation(d, bos_token_id=-5, eos_token_id=2), 3, "bos"),
    "eos ids not ints": (lambda d: _generation(d, bos_token_id=1, eos_token_id=["2", None]), 4, "eos_token_id"),
    "generation_config not JSON": (lambda d: (d / "generation_config.json").write_text("{"), 4, "generation_config.json"),
}


class _Exported(BaseException):
    """Raised where a build would export: the hostile input got past every check."""


@pytest.fixture
def no_export(monkeypatch):
    import aot.pipeline

    def refuse(*args, **kwargs):
        raise _Exported("reached torch.export")

    monkeypatch.setattr(aot.pipeline, "export_methods", refuse)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_checkpoint_folders(hf_ckpt, tmp_path, case, no_export):
    make, code, needle = CASES[case]
    folder = _copy(hf_ckpt, tmp_path / "ckpt")
    make(folder)
    out = tmp_path / "bundle"
    try:
        result = run_cli("build", "--checkpoint", folder, "--out", out, "--quant", "none", "--max-seq-len", "32",
                         "--max-context-len", "64")
    except _Exported:
        pytest.fail(f"{case}: accepted; the build reached torch.export")
    lines = [line for line in result.stderr.splitlines() if line.startswith("aot:")]  # the rest: stage progress
    assert result.exit_code == code, (case, result.exit_code, result.stderr[-400:])
    assert len(lines) == 1 and "Traceback" not in result.stderr, (case, result.stderr[-600:])
    assert needle in lines[0], (case, lines[0])
    assert len(lines[0]) < 1200
    assert not out.exists() and not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())


def test_the_hugging_face_cache_layout_still_reads(hf_ckpt, tmp_path):
    """Snapshots link into the repo's blobs/: inside the cache's repo folder, so allowed."""
    from aot.families.text.checkpoint import open_checkpoint

    repo = tmp_path / "models--meta-llama--Tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in hf_ckpt.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blobs / f.name, snap))
    assert open_checkpoint(snap).args == open_checkpoint(hf_ckpt).args
