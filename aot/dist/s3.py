"""S3 for publish and pull: the client (boto3, imported only here and only when an s3:// URL is
used), and what its errors mean. The endpoint, region and credentials are boto3's own
(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID ..., or a profile)."""

from __future__ import annotations

from aot.dist.transfer import Transfer
from aot.errors import ConfigError

_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


def split_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix") (no slashes at either end)."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{url}: an S3 URL is s3://BUCKET[/PREFIX]")
    return bucket, prefix.strip("/")


def join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


def client(cfg: Transfer, attempts: int):
    """A client whose own retries (botocore's, standard mode) are `attempts` in all: uploads use
    them (each multipart part is retried alone), downloads set 1 and retry with resume instead."""
    import boto3  # ~0.3 s, and only s3:// needs it
    from botocore.config import Config

    return boto3.client("s3", config=Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=cfg.timeout, read_timeout=cfg.timeout))


def errors() -> tuple[type, ...]:
    """What boto3 raises (`except s3.errors() as e:`; the classes load with boto3)."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


def missing(e: Exception) -> bool:
    """A ClientError saying the bucket or key is not there."""
    return _code(e) in _MISSING or _status(e) == 404


def retryable(e: Exception) -> bool:
    """Worth another attempt: a connection failure or a server-side (5xx, throttling) error."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError

    if isinstance(e, (ConnectionError, HTTPClientError, IncompleteReadError, HTTPError)):
        return True
    return isinstance(e, ClientError) and (_status(e) >= 500 or _code(e) in ("SlowDown", "Throttling", "RequestTimeout"))


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def _status(e: Exception) -> int:
    return int(getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
