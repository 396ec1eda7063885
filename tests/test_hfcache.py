"""aot/hfcache.py: checkpoints from the Hugging Face cache (--model NAME) and from the Hub
(--hf-repo ID[@revision]). huggingface_hub writes every cache here itself, from a fake Hub on
127.0.0.1 (tests/fake_hub.py): snapshot_download in this process, `hf download` in a child; no
network."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aot import hfcache
from aot.config import build_config
from aot.errors import CheckpointError, ConfigError
from aot.families import TextFamily, VisionFamily, family_for
from aot.families.base import Program, checkpoint_dir, license_record
from conftest import run_cli
from fake_hub import TOKEN, FakeHub

INSTRUCT_1B = "meta-llama/Llama-3.2-1B-Instruct"
LICENSE = b"LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\nLlama 3.2 Version Release Date: September 25, 2024\n"
EXTRA = {"LICENSE.txt": LICENSE, "USE_POLICY.md": b"# Llama 3.2 Acceptable Use Policy\n", "README.md": b"# tiny\n",
         "original/params.json": b"{}", "original/consolidated.00.pth": b"Meta's layout: never fetched"}
HF = [sys.executable, "-m", "huggingface_hub.cli.hf"]  # the `hf` command


@pytest.fixture(scope="module")
def hub(hf_ckpt):
    """The tiny HF checkpoint published as a test repo, as the published 1B repos (the Instruct
    and the base) and as a gated repo, each with Meta's original/ folder beside it."""
    hub = FakeHub()
    for repo_id in ("test-org/tiny", INSTRUCT_1B, "meta-llama/Llama-3.2-1B"):
        hub.add(repo_id, hf_ckpt, extra=EXTRA)
    hub.add("test-org/gated", hf_ckpt, gated=True, extra=EXTRA)
    yield hub.start()
    hub.stop()


@pytest.fixture
def cache(hub, tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME whose huggingface_hub talks to the fake Hub. Children read the environment;
    this process's huggingface_hub read it at import, so its constants are set to match."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    env = {"HF_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HF_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # never this machine's login
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.requests.clear()
    return home / "hub"


def fetch(repo_id: str, **kw) -> Path:
    """Place `repo_id` in the cache the way users do (huggingface_hub's snapshot_download)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, **kw))


def hf_download(*args: str) -> subprocess.CompletedProcess:
    """The command aot's messages tell users to run, in a child with this test's environment."""
    result = subprocess.run([*HF, "download", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def failure(call, *args, kind=CheckpointError, **kw) -> str:
    with pytest.raises(kind) as e:
        call(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- configuration: no network, no cache -----------------------------------------------------


@pytest.mark.parametrize("value, want", [
    ("meta-llama/Llama-3.2-1B-Instruct", ("meta-llama/Llama-3.2-1B-Instruct", None)),
    ("test-org/tiny@main", ("test-org/tiny", "main")),
    ("org/name.v2@refs/pr/3", ("org/name.v2", "refs/pr/3")),
])
def test_parse_repo(value, want):
    assert hfcache.parse_repo(value) == want


@pytest.mark.parametrize("value", ["Llama-3.2-1B", "a/b/c", "org/name@", "org/na me", "org--x/y", "/name"])
def test_a_malformed_repo_is_a_config_error_naming_the_flag(value):
    message = failure(build_config, Path("out"), hf_repo=value, kind=ConfigError)
    assert message.startswith("--hf-repo takes ORG/NAME[@REVISION]") and f"not '{value}'" in message


@pytest.mark.parametrize("fields, message", [
    (dict(hf_repo="o/n", checkpoint="ckpt"), "--hf-repo and --checkpoint exclude each other"),
    (dict(hf_repo="o/n", model="1b", random_weights=True), "--hf-repo and --random-weights exclude each other"),
    (dict(model="tiny"), "give --checkpoint DIR"),  # test sizes have no published checkpoint
])
def test_hf_repo_rules(fields, message):
    assert message in failure(build_config, Path("out"), **fields, kind=ConfigError)


def test_a_published_model_or_a_repo_alone_is_a_valid_config(cache, hub, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(hfcache, "lookup", lambda *a: pytest.fail("--model NAME: a config looks nowhere"))
        assert build_config(Path("out"), model="3b").checkpoint is None
    # --hf-repo: a config may read the cache (which family builds it), never the network
    assert build_config(Path("out"), model="demo", hf_repo="o/n").checkpoint is None  # not the demo's weights
    assert build_config(Path("out"), hf_repo="test-org/tiny@v1").hf_repo == "test-org/tiny@v1"
    assert hub.requests == []


# ---- the cache ---------------------------------------------------------------------------------


def test_model_finds_its_published_repo_instruct_first(cache, hub):
    base = fetch("meta-llama/Llama-3.2-1B")
    assert hfcache.published("1b") == hfcache.Snapshot("meta-llama/Llama-3.2-1B", base.name, base, "hf-cache")
    instruct = fetch(INSTRUCT_1B, allow_patterns=hfcache.ALLOW_PATTERNS)
    snapshot = hfcache.published("1b")
    assert (snapshot.repo_id, snapshot.path, snapshot.revision) == (INSTRUCT_1B, instruct, hub.repos[INSTRUCT_1B].sha)
    assert instruct.parent.parent.parent == cache and (instruct / "config.json").is_symlink()  # huggingface_hub's layout
    from huggingface_hub import scan_cache_dir

    assert {r.repo_id for r in scan_cache_dir(cache).repos} == {INSTRUCT_1B, "meta-llama/Llama-3.2-1B"}


def test_lookups_never_touch_the_network(cache, hub):
    fetch("test-org/tiny")
    hub.requests.clear()
    assert hfcache.locate(None, "test-org/tiny").source == "hf-cache"
    with pytest.raises(CheckpointError):
        hfcache.published("1b")
    with pytest.raises(CheckpointError):
        hfcache.locate(None, "test-org/other", fetch=False)  # `aot plan`: the cache only
    assert hub.requests == []


def test_model_not_cached_says_how_to_get_it(cache):
    message = failure(hfcache.published, "3b")
    assert "meta-llama/Llama-3.2-3B-Instruct or meta-llama/Llama-3.2-3B is not in the Hugging Face cache" in message
    assert str(cache) in message and "`hf download meta-llama/Llama-3.2-3B-Instruct`" in message
    assert "--hf-repo meta-llama/Llama-3.2-3B-Instruct" in message


def test_an_incomplete_snapshot_names_the_missing_file_and_the_command(cache):
    fetch(INSTRUCT_1B, allow_patterns=["config.json"])  # as transformers' AutoConfig leaves it
    message = failure(hfcache.published, "1b")
    assert message.startswith("--model 1b: the Hugging Face cache's meta-llama/Llama-3.2-1B-Instruct (snapshot ")
    assert "lacks tokenizer.json, model.safetensors" in message and f"`hf download {INSTRUCT_1B}`" in message
    hf_download(INSTRUCT_1B)  # what the message says: completes it
    assert hfcache.published("1b").repo_id == INSTRUCT_1B


def test_a_missing_blob_makes_a_snapshot_incomplete(cache):
    path = fetch("test-org/tiny")
    (path / "model.safetensors").resolve().unlink()  # the blob behind the snapshot's link
    assert hfcache.lookup("test-org/tiny") == (path, ["model.safetensors (or model.safetensors.index.json and its shards)"])
    assert hfcache.cached("test-org/tiny") is None


def test_a_sharded_snapshot_needs_every_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert hfcache.missing_files(tmp_path) == ["model-00002-of-00002.safetensors"]


def _child_lookup(env: dict) -> subprocess.CompletedProcess:
    code = "from aot import hfcache\ntry:\n print(hfcache.published('1b').path)\nexcept Exception as e:\n print(e)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                          cwd=Path(__file__).parent.parent, timeout=120)


def test_hf_home_and_hf_hub_cache_are_honoured(cache, tmp_path):
    hf_download(INSTRUCT_1B)  # into $HF_HOME/hub
    found = Path(_child_lookup({}).stdout.strip())
    assert found.parent.parent.parent == cache and found.name
    moved = tmp_path / "elsewhere"
    cache.rename(moved)
    assert str(moved) in _child_lookup({"HF_HUB_CACHE": str(moved)}).stdout  # HF_HUB_CACHE wins over HF_HOME
    assert "is not in the Hugging Face cache" in _child_lookup({}).stdout


# ---- --hf-repo: the cache, else a download ---------------------------------------------------------


def test_hf_repo_downloads_what_a_build_reads_then_finds_it_cached(cache, hub):
    sha = hub.repos["test-org/tiny"].sha
    got = hfcache.locate(None, "test-org/tiny")
    assert (got.source, got.revision, got.path) == ("hf-download", sha, cache / "models--test-org--tiny" / "snapshots" / sha)
    files = sorted(p.relative_to(got.path).as_posix() for p in got.path.rglob("*") if p.is_file())
    assert "original/consolidated.00.pth" not in files and "README.md" not in files
    assert {"config.json", "tokenizer.json", "model.safetensors", "LICENSE.txt", "USE_POLICY.md"} <= set(files)
    hub.requests.clear()
    assert hfcache.locate(None, f"test-org/tiny@{sha}") == hfcache.Snapshot("test-org/tiny", sha, got.path, "hf-cache")
    assert hfcache.locate(None, "test-org/tiny@main").source == "hf-cache"
    assert hub.requests == []


def test_hf_repo_errors_are_one_line(cache, hub):
    assert "test-org/tiny has no revision 'v9' on the Hub" in failure(hfcache.locate, None, "test-org/tiny@v9")
    assert "no model repo test-org/none on the Hub" in failure(hfcache.locate, None, "test-org/none")


def test_a_gated_repo_says_to_accept_the_licence_and_log_in(cache, hub, monkeypatch):
    message = failure(hfcache.locate, None, "test-org/gated")
    assert message == (f"--hf-repo test-org/gated: the repo is gated; accept its licence at {hub.url}/test-org/gated "
                       "with your Hugging Face account, then log in with `hf auth login` (or set HF_TOKEN)")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # huggingface_hub sends it
    assert hfcache.locate(None, "test-org/gated").source == "hf-download"


def test_offline_mode_uses_the_cache_and_never_downloads(cache, hub, monkeypatch):
    from huggingface_hub import constants

    fetch("test-org/tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert hfcache.locate(None, "test-org/tiny").source == "hf-cache"
    message = failure(hfcache.locate, None, "meta-llama/Llama-3.2-1B")
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE is set" in message
    assert hub.requests == []


def test_no_network_fails_fast(cache, monkeypatch):
    from huggingface_hub import constants

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens: connection refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # connects, never answers: the timeout must end it
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    try:
        for endpoint in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{silent.getsockname()[1]}"):
            monkeypatch.setattr(constants, "ENDPOINT", endpoint)
            start = time.perf_counter()
            message = failure(hfcache.locate, None, "test-org/tiny")
            assert time.perf_counter() - start < 10
            assert f"the Hub ({endpoint}) cannot be reached" in message, message
    finally:
        silent.close()


# ---- where it plugs in: the families' resolve, bundle.json ----------------------------------------


def test_model_1b_resolves_from_the_cache_and_is_checked_against_it(cache):
    path = fetch(INSTRUCT_1B)  # the tiny checkpoint under the 1B repo's name
    cfg = build_config(Path("out"), model="1b")
    assert checkpoint_dir(cfg) == (path, hfcache.Snapshot(INSTRUCT_1B, path.name, path, "hf-cache"))
    message = failure(TextFamily().resolve, cfg, kind=ConfigError)
    assert message.startswith(f"--model 1b does not match {INSTRUCT_1B} (dim 2048 vs 128")


def test_hf_repo_resolves_records_and_fingerprints_like_its_folder(cache, hub):
    from aot.pipeline import fingerprint

    sha = hub.repos["test-org/tiny"].sha
    path = fetch("test-org/tiny")
    cfg = build_config(Path("out"), model="tiny", hf_repo=f"test-org/tiny@{sha}", quant="none")
    family = family_for(cfg)
    src = family.resolve(cfg)
    assert isinstance(family, TextFamily) and src.checkpoint.path == path and src.model_name == "tiny"
    record = family.manifest(src, cfg, Program([]))
    assert record["checkpoint"] == {"path": str(path), "layout": "hf", "source": "hf-cache",
                                    "hf_repo": "test-org/tiny", "revision": sha}
    assert record["license"]["name"] == "Llama 3.2 Community License"
    assert set(record["license"]["files"]) == {"LICENSE.txt", "USE_POLICY.md"}
    # where the checkpoint came from is not an input: the same bytes from a folder give the same key
    assert fingerprint(cfg) == fingerprint(build_config(Path("out"), model="tiny", checkpoint=path, quant="none"))


def test_a_vision_repo_goes_to_the_vision_family(cache):
    assert isinstance(family_for(build_config(Path("out"), hf_repo="meta-llama/Llama-3.2-11B-Vision-Instruct")),
                      VisionFamily)
    fetch("test-org/tiny")  # cached: its config.json (model_type llama) decides, not its name
    assert isinstance(family_for(build_config(Path("out"), hf_repo="test-org/tiny")), TextFamily)


def test_license_record(tmp_path):
    assert license_record(tmp_path) is None and license_record(None) is None
    (tmp_path / "LICENSE").write_bytes(b"Apache License 2.0")  # a Meta download's name; not Llama's licence
    (tmp_path / "config.json").write_text("{}")
    assert license_record(tmp_path) == {"name": None, "files": {"LICENSE": {
        "sha256": hashlib.sha256(b"Apache License 2.0").hexdigest(), "bytes": 18}}}


def test_doctor_lists_the_cached_published_checkpoints(cache):
    from aot.doctor import hf_cache

    fetch(INSTRUCT_1B, allow_patterns=["config.json"])
    report = hf_cache()
    assert report["path"] == str(cache)
    (row,) = report["checkpoints"]
    assert (row["hf_repo"], row["model"], row["state"]) == (INSTRUCT_1B, "1b", "incomplete")
    assert "tokenizer.json" in row["missing"]


@pytest.mark.e2e
def test_build_from_the_cache_records_the_snapshot(cache, hub, tmp_path):
    sha = hub.repos["test-org/tiny"].sha
    fetch("test-org/tiny")
    result = run_cli("build", "--out", tmp_path / "b", "--json", "--model", "tiny", "--hf-repo", f"test-org/tiny@{sha}",
                     "--quant", "none", "--max-seq-len", "8", "--max-context-len", "32")
    assert result.exit_code == 0, result.stderr + result.stdout
    bundle = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert {k: bundle["checkpoint"][k] for k in ("source", "hf_repo", "revision")} == {
        "source": "hf-cache", "hf_repo": "test-org/tiny", "revision": sha}
    assert bundle["license"]["name"] == "Llama 3.2 Community License"
    assert bundle["build"]["config"]["hf_repo"] == f"test-org/tiny@{sha}"
