"""Llama 3.2 Vision (Mllama): the image encoder and the text decoder with gated cross-attention,
written to export as two methods of one program.

- `VisionEncoder(pixel_values [1,1,T,3,H,W], aspect_ratio_ids [1,1], aspect_ratio_mask [1,1,T])`
  runs the tiled ViT (local layers with intermediate outputs, gated global layers), the projector,
  and then every cross-attention layer's K/V projection and k-norm: the image state is one (K, V)
  pair per cross layer, [1, kv_heads, T * patches, head_dim] each, computed once per image.
- `TextDecoder(tokens [1,S], input_pos [S], cross_attention_mask [1,S,T], *image_state)` is the
  decoder with a static self-attention KV cache (buffers) and the cross layers reading the image
  state. A zero state with a zero mask turns every cross layer into the identity, exactly as
  transformers skips them on text-only turns.

Layout and arithmetic follow transformers' MllamaForConditionalGeneration (rotary half-split q/k,
its cross-attention masking: rows before the image attend everywhere, and only their MLP output is
masked), which tests/test_mllama.py uses as the oracle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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
class VisionArgs:
    dim: int = 1280
    n_layers: int = 32
    n_global_layers: int = 8
    n_heads: int = 16
    ffn_hidden: int = 5120
    image_size: int = 560
    patch_size: int = 14
    max_tiles: int = 4
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    norm_eps: float = 1e-5
    channels: int = 3

    @property
    def patches(self) -> int:  # per tile, with the class token
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        return self.dim * (len(self.intermediate_layers) + 1)

    @property
    def max_aspect_ratio_id(self) -> int:
        return sum(1 for a in range(1, self.max_tiles + 1) for b in range(1, self.max_tiles + 1) if a * b <= self.max_tiles)


@dataclass(frozen=True)
class TextArgs:
    dim: int = 4096
    n_layers: int = 40
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128_256
    ffn_hidden: int = 14_336
    cross_layers: tuple[int, ...] = (3, 8, 13, 18, 23, 28, 33, 38)
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=lambda: RopeScaling(factor=8.0))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class MllamaArgs:
    text: TextArgs
    vision: VisionArgs
    image_token_id: int = 128_256

    def to_dict(self) -> dict:
        return asdict(self)


IMAGE_TOKEN = "<|image|>"  # the tokenizer's image placeholder (id MllamaArgs.image_token_id)

# Published sizes (HF config.json of Llama-3.2-11B-Vision / -90B-Vision).
VISION_MODELS: dict[str, MllamaArgs] = {
    "11b-vision": MllamaArgs(TextArgs(), VisionArgs()),
    "90b-vision": MllamaArgs(
        TextArgs(dim=8192, n_layers=100, n_heads=64, n_kv_heads=8, ffn_hidden=28_672,
                 cross_layers=tuple(range(3, 100, 5))),
        VisionArgs()),
}


# ---- vision -----------------------------------------------------------------------------------


# Query rows per attention call in the vision encoder. One image is 4 tiles x 1608 patch rows
# (1601 padded to a multiple of 8): scores over all 6432 rows at once are [16 heads, 6432, 6432],
# 2.6 GB in fp32 with several such tensors live at once. In chunks of queries each call's scores
# are [16, chunk, 6432] and one chunk's memory is reused by the next; the arithmetic per row is the
# same. The attention is written out (matmul, scale, additive mask, softmax, matmul) rather than
# F.scaled_dot_product_attention, whose decomposition with a mask adds "safe softmax" ops (any,
# logical_not, where over the whole score tensor) that XNNPACK does not take: they ran on the
# portable CPU kernels and held extra score-sized tensors (bench/vision_encoder.py).
VISION_ATTENTION_CHUNK = 1024


def chunked_attention(q, k, v, mask, chunk: int | None = None):
    """softmax(q k^T / sqrt(d) + mask) v, `chunk` query rows at a time; mask [1, 1, n, m] is
    additive and finite. Batched 3-D matmuls (batch x heads folded): a 4-D matmul exports as
    expand + bmm, and ExecuTorch runs each expand as a full copy of the score tensor."""
    chunk = chunk or VISION_ATTENTION_CHUNK
    b, h, n, d = q.shape
    m = k.shape[2]
    scale = d ** -0.5
    q3, kt, v3 = q.reshape(b * h, n, d), k.reshape(b * h, m, d).transpose(1, 2), v.reshape(b * h, m, d)
    mask3 = mask.reshape(1, n, m)

    def attend(s: int, e: int):
        return torch.bmm(torch.softmax(torch.bmm(q3[:, s:e], kt) * scale + mask3[:, s:e], dim=-1), v3)

    out = attend(0, n) if n <= chunk else torch.cat([attend(s, min(s + chunk, n)) for s in range(0, n, chunk)], dim=1)
    return out.reshape(b, h, n, d)


class VisionLayer(nn.Module):
    def __init__(self, a: VisionArgs, gated: bool):
        super().__init__()
        self.n_heads, self.head_dim = a.n_heads, a.dim // a.n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(a.dim, a.dim, bias=False) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(a.dim, a.ffn_hidden), nn.Linear(a.ffn_hidden, a.dim)
        self.input_layernorm = nn.LayerNorm(a.dim, eps=a.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(a.dim, eps=a.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = chunked_attention(q, k, v, mask)
        h = self.o_proj(attn.transpose(1, 2).reshape(b, n, -1))
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.fc2(F.gelu(self.fc1(self.post_attention_layernorm(x))))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionEncoder(nn.Module):
    """Pixels -> per-cross-layer (K, V) of the projected image features."""

    def __init__(self, args: MllamaArgs):
        super().__init__()
        a, t = args.vision, args.text
        self.args = args
        self.patch_embedding = nn.Conv2d(a.channels, a.dim, a.patch_size, a.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(a.dim))
        n_ids = a.max_aspect_ratio_id + 1
        self.pos_embedding = nn.Parameter(torch.zeros(a.patches, a.dim))
        self.pos_gate = nn.Parameter(torch.zeros(1))
        self.tile_pos_embedding = nn.Embedding(n_ids, a.max_tiles * a.patches * a.dim)
        self.pre_tile_embedding = nn.Embedding(n_ids, a.max_tiles * a.dim)
        self.pre_tile_gate = nn.Parameter(torch.zeros(1))
        self.post_tile_embedding = nn.Embedding(n_ids, a.max_tiles * a.dim)
        self.post_tile_gate = nn.Parameter(torch.zeros(1))
        self.layernorm_pre = nn.LayerNorm(a.dim)
        self.layernorm_post = nn.LayerNorm(a.dim)
        self.layers = nn.ModuleList(VisionLayer(a, gated=False) for _ in range(a.n_layers))
        self.global_layers = nn.ModuleList(VisionLayer(a, gated=True) for _ in range(a.n_global_layers))
        self.projector = nn.Linear(a.output_dim, t.dim)
        self.cross_k = nn.ModuleList(nn.Linear(t.dim, t.n_kv_heads * t.head_dim, bias=False) for _ in t.cross_layers)
        self.cross_v = nn.ModuleList(nn.Linear(t.dim, t.n_kv_heads * t.head_dim, bias=False) for _ in t.cross_layers)
        self.cross_k_norm = nn.ModuleList(RMSNorm(t.head_dim, t.norm_eps) for _ in t.cross_layers)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor):
        a, t = self.args.vision, self.args.text
        tiles = pixel_values.shape[2]
        x = self.patch_embedding(pixel_values.reshape(tiles, a.channels, a.image_size, a.image_size))
        x = x.flatten(2).transpose(1, 2)  # [T, patches - 1, dim]
        ar = aspect_ratio_ids.reshape(1)
        x = x.reshape(1, tiles, -1, a.dim) + self.pre_tile_embedding(ar).reshape(1, a.max_tiles, 1, a.dim) * self.pre_tile_gate.tanh()
        x = torch.cat([self.class_embedding.expand(tiles, 1, a.dim), x.reshape(tiles, -1, a.dim)], dim=1)
        x = x.reshape(1, tiles, a.patches, a.dim) + (1 - self.pos_gate.tanh()) * self.pos_embedding
        x = x + self.pos_gate.tanh() * self.tile_pos_embedding(ar).reshape(1, a.max_tiles, a.patches, a.dim)
        x = self.layernorm_pre(x)
        pad = (8 - a.patches % 8) % 8
        length = a.patches + pad
        x = F.pad(x, (0, 0, 0, pad)).reshape(1, tiles * length, a.dim)
        mask = _tile_mask(aspect_ratio_mask.reshape(1, tiles), a.patches, length, x.dtype)
        intermediate = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, mask)
            if i in a.intermediate_layers:
                intermediate[i] = x
        x = self.layernorm_post(x).reshape(1, tiles, length, a.dim)
        x = x + self.post_tile_embedding(ar).reshape(1, a.max_tiles, 1, a.dim) * self.post_tile_gate.tanh()
        x = x.reshape(1, tiles * length, a.dim)
        for layer in self.global_layers:
            x = layer(x, mask)
        x = x.reshape(1, tiles, length, a.dim)[:, :, : a.patches]
        inter = torch.stack([intermediate[i] for i in a.intermediate_layers], dim=-1)
        inter = inter.reshape(1, tiles, length, -1)[:, :, : a.patches]
        features = self.projector(torch.cat([x, inter], dim=-1)).reshape(1, tiles * a.patches, t.dim)
        state = []
        for k_proj, v_proj, k_norm in zip(self.cross_k, self.cross_v, self.cross_k_norm):
            k = k_norm(k_proj(features).view(1, -1, t.n_kv_heads, t.head_dim).transpose(1, 2))
            v = v_proj(features).view(1, -1, t.n_kv_heads, t.head_dim).transpose(1, 2)
            state += [k, v]
        return tuple(state)


def _tile_mask(aspect_ratio_mask: torch.Tensor, patches: int, length: int, dtype) -> torch.Tensor:
    """Additive [1, 1, T*L, T*L] mask: padding tiles and padding patches attend nowhere real
    (transformers' _prepare_aspect_ratio_attention_mask)."""
    b, tiles = aspect_ratio_mask.shape
    m = aspect_ratio_mask.view(b, tiles, 1, 1).to(dtype).repeat(1, 1, length, 1)
    m[:, :, -(length - patches):] = 0  # as transformers writes it (no padding: -0 clears every row)
    inv = (1 - m).reshape(b, tiles * length, 1)
    return (inv @ inv.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)


# ---- text -------------------------------------------------------------------------------------


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SelfLayer(nn.Module):
    def __init__(self, t: TextArgs, context: int, cache: KVCacheSpec = KVCacheSpec()):
        super().__init__()
        self.t = t
        hd = t.head_dim
        self.q_proj = nn.Linear(t.dim, t.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(t.dim, t.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(t.dim, t.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(t.n_heads * hd, t.dim, bias=False)
        self.mlp = FeedForward(t.dim, t.ffn_hidden)
        self.input_layernorm = RMSNorm(t.dim, t.norm_eps)
        self.post_attention_layernorm = RMSNorm(t.dim, t.norm_eps)
        # [1, positions, kv_heads, head_dim]: the layout ExecuTorch's llama::update_cache and
        # llama::custom_sdpa take, as in the text models (aot.families.common.register_kv_cache).
        self.cache = cache
        register_kv_cache(self, cache, cache.length(context), t.n_kv_heads, hd)

    def forward(self, x, start_pos, cos, sin, slots=None):
        t, (b, s, _) = self.t, x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(b, s, t.n_heads, t.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, t.n_kv_heads, t.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, t.n_kv_heads, t.head_dim)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # rope in [b, heads, s, d]
        q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        attn = cached_attention(self, self.cache, q, k, v, start_pos, slots)
        x = x + self.o_proj(attn.reshape(b, s, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


def grouped_attention(q, k, v, mask):
    """Attention of q [1, H, S, D] over k, v [1, KV, T, D] (H = KV x rep) with an additive mask
    [1, 1, S, T], as batched 3-D matmuls per KV head: the rep query heads sharing a KV head are
    stacked as rows, so the image K/V are never repeated per query head (SDPA's enable_gqa exports
    as copies of them, 420 MB per token per cross layer at 11B) and every op is XNNPACK's."""
    _, h, s, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    rep = h // kv
    scores = torch.bmm(q.reshape(kv, rep * s, d), k.reshape(kv, t, d).transpose(1, 2)) * d ** -0.5
    probs = torch.softmax(scores.view(kv, rep, s, t) + mask[0], dim=-1)
    out = torch.bmm(probs.reshape(kv, rep * s, t), v.reshape(kv, t, d))
    # (one view straight to [1, h, s, d] merges and splits dims at once, which export cannot prove
    # for a symbolic s; split, then merge)
    return out.view(kv, rep, s, d).view(1, h, s, d)


class CrossLayer(nn.Module):
    def __init__(self, t: TextArgs):
        super().__init__()
        self.t = t
        self.q_proj = nn.Linear(t.dim, t.n_heads * t.head_dim, bias=False)
        self.o_proj = nn.Linear(t.n_heads * t.head_dim, t.dim, bias=False)
        self.q_norm = RMSNorm(t.head_dim, t.norm_eps)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = FeedForward(t.dim, t.ffn_hidden)
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        self.input_layernorm = RMSNorm(t.dim, t.norm_eps)
        self.post_attention_layernorm = RMSNorm(t.dim, t.norm_eps)

    def forward(self, x, k, v, mask, row_mask):
        t, (b, s, _) = self.t, x.shape
        q = self.q_norm(self.q_proj(self.input_layernorm(x)).view(b, s, t.n_heads, t.head_dim).transpose(1, 2))
        attn = grouped_attention(q, k, v, mask)
        x = x + self.attn_gate.tanh() * self.o_proj(attn.transpose(1, 2).reshape(b, s, -1))
        h = row_mask * self.mlp(self.post_attention_layernorm(x))
        return x + self.mlp_gate.tanh() * h


def rope_tables(t: TextArgs, max_context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_context_len, head_dim] (half-split layout, llama3 frequency scaling)."""
    angles = rope_angles(t.head_dim, t.rope_theta, t.rope_scaling, max_context_len)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


class TextDecoder(nn.Module):
    def __init__(self, args: MllamaArgs, max_context_len: int, cache: KVCacheSpec = KVCacheSpec()):
        super().__init__()
        t = args.text
        self.args, self.context, self.cache = args, max_context_len, cache
        self.embed_tokens = nn.Embedding(t.vocab_size + 8, t.dim)
        self.layers = nn.ModuleList(CrossLayer(t) if i in t.cross_layers else SelfLayer(t, max_context_len, cache)
                                    for i in range(t.n_layers))
        self.norm = RMSNorm(t.dim, t.norm_eps)
        self.lm_head = nn.Linear(t.dim, t.vocab_size, bias=False)
        load_custom_ops()  # llama::update_cache and llama::custom_sdpa (eager and export)
        cos, sin = rope_tables(t, max_context_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, input_pos, cross_attention_mask, *image_state):
        a = self.args
        x = self.embed_tokens(tokens)
        s = tokens.shape[1]
        start_pos = input_pos[0].item()  # input_pos holds start_pos .. start_pos + S - 1
        torch._check(start_pos >= 0)
        torch._check(start_pos + s <= self.context)
        cos = self.rope_cos.index_select(0, input_pos)[None, None]  # [1, 1, S, head_dim]
        sin = self.rope_sin.index_select(0, input_pos)[None, None]
        # transformers' _prepare_cross_attention_mask: per text row, tiles it may see (each tile's
        # patches); rows that see none attend everywhere, and only their MLP output is masked out.
        patches = a.vision.patches
        allowed = cross_attention_mask.repeat_interleave(patches, dim=2)[:, None]  # [1, 1, S, T*P]
        min_value = torch.finfo(x.dtype).min
        cross = (1.0 - allowed) * min_value
        row_mask = (allowed.sum(-1, keepdim=True) > 0).to(x.dtype)  # [1, 1, S, 1]
        cross = cross * row_mask
        row_mask = row_mask[:, 0]  # [1, S, 1]
        cross_i = 0
        slots = ring_slots(self.cache, self.cache.length(self.context), start_pos, s)
        for layer in self.layers:
            if isinstance(layer, CrossLayer):
                k, v = image_state[2 * cross_i], image_state[2 * cross_i + 1]
                x = layer(x, k, v, cross, row_mask)
                cross_i += 1
            else:
                x = layer(x, start_pos, cos, sin, slots)
        return self.lm_head(self.norm(x))[:, -1]

    def reset_cache(self):
        for layer in self.layers:
            if isinstance(layer, SelfLayer):
                reset_kv_cache(layer)


def zero_image_state(args: MllamaArgs, tiles: int | None = None) -> tuple[torch.Tensor, ...]:
    """The state of a text-only turn: with a zero mask, every cross layer is the identity."""
    t, tiles = args.text, tiles or args.vision.max_tiles
    shape = (1, t.n_kv_heads, tiles * args.vision.patches, t.head_dim)
    return tuple(torch.zeros(shape) for _ in range(2 * len(t.cross_layers)))


class Mllama(nn.Module):
    def __init__(self, args: MllamaArgs, max_context_len: int, cache: KVCacheSpec = KVCacheSpec()):
        super().__init__()
        self.args = args
        self.vision = VisionEncoder(args)
        self.text = TextDecoder(args, max_context_len, cache)


