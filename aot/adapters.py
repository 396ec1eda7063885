"""LoRA adapters over a Llama 3.2 foundation: Hugging Face PEFT folders and the adaptors in Meta's
QLoRA releases.

An adapter adds `scale * B @ A` (A: [rank, in], B: [out, rank]) to some of each decoder layer's
linears. aot applies it one of two ways:
- merged: W + scale * B @ A in fp32, before quantization; the bundle is an ordinary one (fastest,
  smallest, and one adapter only);
- unmerged: the foundation's (quantized) weight stays as it is and the layer also computes
  B(A x) beside it (`LoRALinear`). Many adapters then share one foundation, stored once: each is a
  program of its own over the same external weights (model.ptd), and each program's own bytes are
  only its adapter's. Meta's QLoRA adaptors are always applied so: their foundation is already
  INT4 (quantization-aware trained with the adaptor beside it), so it is not requantized.

Names here are aot's (Meta's): `layers.N.attention.wq` ... `layers.N.feed_forward.w2`.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from aot.errors import CheckpointError, ConfigError
from aot.quant import LayerQuant, _torchao_config

ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
MODES = ("merged", "unmerged")
QUANTS = ("8da8w", "none")  # an unmerged adapter's A and B: int8 per channel with int8 dynamic activations, or fp32

# PEFT's module names (transformers' Llama) -> ours
HF_TARGETS = {
    "q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
    "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2",
}
LINEARS = tuple(HF_TARGETS.values())
ROTARY = {"attention.wq": "n_heads", "attention.wk": "n_kv_heads"}  # HF rows are permuted per head
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MAX_CONFIG_BYTES = 1 << 20


def program_file(name: str) -> str:
    """The bundle's program for named adapter `name` (the foundation is model.pte)."""
    return f"adapter-{name}.pte"


# ---- --adapter specs ------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str | None, str]:
    """"NAME=DIR" -> (NAME, DIR); "DIR" -> (None, DIR)."""
    name, sep, folder = str(spec).partition("=")
    if sep and ADAPTER_NAME.match(name):
        return name, folder
    return None, str(spec)


def spec_errors(specs: tuple[str, ...], mode: str | None, quant: str | None) -> list[str]:
    errors = []
    parsed = [parse_spec(s) for s in specs]
    named = [n for n, _ in parsed if n is not None]
    for spec, (name, folder) in zip(specs, parsed):
        if not folder:
            errors.append(f"--adapter {spec}: give the adapter's folder (NAME=DIR or DIR)")
        elif name is None and "=" in spec and not Path(spec).exists():
            errors.append(f"--adapter {spec}: NAME must be 1-32 of a-z, 0-9, '_' and '-', starting with a letter "
                          "or digit")
    if len(specs) > 1 and len(named) != len(specs):
        errors.append("--adapter given more than once: name each one (--adapter NAME=DIR), one program per adapter")
    dupes = sorted({n for n in named if named.count(n) > 1})
    if dupes:
        errors.append(f"--adapter: the name {dupes[0]} is given twice; each adapter needs its own name")
    if mode is not None and mode not in MODES:
        errors.append(f"--adapter-mode must be merged or unmerged, but got '{mode}'")
    elif mode == "merged" and named:
        errors.append("--adapter-mode merged: named adapters (NAME=DIR) share one foundation and so stay unmerged; "
                      "give one unnamed --adapter DIR to merge it")
    if quant is not None and quant not in QUANTS:
        errors.append(f"--adapter-quant must be 8da8w or none, but got '{quant}'")
    if (mode is not None or quant is not None) and not specs:
        errors.append("--adapter-mode/--adapter-quant need --adapter")
    return errors


# ---- what an adapter is ---------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    name: str | None  # None: the one unnamed --adapter, built into model.pte
    kind: str  # "peft" or "qlora"
    path: Path  # the PEFT folder, or the QLoRA checkpoint's folder
    rank: int
    scale: float  # B @ A is multiplied by this (PEFT: lora_alpha / r, or / sqrt(r) with rsLoRA)
    targets: tuple[str, ...]  # module kinds it adapts (ours: attention.wq, ...)
    layers: tuple[int, ...]  # decoder layers it adapts
    params: int  # A and B elements
    stored_bytes: int  # its tensors' bytes as its file stores them
    files: tuple[Path, ...] = ()  # inputs (hashed into bundle.json)
    base_model: str | None = None  # PEFT's base_model_name_or_path

    def record(self, mode: str, quant: str, file: str) -> dict:
        d = asdict(self)
        d.update(path=str(self.path), files=[p.name for p in self.files], targets=list(self.targets),
                 layers=list(self.layers), mode=mode, quant=quant if mode == "unmerged" else None, file=file)
        return d


def open_peft(spec_name: str | None, folder: Path, args) -> Adapter:
    """Read and check a PEFT LoRA folder against the model `args` (shapes from the safetensors
    header only; no tensor is read here)."""
    folder = Path(folder).expanduser().absolute()
    flag = f"--adapter {folder}"
    cfg_file, weights = folder / CONFIG_FILE, folder / ADAPTER_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{flag}: not a directory; give the folder holding {CONFIG_FILE} and {ADAPTER_FILE}")
    if not cfg_file.is_file():
        raise CheckpointError(f"{flag}: no {CONFIG_FILE} inside; is it a PEFT LoRA adapter folder?")
    cfg = _read_config(cfg_file)
    if not weights.is_file():
        found = "adapter_model.bin (a pickle: re-save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else "nothing"
        raise CheckpointError(f"{flag}: no {ADAPTER_FILE} inside (found {found})")
    problems = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r:.40}; aot applies LoRA adapters only")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 4096:
        problems.append(f"r must be an integer rank in 1..4096, not {rank!r:.40}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        problems.append(f"lora_alpha must be a number, not {alpha!r:.40}")
    for key, ok, why in (("use_dora", False, "DoRA's magnitude vectors"),
                         ("fan_in_fan_out", False, "fan_in_fan_out weights (GPT-2 style Conv1D)")):
        if bool(cfg.get(key)) != ok:
            problems.append(f"{key}=true ({why}) is not supported")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r:.40}: aot applies adapters without bias terms (bias='none')")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']!r:.80} carries full copies of modules; not supported")
    for key, why in (("lora_bias", "a bias on lora_B"), ("layer_replication", "replicated layers")):
        if cfg.get(key):
            problems.append(f"{key} ({why}) is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            problems.append(f"{key} (per-module ranks or alphas) is not supported")
    if problems:
        raise CheckpointError(f"{cfg_file}: {'; '.join(problems)}")
    scale = float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    shapes = _safetensors_shapes(weights)
    pairs = _peft_pairs(shapes, weights)
    expected = _expected_shapes(args, rank)
    bad = []
    for (layer, kind), (a, b) in sorted(pairs.items()):
        if layer >= args.n_layers:
            bad.append(f"layer {layer} (the model has {args.n_layers})")
            continue
        want_a, want_b = expected[kind]
        if shapes[a][0] != want_a or shapes[b][0] != want_b:
            bad.append(f"{a} {list(shapes[a][0])} / {b} {list(shapes[b][0])}, the model needs {list(want_a)} / "
                       f"{list(want_b)}")
    if bad:
        raise CheckpointError(f"{weights}: the adapter does not fit the model (is it for another base?): "
                              + "; ".join(bad[:2]) + ("; ..." if len(bad) > 2 else ""))
    params = sum(math.prod(shapes[k][0]) for pair in pairs.values() for k in pair)
    stored = sum(math.prod(shapes[k][0]) * shapes[k][1] for pair in pairs.values() for k in pair)
    return Adapter(spec_name, "peft", folder, rank, scale, tuple(sorted({k for _, k in pairs}, key=LINEARS.index)),
                   tuple(sorted({i for i, _ in pairs})), params, stored, (cfg_file, weights),
                   cfg.get("base_model_name_or_path") if isinstance(cfg.get("base_model_name_or_path"), str) else None)


def _read_config(file: Path) -> dict:
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{file}: {file.stat().st_size} bytes; an adapter config is a few hundred")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not readable JSON ({str(e)[:120]})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return cfg


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def _safetensors_shapes(file: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes per element), from the file's header (checked by safetensors)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                if dtype not in _DTYPE_BYTES:
                    raise CheckpointError(f"{file}: {name} is {dtype}; adapter weights are floating point")
                out[name] = (tuple(sl.get_shape()), _DTYPE_BYTES[dtype])
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({str(e)[:120]}); re-download it") from None
    return out


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                       r"(?:\.default)?\.weight$")


def _peft_pairs(shapes: dict, file: Path) -> dict[tuple[int, str], tuple[str, str]]:
    found: dict[tuple[int, str], dict[str, str]] = {}
    other = []
    for name in shapes:
        m = _PEFT_KEY.match(name)
        if m is None or m.group(3) not in HF_TARGETS:
            other.append(name)
            continue
        found.setdefault((int(m.group(1)), HF_TARGETS[m.group(3)]), {})[m.group(4)] = name
    if other:
        raise CheckpointError(f"{file}: tensors aot cannot apply ({len(other)}: {', '.join(o[:80] for o in other[:2])}); "
                              "aot applies LoRA on the decoder layers' q/k/v/o and gate/up/down projections")
    half = [f"{k[1]} of layer {k[0]}" for k, v in found.items() if set(v) != {"A", "B"}]
    if half:
        raise CheckpointError(f"{file}: {half[0]} has lora_A or lora_B but not both")
    if not found:
        raise CheckpointError(f"{file}: holds no LoRA weights")
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def _expected_shapes(args, rank: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    hd, d, f = args.head_dim, args.dim, args.ffn_hidden
    io = {"attention.wq": (d, args.n_heads * hd), "attention.wk": (d, args.n_kv_heads * hd),
          "attention.wv": (d, args.n_kv_heads * hd), "attention.wo": (args.n_heads * hd, d),
          "feed_forward.w1": (d, f), "feed_forward.w3": (d, f), "feed_forward.w2": (f, d)}
    return {k: ((rank, i), (o, rank)) for k, (i, o) in io.items()}


def read_peft(adapter: Adapter, args, unpermute_rotary) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """fqn -> (A [r, in], B [out, r]) in fp32, in aot's layout: q/k rows un-permuted like the
    foundation's (`unpermute_rotary`: aot.families.text.checkpoint's, given by the caller)."""
    from safetensors import safe_open

    file = adapter.path / ADAPTER_FILE
    out = {}
    with safe_open(str(file), framework="pt") as f:
        pairs = _peft_pairs({k: None for k in f.keys()}, file)
        for (layer, kind), (a, b) in pairs.items():
            wa, wb = f.get_tensor(a).float(), f.get_tensor(b).float()
            if not (torch.isfinite(wa).all() and torch.isfinite(wb).all()):
                raise CheckpointError(f"{file}: {a} or {b} holds inf or NaN")
            if kind in ROTARY:
                wb = unpermute_rotary(wb, getattr(args, ROTARY[kind]))
            out[f"layers.{layer}.{kind}"] = (wa, wb)
    return out


# ---- Meta's QLoRA adaptors (consolidated.00.pth: X.adaptor.A.weight / X.adaptor.B.weight) ------


def qlora_names(sd: dict) -> dict[str, tuple[str, str]]:
    """fqn -> (A key, B key) of the adaptors in a Meta checkpoint."""
    out = {}
    for key in sd:
        if key.endswith(".adaptor.A.weight"):
            fqn = key.removesuffix(".adaptor.A.weight")
            out[fqn] = (key, f"{fqn}.adaptor.B.weight")
    return out


def open_qlora(sd: dict, lora_args: dict, args, file: Path) -> tuple[Adapter, dict]:
    """The QLoRA adaptors of a Meta checkpoint: the Adapter, and fqn -> (A, B) as stored."""
    if not isinstance(lora_args, dict):
        raise CheckpointError(f"{file}: params.json lora_args must be an object with 'rank' (and 'scale')")
    rank, scale = lora_args.get("rank"), lora_args.get("scale", 2.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CheckpointError(f"{file}: params.json lora_args.rank must be a positive integer, not {rank!r:.40}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise CheckpointError(f"{file}: params.json lora_args.scale must be a number, not {scale!r:.40}")
    names = qlora_names(sd)
    expected = _expected_shapes(args, rank)
    weights, problems = {}, []
    for fqn, (ka, kb) in sorted(names.items()):
        m = re.match(r"^layers\.(\d+)\.(.+)$", fqn)
        if m is None or m.group(2) not in expected or int(m.group(1)) >= args.n_layers:
            problems.append(f"{fqn}: an adaptor on a layer Meta's recipe does not adapt")
            continue
        if kb not in sd:
            problems.append(f"{ka} without {kb}")
            continue
        a, b = sd[ka], sd[kb]
        want_a, want_b = expected[m.group(2)]
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(f"{fqn}: adaptor A {list(a.shape)} / B {list(b.shape)}, rank {rank} needs "
                            f"{list(want_a)} / {list(want_b)}")
            continue
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{fqn}: adaptor weights are {a.dtype}/{b.dtype}, not floating point")
            continue
        weights[fqn] = (a, b)
    if not names:
        problems.append("params.json has lora_args but the checkpoint holds no adaptors (*.adaptor.A.weight)")
    if problems:
        raise CheckpointError(f"{file}: QLoRA adaptors aot cannot apply: {'; '.join(problems[:2])}"
                              + ("; ..." if len(problems) > 2 else ""))
    targets = tuple(sorted({f.split(".", 2)[2] for f in weights}, key=LINEARS.index))
    layers = tuple(sorted({int(f.split(".")[1]) for f in weights}))
    params = sum(a.numel() + b.numel() for a, b in weights.values())
    stored = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())
    return Adapter(None, "qlora", file.parent, rank, float(scale), targets, layers, params, stored), weights


# ---- applying them --------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A linear layer plus its low-rank update: W x + B (A x), the scale folded into B.

    The foundation's weight stays this module's `weight` (the name the plain linear had), so it is
    stored under the same key in every program and ExecuTorch's external data holds it once."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        dtype = base.weight.dtype  # the model's compute dtype (a torchao weight's logical one)
        self.lora_a = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.lora_b = nn.Linear(b.shape[1], b.shape[0], bias=False)
        with torch.no_grad():
            self.lora_a.weight = nn.Parameter(a.float().to(dtype).contiguous(), requires_grad=False)
            self.lora_b.weight = nn.Parameter((b.float() * scale).to(dtype).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight) + self.lora_b(self.lora_a(x))


def merge_(model: nn.Module, weights: dict, scale: float, names: set[str] | None = None) -> int:
    """W += scale * B @ A in fp32 for each adapted linear (among `names`, parameter names, when
    given: a streamed load merges each part as it is filled); returns how many it merged."""
    merged = 0
    with torch.no_grad():
        for fqn, (a, b) in weights.items():
            if names is not None and f"{fqn}.weight" not in names:
                continue
            w = model.get_submodule(fqn).weight
            w.add_((b.float() @ a.float()).mul_(scale).to(w.dtype))
            merged += 1
    return merged


@contextmanager
def attached(model: nn.Module, weights: dict, scale: float, quant: str):
    """`model` with each adapted linear a LoRALinear (A and B quantized by `quant`) inside the
    block; the plain linears are back afterwards."""

    swapped = []
    try:
        for fqn, (a, b) in weights.items():
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            lora = LoRALinear(base, a, b, scale)
            if quant == "8da8w":
                from torchao.quantization import quantize_

                config = _torchao_config(LayerQuant(8, 0, "int8-dynamic"))
                for m in (lora.lora_a, lora.lora_b):
                    quantize_(m, config, filter_fn=lambda mod, _fqn, m=m: mod is m)
            setattr(parent, child, lora)
            swapped.append((parent, child, base))
        yield model
    finally:
        for parent, child, base in reversed(swapped):
            setattr(parent, child, base)


def default_quant(adapter: Adapter, foundation_quantized: bool) -> str:
    """An unmerged adapter's A and B: int8 (8da8w) over a quantized foundation, fp32 otherwise;
    Meta's QLoRA adaptors in float, as the recipe trained them."""
    if adapter.kind == "qlora" or not foundation_quantized:
        return "none"
    return "8da8w"


def check_name(name: str, flag: str = "--adapter") -> None:
    if not ADAPTER_NAME.match(name or ""):
        raise ConfigError(f"{flag} {name}: not an adapter name (1-32 of a-z, 0-9, '_' and '-')")
