"""Session fixtures: tiny checkpoints written once, and each bundle built once (lowering is the
slow part: ~15-25 s per tiny model on 2 cores)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import pytest
from filelock import FileLock
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
        if item.get_closest_marker("e2e") is not None or item.get_closest_marker("heavy") is not None:
            item.add_marker(pytest.mark.slow)


def run_cli(*args: str, input: str | None = None):
    """Invoke the CLI in-process (stdin from `input`); returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def _once(tmp_path_factory, name: str, make):
    """A session fixture's value made once per test run: pytest-xdist's workers are separate
    sessions, and without this each would write the same checkpoint and lower the same bundle again
    (pytest-xdist's documented recipe: a lock and a record in the run's shared temporary folder).
    `make(folder)` writes under `folder` and returns something JSON can hold."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-fixtures"
    shared.mkdir(exist_ok=True)
    record = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if record.is_file():
            return json.loads(record.read_text())
        value = make(shared / name)
        record.write_text(json.dumps(value, default=str))
        return value


@pytest.fixture(scope="session")
def hf_ckpt(tmp_path_factory) -> Path:
    return Path(_once(tmp_path_factory, "hf_ckpt", lambda d: str(checkpoints.write_hf_checkpoint(d / "hf"))))


@pytest.fixture(scope="session")
def meta_ckpt(hf_ckpt, tmp_path_factory) -> Path:
    return Path(_once(tmp_path_factory, "meta_ckpt",
                      lambda d: str(checkpoints.write_meta_checkpoint(hf_ckpt, d / "meta"))))


def cli_build(out: Path, *args) -> dict:
    """`aot build --out OUT --json ARGS` in-process; its JSON (the build must succeed)."""
    result = run_cli("build", "--out", out, "--json", *args)
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout)


def _build(out: Path, ckpt: Path, *flags: str) -> dict:
    return cli_build(out, "--checkpoint", ckpt, "--max-seq-len", SEQ, "--max-context-len", CTX, *flags)


@pytest.fixture(scope="session")
def bundle_fp32(hf_ckpt, tmp_path_factory) -> dict:
    return _once(tmp_path_factory, "bundle_fp32", lambda d: _build(d / "fp32", hf_ckpt, "--quant", "none"))


@pytest.fixture(scope="session")
def bundle_8da4w(hf_ckpt, tmp_path_factory) -> dict:
    return _once(tmp_path_factory, "bundle_8da4w", lambda d: _build(d / "8da4w", hf_ckpt, "--quant", "8da4w"))


@pytest.fixture(scope="session")
def bundle_fp32_meta(meta_ckpt, tmp_path_factory) -> dict:
    return _once(tmp_path_factory, "bundle_fp32_meta",
                 lambda d: _build(d / "fp32-meta", meta_ckpt, "--quant", "none"))


@pytest.fixture(scope="session")
def bytes_ckpt(tmp_path_factory) -> Path:
    """Tiny random model whose tokenizer has every byte as a token: it emits partial UTF-8."""
    return Path(_once(tmp_path_factory, "bytes_ckpt",
                      lambda d: str(checkpoints.write_hf_checkpoint(d / "bytes", seed=1, all_bytes=True))))


@pytest.fixture(scope="session")
def bundle_bytes(bytes_ckpt, tmp_path_factory) -> dict:
    return _once(tmp_path_factory, "bundle_bytes", lambda d: _build(d / "bytes", bytes_ckpt, "--quant", "none"))


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> dict:
    """The embedded demo model, 8da4w, as `make demo` builds it."""
    return _once(tmp_path_factory, "demo_bundle", lambda d: cli_build(
        d / "demo", "--model", "demo", "--max-seq-len", 64, "--max-context-len", 512))


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory) -> Path:
    """A tiny random Llama with Llama 3's 128,256-id layout and the Llama 3.2 chat template."""
    from chat_fixtures import write_chat_checkpoint

    return Path(_once(tmp_path_factory, "chat_ckpt", lambda d: str(write_chat_checkpoint(d / "chat"))))


@pytest.fixture(scope="session")
def chat_bundle(chat_ckpt, tmp_path_factory) -> dict:
    """Its fp32 bundle with room for a tool-laden conversation (4096 positions)."""
    return _once(tmp_path_factory, "chat_bundle", lambda d: cli_build(
        d / "chat", "--checkpoint", chat_ckpt, "--quant", "none", "--max-seq-len", 64, "--max-context-len", 4096))


@pytest.fixture(scope="session")
def vision_fp32_bundle(tmp_path_factory) -> dict:
    """A tiny random Llama 3.2 Vision (checkpoints.write_mllama_checkpoint, seeded), fp32 text and
    image encoder; SEQ 8, CTX 48 (tests/test_vision_bundle.py)."""
    def make(d: Path) -> dict:
        from checkpoints import write_mllama_checkpoint

        ckpt, _ = write_mllama_checkpoint(d / "mllama")
        return cli_build(d / "fp32", "--checkpoint", ckpt, "--max-seq-len", 8, "--max-context-len", 48,
                          "--quant", "none", "--vision-quant", "none")

    pytest.importorskip("transformers")
    return _once(tmp_path_factory, "vision_fp32_bundle", make)


@pytest.fixture(scope="session")
def release_bundles(hf_ckpt, tmp_path_factory) -> dict:
    """A two-target release (`aot release`) of one model and recipe, 8da4w with external weights:
    `short` at CTX positions, `long` at 2*CTX with an int8 KV cache. Their model.ptd are the same
    bytes (tests/test_external_weights.py); tests/test_publish.py and test_pull.py publish and pull
    it. Returns {"root": ..., "index": release.json's content}."""
    def make(d: Path) -> dict:
        manifest = d / "release.yaml"
        d.mkdir(parents=True, exist_ok=True)
        manifest.write_text(f"""
version: 1
defaults:
  checkpoint: {hf_ckpt}
  quant: 8da4w
  max_seq_len: {SEQ}
  external_weights: true
targets:
  - name: short
    max_context_len: {CTX}
  - name: long
    max_context_len: {2 * CTX}
    kv_cache: int8
""")
        result = run_cli("release", "--manifest", manifest, "--out", d / "root", "--json")
        assert result.exit_code == 0, result.stderr + result.stdout
        return {"root": str(d / "root"), "index": json.loads((d / "root" / "release.json").read_text())}

    return _once(tmp_path_factory, "release_bundles", make)


# ---- distribution servers (tests/dist_servers.py): real ones on 127.0.0.1 --------------------


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory) -> dict:
    """nginx serving a fresh folder: {"root": Path, "port": int}. Tests publish into subfolders."""
    import dist_servers

    if dist_servers.NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
    base = tmp_path_factory.mktemp("nginx")
    (base / "www").mkdir()
    proc, port = dist_servers.start_nginx(base / "www", base / "work")
    yield {"root": base / "www", "port": port}
    dist_servers.stop(proc)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> dict:
    """moto's standalone S3 server with one bucket: {"endpoint": URL, "bucket": name}."""
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    import boto3
    import dist_servers

    proc, port = dist_servers.start_moto(tmp_path_factory.mktemp("moto"))
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="aot-releases")
    yield {"endpoint": endpoint, "bucket": "aot-releases"}
    dist_servers.stop(proc)


@pytest.fixture
def s3_env(moto_server, monkeypatch) -> dict:
    """boto3's standard variables pointed at the moto server, for one test."""
    for k, v in {"AWS_ENDPOINT_URL": moto_server["endpoint"], "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server
