"""Read Llama 3.2 checkpoints: Meta (params.json + consolidated.*.pth) and Hugging Face
(config.json + *.safetensors). The architecture comes from the checkpoint's own config.

Weights stream into the model one tensor at a time (safetensors slices, or an mmap'd pickle
loaded with weights_only=True), are converted from the stored dtype to the model's, and are checked
by name and shape; every missing, extra or mis-shaped tensor is reported together.
"""

from __future__ import annotations

import math
import pickle
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from aot.errors import CheckpointError, ConfigError, short
from aot.files import check_inside, is_int, plain_file_name, read_json_object
from aot.families.text.model import ModelArgs, RopeScaling, Transformer
from aot.adapters import Adapter, open_qlora
from aot.quant.prequantized import Prequantized, detect, load_quantized

META, HF = "meta", "hf"
LLAMA32_ROPE_FACTOR = 32.0  # Meta's params.json only says use_scaled_rope; 3.2 uses factor 32


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    layout: str  # META or HF
    args: ModelArgs
    weight_files: tuple[Path, ...]
    config_files: tuple[Path, ...]
    prequantized: Prequantized | None = None  # Meta's quantized releases (SpinQuant or QLoRA INT4)
    qlora: Adapter | None = None  # a QLoRA release's adaptors (params.json lora_args)

    def files(self) -> tuple[Path, ...]:
        return self.config_files + self.weight_files


def open_checkpoint(path: Path) -> Checkpoint:
    path = Path(path).expanduser().absolute()  # bundle.json records where inputs came from
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: not a directory; give the folder holding the checkpoint")
    if (path / "config.json").is_file():
        return _open_hf(path)
    if (path / "params.json").is_file():
        return _open_meta(path)
    raise CheckpointError(
        f"--checkpoint {path}: found neither config.json (Hugging Face) nor params.json (Meta); "
        "point it at the model folder"
    )


def _require(cfg: dict, key: str, file: Path):
    if key not in cfg:
        raise CheckpointError(f"{file}: missing '{key}'; is this a Llama checkpoint?")
    return cfg[key]


# ---- Hugging Face ---------------------------------------------------------------------------


def _open_hf(path: Path) -> Checkpoint:
    cfg_file = path / "config.json"
    cfg = read_json_object(cfg_file)
    if cfg.get("model_type") != "llama":
        raise CheckpointError(
            f"{cfg_file}: model_type is '{cfg.get('model_type')}', not 'llama'; aot builds Llama 3.2 text models"
        )
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(f"{cfg_file}: {key}=true is not a Llama 3.2 layout and is not supported")
    _check_sizes(cfg, cfg_file, HF_SIZES, ("num_key_value_heads",))
    dim, n_heads = _require(cfg, "hidden_size", cfg_file), _require(cfg, "num_attention_heads", cfg_file)
    _check_heads(cfg_file, dim, n_heads, cfg.get("num_key_value_heads") or n_heads,
                 ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    _check_floats(cfg, cfg_file, ("rms_norm_eps", "rope_theta"))
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{cfg_file}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    # Published 3.2 repos keep rope_theta/rope_scaling at the top level; transformers 5 writes
    # them under rope_parameters.
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))
    if not _positive_number(theta):
        raise CheckpointError(f"{cfg_file}: rope_theta must be a positive finite number, but got {short(repr(theta), 40)}")
    scaling = rope if rope.get("rope_type") not in (None, "default") else (cfg.get("rope_scaling") or {})
    args = _make_args(
        cfg_file,
        dim=dim,
        n_layers=_require(cfg, "num_hidden_layers", cfg_file),
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=_require(cfg, "vocab_size", cfg_file),
        ffn_hidden=_require(cfg, "intermediate_size", cfg_file),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(theta),
        rope_scaling=_hf_rope_scaling(scaling, cfg_file),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _require(read_json_object(index), "weight_map", index)
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if not plain_file_name(n)]
        if bad:
            raise CheckpointError(f"{index}: weight_map names {short(repr(bad[0]), 80)}, outside the checkpoint "
                                  "folder; shards are file names inside it")
        files = tuple(path / name for name in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}")
        config_files = (cfg_file, index)
    else:
        files = tuple(sorted(path.glob("*.safetensors")))
        config_files = (cfg_file,)
    if not files:
        raise CheckpointError(f"--checkpoint {path}: config.json found but no *.safetensors weights")
    extra = tuple(f for f in (path / "generation_config.json",) if f.is_file())
    check_inside(path, config_files + extra + files)
    _check_claims(cfg_file, args, files)
    return Checkpoint(path, HF, args, files, config_files + extra)


def _hf_rope_scaling(scaling: dict, file: Path) -> RopeScaling | None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise CheckpointError(f"{file}: rope type '{kind}' is not supported; Llama 3.2 uses 'llama3'")
    try:
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        values = [scaling[k] for k in keys]
    except KeyError as e:
        raise CheckpointError(f"{file}: llama3 rope scaling lacks {e}") from None
    for k, v in zip(keys, values):
        if not _positive_number(v) or (k == "original_max_position_embeddings" and int(v) != v):
            raise CheckpointError(f"{file}: rope scaling {k} must be a positive number, but got {short(repr(v), 40)}")
    return RopeScaling(factor=float(values[0]), low_freq_factor=float(values[1]), high_freq_factor=float(values[2]),
                       original_context=int(values[3]))


def _hf_to_meta_name(name: str, args: ModelArgs) -> tuple[str, Callable | None] | None:
    """(our name, conversion) for a HF tensor name, or None if it is not a model weight."""
    parts = name.split(".")
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight", None
    if name == "model.norm.weight":
        return "norm.weight", None
    if name == "lm_head.weight":
        return "output.weight", None
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[5] == "weight":
        i, block, proj = parts[2], parts[3], parts[4]
        table = {
            ("self_attn", "q_proj"): ("attention.wq", args.n_heads),
            ("self_attn", "k_proj"): ("attention.wk", args.n_kv_heads),
            ("self_attn", "v_proj"): ("attention.wv", None),
            ("self_attn", "o_proj"): ("attention.wo", None),
            ("mlp", "gate_proj"): ("feed_forward.w1", None),
            ("mlp", "up_proj"): ("feed_forward.w3", None),
            ("mlp", "down_proj"): ("feed_forward.w2", None),
        }
        if (block, proj) in table:
            ours, heads = table[(block, proj)]
            convert = None if heads is None else (lambda w, n=heads: unpermute_rotary(w, n))
            return f"layers.{i}.{ours}.weight", convert
    if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[4] == "weight":
        norms = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
        if parts[3] in norms:
            return f"layers.{parts[2]}.{norms[parts[3]]}.weight", None
    return None


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows with rotary halves split per head; Meta interleaves the pairs."""
    out_features, dim = w.shape
    d = out_features // n_heads
    return w.view(n_heads, 2, d // 2, dim).transpose(1, 2).reshape(out_features, dim)


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of unpermute_rotary (Meta -> HF), for writing HF checkpoints."""
    out_features, dim = w.shape
    d = out_features // n_heads
    return w.view(n_heads, d // 2, 2, dim).transpose(1, 2).reshape(out_features, dim)


def _iter_hf(ckpt: Checkpoint, stack: ExitStack) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple]]:
    """Every tensor's name, reader and shape; the files stay open (memory-mapped) until `stack` closes."""
    from safetensors import SafetensorError, safe_open

    for file in ckpt.weight_files:
        try:
            f = stack.enter_context(safe_open(str(file), framework="pt"))
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                yield name, (lambda f=f, name=name: f.get_tensor(name)), shape
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); re-download it") from None


# ---- Meta -----------------------------------------------------------------------------------


def _open_meta(path: Path) -> Checkpoint:
    params_file = path / "params.json"
    p = read_json_object(params_file)
    if any(k.startswith("vision_") for k in p):
        raise CheckpointError(
            f"--checkpoint {path}: Meta's original Llama 3.2 Vision layout is not read; convert it to the "
            "Hugging Face layout with transformers' convert_mllama_weights_to_hf.py (or download the HF release)")
    _check_sizes(p, params_file, META_SIZES, ("n_kv_heads", "ffn_dim", "multiple_of"))
    _check_floats(p, params_file, ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scale_factor"))
    dim = _require(p, "dim", params_file)
    n_heads = _require(p, "n_heads", params_file)
    _check_heads(params_file, dim, n_heads, p.get("n_kv_heads") or n_heads, ("dim", "n_heads", "n_kv_heads"))
    if "ffn_dim" in p:
        hidden = int(p["ffn_dim"])
    else:  # Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of
        multiple_of = int(p.get("multiple_of", 256))
        hidden = int(2 * (4 * dim) / 3)
        hidden = int(float(p.get("ffn_dim_multiplier") or 1.0) * hidden)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    files = tuple(sorted(path.glob("consolidated.*.pth")))
    if not files:
        raise CheckpointError(f"--checkpoint {path}: params.json found but no consolidated.00.pth")
    if len(files) > 1:
        raise CheckpointError(
            f"--checkpoint {path}: {len(files)} consolidated.*.pth shards (model-parallel); "
            "aot reads single-file Meta checkpoints (Llama 3.2 1B/3B ship as one)"
        )
    check_inside(path, (params_file, *files))
    sd = _load_pickle(files[0])
    prequantized = detect(sd, p, files[0])
    args = _make_args(
        params_file,
        dim=dim,
        n_layers=_require(p, "n_layers", params_file),
        n_heads=n_heads,
        n_kv_heads=p.get("n_kv_heads") or n_heads,
        vocab_size=_require(p, "vocab_size", params_file),
        ffn_hidden=hidden,
        norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=float(p.get("rope_theta", 10_000.0)),
        rope_scaling=(
            RopeScaling(factor=float(p.get("rope_scale_factor", LLAMA32_ROPE_FACTOR)))
            if p.get("use_scaled_rope")
            else None
        ),
        tie_embeddings=prequantized is None and _meta_tied(sd),
    )
    qlora = None
    if p.get("lora_args"):
        if prequantized is None:
            raise CheckpointError(f"{params_file}: lora_args on a float checkpoint; aot reads Meta's QLoRA releases "
                                  "(INT4 weights with adaptors) or PEFT adapters (--adapter DIR)")
        qlora = open_qlora(sd, p["lora_args"], args, files[0])[0]
    return Checkpoint(path, META, args, files, (params_file,), prequantized, qlora)


def read_qlora(ckpt: Checkpoint) -> dict:
    """fqn -> (A, B) of a QLoRA checkpoint's adaptors (the file is memory-mapped again)."""
    params = read_json_object(ckpt.path / "params.json")
    return open_qlora(_load_pickle(ckpt.weight_files[0]), params["lora_args"], ckpt.args, ckpt.weight_files[0])[1]


def _load_pickle(file: Path) -> dict:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise CheckpointError(
            f"{file}: refused to unpickle ({first}); aot loads tensors only (weights_only=True), "
            "so re-export the checkpoint as plain tensors or safetensors"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({e}); re-download it") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, got {type(sd).__name__}")
    if "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return sd


def _meta_tied(sd: dict) -> bool:
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    return out is None or (emb is not None and out.shape == emb.shape and torch.equal(out, emb))


def _iter_meta(ckpt: Checkpoint, sd: dict) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple]]:
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{ckpt.weight_files[0]}: entry '{name}' is a {type(t).__name__}, not a tensor")
        yield name, (lambda t=t: t), tuple(t.shape)


# ---- shared ---------------------------------------------------------------------------------

# The architecture's sizes a config may claim: (lowest, highest). The highest are far past any
# Llama (90B: 8192 wide, 100 layers, 64 heads, 28672 ffn, 128256 vocab) and keep a hostile config
# from sizing a model, a rope table or a preflight estimate from 10^12.
HF_SIZES = {"hidden_size": (1, 1 << 16), "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
            "num_key_value_heads": (1, 1024), "vocab_size": (1, 1 << 22), "intermediate_size": (1, 1 << 20)}
META_SIZES = {"dim": (1, 1 << 16), "n_layers": (1, 1024), "n_heads": (1, 1024), "n_kv_heads": (1, 1024),
              "vocab_size": (1, 1 << 22), "ffn_dim": (1, 1 << 20), "multiple_of": (1, 1 << 16)}
MIN_BYTES_PER_PARAM = 0.5  # int4, the narrowest a checkpoint stores


def _check_sizes(cfg: dict, file: Path, sizes: dict, optional: tuple) -> None:
    for key, (lo, hi) in sizes.items():
        if key not in cfg or (key in optional and cfg[key] is None):
            continue  # _require names the missing ones
        v = cfg[key]
        if not is_int(v) or not lo <= v <= hi:
            raise CheckpointError(f"{file}: {key} must be an integer from {lo} to {hi}, but got {short(repr(v), 40)}; "
                                  "this is not a Llama config")


def _check_heads(file: Path, dim: int, n_heads: int, n_kv: int, names: tuple) -> None:
    if dim % n_heads:
        raise CheckpointError(f"{file}: {names[0]} ({dim}) is not a multiple of {names[1]} ({n_heads})")
    if n_heads % n_kv:
        raise CheckpointError(f"{file}: {names[1]} ({n_heads}) is not a multiple of {names[2]} ({n_kv})")


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_floats(cfg: dict, file: Path, keys: tuple) -> None:
    for key in keys:
        if cfg.get(key) is not None and not _positive_number(cfg[key]):
            raise CheckpointError(f"{file}: {key} must be a positive finite number, but got {short(repr(cfg[key]), 40)}")


def _check_claims(file: Path, args: ModelArgs, weight_files) -> None:
    """The parameters the config claims fit in the bytes the weight files hold (at int4 at least),
    so a config that says a million layers is refused before anything is sized from it."""
    on_disk = sum(f.stat().st_size for f in weight_files)
    claimed = args.num_params()
    if claimed * MIN_BYTES_PER_PARAM > on_disk * 1.05 + (1 << 20):
        raise CheckpointError(f"{file}: describes {claimed:,} parameters, but the weight files hold {on_disk:,} bytes; "
                              "the config does not match these weights")



def _make_args(file: Path, **kw) -> ModelArgs:
    try:
        return ModelArgs(**kw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def load_weights(model: Transformer, ckpt: Checkpoint) -> None:
    """Copy every checkpoint tensor into `model` (converting dtype), or raise naming what is off."""
    with ExitStack() as stack:
        weights = WeightReader(model, ckpt, stack)
        weights.fill(model, weights.names)


class WeightReader:
    """Which checkpoint tensor fills which parameter of `model` (a meta model will do: only names
    and shapes are read), every mismatch reported at once before any weight is read; then `fill`
    reads the tensors of some parameters, so a model can be loaded part by part."""

    def __init__(self, model: Transformer, ckpt: Checkpoint, stack: ExitStack):
        args = model.args
        self.ckpt = ckpt
        sd = _load_pickle(ckpt.weight_files[0]) if ckpt.layout == META else None
        self.prequantized = set()
        if ckpt.prequantized is not None:  # the quantized tensors go in as they are
            self.prequantized = load_quantized(model, sd, ckpt.prequantized, ckpt.weight_files[0])
        params = dict(model.named_parameters(remove_duplicate=False))
        expected = {k: tuple(v.shape) for k, v in params.items() if k not in self.prequantized}
        if args.tie_embeddings:
            expected.pop("output.weight", None)
        self.readers: dict[str, tuple[str, Callable, Callable | None]] = {}
        seen, extra, misshaped = set(), [], []
        source = _iter_hf(ckpt, stack) if ckpt.layout == HF else _iter_meta(ckpt, sd)
        for name, get, shape in source:
            if name in self.prequantized or (ckpt.qlora is not None and ".adaptor." in name):
                continue  # adaptors: attached after loading (aot.adapters)
            if ckpt.layout == HF:
                mapped = _hf_to_meta_name(name, args)
                ours, convert = mapped if mapped else (None, None)
            else:
                ours, convert = (name if name in params else None), None
            if ours == "output.weight" and args.tie_embeddings:
                continue  # tied: the output projection is the embedding
            if ours is None or ours not in expected:
                if not name.endswith("rotary_emb.inv_freq"):
                    extra.append(f"{name} {list(shape)}")
                continue
            if shape != expected[ours]:
                misshaped.append(f"{name}: checkpoint {list(shape)}, model expects {list(expected[ours])}")
                seen.add(ours)  # present, only the wrong shape: not also "missing"
                continue
            self.readers[ours] = (name, get, convert)
            seen.add(ours)
        missing = [f"{m} {list(expected[m])}" for m in sorted(set(expected) - seen, key=_natural)]
        groups = [(kind, items) for kind, items in (("mis-shaped", misshaped), ("missing", missing),
                                                    ("unexpected", extra)) if items]
        if groups:
            shown = "; ".join(
                f"{len(items)} {kind}: " + ", ".join(items[:2]) + (", ..." if len(items) > 2 else "")
                for kind, items in groups
            )
            raise CheckpointError(f"--checkpoint {ckpt.path}: weights do not fit its config: {shown}")

    @property
    def names(self) -> list[str]:
        return list(self.readers)

    def fill(self, model: Transformer, names) -> None:
        """Read the checkpoint tensors of parameters `names` into `model` (already materialised)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        for ours in names:
            name, get, convert = self.readers[ours]
            try:
                tensor = get()
            except Exception as e:  # safetensors/torch raise several types for truncated data
                raise CheckpointError(f"{name}: could not be read from {self.ckpt.path} ({e}); re-download it") from None
            with torch.no_grad():
                params[ours].copy_(convert(tensor) if convert else tensor)
            del tensor


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]
