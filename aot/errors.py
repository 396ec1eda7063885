"""Errors a user can cause. Each has an exit code and a one-line message that says what to do.

The CLI catches `AotError` only; anything else is a bug and shows a traceback under --debug.
"""


def short(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, saying how much was left out: an error never echoes an
    unbounded value back (a 1 MB flag value, a manifest's 10^6-character string)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text) - limit + 40} more characters)"


class AotError(Exception):
    exit_code = 1
    kind = "error"


class ConfigError(AotError):
    """A flag, a combination of flags or a config value is invalid."""

    exit_code = 3
    kind = "config"


class CheckpointError(AotError):
    """A checkpoint or tokenizer is missing, unreadable, unsafe or does not fit the model."""

    exit_code = 4
    kind = "checkpoint"


class OutputError(AotError):
    """The output location exists already or cannot be written."""

    exit_code = 5
    kind = "output"


class DelegateUnavailable(AotError):
    """The delegate is known but cannot run on this machine (SDK missing, wrong platform)."""

    exit_code = 6
    kind = "delegate-unavailable"


class BundleError(AotError):
    """A bundle is incomplete, malformed or fails its integrity check."""

    exit_code = 7
    kind = "bundle"


class BuildError(AotError):
    """Export or lowering failed for a reason the inputs did not make obvious."""

    exit_code = 8
    kind = "build"


class GatesFailed(AotError):
    """The command ran, and at least one validation gate did not hold."""

    exit_code = 9
    kind = "gates"


class TargetsFailed(AotError):
    """A manifest build or release ran, and at least one target failed or was left out."""

    exit_code = 10
    kind = "targets-failed"


class TargetLocked(AotError):
    """Another aot process holds this target's lock on the same output root."""

    exit_code = 11
    kind = "locked"


class DeviceError(AotError):
    """A device cannot be reached, refuses us, times out, or lacks what the bundle needs."""

    exit_code = 12
    kind = "device"


class ResourcesShort(AotError):
    """The machine has too little memory or disk for the build (preflight estimate)."""

    exit_code = 13
    kind = "resources"


class ImageError(AotError):
    """An image file is missing, empty, corrupt, not an image, or too large to decode."""

    exit_code = 14
    kind = "image"


# ---- distribution (aot publish, aot pull) ------------------------------------------------------


class NotFound(AotError):
    """An index, signature or blob is not at the source (HTTP 404, no such S3 key, no such file)."""

    exit_code = 15
    kind = "not-found"


class TransferFailed(AotError):
    """A transfer kept failing (connection refused or cut, timeout, HTTP 5xx) after its retries."""

    exit_code = 16
    kind = "transfer"


class IntegrityError(AotError):
    """A downloaded file's size or sha256 is not what the index says."""

    exit_code = 17
    kind = "integrity"


class SignatureError(AotError):
    """--verify-key: the index is unsigned, its signature is invalid, or another key signed it."""

    exit_code = 18
    kind = "signature"


class NoTargetFits(AotError):
    """--device: no target in the index runs on that device within its memory."""

    exit_code = 19
    kind = "no-fit"


class IndexInvalid(AotError):
    """An index is not an aot-index, is malformed, or names unsafe paths or digests."""

    exit_code = 20
    kind = "index"


class DiskFull(AotError):
    """The disk filled up while writing a download (the partial file is removed)."""

    exit_code = 21
    kind = "disk-full"


EXIT_INTERRUPTED = 130

EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: rerun with --debug and report the traceback)",
    2: "usage error (unknown command or option, bad option value)",
    ConfigError.exit_code: "invalid configuration (model, scheme, group size, lengths, ids, cache, --device-memory) or a prompt past the context",
    CheckpointError.exit_code: "checkpoint or tokenizer missing, corrupt, unsafe or mismatched",
    OutputError.exit_code: "output exists (use --force) or is not writable",
    DelegateUnavailable.exit_code: "delegate not available on this machine",
    BundleError.exit_code: "bundle malformed or failed its sha256 check",
    BuildError.exit_code: "export or lowering failed",
    GatesFailed.exit_code: "validation ran and a gate (accuracy or speed threshold) failed",
    TargetsFailed.exit_code: "manifest build or release: a target failed (its own error is in the summary)",
    TargetLocked.exit_code: "a target is being built by another aot process on the same output root",
    DeviceError.exit_code: "device unreachable, refused the login, timed out or lacks the runtime",
    ResourcesShort.exit_code: "build preflight: not enough memory or disk for this model (--no-preflight overrides)",
    ImageError.exit_code: "image file missing, empty, corrupt, not an image, or too large",
    NotFound.exit_code: "pull: the index, its signature or a blob is not at the source (404, no such key or file)",
    TransferFailed.exit_code: "publish/pull: a transfer kept failing (connection, timeout, 5xx) after its retries; rerun to resume",
    IntegrityError.exit_code: "pull: a download's size or sha256 is not the index's (nothing kept)",
    SignatureError.exit_code: "pull --verify-key: the index is unsigned, tampered with, or signed by another key",
    NoTargetFits.exit_code: "pull --device: no target runs on that device within its memory",
    IndexInvalid.exit_code: "pull: the index is malformed or unsafe (paths, digests, sizes)",
    DiskFull.exit_code: "pull: the disk filled up while writing (the partial file was removed)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); nothing was written",
}

