"""`aot validate --device`: ssh for real (an asyncssh server on 127.0.0.1, the system's OpenSSH
client with a throw-away key and known_hosts), adb with the real adb client and no phone, and the
PyTorchObserver parser on ExecuTorch's own stats JSON."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from xml.etree import ElementTree

import pytest

from conftest import run_cli

asyncssh = pytest.importorskip("asyncssh")

SSH_ARGS = ["--device-prompts", 2, "--device-prompt-tokens", 16, "--new-tokens", 8, "--repeats", 2]


class SshServer:
    """A real SSH server on 127.0.0.1: public-key login, commands run by /bin/sh in `home`, SFTP
    (what OpenSSH's scp speaks) rooted at `home`."""

    def __init__(self, root: Path):
        self.home = root / "home"
        self.home.mkdir()
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = root / "id_ed25519"
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(self.client_key))
        self.client_key.chmod(0o600)
        self.authorized = asyncssh.import_authorized_keys(key.export_public_key().decode())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.port = self.server.sockets[0].getsockname()[1]
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_key.export_public_key().decode()}")

    async def _start(self):
        home = str(self.home)

        class Sftp(asyncssh.SFTPServer):
            def __init__(self, chan):
                super().__init__(chan, chroot=home.encode())

            def exit(self):  # report success as OpenSSH's sftp-server does (scp checks it)
                self.channel.exit(0)

        return await asyncssh.listen("127.0.0.1", 0, server_host_keys=[self.host_key],
                                     authorized_client_keys=self.authorized, process_factory=self._command,
                                     sftp_factory=Sftp, allow_scp=True)

    async def _command(self, process):
        proc = await asyncio.create_subprocess_shell(
            process.command or "true", cwd=self.home, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "HOME": str(self.home)})
        out, err = await proc.communicate()
        process.stdout.write(out.decode(errors="replace"))
        process.stderr.write(err.decode(errors="replace"))
        process.exit(proc.returncode)

    def close(self):
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)

    def options(self, key: Path | None = None, known_hosts: Path | None = None) -> list:
        return ["--ssh-option", f"IdentityFile={key or self.client_key}", "--ssh-option", "IdentitiesOnly=yes",
                "--ssh-option", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "--ssh-option", "GlobalKnownHostsFile=/dev/null"]


@pytest.fixture(scope="module")
def ssh_server(tmp_path_factory):
    server = SshServer(tmp_path_factory.mktemp("ssh"))
    yield server
    server.close()


def _device(server) -> str:
    return f"ssh://tester@127.0.0.1:{server.port}"


def test_ssh_device_validates_like_the_host(ssh_server, demo_bundle, tmp_path):
    junit = tmp_path / "device.xml"
    result = run_cli("validate", demo_bundle["path"], "--device", _device(ssh_server), *ssh_server.options(),
                     "--device-python", sys.executable, *SSH_ARGS, "--junit", junit, "--json")
    assert result.exit_code == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    assert report["ok"] and len(report["prompts"]) == 2
    for row in report["prompts"]:
        assert row["device_tokens"] == row["host_tokens"] and len(row["device_tokens"]) == 8
        assert row["agreement_host"] == 1.0 and row["first_divergence_host"] is None
        assert "agreement_reference" in row  # the demo's checkpoint is the reference
    assert report["device"]["transport"] == "ssh" and report["device"]["cores"] >= 1
    speed = report["speed"]
    assert speed["runs"] == 4 and speed["decode_tps"]["median"] > 0 and speed["peak_rss_mib"] > 0
    assert len(report["runner"]["sha256"]) == 64
    # The bundle and the runner now sit on the "device", addressed by the program's sha256.
    pushed = list((ssh_server.home / ".cache" / "aot").glob("*/model.pte"))
    assert len(pushed) == 1 and pushed[0].read_bytes() == (Path(demo_bundle["path"]) / "model.pte").read_bytes()
    cases = ElementTree.parse(junit).getroot().findall("testcase")
    assert [c.get("name") for c in cases] == ["prompt0.agreement_host", "prompt1.agreement_host"]
    assert all(c.find("failure") is None for c in cases)
    # Again: the program is already there (same sha256), so it is not copied a second time.
    again = run_cli("validate", demo_bundle["path"], "--device", _device(ssh_server), *ssh_server.options(),
                    "--device-python", sys.executable, *SSH_ARGS, "--skip-speed", "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["runner"]["model_pushed"] is False


def test_ssh_speed_gate_fails_with_its_exit_code(ssh_server, demo_bundle):
    result = run_cli("validate", demo_bundle["path"], "--device", _device(ssh_server), *ssh_server.options(),
                     "--device-python", sys.executable, *SSH_ARGS, "--min-decode-tps", 1e9, "--json")
    assert result.exit_code == 9, result.stderr
    assert "min_decode_tps" in result.stderr and json.loads(result.stdout)["ok"] is False


def _fails(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.stderr + result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # progress lines come first; the error is one line
    assert line.startswith("aot: error: "), result.stderr
    for needle in needles:
        assert needle in line, line
    return line


def test_ssh_unknown_host_key_is_refused(ssh_server, demo_bundle, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result = run_cli("validate", demo_bundle["path"], "--device", _device(ssh_server),
                     *ssh_server.options(known_hosts=empty), "--device-python", sys.executable, *SSH_ARGS)
    _fails(result, 12, _device(ssh_server), "host key", "ssh-keyscan")


def test_ssh_refused_key(ssh_server, demo_bundle, tmp_path):
    other = tmp_path / "other_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(other))
    other.chmod(0o600)
    result = run_cli("validate", demo_bundle["path"], "--device", _device(ssh_server),
                     *ssh_server.options(key=other), "--device-python", sys.executable, *SSH_ARGS)
    _fails(result, 12, "refused our key", "IdentityFile")


def test_ssh_connection_refused(demo_bundle):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli("validate", demo_bundle["path"], "--device", f"ssh://127.0.0.1:{port}", *SSH_ARGS)
    _fails(result, 12, f"ssh://127.0.0.1:{port}", "refused")


def test_ssh_silent_server_times_out(demo_bundle):
    with socket.socket() as s:  # accepts TCP, never speaks SSH
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        result = run_cli("validate", demo_bundle["path"], "--device", f"ssh://127.0.0.1:{s.getsockname()[1]}",
                         "--device-timeout", 3, *SSH_ARGS)
    _fails(result, 12, "no answer within 3 s", "--device-timeout")


def test_ssh_device_without_the_executorch_runtime(ssh_server, demo_bundle, tmp_path):
    bare = tmp_path / "bare-python"  # Python without site-packages: no torch, no executorch
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    result = run_cli("validate", demo_bundle["path"], "--device", _device(ssh_server), *ssh_server.options(),
                     "--device-python", bare, *SSH_ARGS)
    _fails(result, 12, "ExecuTorch runtime does not import", "--device-python")
    missing = run_cli("validate", demo_bundle["path"], "--device", _device(ssh_server), *ssh_server.options(),
                      "--device-python", "/nonexistent/python3", *SSH_ARGS)
    _fails(missing, 12, "'/nonexistent/python3' is not on the device")


def test_device_flags_are_checked(demo_bundle):
    result = run_cli("validate", demo_bundle["path"], "--device", "ftp://board")
    _fails(result, 3, "--device ftp://board")
    result = run_cli("validate", demo_bundle["path"], "--device", "ssh://board", "--max-kl", 0.1)
    _fails(result, 3, "--max-kl", "without --device")
    result = run_cli("validate", demo_bundle["path"], "--device", "ssh://board", "--ssh-option", "Port")
    _fails(result, 3, "--ssh-option Port")


# ---- adb ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adb_client():
    """The real adb client (adbutils ships the Linux binary); its server is stopped afterwards."""
    adbutils = pytest.importorskip("adbutils")
    adb = Path(adbutils.__file__).parent / "binaries" / "adb"
    if not adb.is_file():
        pytest.skip("adbutils ships no adb binary for this platform")
    adb.chmod(0o755)
    yield str(adb)
    subprocess.run([str(adb), "kill-server"], capture_output=True, timeout=30)


def test_adb_without_a_device_says_so(adb_client, demo_bundle, tmp_path):
    runner = tmp_path / "llama_main"
    runner.write_bytes(b"\x7fELF placeholder: never pushed, no device is attached")
    result = run_cli("validate", demo_bundle["path"], "--device", "adb", "--device-runner", runner,
                     "--adb", adb_client, "--device-timeout", 60)
    _fails(result, 12, "no Android device is attached", "adb devices")
    named = run_cli("validate", demo_bundle["path"], "--device", "adb:R5CT1234", "--device-runner", runner,
                    "--adb", adb_client)
    _fails(named, 12, "adb:R5CT1234", "no such device")


def test_adb_needs_the_device_runner(demo_bundle):
    result = run_cli("validate", demo_bundle["path"], "--device", "adb")
    _fails(result, 3, "--device-runner", "llama_main")


def test_adb_without_the_client(demo_bundle, tmp_path, monkeypatch):
    runner = tmp_path / "llama_main"
    runner.write_bytes(b"x")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ADB", raising=False)
    result = run_cli("validate", demo_bundle["path"], "--device", "adb", "--device-runner", runner)
    _fails(result, 12, "adb client is not installed")


def test_observer_line_parses_executorch_stats(demo_bundle):
    """The stats line llama_main prints is Stats::to_json_string; parse one from a real host run."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from aot.bundle import open_bundle
    from aot.devices.adb import generated_text, parse_observer
    from aot.native import native_output_silenced
    from aot.runner.pte import load_kernels
    from aot.runner.text import stream_tokenizer

    bundle = open_bundle(Path(demo_bundle["path"]))
    load_kernels()
    tokenizer, _ = stream_tokenizer(bundle.tokenizer, Path(demo_bundle["path"]).parent)
    stats, pieces = [], []
    with native_output_silenced((1, 2)):
        runner = TextLLMRunner(str(bundle.pte), str(tokenizer))
        runner.generate("Once upon a time", GenerationConfig(max_new_tokens=12, temperature=0.0, num_bos=1, echo=False),
                        token_callback=pieces.append, stats_callback=stats.append)
    s = stats[-1]
    printed = "".join(pieces) + "\nPyTorchObserver " + s.to_json_string() + "\n"
    parsed = parse_observer("I 00:00:00 loading\n" + printed)
    assert parsed["prompt_tokens"] == s.num_prompt_tokens and parsed["generated_tokens"] == s.num_generated_tokens
    unit = s.SCALING_FACTOR_UNITS_PER_SECOND
    assert parsed["load_s"] == pytest.approx((s.model_load_end_ms - s.model_load_start_ms) / unit, abs=1e-4)
    assert parsed["prefill_tps"] == pytest.approx(
        s.num_prompt_tokens / ((s.prompt_eval_end_ms - s.inference_start_ms) / unit), rel=1e-3)
    assert parsed["decode_tps"] > 0 and parsed["ttft_s"] > 0
    assert generated_text(printed, "") == "".join(pieces).rstrip("\n") or generated_text(printed, "").strip()
    with pytest.raises(Exception, match="PyTorchObserver"):
        parse_observer("segmentation fault\n")


# ---- device farm ----------------------------------------------------------------------------

SIM = Path(__file__).parent / "farm_sim"


def _executable(src: Path, dst: Path) -> Path:
    """A simulation script as an executable with this interpreter (aot importable)."""
    dst.write_text(f"#!{sys.executable}\nimport sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
                   + src.read_text())
    dst.chmod(0o755)
    return dst


def test_farm_package_run_and_collect(demo_bundle, tmp_path):
    """AWS Device Farm, simulated: the package's test phase runs with an `adb` that executes the
    device commands on this host and a host stand-in for llama_main (tests/farm_sim: ExecuTorch's
    same C++ runner through its bindings). What `aot farm collect` reads is what the farm keeps."""
    import shutil
    import zipfile

    import yaml

    root = tmp_path / "root"
    shutil.copytree(demo_bundle["path"], root / "demo-8da4w")
    manifest = tmp_path / "farm.yaml"
    manifest.write_text("version: 1\ndefaults: {model: demo, max_seq_len: 64, max_context_len: 512}\n"
                        "targets:\n  - name: demo-8da4w\n    quant: 8da4w\n    validate: {min_decode_tps: 1}\n")
    runner = _executable(SIM / "llama_main.py", tmp_path / "llama_main")
    packages = tmp_path / "packages"
    result = run_cli("farm", "package", "--manifest", manifest, "--root", root, "--out", packages,
                     "--device-runner", runner, "--device-prompts", 2, "--device-prompt-tokens", 16,
                     "--new-tokens", 8, "--repeats", 2, "--json")
    assert result.exit_code == 0, result.stderr + result.stdout
    spec_file = packages / "demo-8da4w.testspec.yml"
    spec = yaml.safe_load(spec_file.read_text())
    commands = [c for phase in spec["phases"].values() for c in phase["commands"]]
    # Everything the spec names lives in the package.
    with zipfile.ZipFile(packages / "demo-8da4w.zip") as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "unpacked")
    assert {"demo-8da4w/model.pte", "demo-8da4w/llama_main", "demo-8da4w/expected.json",
            "demo-8da4w/run_on_device.sh", "testspec.yml", "requirements.txt", "tests/test_placeholder.py"} <= names
    assert spec["android_test_host"] == "amazon_linux_2"
    for c in commands:
        for word in c.split():
            if "$DEVICEFARM_TEST_PACKAGE_PATH/" in word:
                assert word.strip('"').split("$DEVICEFARM_TEST_PACKAGE_PATH/")[1] in names, word
    script = (tmp_path / "unpacked" / "demo-8da4w" / "run_on_device.sh").read_text()
    for word in script.split():
        if word.startswith('"$HERE/'):
            name = word[len('"$HERE/'):].split('"')[0]
            assert "demo-8da4w/" + name in names, word

    # The farm host: run the test phase as Device Farm would, with the simulated adb.
    sim_root, bin_dir, logs = tmp_path / "device", tmp_path / "bin", tmp_path / "logs"
    (sim_root / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    _executable(SIM / "adb.py", bin_dir / "adb")
    getprop = sim_root / "bin" / "getprop"
    getprop.write_text("#!/bin/sh\necho '[ro.product.manufacturer]: [aot]'\necho '[ro.product.model]: [host simulation]'\n"
                       "echo '[ro.product.cpu.abi]: [x86_64]'\n")
    getprop.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "AOT_SIM_ROOT": str(sim_root),
           "DEVICEFARM_TEST_PACKAGE_PATH": str(tmp_path / "unpacked"), "DEVICEFARM_DEVICE_UDID": "SIM-1",
           "DEVICEFARM_LOG_DIR": str(logs)}
    for command in spec["phases"]["test"]["commands"]:
        done = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    junit = tmp_path / "farm.xml"
    collected = run_cli("farm", "collect", logs, "--manifest", manifest, "--root", root, "--junit", junit, "--json")
    assert collected.exit_code == 0, collected.stderr + collected.stdout
    report = json.loads(collected.stdout)
    (run,) = report["runs"]
    assert run["ok"] and run["device"]["model"] == "aot host simulation" and run["device"]["serial"] == "SIM-1"
    assert all(p["agreement_host"] == 1.0 and len(p["device_tokens"]) == 8 for p in run["prompts"])
    assert run["speed"]["runs"] == 4 and run["speed"]["decode_tps"] > 1
    assert json.loads((root / "devices.json").read_text())["ok"] is True
    assert len(ElementTree.parse(junit).getroot().findall("testcase")) == 3  # 2 prompts + the speed gate

    # A device whose output diverges fails its gate, and the exit code says so.
    out = next(logs.rglob("prompt1.run0.out"))
    text = out.read_text()
    out.write_text(text.replace(text.split("\n")[0], text.split("\n")[0][:-10] + " zebra zebra"))
    failed = run_cli("farm", "collect", logs, "--json")
    assert failed.exit_code == 9, failed.stderr
    assert "prompt1.agreement_host" in failed.stderr and json.loads(failed.stdout)["ok"] is False


def test_farm_package_needs_built_targets(tmp_path):
    manifest = tmp_path / "farm.yaml"
    manifest.write_text("version: 1\ntargets:\n  - name: demo-8da4w\n    model: demo\n")
    runner = tmp_path / "llama_main"
    runner.write_bytes(b"x")
    result = run_cli("farm", "package", "--manifest", manifest, "--root", tmp_path / "root", "--out",
                     tmp_path / "p", "--device-runner", runner)
    _fails(result, 3, "not built yet: demo-8da4w")
    assert not (tmp_path / "p").exists()
