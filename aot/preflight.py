"""Before a build starts: will this machine hold it? Estimate the bundle's size and the build's
peak memory from the architecture and the quantization plan, and stop with one line when the
memory available or the disk free at --out is short (`--no-preflight` builds anyway).

The estimate is calibrated on measured builds (bench/results, 2-core host, streamed load):
peak RSS ~ 0.3 GiB + 1.8 x the program's weight bytes (Llama 3.2 1B 8da4w: 1.0 GiB of weights,
2.09 GiB peak; 3B: 2.2 GiB, 4.26 GiB). Weight bytes per parameter: fp32 4, bf16 2, 8-bit 1,
4-bit 0.5 plus a 16-bit scale per group.

It also predicts the bundle's runtime memory plan on the phone (runtime(): KV cache, weights, rope
tables, activations) and, with --device-memory, refuses a bundle that would not fit there.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import psutil

from aot.errors import ConfigError, ResourcesShort
from aot.memplan import size

GIB = 1024**3
BASE_BYTES = 0.3 * GIB
PEAK_PER_WEIGHT_BYTE = 1.8


def bytes_per_param(recipe, dtype: str = "float32") -> float:
    """Stored bytes per weight of a LayerQuant recipe (None: the compute dtype)."""
    if recipe is None:
        return 2.0 if dtype == "bfloat16" else 4.0
    scales = 2.0 / recipe.group_size if recipe.group_size else 0.0
    return recipe.bits / 8 + scales


def weight_bytes(kinds: dict[str, int], plan, prefix: str = "") -> float:
    """kinds: parameter counts by layer kind (linear, embedding, output, other)."""
    recipes = {"linear": plan.linear, "embedding": plan.embedding, "output": plan.output, "other": None}
    return sum(n * bytes_per_param(recipes[kind.removeprefix(prefix)], plan.dtype)
               for kind, n in kinds.items() if kind.startswith(prefix))


def program_weight_bytes(kinds: dict[str, int], text_plan, vision_plan=None) -> float:
    """The text weights under their plan, and a vision model's encoder ("vision." kinds) under its own."""
    weights = weight_bytes({k: v for k, v in kinds.items() if not k.startswith("vision.")}, text_plan)
    if vision_plan is not None:
        weights += weight_bytes({k: v for k, v in kinds.items() if k.startswith("vision.")}, vision_plan, "vision.")
    return weights


def estimate(kinds: dict[str, int], text_plan, vision_plan=None) -> dict:
    weights = program_weight_bytes(kinds, text_plan, vision_plan)
    return {"pte_bytes": int(weights), "peak_rss_bytes": int(BASE_BYTES + PEAK_PER_WEIGHT_BYTE * weights)}


def available_memory() -> int | None:
    """Memory a new process can use without swapping (MemAvailable on Linux); None when unknown."""
    try:
        return psutil.virtual_memory().available
    except (OSError, RuntimeError):
        return None


def check(what: str, kinds: dict[str, int], text_plan, vision_plan=None, out_dir: Path | None = None,
          enabled: bool = True) -> dict:
    """Raise ResourcesShort when the estimate does not fit; return the estimate otherwise."""
    est = estimate(kinds, text_plan, vision_plan)
    if not enabled:
        return {**est, "checked": False}
    need, have = est["peak_rss_bytes"], available_memory()
    if have is not None and need > have:
        raise ResourcesShort(
            f"{what} needs about {need / GIB:.1f} GiB of memory at peak (estimated from {sum(kinds.values()) / 1e9:.2f}B "
            f"parameters at this quantization) but {have / GIB:.1f} GiB is available; build on a larger machine, "
            "free memory, or pass --no-preflight to try anyway")
    if out_dir is not None:
        free = shutil.disk_usage(out_dir).free
        if est["pte_bytes"] * 1.05 > free:
            raise ResourcesShort(
                f"--out {out_dir.parent}: the bundle needs about {est['pte_bytes'] / GIB:.1f} GiB of disk but "
                f"{free / GIB:.1f} GiB is free there; choose another --out, free space, or pass --no-preflight")
    return {**est, "checked": True, "available_bytes": have}


# ---- the runtime plan, predicted before building ----------------------------------------------
# What the bundle will ask the phone for when its method loads (aot.memplan reads the same parts
# from the built .pte): the KV cache (positions x bytes per position), the weights, the rope tables
# (constants, [max_context_len, head_dim / 2] twice) and the planned activations. Checked against
# the plan read from built .pte files by tests/test_memplan.py: the cache exactly, the total within 2%.

MIB = 1024**2
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Planned activations (outside XNNPACK's own workspace): about four [S, dim + 2 x kv_dim] tensors
# live at once, plus the logits. Fitted on the demo and tiny programs (1.1-1.3x what they plan, on the
# high side); at real sizes they are MiBs next to GiBs of cache and weights.
ACTIVATION_TENSORS = 4


def parse_size(text: str) -> int:
    """'6GiB', '512MiB', '3.5 GiB', '6GB' (SI: 10**9) as bytes; ValueError with the problem."""
    s = str(text).strip().lower().replace(" ", "").replace("_", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or unit not in _UNITS:
        raise ValueError(f"--device-memory takes a size with a unit (6GiB, 512MiB, 3.5 GiB; GB = 10^9 bytes), "
                         f"but got '{text}'")
    if value <= 0:
        raise ValueError(f"--device-memory must be more than 0, but got '{text}'")
    return int(value * _UNITS[unit])


def device_memory_errors(value: str | None) -> list[str]:
    """BuildConfig.errors' check of --device-memory (the fit itself needs the model: runtime())."""
    if value is None:
        return []
    try:
        parse_size(value)
    except ValueError as e:
        return [str(e)]
    return []


def _decoder(args):
    """The self-attention decoder whose KV cache the plan holds, and its number of cached layers:
    a text model's args, or a vision model's text half (its cross-attention layers hold the image's
    keys and values, which are not predicted)."""
    t = getattr(args, "text", args)
    return t, t.n_layers - len(getattr(t, "cross_layers", ()))


def kv_bytes_per_position(args, storage: str, dtype: str = "float32") -> int:
    """fp32 (the compute dtype: bf16 builds convert the cache): 2 x layers x kv_heads x head_dim
    values; int8 (ExecuTorch's QuantizedKVCache): int8 values plus a scale (the compute dtype) and
    an int8 zero point per token and head."""
    t, layers = _decoder(args)
    dtype_bytes = 2 if dtype == "bfloat16" else 4
    per_head = t.head_dim + dtype_bytes + 1 if storage == "int8" else t.head_dim * dtype_bytes
    return 2 * layers * t.n_kv_heads * per_head


def runtime(cfg, args, kinds: dict, text_plan, vision_plan=None, backend=None) -> dict:
    """The predicted runtime plan of the bundle `cfg` builds; with cfg.device_memory, ConfigError
    (exit 3) when it does not fit, naming the biggest part and what would make it fit. A config
    problem, not this machine's: --no-preflight does not skip it."""
    est = _predict(cfg, args, kinds, text_plan, vision_plan, backend)
    if cfg.device_memory is None:
        return est
    have = parse_size(cfg.device_memory)
    est = {**est, "device_memory_bytes": have, "fits": est["at_load_bytes"] <= have}
    if not est["fits"]:
        raise ConfigError(_refusal(cfg, args, kinds, text_plan, vision_plan, backend, est, have))
    return est


def _predict(cfg, args, kinds, text_plan, vision_plan, backend, storage=None, context=None, sink=None) -> dict:
    """The plan of `cfg`, or of `cfg` with another cache storage, context or (sink, window)."""
    spec = cfg.kv_cache_spec()  # aot.families.common.KVCacheSpec
    if storage is not None:
        spec = dataclasses.replace(spec, storage=storage)
    if sink is not None:
        spec = dataclasses.replace(spec, sink=sink[0], window=sink[1], chunk=cfg.max_seq_len)
    context = context or cfg.max_context_len
    t, _ = _decoder(args)
    dtype_bytes = 2 if text_plan.dtype == "bfloat16" else 4
    static = backend is not None and backend.static_shapes
    positions = spec.length(context)
    per_position = None if static else kv_bytes_per_position(args, spec.storage, text_plan.dtype)
    weights = program_weight_bytes(kinds, text_plan, vision_plan)
    logits_rows = cfg.max_seq_len if cfg.full_logits else 1
    # fp32 even in bf16 builds, which keep rope and attention in fp32 (measured: as many bytes)
    activations = 4 * (ACTIVATION_TENSORS * cfg.max_seq_len * (t.dim + 2 * t.n_kv_heads * t.head_dim)
                       + logits_rows * t.vocab_size)
    parts = {
        "kv_cache_bytes": None if static else per_position * positions,
        "weights_bytes": int(weights),
        "rope_tables_bytes": context * t.head_dim * dtype_bytes,
        "activations_bytes": activations,
    }
    unknown = []
    if static:
        unknown.append("the KV cache: a static-shape delegate's graph holds it in the width its quantizer picks")
    if vision_plan is not None:
        unknown.append("the cross-attention image state and the vision encoder's activations")
    return {
        "kv_cache": {"storage": spec.storage, "positions": positions, "bytes_per_position": per_position},
        **parts,
        "at_load_bytes": sum(v for v in parts.values() if v is not None),
        "biggest": max((k for k in parts if parts[k] is not None), key=parts.get).removesuffix("_bytes"),
        "not_predicted": unknown,
    }


_NAMES = {"kv_cache": "the KV cache", "weights": "the weights", "rope_tables": "the rope tables",
          "activations": "the activations"}


def _refusal(cfg, args, kinds, text_plan, vision_plan, backend, est, have) -> str:
    def predict(**kw) -> int:
        return _predict(cfg, args, kinds, text_plan, vision_plan, backend, **kw)["at_load_bytes"]

    part = est["biggest"]
    kv = est["kv_cache"]
    what = f"{_NAMES[part]}, {size(est[part + '_bytes'])}"
    if part == "kv_cache":
        what += f" ({kv['positions']} positions x {size(kv['bytes_per_position'])}, {kv['storage']})"
    fixes = []
    if kv["bytes_per_position"] is not None:
        int8 = kv["storage"] != "int8" and backend is not None and "int8" in backend.kv_caches
        int8_fits = int8 and predict(storage="int8") <= have
        if int8_fits:
            fixes.append(f"--kv-cache int8 (about {size(predict(storage='int8'))})")
        spec = cfg.kv_cache_spec()
        # a shorter context, in this storage and (when int8 alone is not enough) in int8; a sink's
        # cache does not shrink with the context
        for storage in ([] if spec.ring else [kv["storage"]] + (["int8"] if int8 and not int8_fits else [])):
            n = _largest(lambda c, s=storage: predict(storage=s, context=c), cfg.max_seq_len + 1,
                         cfg.max_context_len - 1, have)
            if n is not None:
                fixes.append(("--kv-cache int8 " if storage != kv["storage"] else "") + f"--max-context-len {n}")
        if not spec.ring and not (backend is not None and backend.static_shapes):
            # the ring must stay shorter than the context
            window = _largest(lambda w: predict(sink=(4, w)), 1, cfg.max_context_len - 4 - cfg.max_seq_len - 1, have)
            if window is not None:
                fixes.append(f"--attention-sink 4,{window} (a fixed {4 + window + cfg.max_seq_len}-position cache)")
    if not fixes:
        four_bit = text_plan.linear is not None and text_plan.linear.bits == 4
        fixes.append(f"a smaller model{'' if four_bit else ' or a 4-bit --quant (8da4w)'}: not even the shortest "
                     f"cache fits beside the weights ({size(est['weights_bytes'])})")
    return (f"--device-memory {cfg.device_memory}: the runtime plan of this bundle needs about "
            f"{size(est['at_load_bytes'])} at load, more than {size(have)}; the biggest part is {what}; "
            f"to fit: {', or '.join(fixes)}")


def _largest(at_load, lo: int, hi: int, have: int) -> int | None:
    """The largest n in [lo, hi] whose at_load(n) (growing with n) fits in `have`, rounded down to a
    multiple of 1024 from 4096 up; None when not even `lo` fits."""
    if hi < lo or at_load(lo) > have:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at_load(mid) <= have else (lo, mid - 1)
    return lo // 1024 * 1024 if lo >= 4096 else lo
