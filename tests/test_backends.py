"""aot/backends/__init__.py: the delegate registry, and each backend's availability here (XNNPACK
ships with executorch; the NPU SDKs are not installed and must be named, never downloaded)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from aot.backends import BACKENDS, Backend, get_backend, register
from aot.errors import ConfigError, DelegateUnavailable


def test_registry_names_each_delegate_once():
    assert sorted(BACKENDS) == ["mediatek", "qnn", "xnnpack"]
    for name in BACKENDS:
        backend = get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name and backend.schemes
    with pytest.raises(AssertionError):
        register(BACKENDS["qnn"])


def test_unknown_delegate_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"^unknown --delegate 'npu'; choose one of: mediatek, qnn, xnnpack$"):
        get_backend("npu")


def test_shapes_schemes_and_chips():
    x, q, m = get_backend("xnnpack"), get_backend("qnn"), get_backend("mediatek")
    assert not x.static_shapes and q.static_shapes and m.static_shapes
    assert "8da4w" in x.schemes and "16a4w" not in x.schemes
    assert q.schemes[0] == "16a4w" and q.kv_bits == (8, 16)
    assert x.socs() == () and q.socs()[0] == "SM8650" and m.socs()
    cfg = SimpleNamespace(soc="SM8650", max_seq_len=32, kv_bits=8)
    assert q.bundle_fields(cfg) == {"delegate": "qnn", "soc": "SM8650", "prefill_len": 32, "decode_len": 1, "kv_bits": 8}
    assert x.bundle_fields(SimpleNamespace(soc=None)) == {"delegate": "xnnpack", "soc": None}


def test_xnnpack_is_available_here():
    status = get_backend("xnnpack").availability()
    assert status.ok, status.reason
    get_backend("xnnpack").require()


def test_qnn_without_its_sdk_names_it(monkeypatch, tmp_path):
    qnn = get_backend("qnn")
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    status = qnn.availability()
    assert not status.ok and "QNN_SDK_ROOT is not set" in status.reason and "never downloads" in status.reason
    with pytest.raises(DelegateUnavailable, match="^--delegate qnn is not available here: QNN_SDK_ROOT"):
        qnn.require()
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    assert "has no lib/x86_64-linux-clang/libQnnHtp.so" in qnn.availability().reason
    lib = tmp_path / "lib" / "x86_64-linux-clang" / "libQnnHtp.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    assert qnn.availability().ok


def test_mediatek_without_its_sdk_names_it():
    pytest.importorskip("executorch")
    try:
        import mtk_converter  # noqa: F401
        pytest.skip("MediaTek's SDK is installed here")
    except ImportError:
        pass
    status = get_backend("mediatek").availability()
    assert not status.ok and "NeuroPilot" in status.reason and "never downloads" in status.reason
