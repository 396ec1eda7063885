"""`aot publish` (and `aot release --sign`): the store's layout and write order, what a re-publish
uploads, the index against docs/index.schema.json, refusals of a modified release root and of bad
keys. Into a directory (served by nginx in test_pull.py) and into S3 (moto's server on 127.0.0.1,
behind a fault-injecting proxy where an upload must fail)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import boto3
import jsonschema
import pytest

from aot.dist.index import build_index
from conftest import CTX, run_cli
from dist_servers import PTE_HEAD, FaultProxy, error_line, fake_bundle, fake_release, write_keys

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "index.schema.json").read_text())


def check_schema(index: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(index)


def publish(root, to, *flags) -> dict:
    r = run_cli("publish", root, "--to", to, "--json", *flags)
    assert r.exit_code == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def two_targets(root: Path, tokenizer: bytes = b'{"model": {}}') -> Path:
    shared = bytes(range(256)) * 64
    a = fake_bundle(root / "a", {"model.pte": PTE_HEAD + b"a" * 40, "model.ptd": shared, "tokenizer.json": tokenizer})
    b = fake_bundle(root / "b", {"model.pte": PTE_HEAD + b"b" * 40, "model.ptd": shared, "tokenizer.json": b"{}"},
                    ctx=128)
    return fake_release(root, {"a": a, "b": b})


def test_the_real_release_publishes_a_schema_valid_signed_index(release_bundles, tmp_path):
    root = Path(release_bundles["root"])
    priv, pub = write_keys(tmp_path)
    store = tmp_path / "store"
    result = publish(root, store, "--sign", priv)

    raw = (store / "index.json").read_bytes()
    index = json.loads(raw)
    check_schema(index)
    digest = hashlib.sha256(raw).hexdigest()
    assert result["index"]["sha256"] == digest
    assert (store / "signatures" / f"{digest}.sig").is_file() and result["signature"]
    assert index["release"]["sha256"] == hashlib.sha256((root / "release.json").read_bytes()).hexdigest()
    assert index["release"]["manifest_sha256"] == release_bundles["index"]["manifest"]["sha256"]

    by_name = {t["name"]: t for t in index["targets"]}
    for name, ctx, kv in (("short", CTX, "fp32"), ("long", 2 * CTX, "int8")):
        t, m = by_name[name], json.loads((root / name / "bundle.json").read_text())
        roles = {f["name"]: f["role"] for f in t["files"]}
        assert roles == {"model.pte": "program", "model.ptd": "weights", "tokenizer.json": "tokenizer",
                         "bundle.json": "manifest"}
        for f in t["files"]:  # every file is its blob, byte for byte
            assert (store / "blobs" / "sha256" / f["sha256"]).read_bytes() == (root / name / f["name"]).read_bytes()
        assert t["runtime"]["pte_schema"] == (root / name / "model.pte").read_bytes()[4:8].decode() == "ET12"
        assert t["runtime"]["executorch"] == m["versions"]["executorch"]
        assert t["device"] == {"delegate": "xnnpack", "soc": None, "abis": ["arm64-v8a", "x86_64"]}
        assert t["context"]["max_context_len"] == ctx and t["context"]["kv_cache"] == kv
        assert t["memory"]["at_load_bytes"] == m["memory_plan"]["total"]["at_load_bytes"]
        assert t["tokenizer"] == {"file": "tokenizer.json", "kind": m["tokenizer"]["kind"]}
        assert t["license"] is None and t["validation"] is None
    # the two targets' model.ptd and tokenizer are the same bytes: one blob each, uploaded once
    digests = {f["sha256"] for t in index["targets"] for f in t["files"]}
    assert result["uploaded"] == len(digests) == 6
    assert sorted(p.name for p in (store / "blobs" / "sha256").iterdir()) == sorted(digests)


def test_a_republish_uploads_only_what_changed(tmp_path):
    root, store = two_targets(tmp_path / "rel"), tmp_path / "store"
    first = publish(root, store)
    check_schema(json.loads((store / "index.json").read_text()))
    assert first["uploaded"] == 7 and first["skipped"] == 0  # 8 files, one model.ptd shared
    again = publish(root, store)
    assert (again["uploaded"], again["skipped"], again["uploaded_bytes"], again["skipped_bytes"]) == (
        0, 7, 0, first["uploaded_bytes"])
    assert again["index"]["sha256"] == first["index"]["sha256"]  # the same release, the same index bytes

    two_targets(root, tokenizer=b'{"model": {"changed": 1}}')  # target a's tokenizer (and so its bundle.json)
    third = publish(root, store)
    assert sorted(u["name"] for u in third["uploaded_files"]) == ["a/bundle.json", "a/tokenizer.json"]
    assert third["uploaded_bytes"] == sum(u["size"] for u in third["uploaded_files"])
    assert [t["uploaded"] for t in third["targets"]] == [2, 0]
    index = json.loads((store / "index.json").read_text())
    tok = next(f for f in index["targets"][0]["files"] if f["name"] == "tokenizer.json")
    assert tok["sha256"] == hashlib.sha256(b'{"model": {"changed": 1}}').hexdigest()


def test_a_modified_release_root_is_refused_before_any_upload(tmp_path):
    root, store = two_targets(tmp_path / "rel"), tmp_path / "store"
    (root / "b" / "model.ptd").write_bytes(b"x" + (root / "b" / "model.ptd").read_bytes()[1:])
    r = run_cli("publish", root, "--to", store)
    assert r.exit_code == 7 and "model.ptd" in error_line(r), r.stderr
    assert not store.exists()

    two_targets(root)
    manifest = json.loads((root / "a" / "bundle.json").read_text())
    (root / "a" / "bundle.json").write_text(json.dumps({**manifest, "license": "changed"}))
    r = run_cli("publish", root, "--to", store)
    assert r.exit_code == 7 and "differs from what release.json recorded" in r.stderr, r.stderr
    assert run_cli("publish", tmp_path, "--to", store).exit_code == 7  # no release.json
    assert not store.exists()


@pytest.mark.parametrize("case", ["missing", "public", "not-a-key"])
def test_a_bad_signing_key_is_one_line_naming_the_flag(tmp_path, case):
    priv, pub = write_keys(tmp_path)
    key = {"missing": tmp_path / "nope.pem", "public": pub, "not-a-key": tmp_path / "rel" / "release.json"}[case]
    root = two_targets(tmp_path / "rel")
    r = run_cli("publish", root, "--to", tmp_path / "store", "--sign", key)
    assert r.exit_code == 3 and "--sign" in error_line(r), r.stderr
    assert not (tmp_path / "store").exists()
    r = run_cli("release", "--manifest", tmp_path / "no-such.yaml", "--sign", key)  # refused before the manifest
    assert r.exit_code == 3 and "--sign" in r.stderr, r.stderr


def test_release_sign_writes_a_signature_of_release_json(release_bundles, tmp_path):
    from model_signing import verifying

    root = tmp_path / "root"
    shutil.copytree(release_bundles["root"], root)  # up to date there too: input keys ignore paths
    priv, pub = write_keys(tmp_path)
    r = run_cli("release", "--manifest", Path(release_bundles["root"]).parent / "release.yaml", "--out", root,
                "--sign", priv, "--json")
    assert r.exit_code == 0, r.stderr + r.stdout
    result = json.loads(r.stdout)
    assert [t["build"]["status"] for t in result["targets"]] == ["skipped", "skipped"]
    assert result["signature"] == str(root / "release.json.sig")
    verifying.Config().use_elliptic_key_verifier(public_key=str(pub)).verify(root / "release.json",
                                                                            root / "release.json.sig")


def test_s3_publish_counts_uploads_and_writes_the_index_last(s3_env, tmp_path, monkeypatch):
    root = two_targets(tmp_path / "rel")
    s3 = boto3.client("s3")
    url = f"s3://{s3_env['bucket']}/failing"

    # A proxy in front of moto fails every request for one blob: the upload fails (botocore's own
    # retries, 2 attempts), and the bucket must still hold no index.json.
    proxy = FaultProxy(int(s3_env["endpoint"].rsplit(":", 1)[1]))
    index, _ = build_index(root)
    victim = next(f["sha256"] for f in index["targets"][1]["files"] if f["name"] == "model.pte")
    proxy.fail_path = f"PUT /{s3_env['bucket']}/failing/blobs/sha256/{victim}"  # target b's program
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AOT_TRANSFER_ATTEMPTS", "2")
    r = run_cli("publish", root, "--to", url)
    proxy.close()
    assert r.exit_code == 16 and "upload failed" in error_line(r), r.stderr
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_env["bucket"], Prefix="failing/").get("Contents", [])}
    assert "failing/index.json" not in keys and f"failing/blobs/sha256/{victim}" not in keys

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["endpoint"])
    done = publish(root, url)  # resumes: target a's 4 blobs went up before b's program failed
    assert done["skipped"] == 4 and done["uploaded"] == 3
    assert victim in {u["sha256"] for u in done["uploaded_files"]}
    raw = s3.get_object(Bucket=s3_env["bucket"], Key="failing/index.json")["Body"].read()
    check_schema(json.loads(raw))
    assert publish(root, url)["uploaded"] == 0

    r = run_cli("publish", root, "--to", "s3://no-such-bucket-here/x")
    assert r.exit_code == 5 and "no bucket" in r.stderr, r.stderr
