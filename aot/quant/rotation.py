"""SpinQuant / QuaRot rotations, fused into a fp32 Llama before 4-bit quantization.

Orthogonal rotations spread outliers of the residual stream (R1), of each attention head's values
(R2) and of the FFN's inner activation (R4) over all channels, so that 4-bit groups and 8-bit
per-token activations lose less. R1 and R2 are folded into the weights offline; R4 is a Hadamard
transform applied to the activation at run time (`OnlineHadamard`) with its inverse folded into
`down_proj` (w2). In fp32 the rotated model computes the same function as the original.

Conventions (those of SpinQuant's public code and ExecuTorch's apply_spin_quant_r1_r2.py, so learned
matrices from SpinQuant's training load as they are): a residual-stream row vector h becomes h @ R1;
a linear reading it gets W @ R1, one writing it R1.T @ W; per head, values become v @ R2 and the
output projection's head columns W_o[:, head] @ R2.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from aot.errors import ConfigError
from aot.files import sha256_file
from aot.native import load_custom_ops as _load_custom_ops

# The non-power-of-two factors SpinQuant needs for Llama 3.2 (the 3B's dim 3072 = 12 * 256) and
# beyond: torchao's SpinQuant tables. get_hadK(m, transpose=True) is, bit for bit, the +-1 Paley I
# matrix of the quadratic residues mod m - 1 (tests/test_rotation_hadamard.py builds it and checks).
_FACTORS = (12, 20)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _factor(m: int) -> torch.Tensor:
    """The unnormalized m x m +-1 Hadamard factor (m in _FACTORS), float64, from torchao."""
    with contextlib.redirect_stdout(io.StringIO()):  # its import prints a NOTE on stdout (--json)
        from torchao.prototype.spinquant.hadamard_utils import get_hadK
    h, k = get_hadK(m, transpose=True)
    assert k == m, (m, k)
    return h.to(torch.float64).contiguous()


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, p) with n = m * p, p a power of two and m in (1, 12, 20); None if n has no such form."""
    for m in (1, *_FACTORS):
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    return None


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal n x n Hadamard matrix `OnlineHadamard(n)` applies (float64): the Kronecker
    product of a 12 or 20 factor (when n needs one) and a Sylvester power of two."""
    factors = hadamard_factors(n)
    if factors is None:
        raise ConfigError(f"no Hadamard matrix of size {n}: it must be 2^k, 12*2^k or 20*2^k")
    m, p = factors
    h = _sylvester(p) if m == 1 else torch.kron(_factor(m), _sylvester(p))
    return h / n**0.5


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """QuaRot's random Hadamard (random column signs of an orthonormal Hadamard matrix), or a
    Haar-random orthogonal matrix where no Hadamard matrix of that size is available."""
    if hadamard_factors(n) is not None:
        return hadamard(n) * random_signs(n, generator)[None, :]
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _fast_hadamard(x: torch.Tensor, p: int, paley: torch.Tensor | None) -> torch.Tensor:
    """The Sylvester part (size p) with ExecuTorch's kernel over the last dimension, then, for
    n = m * p, the orthonormal m x m Paley factor `paley` as a matmul over the m blocks."""
    if paley is None:
        return torch.ops.llama.fast_hadamard_transform(x)
    y = torch.ops.llama.fast_hadamard_transform(x.reshape(-1, paley.shape[0], p))
    return torch.matmul(paley, y).reshape(x.shape)


def _paley_factor(m: int) -> torch.Tensor | None:
    return _factor(m) / m**0.5 if m > 1 else None


def hadamard_rows(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ hadamard(n).T (or x @ hadamard(n) with transpose) over the last dimension, in
    O(n log n) per row with the fast kernel: for fusing Hadamard rotations into big weights."""
    _load_custom_ops()
    m, p = hadamard_factors(x.shape[-1])
    paley = _paley_factor(m)
    if paley is not None:
        paley = (paley.T if transpose else paley).to(x.dtype)
    return _fast_hadamard(x.contiguous(), p, paley)


class OnlineHadamard(nn.Module):
    """x -> x @ hadamard(n).T over the last dimension, at run time.

    The power-of-two part runs ExecuTorch's `llama::fast_hadamard_transform` kernel (O(n log n),
    in the LLM custom ops every ExecuTorch LLM runner links, the kernel Meta's SpinQuant bundles use);
    a Paley factor (12 or 20) is a small matmul on top.
    """

    def __init__(self, n: int):
        super().__init__()
        _load_custom_ops()
        factors = hadamard_factors(n)
        if factors is None:
            raise ConfigError(f"no online Hadamard transform of size {n}: it must be 2^k, 12*2^k or 20*2^k")
        self.n, (self.m, self.p) = n, factors
        paley = _paley_factor(self.m)
        self.register_buffer("paley", None if paley is None else paley.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fast_hadamard(x, self.p, self.paley)

    def extra_repr(self) -> str:
        return f"n={self.n}" + (f" ({self.m} x {self.p})" if self.m > 1 else "")


# ---- rotation sources -----------------------------------------------------------------------


@dataclass
class Rotations:
    r1: torch.Tensor  # [dim, dim]
    r2: list[torch.Tensor]  # per layer, [head_dim, head_dim]
    record: dict  # what bundle.json says about them
    r1_signs: torch.Tensor | None = None  # when r1 == hadamard(dim) * signs: fused with the fast transform

    def to_dict(self) -> dict:
        return dict(self.record)


def random_rotations(args, seed: int) -> Rotations:
    g = torch.Generator().manual_seed(seed)
    signs = None
    if hadamard_factors(args.dim) is not None:
        signs = random_signs(args.dim, g)
        r1 = hadamard(args.dim) * signs[None, :]
    else:
        r1 = random_orthogonal(args.dim, g)
    r2 = [random_orthogonal(args.head_dim, g) for _ in range(args.n_layers)]
    kind = "random-hadamard" if hadamard_factors(args.dim) and hadamard_factors(args.head_dim) else "random-orthogonal"
    return Rotations(r1, r2, {"source": kind, "seed": seed}, signs)


R1_KEY = "R1"


def r2_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.R2"


def load_rotations(file: Path, args) -> Rotations:
    """Learned R1/R2 in the format SpinQuant's training saves (`R.bin`: a dict of tensors,
    "R1" [dim, dim] and "model.layers.{i}.self_attn.R2" [head_dim, head_dim])."""

    flag = f"--rotation {file}"
    if not file.is_file():
        raise ConfigError(f"{flag}: no such file; give the R.bin SpinQuant's optimize_rotation saved")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        first = (str(e).strip().splitlines() or ["unreadable"])[0]
        raise ConfigError(f"{flag}: not a tensor file torch.load(weights_only=True) can read ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: expected a dict of rotation matrices, got {type(data).__name__}")
    problems = []

    def get(key: str, n: int) -> torch.Tensor | None:
        t = data.get(key)
        if not isinstance(t, torch.Tensor):
            problems.append(f"missing {key}")
            return None
        if tuple(t.shape) != (n, n):
            problems.append(f"{key} is {list(t.shape)}, the model needs [{n}, {n}]")
            return None
        t = t.to(torch.float64)
        err = (t @ t.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
        if err > 1e-3:
            problems.append(f"{key} is not orthogonal (max |R R^T - I| = {err:.2g})")
        return t

    r1 = get(R1_KEY, args.dim)
    r2 = [get(r2_key(i), args.head_dim) for i in range(args.n_layers)]
    if problems:
        shown = ", ".join(problems[:3]) + (f", and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ConfigError(f"{flag}: {shown}")
    return Rotations(r1, r2, {"source": "file", "file": file.name, "sha256": sha256_file(file)})


# ---- fusion ---------------------------------------------------------------------------------


def _set(linear: nn.Linear, w: torch.Tensor) -> None:
    linear.weight.data = w.to(linear.weight.dtype).contiguous()


# Fusion runs in float32: float64 matmuls took minutes per 1B build on 2 cores, and fp32 keeps the
# rotated model within ~1e-6 relative of the original (the tests hold it to 1e-4 on the logits).
def _w(linear) -> torch.Tensor:
    return linear.weight.data.to(torch.float32)


def _fold_norm(norm, linears) -> None:
    gamma = norm.weight.data.to(torch.float32)
    for lin in linears:
        _set(lin, _w(lin) * gamma[None, :])
    norm.weight.data.fill_(1.0)


class _R1:
    """W @ R1 and R1.T @ W: dense matmuls, or for a random Hadamard R1 = H diag(s) the fast
    transform (measured on the 1B: rotate stage 43 s with matmuls, see README for the fast one)."""

    def __init__(self, rot: Rotations):
        self.dense = rot.r1.to(torch.float32)
        self.signs = None if rot.r1_signs is None else rot.r1_signs.to(torch.float32)

    def right(self, w: torch.Tensor) -> torch.Tensor:  # w @ R1 = (w @ H) * s
        if self.signs is None:
            return w @ self.dense
        return hadamard_rows(w, transpose=True) * self.signs[None, :]

    def left_t(self, w: torch.Tensor) -> torch.Tensor:  # R1.T @ w = s * (H.T @ w) = s * (w.T @ H).T
        if self.signs is None:
            return self.dense.T @ w
        return hadamard_rows(w.T, transpose=True).T * self.signs[:, None]


def _rows_right_(weight: torch.Tensor, r1: _R1, chunk: int = 8192) -> None:
    """weight = weight @ R1 in place, a block of rows at a time (the embedding has vocab rows; a
    second full copy of it would raise the build's peak memory by its size)."""
    for i in range(0, weight.shape[0], chunk):
        weight[i : i + chunk] = r1.right(weight[i : i + chunk].to(torch.float32)).to(weight.dtype)


@torch.no_grad()
def fuse_rotations(model, rot: Rotations, online_r4: bool = True) -> dict:
    """Rotate `model` (aot.families.text.model.Transformer, fp32, unquantized) in place; returns the record for
    bundle.json. Function-preserving in exact arithmetic (in fp32: ~1e-6 relative)."""
    args = model.args
    record = rot.to_dict()
    # Tied embeddings: the output projection gets the final norm folded in and the embedding does
    # not, so they stop being equal; store them apart (SpinQuant's own code has to do the same).
    if model.output.weight is model.tok_embeddings.weight:
        model.output.weight = nn.Parameter(model.output.weight.detach().clone(), requires_grad=False)
        record["untied_embedding"] = True
    # RMSNorm(x R1) = RMSNorm(x) R1 only without the elementwise scale: fold it into the readers.
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        _fold_norm(layer.attention_norm, (att.wq, att.wk, att.wv))
        _fold_norm(layer.ffn_norm, (ffn.w1, ffn.w3))
    _fold_norm(model.norm, (model.output,))

    r1 = _R1(rot)
    _rows_right_(model.tok_embeddings.weight.data, r1)
    _rows_right_(model.output.weight.data, r1)
    hd = args.head_dim
    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.feed_forward
        for lin in (att.wq, att.wk, att.wv, ffn.w1, ffn.w3):
            _set(lin, r1.right(_w(lin)))
        for lin in (att.wo, ffn.w2):
            _set(lin, r1.left_t(_w(lin)))
        r2 = rot.r2[i].to(torch.float32)
        wv = _w(att.wv).view(args.n_kv_heads, hd, args.dim)
        _set(att.wv, (r2.T @ wv).reshape(args.n_kv_heads * hd, args.dim))
        wo = _w(att.wo).view(args.dim, args.n_heads, hd)
        _set(att.wo, (wo @ r2).reshape(args.dim, args.n_heads * hd))
    if online_r4:
        # w2 @ H.T with the fast transform, not a dense [ffn, ffn] matmul (on the 1B that matmul
        # alone took ~30 s of a 71 s rotate stage).
        for layer in model.layers:
            _set(layer.feed_forward.w2, hadamard_rows(_w(layer.feed_forward.w2)))
        record["r4"] = add_online_r4(model)
    return record


def add_online_r4(model) -> str:
    """R4 at run time: the Hadamard transform before every w2 (whose weight must already carry its
    inverse). Returns what bundle.json records about it."""
    for layer in model.layers:
        layer.feed_forward.r4 = OnlineHadamard(model.args.ffn_hidden)
    return describe_r4(model.args)


def describe_r4(args) -> str:
    return f"online hadamard before w2 (n={args.ffn_hidden})"


def check_sizes(args, online_r4: bool = True) -> list[str]:
    """Errors for a model whose FFN width has no online Hadamard transform."""
    if online_r4 and hadamard_factors(args.ffn_hidden) is None:
        return [f"--quant spinquant needs an FFN width of 2^k, 12*2^k or 20*2^k for its online "
                f"Hadamard transform, but the model's is {args.ffn_hidden}"]
    return []
