"""Where `aot pull` reads: an HTTP(S) server, an S3 prefix or a local directory, each holding a
published store (index.json, signatures/, blobs/sha256/). A source reads whole small objects (the
index, a signature) and streams a blob from an offset (HTTP Range, S3 Range, seek), so an
interrupted download resumes where it stopped.

`open(key, offset)` returns (start, chunks): `start` is where the stream really begins (0 when an
HTTP server ignores the Range header). Failures worth retrying raise Retryable, a missing object
NotFound, anything else a one-line AotError."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from aot.dist import s3
from aot.dist.layout import INDEX_JSON
from aot.dist.transfer import Retryable, Transfer
from aot.errors import ConfigError, IntegrityError, NotFound, TransferFailed
from aot.files import CHUNK

MAX_SMALL = 64 << 20  # an index or signature larger than this is not one
NET_CHUNK = 256 << 10  # at most, per network read


def open_source(index: str, cfg: Transfer, verify_key: bool) -> tuple["HttpSource | S3Source | LocalSource", str]:
    """The source holding INDEX and the index's key in it. Plain http:// only to a loopback host,
    or for an index whose signature will be verified (a verified index pins every blob's digest)."""
    if index.startswith(("http://", "https://")):
        if not verify_key and not _secure(index):
            raise ConfigError(f"{index}: {_PLAIN}")
        base, _, name = index.rpartition("/") if index.endswith(".json") else (index.rstrip("/"), "", INDEX_JSON)
        return HttpSource(base, cfg, plain_ok=verify_key), name
    if index.startswith("s3://"):
        base, _, name = index.rpartition("/") if index.endswith(".json") else (index.rstrip("/"), "", INDEX_JSON)
        return S3Source(base, cfg), name
    if "://" in index:
        raise ConfigError(f"{index}: INDEX is an https://, http:// (loopback), s3:// URL or a local path")
    path = Path(index).expanduser()
    if path.is_dir():
        return LocalSource(path), INDEX_JSON
    return LocalSource(path.parent), path.name


def read_small(source, key: str) -> bytes:
    """A whole index or signature (under MAX_SMALL), with the source's retries."""
    def read() -> bytes:
        data = bytearray()
        for chunk in source.open(key, 0)[1]:
            data += chunk
            if len(data) > MAX_SMALL:
                raise TransferFailed(f"{source.where(key)}: larger than {MAX_SMALL >> 20} MiB; not an index or signature")
        return bytes(data)

    return source.cfg.run(source.where(key), read)


_PLAIN = "plain http is accepted only from a loopback host; use https, or a signed index with --verify-key"


def _secure(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and _loopback(parts.hostname or ""))


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpSource:
    def __init__(self, base: str, cfg: Transfer, plain_ok: bool):
        import requests  # ~0.1 s; only http(s) needs it

        self.base, self.cfg, self.plain_ok = base, cfg, plain_ok
        self.session = requests.Session()

    def where(self, key: str) -> str:
        return f"{self.base}/{key}"

    def open(self, key: str, offset: int) -> tuple[int, Iterator[bytes]]:
        import requests

        url = self.where(key)
        # identity: the stored bytes as they are (a server may gzip JSON), and ranges over them
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
        try:
            r = self.session.get(url, headers=headers, stream=True, timeout=(self.cfg.timeout, self.cfg.timeout))
        except requests.RequestException as e:
            raise Retryable(_reason(e)) from None
        if not self.plain_ok and not _secure(r.url):  # redirected to plain http elsewhere
            r.close()
            raise ConfigError(f"{url}: redirected to {r.url}: {_PLAIN}")
        if r.status_code in (404, 410):
            r.close()
            raise NotFound(f"{url}: not found (HTTP {r.status_code}); check the URL, or republish")
        if r.status_code == 416:
            r.close()
            raise IntegrityError(f"{url}: the server holds fewer bytes than the index says; the store is damaged")
        if r.status_code >= 500 or r.status_code == 429:
            r.close()
            raise Retryable(f"HTTP {r.status_code} {r.reason}")
        if r.status_code not in (200, 206):
            r.close()
            raise TransferFailed(f"{url}: HTTP {r.status_code} {r.reason}")
        start = offset if r.status_code == 206 else 0
        if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            r.close()
            raise Retryable(f"a range answer that does not start at byte {offset}")
        return start, self._chunks(r)

    @staticmethod
    def _chunks(r) -> Iterator[bytes]:
        """What each socket read returns: read1, not iter_content, whose fixed-size reads lose what
        they held when the connection is cut (so a resume would fetch up to a chunk again)."""
        import requests
        from urllib3.exceptions import HTTPError

        try:
            while block := r.raw.read1(NET_CHUNK, decode_content=False):
                yield block
        except (requests.RequestException, HTTPError, OSError) as e:  # a cut (Content-Length is enforced), a timeout
            raise Retryable(_reason(e)) from None
        finally:
            r.close()


def _reason(e: Exception) -> str:
    import requests

    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    if isinstance(e, (requests.Timeout, ReadTimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(e, (requests.exceptions.ChunkedEncodingError, ProtocolError)):
        return "connection cut mid-transfer"
    return f"connection failed ({type(e).__name__})"


class S3Source:
    def __init__(self, base: str, cfg: Transfer):
        self.cfg = cfg
        self.bucket, self.prefix = s3.split_url(base)
        self.client = s3.client(cfg, attempts=1)  # retried by Transfer, resuming at the bytes held

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{s3.join(self.prefix, key)}"

    def open(self, key: str, offset: int) -> tuple[int, Iterator[bytes]]:
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=s3.join(self.prefix, key), **extra)["Body"]
        except s3.errors() as e:
            raise self._error(key, e) from None
        return offset, self._chunks(key, body)

    def _chunks(self, key: str, body) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(NET_CHUNK)
        except s3.errors() as e:
            raise self._error(key, e) from None
        finally:
            body.close()

    def _error(self, key: str, e: Exception) -> Exception:
        from botocore.exceptions import NoCredentialsError

        if isinstance(e, NoCredentialsError):
            return ConfigError(f"{self.where(key)}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                               "or AWS_PROFILE)")
        if s3.missing(e):
            return NotFound(f"{self.where(key)}: no such object; check the URL, or republish")
        if "InvalidRange" in str(e):
            return IntegrityError(f"{self.where(key)}: the object holds fewer bytes than the index says; the store "
                                  "is damaged")
        if s3.retryable(e):
            return Retryable(str(e))
        return TransferFailed(f"{self.where(key)}: {e}")


class LocalSource:
    def __init__(self, root: Path):
        self.root = root
        self.cfg = Transfer(attempts=1)  # a local read that fails will fail again

    def where(self, key: str) -> str:
        return str(self.root / key)

    def open(self, key: str, offset: int) -> tuple[int, Iterator[bytes]]:
        try:
            f = open(self.root / key, "rb")
        except FileNotFoundError:
            raise NotFound(f"{self.where(key)}: no such file; check the path, or republish") from None
        except OSError as e:
            raise TransferFailed(f"{self.where(key)}: cannot read ({e.strerror})") from None
        f.seek(offset)
        return offset, self._chunks(f)

    @staticmethod
    def _chunks(f) -> Iterator[bytes]:
        with f:
            while block := f.read(CHUNK):
                yield block
