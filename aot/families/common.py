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
    bad = [i for i in (bos, *eos) if i >= vocab_size]
    if bad:
        return None, None, [f"bos/eos id(s) {bad} are outside the model's vocab ({vocab_size}); fix --bos-id/--eos-id"]
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


