"""Llama 3.2 text decoder, written to export: static KV cache, ExecuTorch's LLM custom ops.

One idea here: the transformer. Hyperparameters live in `ModelArgs`, named sizes in `MODELS`.
Layout is Meta's (interleaved rotary pairs), so Meta checkpoints load as they are and Hugging Face
ones are permuted once at load time (see aot/families/text/checkpoint.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from aot.errors import ConfigError
from aot.families.common import (
    FeedForward,
    KVCacheSpec,
    RMSNorm,
    RopeScaling,
    cached_attention,
    register_kv_cache,
    reset_kv_cache,
    ring_slots,
    rope_angles,
)
from aot.native import load_custom_ops


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_hidden: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"`{name}` must be positive, but got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ConfigError(f"`dim` ({self.dim}) must be a multiple of `n_heads` ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"`n_heads` ({self.n_heads}) must be a multiple of `n_kv_heads` ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, but got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def params_by_kind(self) -> dict[str, int]:
        """Parameter counts by how a build stores them (aot.preflight); a tied output projection
        counts apart: quantized, it is stored apart from the embedding."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_hidden
        return {"embedding": self.vocab_size * self.dim, "output": self.vocab_size * self.dim,
                "linear": self.n_layers * (attn + mlp), "other": (2 * self.n_layers + 1) * self.dim}

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_hidden
        per_layer = attn + mlp + 2 * self.dim
        out = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + out


# Published Llama 3.2 text sizes (Meta params.json / HF config.json), plus tiny sizes for tests.
MODELS: dict[str, ModelArgs] = {
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128_256, ffn_hidden=8192),
    "3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128_256, ffn_hidden=8192),
    # aot's embedded demo model (aot/demo, trained by tools/train_demo.py).
    "demo": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=2048, ffn_hidden=768),
    # its Instruct fine-tune (aot/demo/instruct): Llama 3's chat tokens added at 2048-2055
    # (tools/train_demo_instruct.py)
    "demo-instruct": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=2056, ffn_hidden=768),
    "tiny": ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, ffn_hidden=384),
    "small": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=4096, ffn_hidden=768),
}


def rope_frequencies(args: ModelArgs, max_context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_context_len, head_dim // 2], float32."""
    angles = rope_angles(args.head_dim, args.rope_theta, args.rope_scaling, max_context_len)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, S, H, D] with (real, imag) pairs interleaved along D; cos, sin: [S, D // 2]
    xr, xi = x.float().reshape(x.shape[:-1] + (-1, 2)).unbind(-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, max_context_len: int, dtype: torch.dtype, cache: KVCacheSpec = KVCacheSpec()):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        # k/v cache: [1, positions, n_kv_heads, head_dim] (aot.families.common.register_kv_cache)
        self.cache = cache
        register_kv_cache(self, cache, cache.length(max_context_len), args.n_kv_heads, args.head_dim, dtype)
        # Static attention (NPU delegates): standard ops and static shapes. The cache is written
        # with index_copy at the call's positions and every call attends over the whole cache under
        # a mask, so a prefill chunk and a one-token decode are two fixed graphs sharing the cache;
        # what PT2E quantizers annotate and QNN/NeuroPilot lower.
        self.static = False

    def _static_attention(self, q, k, v, positions):
        # q: [1, S, H, D]; k, v: [1, S, KV, D]; positions: [S] absolute positions of this call
        S, rep = q.shape[1], self.n_heads // self.n_kv_heads
        self.k_cache.index_copy_(1, positions, k)
        self.v_cache.index_copy_(1, positions, v)
        q = q.transpose(1, 2)
        keys = self.k_cache.repeat_interleave(rep, dim=2).transpose(1, 2)
        values = self.v_cache.repeat_interleave(rep, dim=2).transpose(1, 2)
        # A finite mask, as NPU llama graphs use: -inf would give quantization observers an infinite
        # range. exp(-255) is 0 in float32, so masking stays exact.
        visible = torch.arange(self.k_cache.shape[1])[None, :] <= positions[:, None]
        mask = torch.where(visible, 0.0, -255.0).to(q.dtype)
        scores = torch.matmul(q, keys.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        y = torch.matmul(torch.softmax(scores, dim=-1), values)
        return y.transpose(1, 2).reshape(1, S, self.n_heads * self.head_dim)

    def forward(self, x, start_pos, cos, sin, slots=None):
        # x: [1, S, dim]; start_pos: position of x[:, 0] in the cache (static: [S] positions tensor);
        # slots: where a ring cache puts this call (aot.families.common.ring_slots)
        _, S, _ = x.shape
        q = self.wq(x).view(1, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(1, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(1, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.static:
            return self.wo(self._static_attention(q, k, v, start_pos))
        y = cached_attention(self, self.cache, q, k, v, start_pos, slots)
        return self.wo(y.view(1, S, self.n_heads * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, max_context_len: int, dtype: torch.dtype, cache: KVCacheSpec):
        super().__init__()
        self.attention = Attention(args, max_context_len, dtype, cache)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos: int, cos, sin, slots=None):
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, slots)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """forward(tokens [1, S] int64, input_pos [1] int64) -> logits.

    Logits are [1, vocab] for the last position (what the LLM runners sample from), or
    [1, S, vocab] with `full_logits` (for teacher-forced scoring).
    """

    def __init__(
        self,
        args: ModelArgs,
        max_context_len: int,
        full_logits: bool = False,
        cache_dtype: torch.dtype = torch.float32,
        cache: KVCacheSpec = KVCacheSpec(),
    ):
        super().__init__()
        load_custom_ops()
        self.args, self.max_context_len, self.full_logits = args, max_context_len, full_logits
        self.cache = cache
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args, max_context_len, cache_dtype, cache) for _ in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_frequencies(args, max_context_len)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def init_buffers(self) -> None:
        """Fill buffers and re-tie weights after `to_empty()` (models are built on the meta device
        so that loading a checkpoint never allocates a throwaway random init)."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_frequencies(self.args, self.max_context_len)
        with torch.no_grad():
            self.freqs_cos.copy_(cos)
            self.freqs_sin.copy_(sin)
        self.reset_cache(ring_only=True)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        S = tokens.shape[1]
        if self.static:  # positions as a tensor: no data-dependent shapes
            start_pos = input_pos[-1] + torch.arange(S)
            cos, sin = self.freqs_cos.index_select(0, start_pos), self.freqs_sin.index_select(0, start_pos)
        else:
            start_pos = input_pos[-1].item()
            torch._check(start_pos >= 0)
            torch._check(start_pos + S <= self.max_context_len)
            cos = self.freqs_cos.narrow(0, start_pos, S)
            sin = self.freqs_sin.narrow(0, start_pos, S)
        h = self.tok_embeddings(tokens)
        slots = None if self.static else ring_slots(self.cache, self.cache.length(self.max_context_len), start_pos, S)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, slots)
        if not self.full_logits:
            h = h[:, -1, :]
        return self.output(self.norm(h))

    @property
    def static(self) -> bool:
        return self.layers[0].attention.static

    def use_static_attention(self) -> None:
        """Static-shape attention with standard ops (NPU delegates); the same logits."""
        if self.cache != KVCacheSpec():
            raise ConfigError("static-shape (NPU) attention stores the cache in the graph's own ops; "
                              "--kv-cache int8 and --attention-sink apply to --delegate xnnpack")
        for layer in self.layers:
            layer.attention.static = True
        self.reset_cache()  # static attention reads every position under a mask

    def reset_cache(self, ring_only: bool = False) -> None:
        for layer in self.layers:
            reset_kv_cache(layer.attention, ring_only)
