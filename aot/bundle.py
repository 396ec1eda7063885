"""Bundles: a directory with model.pte, the tokenizer as given, and bundle.json saying exactly
what went in. Written into a hidden temporary directory beside the target and renamed into place
whole, so an interrupted or failed build never leaves a partial bundle."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aot.errors import BundleError, ConfigError, DelegateUnavailable, OutputError, short
from aot.files import is_int, plain_file_name, read_json, sha256_file

BUNDLE_JSON = "bundle.json"
BUNDLE_FORMAT = "aot-bundle"
FORMAT_VERSION = 1
PTE_NAME = "model.pte"
PTD_NAME = "model.ptd"  # external weights (--external-weights): ExecuTorch named data beside the program


def check_out(out: Path, force: bool) -> None:
    """--out's rule (aot build, aot pull): an existing path is replaced only with `force`, and only
    when it is an empty folder or a bundle (never a folder of someone's other files)."""
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"--out {out} exists; pass --force to replace it, or choose another --out")
        replaceable = out.is_dir() and not out.is_symlink()
        if not (replaceable and (not any(out.iterdir()) or (out / BUNDLE_JSON).is_file())):
            raise OutputError(
                f"--out {out} exists and is not an aot bundle; refusing to replace it even with --force"
            )


class Staging:
    """`with Staging(out, force) as s:` write into `s.dir`, then `s.commit(manifest)`.

    Checks the target before any work starts (so a long build does not end in "exists"), and
    removes the temporary directory on any exception, Ctrl-C included.
    """

    def __init__(self, out: Path, force: bool):
        self.out = Path(out).expanduser().absolute()
        self.force = force
        self.dir: Path | None = None

    def __enter__(self) -> "Staging":
        out = self.out
        check_out(out, self.force)
        parent = out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        except OSError as e:
            raise OutputError(f"--out {out}: cannot write in {parent} ({e.strerror}); choose a writable --out") from None
        return self

    def commit(self, manifest: dict) -> dict:
        """Hash the staged files into bundle.json, move the bundle into place; returns the manifest."""
        assert self.dir is not None
        files = {}
        for f in sorted(self.dir.iterdir()):
            files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {**manifest, "files": files}
        (self.dir / BUNDLE_JSON).write_text(json.dumps(manifest, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.dir, 0o777 & ~umask)  # mkdtemp makes 0700; a bundle is for sharing
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.rename(self.out, old / "bundle")
        os.rename(self.dir, self.out)
        self.dir = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest

    def __exit__(self, exc_type, exc, tb):
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        return False


def read_bundle(path: Path) -> dict:
    """bundle.json of a bundle directory (or of the directory holding a given model.pte)."""
    path = Path(path).expanduser()
    if path.is_file() and path.name != BUNDLE_JSON:
        path = path.parent
    if path.name == BUNDLE_JSON:
        path = path.parent
    file = path / BUNDLE_JSON
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory; give the folder `aot build --out` wrote")
    if not file.is_file():
        raise BundleError(f"{path}: no {BUNDLE_JSON} inside; is this a bundle from `aot build`?")
    manifest = read_json(file, BundleError, BUNDLE_JSON, "rebuild the bundle", MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{file}: not an {BUNDLE_FORMAT} manifest; rebuild the bundle")
    version = manifest.get("format_version", 0)
    if not is_int(version):
        raise BundleError(f"{file}: format_version must be an integer; rebuild the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{file}: format version {version} is newer than this aot reads ({FORMAT_VERSION}); upgrade aot"
        )
    problem = _shape_problem(manifest)
    if problem:
        raise BundleError(f"{file}: {problem}; rebuild the bundle (bundle.json is written by `aot build`)")
    return manifest


MAX_MANIFEST_BYTES = 16 << 20
# The parts of bundle.json aot's readers index into, and what each must be: a bundle.json that
# came from elsewhere is checked against these before anything reads a field of it.
_OBJECTS = ("model", "export", "quant", "tokenizer", "image", "checkpoint", "target", "memory_plan", "build",
            "inputs", "metadata", "chat", "runtime")
_REQUIRED = ("model", "export", "files")


def _shape_problem(m: dict) -> str | None:
    for key in _REQUIRED:
        if not isinstance(m.get(key), dict):
            return f"'{key}' must be an object"
    for key in _OBJECTS:
        if m.get(key) is not None and not isinstance(m[key], dict):
            return f"'{key}' must be an object"
    files = m["files"]
    if not isinstance(files, dict) or not files:
        return "'files' must be an object of file entries"
    for name, entry in files.items():
        if not plain_file_name(name):
            return f"file entry {short(repr(name), 60)} is not a plain file name"
        if not isinstance(entry, dict) or not is_int(entry.get("bytes")) or entry["bytes"] < 0 \
                or not isinstance(entry.get("sha256"), str):
            return f"file entry '{short(name, 60)}' must have integer bytes and a sha256 string"
    if not isinstance(m["model"].get("name"), str):
        return "model.name must be a string"
    if m["model"].get("args") is not None and not isinstance(m["model"]["args"], dict):
        return "model.args must be an object"
    ctx = m["export"].get("max_context_len")
    if ctx is not None and (not is_int(ctx) or ctx < 1):
        return "export.max_context_len must be a positive integer"
    if m.get("quant") is not None and not isinstance(m["quant"].get("scheme", ""), str):
        return "quant.scheme must be a string"
    tok = m.get("tokenizer")
    if tok is not None and not (plain_file_name(tok.get("file")) and tok["file"] in files):
        return "tokenizer.file must name one of the bundle's files"
    data = m.get("data_file")
    if data is not None and not (plain_file_name(data) and data in files):
        return "data_file must name one of the bundle's files"
    if m.get("adapters") is not None and not (isinstance(m["adapters"], list)
                                              and all(isinstance(a, dict) for a in m["adapters"])):
        return "adapters must be a list of objects"
    if m.get("bos_id") is not None and not is_int(m["bos_id"]):
        return "bos_id must be an integer"
    eos = m.get("eos_ids")
    if eos is not None and not (isinstance(eos, list) and all(is_int(e) for e in eos)):
        return "eos_ids must be a list of integers"
    return None


def verify_bundle(path: Path) -> dict:
    """Read and check every file's size and sha256; raise BundleError naming the first bad file."""
    manifest = read_bundle(path)
    root = Path(path).expanduser()
    root = root if root.is_dir() else root.parent
    files = manifest.get("files") or {}
    if PTE_NAME not in files:
        raise BundleError(f"{root / BUNDLE_JSON}: lists no {PTE_NAME}; rebuild the bundle")
    for name, entry in files.items():
        f = root / name
        if Path(name).name != name:
            raise BundleError(f"{root / BUNDLE_JSON}: file entry '{name}' is not a plain file name")
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle; rebuild or re-copy it")
        if f.stat().st_size != entry.get("bytes") or sha256_file(f) != entry.get("sha256"):
            raise BundleError(f"{f}: sha256 does not match bundle.json (corrupt or modified); rebuild or re-copy it")
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: its manifest and the paths a runner needs."""

    root: Path
    manifest: dict
    program: str = PTE_NAME  # the program runners load: model.pte, or a named adapter's (with_adapter)

    @property
    def pte(self) -> Path:
        return self.root / self.program

    @property
    def adapter(self) -> str | None:
        """The named adapter this bundle runs (with_adapter), or None for model.pte."""
        return next((a["name"] for a in self.adapters() if a.get("file") == self.program and a.get("name")), None)

    def adapters(self) -> list[dict]:
        return [a for a in (self.manifest.get("adapters") or []) if isinstance(a, dict)]

    def with_adapter(self, name: str | None) -> "Bundle":
        """This bundle running named adapter `name`'s program (None: model.pte)."""
        if name is None:
            return self
        named = {a["name"]: a for a in self.adapters() if a.get("name")}
        if name not in named:
            have = ", ".join(sorted(named)) if named else "none (build with --adapter NAME=DIR)"
            raise ConfigError(f"--adapter {name}: {self.root} has no adapter of that name; its adapters: {have}")
        file = str(named[name].get("file", ""))
        if Path(file).name != file or file not in (self.manifest.get("files") or {}):
            raise BundleError(f"{self.root / BUNDLE_JSON}: adapter {name}'s program '{file}' is not one of the "
                              "bundle's files; rebuild the bundle")
        return Bundle(self.root, self.manifest, file)

    def require_host_runnable(self) -> None:
        """Static-shape NPU bundles (prefill/decode methods lowered for a device) do not run on
        the host's runners; say where they do."""
        target = self.manifest.get("target") or {}
        if "prefill_len" in target:
            d = target.get("delegate")
            raise DelegateUnavailable(
                f"{self.root}: a {d} bundle for {target.get('soc')} (prefill/decode methods for the NPU) runs on "
                f"the device with ExecuTorch's {d} runtime, not on this host; `aot simulate --delegate {d}` "
                "measures its recipe's accuracy here")

    def require_text_runner(self, what: str) -> None:
        """Vision bundles (vision_encoder + text_decoder) do not run on ExecuTorch's text runners."""
        if self.manifest.get("image") is not None:
            raise ConfigError(f"{self.root} is a vision bundle: {what} runs text bundles; use `aot run --image` "
                              "and `aot validate` (host) for it")

    @property
    def data_path(self) -> Path | None:
        """model.ptd, the external weights (--external-weights), or None for a single-file bundle."""
        name = self.manifest.get("data_file")
        return self.root / name if name else None

    @property
    def tokenizer(self) -> Path:
        tok = self.manifest.get("tokenizer")
        if not tok:
            raise BundleError(
                f"{self.root}: has no tokenizer (built from --random-weights without --tokenizer); "
                "rebuild it with --tokenizer FILE to run it"
            )
        return self.root / tok["file"]


def open_bundle(path: Path) -> Bundle:
    """Verify every file's sha256, then hand out the bundle; a tampered bundle is refused."""
    manifest = verify_bundle(path)
    root = Path(path).expanduser()
    return Bundle(root if root.is_dir() else root.parent, manifest)
