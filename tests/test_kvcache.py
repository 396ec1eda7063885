"""The KV cache both decoders attend through (aot.families.common): int8 storage with ExecuTorch's
quantized-cache ops, and the attention sink's ring, checked in eager mode against references
that attend over the whole history with an explicitly built mask."""

from __future__ import annotations

import pytest
import torch

import aot.families.common as common
from aot.config import build_config
from aot.errors import ConfigError
from aot.families.common import KVCacheSpec, random_init_
from aot.families.text.model import MODELS, Transformer

ARGS = MODELS["tiny"]
IDS = torch.randint(0, ARGS.vocab_size, (1, 150), generator=torch.Generator().manual_seed(0))


def model(spec: KVCacheSpec, context: int = 160) -> Transformer:
    m = Transformer(ARGS, context, full_logits=True, cache=spec)
    random_init_(m, 0)
    m.reset_cache()
    return m.eval()


def logits(m: Transformer, chunk: int = 16, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([m(ids[:, p : p + chunk], torch.tensor([p]))[0] for p in range(0, ids.shape[1], chunk)])


def sliding_reference(sink: int, window: int, monkeypatch) -> torch.Tensor:
    """The full-cache model, each query attending to positions < sink and the last `window`
    positions: the mask written out position by position, the cache never wrapped."""

    def attend(module, spec, q, k, v, start_pos, slots=None):
        S, T = q.shape[1], module.k_cache.shape[1]
        torch.ops.llama.update_cache(k, module.k_cache, start_pos)
        torch.ops.llama.update_cache(v, module.v_cache, start_pos)
        mask = torch.full((S, T), float("-inf"))
        for i in range(S):
            p = start_pos + i
            for j in range(p + 1):
                if j < sink or p - j < window:
                    mask[i, j] = 0.0
        return torch.ops.llama.custom_sdpa(q, module.k_cache, module.v_cache, 0, mask, 0, False)

    monkeypatch.setattr("aot.families.text.model.cached_attention", attend)
    return logits(model(KVCacheSpec()))


def test_int8_cache_agrees_with_fp32():
    fp32, int8 = logits(model(KVCacheSpec())), logits(model(KVCacheSpec("int8")))
    assert (fp32.argmax(-1) == int8.argmax(-1)).float().mean() >= 0.99
    assert (fp32 - int8).abs().max() < 0.05 * fp32.abs().max()
    assert not torch.equal(fp32, int8)  # it is quantized


def test_int8_cache_stores_int8_with_scales():
    m = model(KVCacheSpec("int8"))
    a = m.layers[0].attention
    assert a.k_cache.dtype == torch.int8 and a.k_cache_scales.dtype == torch.float32
    assert a.k_cache_zero_points.dtype == torch.int8 and a.k_cache_scales.shape == (1, 160, ARGS.n_kv_heads, 1)
    logits(m, ids=IDS[:, :10])
    assert a.k_cache[0, :10].abs().sum() > 0 and a.k_cache[0, 10:].abs().sum() == 0


def test_a_ring_wider_than_the_sequence_is_the_full_cache():
    full = logits(model(KVCacheSpec()))
    ring = logits(model(KVCacheSpec("fp32", 4, 200, 16)))
    torch.testing.assert_close(ring, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sink,window", [(4, 24), (0, 32), (1, 17)])
def test_the_ring_attends_to_the_sink_and_the_window(sink, window, monkeypatch):
    ring = model(KVCacheSpec("fp32", sink, window, 16))
    assert ring.layers[0].attention.k_cache.shape[1] == sink + window + 16  # fixed, far below 150 positions
    got = logits(ring)
    torch.testing.assert_close(got, sliding_reference(sink, window, monkeypatch), atol=1e-5, rtol=1e-5)


def test_ring_chunks_do_not_change_the_result():
    spec = KVCacheSpec("fp32", 4, 24, 16)
    torch.testing.assert_close(logits(model(spec), chunk=16), logits(model(spec), chunk=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model(spec), chunk=16), logits(model(spec), chunk=7), atol=1e-5, rtol=1e-5)


def test_int8_ring_agrees_with_fp32_ring():
    fp32, int8 = logits(model(KVCacheSpec("fp32", 4, 24, 16))), logits(model(KVCacheSpec("int8", 4, 24, 16)))
    assert (fp32.argmax(-1) == int8.argmax(-1)).float().mean() >= 0.99


def test_bytes_per_position():
    # Llama 3.2 1B: 16 layers, 8 KV heads of 64: 64 KiB per position in fp32, 17.25 KiB in int8
    assert KVCacheSpec("fp32").bytes_per_position(16, 8, 64) == 64 * 1024
    assert KVCacheSpec("int8").bytes_per_position(16, 8, 64) == 2 * 16 * 8 * (64 + 5)
    assert KVCacheSpec("int8").bytes_per_position(16, 8, 64) * 131072 / 2**30 == pytest.approx(2.156, abs=1e-3)


@pytest.mark.parametrize("fields,message", [
    (dict(kv_cache="int4"), "--kv-cache int4: --delegate xnnpack takes fp32, int8"),
    (dict(kv_cache="fp32", delegate="qnn"), "--kv-cache fp32: --delegate qnn takes int8, int16"),
    (dict(kv_bits=8, kv_cache="int16", delegate="qnn"), "--kv-bits 8 and --kv-cache int16 disagree"),
    (dict(kv_cache="int8", quant="bf16"), "a --quant bf16 build keeps its cache in bf16"),
    (dict(attention_sink="4"), "--attention-sink takes SINK,WINDOW"),
    (dict(attention_sink="-1,8"), "SINK must be >= 0 and WINDOW >= 1"),
    (dict(attention_sink="4,2000"), "cover the whole context (2048)"),
    (dict(attention_sink="4,256", delegate="qnn"), "attention sinks are for --delegate xnnpack"),
])
def test_cache_flags_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config("/tmp/out", model="demo", **fields)


def test_kv_bits_is_the_old_spelling_of_kv_cache():
    old, new = build_config("/tmp/o", model="demo", delegate="qnn", kv_bits=8), \
        build_config("/tmp/o", model="demo", delegate="qnn", kv_cache="int8")
    assert (old.kv_bits, old.kv_cache) == (new.kv_bits, new.kv_cache) == (8, "int8")
    assert old.kv_cache_spec() == KVCacheSpec()  # the NPU quantizer stores its own cache


def test_spec_from_flags():
    cfg = build_config("/tmp/o", model="demo", kv_cache="int8", attention_sink="4,1024", max_seq_len=64)
    assert cfg.kv_cache_spec() == KVCacheSpec("int8", 4, 1024, 64)
    assert cfg.kv_cache_spec().length(cfg.max_context_len) == 4 + 1024 + 64
    assert build_config("/tmp/o", model="demo").kv_cache_spec() == KVCacheSpec()
    assert build_config("/tmp/o", model="demo", quant="bf16").kv_storage == "bf16"
    assert common.KV_STORAGE == ("fp32", "int8")
