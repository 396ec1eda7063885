"""The one build configuration that flows through every stage.

The CLI (and, later, manifests) parse into `BuildConfig` once; its defaults live here only, and so
do the rules that span fields, so library users get the same checks as the CLI. Every problem is
collected and reported together in one line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from aot.backends import BACKENDS
from aot.errors import ConfigError
from aot.model import MODELS
from aot.quant import QuantConfig

DEFAULT_MAX_SEQ_LEN = 128  # longest prefill chunk one forward call takes
DEFAULT_MAX_CONTEXT_LEN = 2048  # KV cache positions
MAX_CONTEXT_LIMIT = 131_072  # Llama 3.2's trained context
DEMO_DIR = Path(__file__).parent / "demo"  # the embedded demo model and its held-out text
DEMO_CHECKPOINT = DEMO_DIR / "model"


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    model: str | None = None
    checkpoint: Path | None = None
    tokenizer: Path | None = None
    rotation: Path | None = None  # learned SpinQuant R1/R2 (R.bin); default: random Hadamard
    random_weights: bool = False
    seed: int = 0
    delegate: str = "xnnpack"
    soc: str | None = None  # NPU delegates' target chip; default: the delegate's first
    kv_bits: int | None = None  # NPU delegates: KV-cache width; default: the activations' width
    calibration: Path | None = None  # NPU delegates: PT2E calibration text; default: demo held-out
    quant: QuantConfig = field(default_factory=QuantConfig)
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    max_context_len: int = DEFAULT_MAX_CONTEXT_LEN
    bos_id: int | None = None
    eos_ids: tuple[int, ...] | None = None
    full_logits: bool = False
    vision_quant: str | None = None  # vision models: the image encoder's scheme [8da8w]
    no_preflight: bool = False  # build even when the memory/disk estimate says it will not fit
    force: bool = False

    def __post_init__(self):
        if self.model == "demo" and self.checkpoint is None and not self.random_weights:
            object.__setattr__(self, "checkpoint", DEMO_CHECKPOINT)  # the demo ships its weights
        if self.soc is None and self.delegate in BACKENDS and BACKENDS[self.delegate]().socs():
            object.__setattr__(self, "soc", BACKENDS[self.delegate]().socs()[0])
        errors = self.errors()
        if errors:
            raise ConfigError("; ".join(errors))

    def errors(self) -> list[str]:
        errors = []
        from aot.mllama import VISION_MODELS

        if self.model is not None and self.model not in MODELS and self.model not in VISION_MODELS:
            errors.append(f"unknown --model '{self.model}'; choose one of: {', '.join([*MODELS, *VISION_MODELS])}")
        if self.vision_quant is not None:
            from aot.vision_build import VISION_SCHEMES, is_mllama_checkpoint

            if self.vision_quant not in VISION_SCHEMES:
                errors.append(f"unknown --vision-quant '{self.vision_quant}'; choose one of: {', '.join(VISION_SCHEMES)}")
            if self.model not in VISION_MODELS and not is_mllama_checkpoint(self.checkpoint):
                errors.append("--vision-quant applies to vision models (11b-vision, 90b-vision or a Mllama "
                              "--checkpoint); drop it")
        if self.checkpoint is None and not self.random_weights:
            errors.append(
                "give --checkpoint DIR (a Meta or Hugging Face Llama 3.2 directory), or --model NAME "
                "--random-weights to build untrained weights for benchmarking"
            )
        if self.checkpoint is not None and self.random_weights:
            errors.append("--checkpoint and --random-weights exclude each other; drop one")
        if self.random_weights and self.model is None:
            errors.append("--random-weights needs --model NAME to know the architecture")
        if self.rotation is not None and self.quant.scheme != "spinquant":
            errors.append(f"--rotation applies to --quant spinquant, not --quant {self.quant.scheme}; drop one")
        if self.delegate not in BACKENDS:
            errors.append(f"unknown --delegate '{self.delegate}'; choose one of: {', '.join(sorted(BACKENDS))}")
        else:
            errors += self._delegate_errors(BACKENDS[self.delegate]())
        if not 1 <= self.max_seq_len <= self.max_context_len:
            errors.append(
                f"--max-seq-len must be between 1 and --max-context-len ({self.max_context_len}), "
                f"but got {self.max_seq_len}"
            )
        if not 2 <= self.max_context_len <= MAX_CONTEXT_LIMIT:
            errors.append(f"--max-context-len must be between 2 and {MAX_CONTEXT_LIMIT}, but got {self.max_context_len}")
        if self.bos_id is not None and self.bos_id < 0:
            errors.append(f"--bos-id must be >= 0, but got {self.bos_id}")
        if self.eos_ids is not None and (not self.eos_ids or min(self.eos_ids) < 0):
            errors.append(f"--eos-id must be one or more ids >= 0, but got {list(self.eos_ids)}")
        return errors

    def _delegate_errors(self, backend) -> list[str]:
        errors = delegate_errors(backend, self.quant.scheme, self.soc, self.kv_bits)
        if self.calibration is not None and not backend.static_shapes:
            errors.append(f"--calibration applies to NPU delegates (PT2E), not --delegate {self.delegate}; drop it")
        return errors

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("out", *PATH_FIELDS):
            d[key] = None if d[key] is None else str(d[key])
        d["eos_ids"] = None if self.eos_ids is None else list(self.eos_ids)
        return d


def delegate_errors(backend, scheme: str, soc: str | None, kv_bits: int | None) -> list[str]:
    """What --quant, --soc and --kv-bits say that `backend` does not take (aot build and simulate)."""
    errors, name = [], backend.name
    if scheme not in backend.schemes:
        errors.append(f"--delegate {name} does not take --quant {scheme}; choose one of: {', '.join(backend.schemes)}")
    socs = backend.socs()
    if soc is not None and not socs:
        errors.append(f"--soc applies to NPU delegates, not --delegate {name}; drop it")
    elif soc is not None and soc not in socs:
        errors.append(f"unknown --soc '{soc}' for --delegate {name}; choose one of: {', '.join(socs)}")
    if kv_bits is not None and kv_bits not in backend.kv_bits:
        errors.append(f"--kv-bits {kv_bits}: --delegate {name} takes "
                      + (", ".join(map(str, backend.kv_bits)) if backend.kv_bits else "no --kv-bits; drop it"))
    return errors


# Build fields by their flag / manifest name: (accepted YAML types, config, field there).
# `aot build` flags and manifest keys are the same names, parsed here once.
FIELDS: dict[str, tuple[tuple[type, ...], str, str]] = {
    "model": ((str,), "build", "model"),
    "checkpoint": ((str,), "build", "checkpoint"),
    "tokenizer": ((str,), "build", "tokenizer"),
    "rotation": ((str,), "build", "rotation"),
    "random_weights": ((bool,), "build", "random_weights"),
    "seed": ((int,), "build", "seed"),
    "delegate": ((str,), "build", "delegate"),
    "soc": ((str,), "build", "soc"),
    "kv_bits": ((int,), "build", "kv_bits"),
    "calibration": ((str,), "build", "calibration"),
    "quant": ((str,), "quant", "scheme"),
    "group_size": ((int,), "quant", "group_size"),
    "embedding_quant": ((str, int), "quant", "embedding"),
    "embedding_group_size": ((int,), "quant", "embedding_group_size"),
    "output_quant": ((str,), "quant", "output"),
    "max_seq_len": ((int,), "build", "max_seq_len"),
    "max_context_len": ((int,), "build", "max_context_len"),
    "bos_id": ((int,), "build", "bos_id"),
    "eos_ids": ((list,), "build", "eos_ids"),
    "full_logits": ((bool,), "build", "full_logits"),
    "vision_quant": ((str,), "build", "vision_quant"),
    "no_preflight": ((bool,), "build", "no_preflight"),
}
# Input files: relative to the manifest in manifests, and not part of a build's input key (their
# contents are, by sha256).
PATH_FIELDS = ("checkpoint", "tokenizer", "rotation", "calibration")


def build_config(out: Path, force: bool = False, **fields) -> BuildConfig:
    """A BuildConfig from flag-named fields (the CLI's and the manifests' one entry point).

    Problems in the quantization fields and in the rest are reported together.
    """
    quant, build = {}, {}
    backend = BACKENDS.get(fields.get("delegate"))
    if "quant" not in fields and backend is not None and QuantConfig().scheme not in backend.schemes:
        quant["scheme"] = backend.schemes[0]  # an NPU delegate's own default (16a4w)
    for key, value in fields.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown build field '{key}'; choose one of: {', '.join(FIELDS)}")
        _, where, name = FIELDS[key]
        if key in PATH_FIELDS:
            value = Path(value).expanduser()
        elif key == "eos_ids":
            value = tuple(value)
        elif key == "embedding_quant":
            value = str(value)
        (quant if where == "quant" else build)[name] = value
    errors = []
    try:
        qcfg = QuantConfig(**quant)
    except ConfigError as e:
        errors.append(str(e))
        qcfg = QuantConfig()
    try:
        cfg = BuildConfig(out=Path(out), force=force, quant=qcfg, **build)
    except ConfigError as e:
        errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg
