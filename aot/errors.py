"""Errors a user can cause. Each has an exit code and a one-line message that says what to do.

The CLI catches `AotError` only; anything else is a bug and shows a traceback under --debug.
"""


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
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); nothing was written",
}

