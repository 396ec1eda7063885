"""A Hugging Face Hub on 127.0.0.1 that answers the few endpoints huggingface_hub's
snapshot_download calls (repo info, tree listing, file HEAD/GET), so the cache is written by
huggingface_hub itself and the download, gated and not-found paths run for real, with no network."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TOKEN = "hf_test_token"  # the one token the fake Hub accepts for its gated repos


@dataclass
class Repo:
    sha: str  # the commit main points at
    files: dict[str, bytes]
    gated: bool = False


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)  # "METHOD /path", in order
    url: str = ""

    def add(self, repo_id: str, folder: Path, gated: bool = False, extra: dict[str, bytes] | None = None) -> str:
        """Publish every file under `folder` (plus `extra`) as `repo_id`'s main; returns its commit."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update(extra or {})
        digest = hashlib.sha1(repo_id.encode())
        for name, data in sorted(files.items()):
            digest.update(name.encode() + hashlib.sha256(data).digest())
        self.repos[repo_id] = Repo(digest.hexdigest(), files, gated)
        return self.repos[repo_id].sha

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub.handle(self, body=True)

            def do_HEAD(self):
                hub.handle(self, body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- the endpoints -------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        self.requests.append(f"{req.command} {path}")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            return self.info(req, m[1], m[2] or "main")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path)
        if m:
            return self.tree(req, m[1], m[2])
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self.file(req, m[1], m[2], m[3], body)
        self.error(req, 404, "EntryNotFound", f"no route {path}")

    def find(self, req, repo_id: str, revision: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:  # the Hub answers 401 for a repo it does not show this caller
            self.error(req, 401, "RepoNotFound", "Repository Not Found for url.")
            return None
        if revision not in ("main", repo.sha):
            self.error(req, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def info(self, req, repo_id: str, revision: str) -> None:
        repo = self.find(req, repo_id, revision)
        if repo is not None:
            self.json(req, {"id": repo_id, "sha": repo.sha, "private": False, "gated": "manual" if repo.gated else False,
                            "siblings": [{"rfilename": name} for name in repo.files]})

    def tree(self, req, repo_id: str, revision: str) -> None:
        repo = self.find(req, repo_id, revision)
        if repo is not None:
            self.json(req, [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                            for name, data in repo.files.items()])

    def file(self, req, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self.find(req, repo_id, revision)
        if repo is None:
            return
        if repo.gated and req.headers.get("authorization") != f"Bearer {TOKEN}":
            return self.error(req, 401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                              "access to it and be authenticated to access it. Please log in.")
        if name not in repo.files:
            return self.error(req, 404, "EntryNotFound", f"{name} does not exist", repo.sha)
        data = repo.files[name]
        req.send_response(200)
        req.send_header("X-Repo-Commit", repo.sha)
        req.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

    @staticmethod
    def json(req, value) -> None:
        data = json.dumps(value).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)

    @staticmethod
    def error(req, status: int, code: str, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        req.send_response(status)
        req.send_header("X-Error-Code", code)
        req.send_header("X-Error-Message", message)
        if commit:
            req.send_header("X-Repo-Commit", commit)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)
