"""File helpers every layer uses: one sha256, one atomic writer, one JSON-object reader.

At the bottom of the import layers (errors, files -> config -> ...): imports nothing of aot's but
its errors (and reads the JSON objects checkpoints are made of).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from aot.errors import CheckpointError, OutputError

MAX_JSON_BYTES = 16 << 20  # config.json, params.json, shard indexes, tokenizer_config.json: KBs each
CHUNK = 1 << 22  # 4 MiB reads: hashing a 6 GiB checkpoint never holds more than this


def sha256_file(file: Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file, read in chunks (never whole into memory)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_atomically(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it and a rename: a reader sees the old
    file or the new one, never half of one. One line (OutputError) when the place is not writable."""
    path = Path(path).expanduser()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; what open() would have made
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror}); choose a writable path") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def read_json(file: Path, error: type = CheckpointError, what: str = "config file",
              hint: str = "re-download or fix the file", limit: int = MAX_JSON_BYTES):
    """The JSON in `file`, read at most `limit` bytes of it (`what`: what such a file is, for the
    message); every problem one line of `error` ending in `hint`."""
    try:
        with open(file, "rb") as f:
            if not os.path.isfile(file):
                raise error(f"{file}: not a regular file; {hint}")
            raw = f.read(limit + 1)
        if len(raw) > limit:
            raise error(f"{file}: larger than {limit >> 20} MiB, which no {what} is; {hint}")
        return json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, a 5,000-digit int
        reason = e.strerror if isinstance(e, OSError) else " ".join(str(e).split())[:160]
        raise error(f"{file}: not readable JSON ({reason}); {hint}") from None


def read_json_object(file: Path) -> dict:
    """A JSON file that must hold an object (a checkpoint's config.json, params.json, shard index,
    tokenizer_config.json); one line (CheckpointError) when it is unreadable or not an object."""
    data = read_json(file)
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def is_int(value) -> bool:
    """An int that is not a bool (JSON's true would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def plain_file_name(name) -> bool:
    """A name that stays in its folder: no separator, not `.` or `..`, no NUL."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..")
            and not any(c in name for c in "/\\\0"))


def check_inside(folder: Path, files) -> None:
    """Every file the checkpoint is read from lies inside its folder once symlinks are followed;
    in the Hugging Face cache (models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/SHA) inside the
    repo's folder. A link to /etc or another user's home is refused before it is opened."""
    real = folder.resolve()
    roots = [real]
    if folder.parent.name == "snapshots":
        roots.append(folder.parent.parent.resolve())
    for f in files:
        target = Path(os.path.realpath(f))
        if not any(target == r or r in target.parents for r in roots):
            raise CheckpointError(f"{f}: links outside the checkpoint folder (to {str(target)[:120]}); copy the "
                                  "file into the folder")
        if not target.is_file():
            raise CheckpointError(f"{f}: not a regular file; re-download it")
