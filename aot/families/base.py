"""The model-family interface (see aot/families/__init__.py): Source, Program, Family."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

from aot import hfcache
from aot.bundle import PTE_NAME
from aot.files import sha256_file
from aot.methods import Method
from aot.quant import QuantPlan
from aot.tokenizer import TokenizerInfo

if TYPE_CHECKING:
    from aot.config import BuildConfig


@dataclass(frozen=True)
class Source:
    """What a build reads, resolved and checked: every field a pipeline stage needs."""

    args: object  # the family's architecture dataclass
    model_name: str  # registry name whose sizes match, or "custom"
    tokenizer: TokenizerInfo | None
    bos_id: int
    eos_ids: tuple[int, ...]
    plan: QuantPlan  # what bundle.json records as quant.plan (a prequantized checkpoint's own)
    preflight: tuple  # aot.preflight.check's (label, params_by_kind, plan[, second plan])

    def files(self) -> list[Path]:
        """The input files whose sha256 bundle.json records (and the input key covers)."""
        raise NotImplementedError


@dataclass
class Program:
    """The methods of one program, and how ExecuTorch should plan them."""

    methods: list[Method]
    # Plan mutable buffers (KV caches) apart from the arenas the methods share, so running one
    # method between calls of another cannot overwrite them (vision, static prefill/decode).
    share_mutable_buffers: bool = False
    # Mutable buffers (by name fragment) serialized with their initial contents, which the runtime
    # copies in at load; the rest have none (ExecuTorch plans them by shape only).
    initialized_buffers: tuple[str, ...] = ()
    target: dict = field(default_factory=dict)  # bundle.json "target" fields the methods add
    label: str | None = None  # the export stage's detail; default: the method names
    exported: dict = field(default_factory=dict)  # the signatures of methods already exported

    def export_label(self) -> str:
        return self.label or ", ".join(m.name for m in self.methods)

    def signatures(self) -> dict:
        return {**self.exported, **{m.name: m.signature for m in self.methods}}

    def release(self) -> None:
        """Drop the methods (and so the eager model) once exported; their signatures stay."""
        self.exported = self.signatures()
        self.methods.clear()


@dataclass(frozen=True)
class Variant:
    """One program file of a bundle: model.pte, or a named adapter's program over the same
    foundation. `attach()` is a context manager that puts the variant's changes on the model."""

    name: str | None  # None: model.pte
    file: str
    attach: Callable[[], ContextManager] = nullcontext
    label: str = ""  # the export stage's detail


class Family:
    name: str = ""  # bundle.json model.family
    models: dict = {}  # published (and test) sizes by --model name

    def claims(self, cfg: BuildConfig) -> bool:
        raise NotImplementedError

    def config_errors(self, cfg: BuildConfig) -> list[str]:
        """Flags this family does not take (checked with the rest of the configuration)."""
        return []

    def resolve(self, cfg: BuildConfig, fetch: bool = True) -> Source:
        """`fetch`: download an --hf-repo the Hugging Face cache lacks (False: only look there)."""
        raise NotImplementedError

    def load(self, src: Source, cfg: BuildConfig, backend, stages):
        raise NotImplementedError

    def methods(self, model, src: Source, cfg: BuildConfig) -> Program:
        raise NotImplementedError

    def variants(self, model, src: Source, cfg: BuildConfig) -> list[Variant]:
        """The programs a build writes, each exported from `model` (first: model.pte)."""
        return [Variant(None, PTE_NAME)]

    def runner_metadata(self, src: Source, cfg: BuildConfig, static: bool) -> dict:
        raise NotImplementedError

    def manifest(self, src: Source, cfg: BuildConfig, program: Program) -> dict:
        """bundle.json's family fields: model, checkpoint, tokenizer, quant, export (and more)."""
        raise NotImplementedError

    def reference(self, checkpoint: Path, max_context_len: int, **kw):
        """The fp32 eager model of a checkpoint, for validation."""
        raise NotImplementedError

    # shared record shapes
    def model_record(self, src: Source, cfg: BuildConfig, num_params: int) -> dict:
        return {"name": src.model_name, "family": self.name, "args": src.args.to_dict(), "num_params": num_params,
                "random_weights": cfg.random_weights, "seed": cfg.seed if cfg.random_weights else None}

    @staticmethod
    def checkpoint_record(path: Path, layout: str, snapshot: hfcache.Snapshot | None) -> dict:
        """Where the weights were read: the folder, and the Hugging Face repo and commit it is."""
        origin = snapshot.record() if snapshot else {"source": "local", "hf_repo": None, "revision": None}
        return {"path": str(path.absolute()), "layout": layout, **origin}

    @staticmethod
    def tokenizer_record(src: Source) -> dict | None:
        t = src.tokenizer
        return None if t is None else {"file": t.path.name, "kind": t.kind, "vocab_size": t.vocab_size}


def checkpoint_dir(cfg: BuildConfig, fetch: bool = True) -> tuple[Path | None, hfcache.Snapshot | None]:
    """The folder a build reads its weights from, and the Hugging Face snapshot it is (--hf-repo,
    or --model's published repo in the cache); (None, None) for random weights."""
    if cfg.checkpoint is not None:
        return Path(cfg.checkpoint).expanduser(), None
    if cfg.random_weights:
        return None, None
    snapshot = hfcache.locate(cfg.model, cfg.hf_repo, fetch)
    return snapshot.path, snapshot


LICENSE_NAME = "Llama 3.2 Community License"


def license_record(path: Path | None) -> dict | None:
    """bundle.json's "license": the licence files a checkpoint folder ships (Meta's and the
    Hugging Face repos': LICENSE / LICENSE.txt and USE_POLICY.md) by sha256, and the licence's
    name when LICENSE says it is Llama 3.2's. None without such files."""
    if path is None or not Path(path).is_dir():
        return None
    files = sorted(p for p in Path(path).iterdir()
                   if p.is_file() and (p.name.upper().startswith("LICENSE") or p.name.upper().startswith("USE_POLICY")))
    if not files:
        return None
    texts = [p.read_text(errors="replace") for p in files if p.name.upper().startswith("LICENSE")]
    name = LICENSE_NAME if any(LICENSE_NAME.lower() in t.lower() for t in texts) else None
    return {"name": name, "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}}
