"""The pull cache, shared by every bundle and modeled on huggingface_hub's:

    $AOT_CACHE, else $XDG_CACHE_HOME/aot, else ~/.cache/aot
      blobs/sha256/<hex>              complete, verified blobs only (read-only)
      tmp/<hex>.incomplete            a download in progress; the next pull resumes it
      locks/<hex>.lock                one downloader per blob (filelock), across processes
      snapshots/<index12>/index.json  the index a snapshot came from
      snapshots/<index12>/<target>/   the bundle's files as links into blobs/

A blob is hashed as it is written (and what a resumed file already holds, first); only when its
size and sha256 match the index is it renamed into blobs/, so nothing half-written or wrong is
ever visible there. Ctrl-C keeps the .incomplete file for the next pull to resume.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

from filelock import FileLock

from aot.dist.layout import blob_key
from aot.dist.transfer import ByteBar, Retryable
from aot.errors import DiskFull, IntegrityError, OutputError
from aot.files import CHUNK, write_atomically
from aot.memplan import size

SNAPSHOT_DIGITS = 12  # of the index's sha256, naming its snapshot folder


def cache_root(given: Path | None = None) -> Path:
    if given is not None:
        return Path(given).expanduser()
    if os.environ.get("AOT_CACHE"):
        return Path(os.environ["AOT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "aot"


class Cache:
    def __init__(self, root: Path):
        self.root = root
        try:
            for d in ("blobs/sha256", "tmp", "locks", "snapshots"):
                (root / d).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--cache {root}: cannot write there ({e.strerror}); choose another --cache or "
                              "$AOT_CACHE") from None

    def blob(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def partial(self, digest: str) -> Path:
        return self.root / "tmp" / f"{digest}.incomplete"

    def has(self, digest: str, nbytes: int) -> bool:
        b = self.blob(digest)
        return b.is_file() and b.stat().st_size == nbytes

    def fetch(self, source, f: dict, bar: ByteBar) -> dict:
        """Make sure blob f["sha256"] (of f["size"] bytes) is in blobs/; what it took."""
        digest, nbytes = f["sha256"], f["size"]
        if self.has(digest, nbytes):
            return {"cached": True, "fetched_bytes": 0, "resumed_at": None}
        with FileLock(str(self.root / "locks" / f"{digest}.lock")):
            if self.has(digest, nbytes):  # another pull finished it while this one waited
                return {"cached": True, "fetched_bytes": 0, "resumed_at": None}
            return self._download(source, f, bar)

    def _download(self, source, f: dict, bar: ByteBar) -> dict:
        digest, nbytes, part = f["sha256"], f["size"], self.partial(f["sha256"])
        h, have = hashlib.sha256(), 0
        if part.is_file() and part.stat().st_size <= nbytes:
            with open(part, "rb") as held:  # resume: hash what is there first
                while block := held.read(CHUNK):
                    h.update(block)
                    have += len(block)
        else:
            part.unlink(missing_ok=True)  # longer than the blob: not this blob's start
        resumed_at = have or None
        bar.file(f["name"], nbytes, f"resuming at {size(have)}" if have else "")
        bar.advance(have)
        state = {"h": _Hasher(h), "have": have, "fetched": 0}
        try:
            with open(part, "ab") as out:
                with _Flusher(out) as state["flusher"]:
                    source.cfg.run(source.where(blob_key(digest)), lambda: self._receive(source, digest, nbytes, out,
                                                                                         state, bar))
                out.flush()
                os.fsync(out.fileno())  # on disk before the rename into blobs/ makes it trusted
        except IntegrityError:
            part.unlink(missing_ok=True)
            raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                part.unlink(missing_ok=True)
                raise DiskFull(f"{self.root}: disk full while writing {f['name']} ({size(nbytes)}); the partial file "
                               "was removed: free space or choose another --cache") from None
            raise OutputError(f"{part}: cannot write ({e.strerror}); choose another --cache") from None
        finally:
            digest_got = state["h"].hexdigest()  # also ends its thread
            if nbytes and part.is_file() and not part.stat().st_size:
                part.unlink()  # nothing came (a 404, a refused connection): nothing to resume
        if digest_got != digest:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{source.where(blob_key(digest))}: sha256 is not the index's ({f['name']}); the "
                                 "download was discarded: the store is damaged, republish it")
        os.chmod(part, 0o444)
        os.replace(part, self.blob(digest))
        return {"cached": False, "fetched_bytes": state["fetched"], "resumed_at": resumed_at}

    @staticmethod
    def _receive(source, digest: str, nbytes: int, out, state: dict, bar: ByteBar) -> None:
        """One attempt: append the rest of the blob from where the file ends (OSError propagates)."""
        if state["have"] == nbytes:
            return
        start, chunks = source.open(blob_key(digest), state["have"])
        if start != state["have"]:  # the server sent it from the start: begin again
            out.truncate(start)
            bar.advance(start - state["have"])
            state["h"].hexdigest()
            state["h"], state["have"] = _Hasher(hashlib.sha256()), 0
        for chunk in chunks:
            if state["have"] + len(chunk) > nbytes:
                raise IntegrityError(f"{source.where(blob_key(digest))}: more bytes than the index's {nbytes}; the "
                                     "store is damaged, republish it")
            out.write(chunk)
            state["flusher"].wrote(len(chunk))
            state["h"].update(chunk)
            state["have"] += len(chunk)
            state["fetched"] += len(chunk)
            bar.advance(len(chunk))
        if state["have"] < nbytes:
            raise Retryable(f"connection closed at {state['have']} of {nbytes} bytes")

    def snapshot(self, index_sha: str, raw_index: bytes, target: dict) -> Path:
        """snapshots/<index12>/<target>/: the target's files as relative links into blobs/."""
        top = self.root / "snapshots" / index_sha[:SNAPSHOT_DIGITS]
        top.mkdir(parents=True, exist_ok=True)
        if not (top / "index.json").is_file():
            write_atomically(top / "index.json", raw_index)
        links = {f["name"]: Path("..", "..", "..", blob_key(f["sha256"])) for f in target["files"]}
        dest = top / target["name"]
        if dest.is_dir() and {p.name: Path(os.readlink(p)) for p in dest.iterdir() if p.is_symlink()} == links:
            return dest  # the same index gives the same snapshot: a repeated pull leaves it be
        return place_links(dest, links, replace=True)


class _Hasher:
    """sha256 in a thread of its own, fed each chunk as it is written: hashing runs at about the
    speed of a loopback transfer (~1.2 GB/s on one core with SHA-NI), and hashlib and the socket
    both release the GIL, so the two overlap instead of adding up."""

    def __init__(self, h):
        self._h = h
        self._q: queue.Queue = queue.Queue(maxsize=64)  # 64 reads in flight at most (16 MiB)
        self._digest = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            self._h.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._q.put(chunk)

    def hexdigest(self) -> str:
        """The digest of everything fed (waits for the thread, which then ends)."""
        if self._digest is None:
            self._q.put(None)
            self._thread.join()
            self._digest = self._h.hexdigest()
        return self._digest


class _Flusher:
    """Writes a download's data out to disk as it arrives (an fdatasync per FLUSH_EVERY bytes, in a
    thread that waits on the disk, not the CPU), so the fsync before the rename into blobs/ finds
    little left to write: behind a 100 MiB/s link, a 1 GiB pull otherwise ends with ~1 s of it."""

    FLUSH_EVERY = 64 << 20

    def __init__(self, f):
        self._f, self._pending, self._stop = f, 0, False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_Flusher":
        self._thread.start()
        return self

    def _run(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            try:
                sync(self._f.fileno())
            except (OSError, ValueError):  # a full disk also fails the writer's own write or fsync
                return

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending >= self.FLUSH_EVERY:
            self._f.flush()
            self._pending = 0
            self._wake.set()

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join()


def place_links(dest: Path, links: dict[str, Path], replace: bool) -> Path:
    """A folder of symlinks `name -> target`, written beside `dest` and renamed into place whole;
    an existing `dest` is swapped out only when `replace`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for name, target in links.items():
            os.symlink(target, tmp / name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        old = None
        if dest.exists() or dest.is_symlink():
            if not replace:
                raise OutputError(f"{dest} exists")
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "dir")
        os.rename(tmp, dest)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
