"""Real servers on 127.0.0.1 for publish/pull's tests and bench/pull.py: nginx serving a folder, moto's
standalone S3 server, and a small HTTP proxy that injects faults (cut connections, 5xx, 404,
stalls, a slow link) between a client and either of them. Also what those tests publish: EC key
pairs and synthetic release roots (a release.json and bundle directories whose bundle.json lists
their files) for tests about transport rather than the model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def start_nginx(root: Path, work: Path, limit_rate: str | None = None) -> tuple[subprocess.Popen, int]:
    """nginx in the foreground serving `root` (Range requests included) on a free loopback port;
    `limit_rate` (nginx's, bytes/s per connection: "100m") emulates a slower link.
    master_process off: one process, which keeps the starting user's rights (as root, a worker
    would switch to `nobody` and could not read pytest's 0700 temporary folders)."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    temp = work / "temp"
    temp.mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process off;
pid {work / 'nginx.pid'};
error_log {work / 'error.log'};
events {{}}
http {{
  access_log off;
  client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
  uwsgi_temp_path {temp}; scgi_temp_path {temp};
  server {{ listen 127.0.0.1:{port}; root {root}; {f"limit_rate {limit_rate};" if limit_rate else ""} }}
}}
""")
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(work)], stdout=subprocess.DEVNULL,
                            stderr=open(work / "stderr.log", "wb"))
    wait_for_port(port, proc)
    return proc, port


def start_moto(work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(work / "moto.log", "wb"), stderr=subprocess.STDOUT)
    wait_for_port(port, proc)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of `upstream_port`, one request per connection (it asks the
    upstream to close after each), so each fault applies to whole requests:

    fail_next: answer the next K requests with 500;  fail_path: answer 500 to requests whose
    "METHOD /path" holds this string; missing_path: 404 likewise; cut_after: close the next
    response to a request under `fault_path` after N bytes (once); stall_after: send N bytes of
    such a response, then nothing (once); rate: bytes per second downstream. `sent` counts the
    bytes sent to clients (headers too)."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.fail_next = 0
        self.fail_path = self.missing_path = None
        self.cut_after = self.stall_after = None
        self.rate = None
        self.fault_path = "/blobs/"
        self.sent = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.fail_next, self.fail_path, self.missing_path = 0, None, None
            self.cut_after = self.stall_after = self.rate = None
            self.sent, self.requests = 0, []

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head, body = _read_head(client)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:])
                           if k.strip().lower() == "content-length"), 0)
            request = f"{method} {path}"
            with self._lock:
                self.requests.append(request)
                fail = self.fail_next > 0 or (self.fail_path is not None and self.fail_path in request)
                self.fail_next -= self.fail_next > 0
                missing = self.missing_path is not None and self.missing_path in request
                cut = stall = None
                if self.fault_path in path:
                    cut, self.cut_after = self.cut_after, None
                    stall, self.stall_after = self.stall_after, None
            if fail or missing:
                while len(body) < length and (more := client.recv(65536)):
                    body += more
                status = b"500 Internal Server Error" if fail else b"404 Not Found"
                client.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            kept = [ln for ln in lines[1:] if ln and ln.split(":")[0].strip().lower() not in ("connection", "keep-alive")]
            forward = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")
            try:
                with socket.create_connection(("127.0.0.1", self.upstream)) as up:
                    up.sendall(forward + body)
                    threading.Thread(target=_pump, args=(client, up, length - len(body)), daemon=True).start()
                    self._respond(up, client, cut, stall)
            except OSError:
                return

    def _respond(self, up: socket.socket, client: socket.socket, cut: int | None, stall: int | None) -> None:
        sent = 0
        start = time.monotonic()
        while block := up.recv(65536 if self.rate is None else 8192):
            limit = cut if cut is not None else stall
            if limit is not None and sent + len(block) >= limit:
                block = block[:limit - sent]
                client.sendall(block)
                self._count(len(block))
                if stall is not None:
                    self._stop.wait(60)  # hold the connection open, silent, until the proxy closes
                client.shutdown(socket.SHUT_RDWR)
                return
            client.sendall(block)
            sent += len(block)
            self._count(len(block))
            if self.rate:
                time.sleep(max(0.0, sent / self.rate - (time.monotonic() - start)))

    def _count(self, n: int) -> None:
        with self._lock:
            self.sent += n


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            return None, b""
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _pump(client: socket.socket, up: socket.socket, remaining: int) -> None:
    """The rest of a request body (an upload) from the client to the upstream."""
    try:
        while remaining > 0 and (block := client.recv(min(65536, remaining))):
            up.sendall(block)
            remaining -= len(block)
    except OSError:
        pass


# ---- what the tests publish ---------------------------------------------------------------


def write_keys(d: Path, name: str = "key") -> tuple[Path, Path]:
    """An EC P-256 key pair as PEM: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    d.mkdir(parents=True, exist_ok=True)
    priv, pub = d / f"{name}.pem", d / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


PTE_HEAD = b"\x1c\x00\x00\x00ET12"  # a flatbuffer root offset, then ExecuTorch's file identifier


def fake_bundle(d: Path, files: dict[str, bytes], *, delegate: str = "xnnpack", soc: str | None = None,
                ctx: int = 64, at_load: int | None = 1 << 20) -> dict:
    """A bundle directory with `files` (model.pte must start with PTE_HEAD) and the bundle.json
    fields the index reads; returns bundle.json."""
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    manifest = {
        "format": "aot-bundle", "format_version": 1, "created": "2026-01-01T00:00:00+00:00",
        "delegate": delegate,
        "versions": {"aot": "0.1.0", "torch": "2.13.0", "executorch": "1.5.1", "torchao": "0.18.0"},
        "metadata": {"get_max_context_len": ctx, "get_max_seq_len": 16},
        "model": {"name": "tiny"}, "quant": {"scheme": "none"},
        "tokenizer": {"file": "tokenizer.json", "kind": "hf-json"} if "tokenizer.json" in files else None,
        "chat": None, "license": None,
        "target": {"delegate": delegate, "soc": soc},
        "export": {"kv_cache": {"storage": "fp32"}},
        "build": {"config": {"kv_cache": None, "attention_sink": None}},
        "memory_plan": None if at_load is None else {"total": {"at_load_bytes": at_load}},
        "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in sorted(files.items())},
    }
    (d / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def fake_release(root: Path, bundles: dict[str, dict]) -> Path:
    """release.json over bundle directories root/<name> (written with fake_bundle)."""
    targets = []
    for name, manifest in bundles.items():
        targets.append({"name": name, "bundle": name, "files": manifest["files"],
                        "bundle_json_sha256": hashlib.sha256((root / name / "bundle.json").read_bytes()).hexdigest(),
                        "model": "tiny", "quant": "none", "delegate": manifest["delegate"],
                        "input_key": "0" * 64, "build": {"status": "built", "seconds": 0.0}, "validation": None})
    release = {"format": "aot-release", "format_version": 1, "created": "2026-01-01T00:00:00+00:00",
               "manifest": {"path": "fake.yaml", "sha256": "0" * 64}, "versions": {}, "targets": targets}
    (root / "release.json").write_text(json.dumps(release, indent=2) + "\n")
    return root


def synthetic_release(root: Path, weights: bytes, **kw) -> Path:
    """A one-target release `t` whose model.ptd holds `weights` (the transport tests' payload)."""
    manifest = fake_bundle(root / "t", {"model.pte": PTE_HEAD + b"\0" * 56, "model.ptd": weights,
                                        "tokenizer.json": b'{"model": {}}'}, **kw)
    return fake_release(root, {"t": manifest})


def env_with(**extra: str) -> dict:
    return {**os.environ, **extra}


def error_line(result) -> str:
    """The one `aot: error:` line a failed command printed (progress lines may come before it)."""
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("aot: error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]
