"""The one build configuration that flows through every stage.

The CLI (and, later, manifests) parse into `BuildConfig` once; its defaults live here only, and so
do the rules that span fields, so library users get the same checks as the CLI. Every problem is
collected and reported together in one line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aot.backends import BACKENDS
from aot.errors import ConfigError
from aot.families import family_for, model_names
from aot.families.common import KVCacheSpec
from aot.hfcache import PUBLISHED, repo_errors
from aot.preflight import device_memory_errors
from aot.adapters import parse_spec, spec_errors
from aot.quant import QuantConfig
from aot.texts import DEMO_CHECKPOINT, DEMO_CHECKPOINTS, DEMO_DIR  # noqa: F401  (the --model demo checkpoint)

DEFAULT_MAX_SEQ_LEN = 128  # longest prefill chunk one forward call takes
DEFAULT_MAX_CONTEXT_LEN = 2048  # KV cache positions
MAX_CONTEXT_LIMIT = 131_072  # Llama 3.2's trained context


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    model: str | None = None
    checkpoint: Path | None = None
    # A Hugging Face repo "ID[@revision]": its snapshot in the local HF cache, else downloaded
    # through huggingface_hub (aot.hfcache). Without it and without --checkpoint, --model's
    # published repo is looked up in the cache.
    hf_repo: str | None = None
    tokenizer: Path | None = None
    rotation: Path | None = None  # learned SpinQuant R1/R2 (R.bin); default: random Hadamard
    random_weights: bool = False
    seed: int = 0
    delegate: str = "xnnpack"
    soc: str | None = None  # NPU delegates' target chip; default: the delegate's first
    kv_bits: int | None = None  # NPU delegates: the old spelling of --kv-cache (8 or 16 bits)
    calibration: Path | None = None  # NPU delegates: PT2E calibration text; default: demo held-out
    quant: QuantConfig = field(default_factory=QuantConfig)
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    max_context_len: int = DEFAULT_MAX_CONTEXT_LEN
    # KV-cache storage: xnnpack fp32 or int8 (ExecuTorch's quantized-cache ops); NPU delegates
    # int8 or int16 (their activations' width when left out). None: the delegate's default.
    kv_cache: str | None = None
    # "SINK,WINDOW": a ring-buffer cache of SINK first positions plus the last WINDOW; the context
    # (--max-context-len) goes on with fixed memory. None: the cache holds the whole context.
    attention_sink: str | None = None
    # The phone's memory for this app ("6GiB"): refuse a bundle whose runtime plan does not fit.
    device_memory: str | None = None
    bos_id: int | None = None
    eos_ids: tuple[int, ...] | None = None
    full_logits: bool = False
    # The weights in model.ptd beside a small model.pte (ExecuTorch named data): targets with equal
    # quantized weights (two contexts, two KV-cache types) write a byte-identical .ptd.
    external_weights: bool = False
    # LoRA adapters (aot.adapters): one "DIR" (a PEFT folder; merged into the weights by default),
    # or "NAME=DIR" repeated: a program per adapter over one foundation stored once in model.ptd.
    adapters: tuple[str, ...] | None = None
    adapter_mode: str | None = None  # merged or unmerged [merged for one unnamed adapter]
    adapter_quant: str | None = None  # unmerged adapters' A and B: 8da8w or none [8da8w on a quantized model]
    vision_quant: str | None = None  # vision models: the image encoder's scheme [8da8w]
    no_preflight: bool = False  # build even when the memory/disk estimate says it will not fit
    force: bool = False

    def __post_init__(self):
        backend = BACKENDS[self.delegate]() if self.delegate in BACKENDS else None
        if backend is not None and backend.kv_bits:  # NPU: --kv-cache intN is --kv-bits N, either spelling
            if self.kv_bits is not None and self.kv_cache is None:
                object.__setattr__(self, "kv_cache", f"int{self.kv_bits}")
            elif self.kv_bits is None and self.kv_cache in backend.kv_caches:
                object.__setattr__(self, "kv_bits", int(self.kv_cache.removeprefix("int")))
        if self.adapters and any(parse_spec(a)[0] for a in self.adapters) and not self.external_weights:
            object.__setattr__(self, "external_weights", True)  # named adapters share one model.ptd
        weights_given = self.checkpoint is not None or self.hf_repo is not None or self.random_weights
        if self.model in DEMO_CHECKPOINTS and not weights_given:
            object.__setattr__(self, "checkpoint", DEMO_CHECKPOINTS[self.model])  # the demos ship their weights
        if self.soc is None and self.delegate in BACKENDS and BACKENDS[self.delegate]().socs():
            object.__setattr__(self, "soc", BACKENDS[self.delegate]().socs()[0])
        errors = self.errors()
        if errors:
            raise ConfigError("; ".join(errors))

    def errors(self) -> list[str]:
        errors = []
        models = model_names()
        if self.model is not None and self.model not in models:
            errors.append(f"unknown --model '{self.model}'; choose one of: {', '.join(models)}")
        else:
            errors += family_for(self).config_errors(self)
        if self.hf_repo is not None:
            errors += repo_errors(self.hf_repo)
            if self.checkpoint is not None:
                errors.append("--hf-repo and --checkpoint exclude each other; drop one")
            if self.random_weights:
                errors.append("--hf-repo and --random-weights exclude each other; drop one")
        elif self.checkpoint is None and not self.random_weights and self.model not in PUBLISHED:
            errors.append(
                "give --checkpoint DIR (a Meta or Hugging Face Llama 3.2 directory), --hf-repo ID, --model "
                f"{'|'.join(PUBLISHED)} (its published checkpoint, from the Hugging Face cache), or --model NAME "
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
        errors += self._cache_errors()
        errors += self._adapter_errors()
        errors += device_memory_errors(self.device_memory)
        if self.bos_id is not None and self.bos_id < 0:
            errors.append(f"--bos-id must be >= 0, but got {self.bos_id}")
        if self.eos_ids is not None and (not self.eos_ids or min(self.eos_ids) < 0):
            errors.append(f"--eos-id must be one or more ids >= 0, but got {list(self.eos_ids)}")
        return errors

    def _delegate_errors(self, backend) -> list[str]:
        errors = delegate_errors(backend, self.quant.scheme, self.soc, self.kv_bits)
        if self.calibration is not None and not backend.static_shapes:
            errors.append(f"--calibration applies to NPU delegates (PT2E), not --delegate {self.delegate}; drop it")
        if self.external_weights and backend.static_shapes:
            errors.append(f"--external-weights: --delegate {self.delegate} bundles keep their weights in the vendor's "
                          "context binary inside model.pte; external weights are for --delegate xnnpack")
        return errors

    def _adapter_errors(self) -> list[str]:
        if not self.adapters and self.adapter_mode is None and self.adapter_quant is None:
            return []
        errors = spec_errors(tuple(self.adapters or ()), self.adapter_mode, self.adapter_quant)
        if self.adapters:
            if self.model is None or self.model in model_names():
                if family_for(self).name != "llama3.2":
                    errors.append("--adapter: LoRA adapters apply to the Llama 3.2 text models; drop it for a vision model")
            if self.delegate in BACKENDS and BACKENDS[self.delegate]().static_shapes:
                errors.append(f"--adapter: --delegate {self.delegate} bundles are one program in the vendor's context "
                              "binary; adapters are for --delegate xnnpack")
            unmerged = self.adapter_mode == "unmerged" or any(parse_spec(a)[0] for a in self.adapters)
            if unmerged and self.quant.scheme == "spinquant":
                errors.append("--adapter: an unmerged adapter over --quant spinquant would need rotating; "
                              "use --adapter-mode merged, or --quant 8da4w")
        return errors

    def _cache_errors(self) -> list[str]:
        if self.delegate not in BACKENDS:
            return []
        errors, backend = [], BACKENDS[self.delegate]()
        takes = backend.kv_caches
        if self.kv_cache is not None and self.kv_cache not in takes:
            errors.append(f"--kv-cache {self.kv_cache}: --delegate {self.delegate} takes "
                          + (", ".join(takes) if takes else "no --kv-cache; drop it"))
        elif self.kv_cache is not None and self.quant.scheme == "bf16":
            errors.append(f"--kv-cache {self.kv_cache}: a --quant bf16 build keeps its cache in bf16 with the rest "
                          "of the model; drop --kv-cache, or use --quant none or 8da4w")
        elif self.kv_bits is not None and self.kv_cache is not None and self.kv_cache != f"int{self.kv_bits}":
            errors.append(f"--kv-bits {self.kv_bits} and --kv-cache {self.kv_cache} disagree; give one (--kv-cache)")
        if self.attention_sink is not None:
            sink = parse_attention_sink(self.attention_sink)
            if isinstance(sink, str):
                errors.append(sink)
            elif backend.static_shapes:
                errors.append(f"--attention-sink: --delegate {self.delegate} attends over a fixed cache; "
                              "attention sinks are for --delegate xnnpack")
            elif sum(sink) + self.max_seq_len >= self.max_context_len:
                errors.append(f"--attention-sink {self.attention_sink}: the sink, the window and a "
                              f"--max-seq-len chunk ({sum(sink) + self.max_seq_len} positions) cover the whole "
                              f"context ({self.max_context_len}); drop it, or raise --max-context-len")
        return errors

    @property
    def kv_storage(self) -> str | None:
        """What the KV cache is stored as: xnnpack fp32 or int8; NPUs int8/int16, or None for
        their activations' width."""
        backend = BACKENDS[self.delegate]()
        if backend.kv_bits:
            return self.kv_cache
        if self.quant.scheme == "bf16":
            return "bf16"
        return self.kv_cache or backend.kv_caches[0]

    def kv_cache_spec(self) -> KVCacheSpec:
        """The decoder's cache (XNNPACK builds; static-shape delegates store their own)."""
        if BACKENDS[self.delegate]().static_shapes:
            return KVCacheSpec()
        sink, window = parse_attention_sink(self.attention_sink) if self.attention_sink else (0, 0)
        return KVCacheSpec(self.kv_storage, sink, window, self.max_seq_len if window else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("out", *PATH_FIELDS):
            d[key] = None if d[key] is None else str(d[key])
        d["eos_ids"] = None if self.eos_ids is None else list(self.eos_ids)
        return d


def parse_attention_sink(value: str) -> tuple[int, int] | str:
    """"SINK,WINDOW" as two ints, or the one-line problem with it."""
    parts = str(value).replace(" ", "").split(",")
    try:
        sink, window = (int(p) for p in parts)
    except ValueError:
        return f"--attention-sink takes SINK,WINDOW (e.g. 4,2048: the first 4 positions and the last 2048), not '{value}'"
    if sink < 0 or window < 1:
        return f"--attention-sink {value}: SINK must be >= 0 and WINDOW >= 1"
    return sink, window


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


# ---- the one schema of build fields: `aot build` flags and manifest keys ----------------------
# Derived from the dataclasses' fields and type hints, so a field added to BuildConfig or
# QuantConfig is a flag name, a manifest key and a checked YAML type at once.


@dataclass(frozen=True)
class FieldType:
    """What a config field holds (its type hint, None left out) and what YAML may write for it."""

    base: type  # Path, str, int, float, bool or tuple
    item: type | None = None  # tuples: the type of each element
    also: tuple[type, ...] = ()  # YAML scalars parsed into `base` as well (embedding bits: 8, 4)

    @property
    def yaml(self) -> tuple[type, ...]:
        own = {Path: (str,), float: (int, float), tuple: (list,)}.get(self.base, (self.base,))
        return own + self.also

    def accepts(self, value) -> bool:
        if isinstance(value, bool) and bool not in self.yaml:
            return False
        if not isinstance(value, self.yaml):
            return False
        return self.item is None or all(isinstance(v, self.item) and not isinstance(v, bool) for v in value)

    def describe(self) -> str:
        return " or ".join(t.__name__ for t in self.yaml) + (f" of {self.item.__name__}s" if self.item else "")

    def parse(self, value):
        """A flag's or YAML value as the dataclass field holds it."""
        if value is None:
            return None
        if self.base is Path:
            return Path(value).expanduser()
        if self.base is tuple:
            return tuple(value)
        return str(value) if self.base is str else value


def field_types(cls, skip: tuple[str, ...] = ()) -> dict[str, FieldType]:
    """A dataclass's fields in declaration order, by name, from their type hints."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
        if origin is tuple:
            out[f.name] = FieldType(tuple, typing.get_args(hint)[0])
        elif hint in (Path, str, int, float, bool):
            out[f.name] = FieldType(hint)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag or YAML form for {hint}")
    return out


@dataclass(frozen=True)
class BuildField:
    config: str  # "build" (BuildConfig) or "quant" (QuantConfig)
    attr: str  # the field's name there
    type: FieldType


# QuantConfig's fields by their flag names (its own names are short: scheme, output, ...).
_QUANT_FLAGS = {"scheme": "quant", "embedding": "embedding_quant", "output": "output_quant"}
_YAML_ALSO = {"embedding_quant": (int,)}  # bits: YAML reads `embedding_quant: 8` as an int


def _build_fields() -> dict[str, BuildField]:
    build = field_types(BuildConfig, skip=("out", "force", "quant"))
    quant = {_QUANT_FLAGS.get(a, a): (a, t) for a, t in field_types(QuantConfig).items()}
    fields_ = {}
    for f in dataclasses.fields(BuildConfig):  # BuildConfig's order, QuantConfig's fields in its place
        if f.name == "quant":
            fields_.update({name: BuildField("quant", a, FieldType(t.base, t.item, _YAML_ALSO.get(name, ())))
                            for name, (a, t) in quant.items()})
        elif f.name in build:
            fields_[f.name] = BuildField("build", f.name, build[f.name])
    return fields_


# Build fields by their flag / manifest name (`aot build` flags and manifest keys are the same).
FIELDS: dict[str, BuildField] = _build_fields()
# Input files: relative to the manifest in manifests, and not part of a build's input key (their
# contents are, by sha256).
PATH_FIELDS = tuple(k for k, f in FIELDS.items() if f.type.base is Path)


def given_fields(values: dict) -> dict:
    """The build fields among `values` (a command's parameters) that were set: None, False and
    empty lists are flags left out, whose defaults are BuildConfig's and QuantConfig's."""
    return {k: values[k] for k in FIELDS if k in values
            and not (values[k] is None or values[k] is False or values[k] in ([], ()))}


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
        f = FIELDS[key]
        (quant if f.config == "quant" else build)[f.attr] = f.type.parse(value)
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
