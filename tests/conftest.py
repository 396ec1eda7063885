"""Session fixtures: tiny checkpoints written once, and each bundle built once (lowering is the
slow part: ~15-25 s per tiny model on 2 cores)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import checkpoints
from aot.cli import app

warnings.filterwarnings("ignore")
logging.getLogger("torchao").setLevel(logging.ERROR)

# Small enough to lower fast, long enough to exercise chunked prefill and many decode steps.
SEQ, CTX = 16, 64


# ---- tiers (pyproject declares the markers; `make test-fast` runs -m "not slow") ---------------
# A test that requests a fixture whose name contains "bundle" builds (or shares) a lowered bundle:
# it is e2e. Every e2e test lowers a model, so it is also slow. Tests that build inline mark
# themselves e2e (or slow, when they take seconds without lowering); oracle tests mark themselves.


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any("bundle" in name for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.slow)


def run_cli(*args: str, input: str | None = None):
    """Invoke the CLI in-process (stdin from `input`); returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture(scope="session")
def hf_ckpt(tmp_path_factory) -> Path:
    return checkpoints.write_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf")


@pytest.fixture(scope="session")
def meta_ckpt(hf_ckpt, tmp_path_factory) -> Path:
    return checkpoints.write_meta_checkpoint(hf_ckpt, tmp_path_factory.mktemp("ckpt") / "meta")


def _build(out: Path, ckpt: Path, *flags: str) -> dict:
    result = run_cli("build", "--checkpoint", ckpt, "--out", out, "--max-seq-len", SEQ,
                     "--max-context-len", CTX, "--json", *flags)
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def bundle_fp32(hf_ckpt, tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("bundles") / "fp32", hf_ckpt, "--quant", "none")


@pytest.fixture(scope="session")
def bundle_8da4w(hf_ckpt, tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("bundles") / "8da4w", hf_ckpt, "--quant", "8da4w")


@pytest.fixture(scope="session")
def bundle_fp32_meta(meta_ckpt, tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("bundles") / "fp32-meta", meta_ckpt, "--quant", "none")


@pytest.fixture(scope="session")
def bytes_ckpt(tmp_path_factory) -> Path:
    """Tiny random model whose tokenizer has every byte as a token: it emits partial UTF-8."""
    return checkpoints.write_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "bytes", seed=1, all_bytes=True)


@pytest.fixture(scope="session")
def bundle_bytes(bytes_ckpt, tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("bundles") / "bytes", bytes_ckpt, "--quant", "none")


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> dict:
    """The embedded demo model, 8da4w, as `make demo` builds it."""
    out = tmp_path_factory.mktemp("bundles") / "demo"
    result = run_cli("build", "--model", "demo", "--out", out, "--max-seq-len", 64, "--max-context-len", 512, "--json")
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> Path:
    """A tiny random Llama with Llama 3's 128,256-id layout and the Llama 3.2 chat template."""
    from chat_fixtures import write_chat_checkpoint

    return write_chat_checkpoint(tmp_path_factory.mktemp("ckpt") / "chat")


@pytest.fixture(scope="session")
def chat_bundle(chat_ckpt, tmp_path_factory) -> dict:
    """Its fp32 bundle with room for a tool-laden conversation (4096 positions)."""
    out = tmp_path_factory.mktemp("bundles") / "chat"
    result = run_cli("build", "--checkpoint", chat_ckpt, "--out", out, "--quant", "none", "--max-seq-len", 64,
                     "--max-context-len", 4096, "--json")
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)
