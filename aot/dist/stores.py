"""Where `aot publish` writes: a directory (which a static HTTP host such as nginx can serve as it
is) or an S3 prefix. Both put each object whole or not at all: a directory through a temporary
file and a rename, S3 by the nature of a PUT (and of a completed multipart upload)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from aot.dist import s3
from aot.dist.transfer import Transfer
from aot.errors import BundleError, OutputError, TransferFailed
from aot.files import CHUNK, write_atomically


def open_store(dest: str, cfg: Transfer):
    return S3Store(dest, cfg) if dest.startswith("s3://") else DirStore(Path(dest).expanduser())


class DirStore:
    def __init__(self, root: Path):
        self.root = root
        if root.exists() and not root.is_dir():
            raise OutputError(f"--to {root}: exists and is not a directory; choose a directory or s3://BUCKET/PREFIX")

    def prepare(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--to {self.root}: cannot write there ({e.strerror}); choose a writable --to") from None

    def where(self, key: str) -> str:
        return str(self.root / key)

    def has(self, key: str, nbytes: int) -> bool:
        f = self.root / key
        return f.is_file() and f.stat().st_size == nbytes

    def put_file(self, key: str, src: Path, sha256: str) -> None:
        """Copy `src` in, hashing the bytes as they go: a file changed since it was verified is
        refused, not published under a digest it no longer has."""
        dst = self.root / key
        tmp = None
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
            h = hashlib.sha256()
            with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
                while block := fin.read(CHUNK):
                    h.update(block)
                    fout.write(block)
            if h.hexdigest() != sha256:
                raise BundleError(f"{src}: changed while it was being published; re-run `aot release`, then publish")
            os.chmod(tmp, 0o644)  # mkstemp makes 0600: a served store is read by the web server's user
            os.replace(tmp, dst)
            tmp = None
        except OSError as e:
            raise OutputError(f"--to {self.root}: cannot write {key} ({e.strerror}); choose a writable --to") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        dst = self.root / key
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--to {self.root}: cannot write there ({e.strerror}); choose a writable --to") from None
        write_atomically(dst, data)


class S3Store:
    def __init__(self, url: str, cfg: Transfer):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = s3.split_url(url)
        self.client = s3.client(cfg, attempts=cfg.attempts)

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{s3.join(self.prefix, key)}"

    def has(self, key: str, nbytes: int) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=s3.join(self.prefix, key))
        except s3.errors() as e:
            if s3.missing(e):
                return False
            raise self._error(key, e) from None
        return head.get("ContentLength") == nbytes

    def put_file(self, key: str, src: Path, sha256: str) -> None:
        from boto3.exceptions import S3UploadFailedError

        try:
            # s3transfer: one PUT, or a multipart upload (8 MiB parts, each retried) for big files
            self.client.upload_file(str(src), self.bucket, s3.join(self.prefix, key))
        except S3UploadFailedError as e:
            cause = e.__context__ or e  # boto3 wraps the ClientError in a message naming the local path
            raise TransferFailed(f"{self.where(key)}: upload failed ({cause}); rerun: what is uploaded is kept") from None
        except s3.errors() as e:
            raise self._error(key, e) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=s3.join(self.prefix, key), Body=data)
        except s3.errors() as e:
            raise self._error(key, e) from None

    def prepare(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except s3.errors() as e:
            raise self._error("", e) from None

    def _error(self, key: str, e: Exception) -> Exception:
        from botocore.exceptions import NoCredentialsError

        if isinstance(e, NoCredentialsError):
            return OutputError(f"--to {self.url}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                               "or AWS_PROFILE)")
        if s3.missing(e):
            return OutputError(f"--to {self.url}: no bucket '{self.bucket}'; create it or choose another --to")
        if s3.retryable(e):
            return TransferFailed(f"{self.where(key)}: {e}; check AWS_ENDPOINT_URL and the network, then rerun")
        return OutputError(f"--to {self.url}: {e}")
