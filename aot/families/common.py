"""What the model families share: the layers both Llama 3.2 decoders are made of, the rotary
frequencies, random weights, special ids, and the streamed load loop.

Below the families in the import layers: imports only torch, aot.errors and aot.tokenizer.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from aot.errors import short
from aot.tokenizer import LLAMA3_BOS, LLAMA3_EOS, TokenizerInfo

LLAMA3_VOCAB = 128_256  # Llama 3's tokenizer (text and vision); its special ids are known without one


@dataclass(frozen=True)
class RopeScaling:
    """The "llama3" frequency scaling (Llama 3.1 uses factor 8, Llama 3.2 factor 32)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


def rope_angles(head_dim: int, theta: float, scaling: RopeScaling | None, max_context_len: int) -> torch.Tensor:
    """Rotary angles [max_context_len, head_dim // 2], float64: position x frequency, with llama3
    scaling. The families lay them out their own way (interleaved pairs, or halves)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        freqs = llama3_scale(freqs, scaling)
    return torch.outer(torch.arange(max_context_len, dtype=torch.float64), freqs)


def llama3_scale(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_context / s.low_freq_factor
    high_wavelen = s.original_context / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * freqs / s.factor + smooth * freqs
    out = torch.where(wavelen > low_wavelen, freqs / s.factor, blended)
    return torch.where(wavelen < high_wavelen, freqs, out)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), Meta's names (w1 gate, w3 up, w2 down)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        # SpinQuant's R4: an online Hadamard transform before w2 (aot.quant.rotation), or None.
        self.r4: nn.Module | None = None

    def forward(self, x):
        h = nn.functional.silu(self.w1(x)) * self.w3(x)
        if self.r4 is not None:
            h = self.r4(h)
        return self.w2(h)


def random_init_(model: nn.Module, seed: int, names: set[str] | None = None) -> None:
    """Deterministic random weights (for benchmarking builds; never for accuracy claims).

    Each parameter draws from its own generator, seeded by `seed` and its name, so a model filled
    part by part (`names`) gets the same weights as one filled at once.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if names is not None and name not in names:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=g)


def special_ids(bos_flag: int | None, eos_flag: Sequence[int] | None, tok: TokenizerInfo | None,
                vocab_size: int, llama3: bool) -> tuple[int | None, tuple[int, ...] | None, list[str]]:
    """bos and eos ids: the flags, else the tokenizer's, else (no tokenizer, Llama 3's vocab)
    Llama 3's own; with the problems found, for the family's one-line error."""
    bos = bos_flag if bos_flag is not None else (tok.bos_id if tok else None)
    eos = eos_flag if eos_flag is not None else (tok.eos_ids if tok else None)
    if tok is None and llama3:
        bos = LLAMA3_BOS if bos is None else bos
        eos = LLAMA3_EOS if eos is None else eos
    if bos is None or eos is None:
        return None, None, ["no tokenizer to take bos/eos ids from: pass --bos-id and --eos-id"]
    bad = [i for i in (bos, *eos) if not 0 <= i < vocab_size]
    if bad:
        where = ("--bos-id/--eos-id" if bos_flag is not None or eos_flag is not None
                 else "the checkpoint's generation_config.json/config.json (or pass --bos-id/--eos-id)")
        return None, None, [f"bos/eos id(s) {short(bad, 80)} are outside the model's vocab ({vocab_size}); fix {where}"]
    return int(bos), tuple(int(e) for e in eos), []


def stream_parts(model: nn.Module, groups: Sequence[tuple[str, ...]], materialise: Callable[[str], None],
                 names_of: Callable[[tuple[str, ...]], list[str]], fill: Callable[[list[str]], None],
                 quantize: Callable[[tuple[str, ...]], Iterable[str]], backend=None, progress=None) -> None:
    """The streamed load loop both families run: for each group of submodules, allocate it
    (`materialise`), fill its parameters (`fill`: read from the checkpoint, or drawn), quantize it
    (`quantize` returns the submodules it quantized), and let the backend hold its weights
    compactly, before the next group is allocated. Peak memory: the quantized model plus one
    group in fp32.

    The groups' only buffers are KV caches: never written here. ExecuTorch serializes a buffer the
    graph mutates by shape and dtype only (its contents are the runtime's), export and lowering
    read only the buffers' shapes, and an allocation of at least the 1 MiB mmap threshold is pages
    the kernel backs when first written: left unwritten, the caches (0.44 GiB for the 3B at a 2048
    context) never become resident. tests/test_streamed.py fills them with garbage: the .pte bytes
    do not change."""
    for done, group in enumerate(groups):
        for name in group:
            materialise(name)
        fill(names_of(group))
        for name in quantize(group):
            if backend is not None:
                backend.hold_weights(model.get_submodule(name))
        if progress is not None:
            progress(done + 1, len(groups))




# ---- the KV cache both decoders attend through ------------------------------------------------

KV_STORAGE = ("fp32", "int8")  # what ExecuTorch's CPU LLM ops store a cache in (XNNPACK builds)


@dataclass(frozen=True)
class KVCacheSpec:
    """How a decoder's self-attention stores its keys and values.

    storage: fp32 (bf16 in a --quant bf16 build, whose buffers are all bf16), or int8 as ExecuTorch's
    QuantizedKVCache stores it (affine per token and head:
    int8 values, an fp32 scale and an int8 zero point each), attended by llama::custom_quantized_sdpa.
    sink, window: 0, 0 -- the cache holds every position of the context. Otherwise an attention
    sink (StreamingLLM): the first `sink` positions stay, the rest go round a ring, and each query
    attends to the sink plus the last `window` positions, so memory stays fixed while the context
    (the rotary positions, up to max_context_len) goes on. The ring holds window + chunk slots
    (chunk: the longest call, max_seq_len) so that a prefill chunk never overwrites a slot one of its
    own queries still sees.
    """

    storage: str = "fp32"
    sink: int = 0
    window: int = 0
    chunk: int = 0

    @property
    def ring(self) -> bool:
        return self.window > 0

    def length(self, max_context_len: int) -> int:
        """Positions the cache buffers hold."""
        return self.sink + self.window + self.chunk if self.ring else max_context_len

    def bytes_per_position(self, n_layers: int, n_kv_heads: int, head_dim: int) -> int:
        per_head = {"fp32": head_dim * 4, "bf16": head_dim * 2}.get(self.storage, head_dim + 4 + 1)
        return 2 * n_layers * n_kv_heads * per_head

    def to_dict(self) -> dict:
        return {"storage": self.storage, "sink": self.sink, "window": self.window, "ring_slots": self.window + self.chunk}

    def initialized_buffers(self) -> tuple[str, ...]:
        """The cache buffers a bundle must carry zeroed. A ring's mask covers every slot, and a slot
        not written yet must not hold NaN (0 x NaN is NaN in the attention); ExecuTorch's planned
        memory has no defined contents. int8 values and zero points cannot be NaN, so an int8 ring
        carries only its scales (1/(head_dim + 5) of the cache). A full cache is read only up to the
        positions written (a causal llama::custom_sdpa): nothing."""
        if not self.ring:
            return ()
        return ("k_cache_scales", "v_cache_scales") if self.storage == "int8" else ("k_cache", "v_cache")


def kv_cache_record(cfg, n_layers: int, n_kv_heads: int, head_dim: int) -> dict:
    """bundle.json's export fields for the cache of a build `cfg` (a BuildConfig)."""
    spec = cfg.kv_cache_spec()
    positions = spec.length(cfg.max_context_len)
    static = spec == KVCacheSpec() and cfg.kv_storage != "fp32"  # an NPU's own cache
    record = {"storage": cfg.kv_storage, "positions": positions}
    if not static:
        per = spec.bytes_per_position(n_layers, n_kv_heads, head_dim)
        record.update(bytes_per_position=per, bytes=per * positions)
    sink = {"sink": spec.sink, "window": spec.window, "ring_slots": spec.window + spec.chunk} if spec.ring else None
    return {"kv_cache": record, "attention_sink": sink}


def register_kv_cache(module: nn.Module, spec: KVCacheSpec, length: int, n_kv_heads: int, head_dim: int,
                      dtype: torch.dtype = torch.float32) -> None:
    """k_cache, v_cache [1, length, n_kv_heads, head_dim] (the layout llama::update_cache and
    llama::custom_sdpa take: sequence before heads), and for int8 their scales and zero points
    [1, length, n_kv_heads, 1]. Buffers the graph mutates, not part of the checkpoint."""
    shape, qshape = (1, length, n_kv_heads, head_dim), (1, length, n_kv_heads, 1)
    cache_dtype = torch.int8 if spec.storage == "int8" else dtype
    for name in ("k", "v"):
        module.register_buffer(f"{name}_cache", torch.zeros(shape, dtype=cache_dtype), persistent=False)
        if spec.storage == "int8":
            module.register_buffer(f"{name}_cache_scales", torch.ones(qshape, dtype=torch.float32), persistent=False)
            module.register_buffer(f"{name}_cache_zero_points", torch.zeros(qshape, dtype=torch.int8), persistent=False)


def reset_kv_cache(module: nn.Module, ring_only: bool = False) -> None:
    """Zero the cache (scales to 1). ring_only: only a ring's (small, and read under a mask over
    every slot; a full cache is never read before it is written, and left alone it never becomes
    resident: 8 GiB for the 1B at 128K in fp32)."""
    if ring_only and not module.cache.ring:
        return
    for name, buf in module.named_buffers(recurse=False):
        if "_cache" in name:
            buf.fill_(1 if name.endswith("_scales") else 0)


def zero_ring_caches(module: nn.Module) -> None:
    """reset_kv_cache(ring_only=True) on every attention under `module` (after to_empty())."""
    for m in module.modules():
        if isinstance(getattr(m, "cache", None), KVCacheSpec) and hasattr(m, "k_cache"):
            reset_kv_cache(m, ring_only=True)


def _per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x quantized per token and head (its last dim), as ExecuTorch's QuantizedKVCache does."""
    scales, zero_points = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    q = torch.ops.quantized_decomposed.quantize_per_token(x, scales, zero_points, -128, 127, torch.int8)
    return q, scales.to(torch.float32), zero_points.to(torch.int8)


def ring_slots(spec: KVCacheSpec, length: int, start_pos, seq_len: int):
    """Where this call's positions go in a sink + ring cache, and the mask [S, length] of the
    slots each query sees. A slot's position is known from the call alone (positions are written
    in order), so no position buffer has to be carried between calls. Computed once per call and
    shared by every layer (None without a ring)."""
    if not spec.ring:
        return None
    sink, ring, window = spec.sink, length - spec.sink, spec.window
    pos = start_pos + torch.arange(seq_len)
    indices = torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, ring))
    slots = torch.arange(length)
    last = start_pos + seq_len - 1
    # the position each slot holds after this call: the latest written position that maps to it
    held = torch.where(slots < sink, slots, last - torch.remainder(last - slots, ring))
    q, held, slots = pos[:, None], held[None, :], slots[None, :]
    visible = (held >= 0) & (held <= q) & ((slots < sink) | ((held >= sink) & (q - held < window)))
    mask = torch.where(visible, 0.0, float("-inf"))
    return indices[None, :], mask


def cached_attention(module: nn.Module, spec: KVCacheSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     start_pos, slots=None) -> torch.Tensor:
    """Write k, v [1, S, KV, D] at start_pos into `module`'s cache (register_kv_cache) and attend
    q [1, S, H, D] over it with ExecuTorch's CPU LLM ops (grouped-query heads handled by the op).
    Returns [1, S, H, D]. fp32 without a sink is llama::update_cache + a causal llama::custom_sdpa.
    slots: ring_slots() of this call (a ring cache)."""
    indices, mask = slots if spec.ring else (None, None)

    def write(value, cache):
        if indices is None:
            torch.ops.llama.update_cache(value, cache, start_pos)
        else:
            torch.ops.llama.update_cache_with_indices(value, cache, start_pos, indices)

    # with a mask the op attends over the slots it marks (start_pos unused, not causal)
    sdpa_pos, causal = (start_pos, True) if mask is None else (0, False)
    if spec.storage != "int8":  # fp32, or bf16 in a --quant bf16 build
        write(k, module.k_cache)
        write(v, module.v_cache)
        return torch.ops.llama.custom_sdpa(q, module.k_cache, module.v_cache, sdpa_pos, mask, 0, causal)
    for value, name in ((k, "k"), (v, "v")):
        qv, scales, zero_points = _per_token_int8(value)
        write(qv, getattr(module, f"{name}_cache"))
        write(scales, getattr(module, f"{name}_cache_scales"))
        write(zero_points, getattr(module, f"{name}_cache_zero_points"))
    qq, q_scales, q_zero_points = _per_token_int8(q)
    return torch.ops.llama.custom_quantized_sdpa(
        qq, module.k_cache, module.v_cache, sdpa_pos, mask, 0, causal, None,
        q_zero_points, q_scales, module.k_cache_zero_points, module.k_cache_scales,
        module.v_cache_zero_points, module.v_cache_scales)
