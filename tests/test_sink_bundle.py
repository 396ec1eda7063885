"""Bundles with an int8 KV cache and an attention sink, through ExecuTorch's runtime: the ring is
the size bundle.json and the memory plan say, the stock TextLLMRunner and the python engine run
past the ring to the context limit and agree, and the program computes what the eager model with
the same cache computes."""

from __future__ import annotations

import pytest
import torch

from aot.bundle import open_bundle
from aot.families.common import KVCacheSpec
from aot.families.text.family import TextFamily
from aot.families.text.model import Transformer
from aot.native import native_output_silenced
from aot.runner.engines import PythonEngine, StockEngine
from conftest import CTX, SEQ, _build
from test_context_limit import WORDS

SINK, WINDOW = 2, 16
RING = SINK + WINDOW + SEQ  # 34 of the 64 positions


@pytest.fixture(scope="session")
def bundle_int8_sink(hf_ckpt, tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("bundles") / "int8-sink", hf_ckpt, "--quant", "none",
                  "--kv-cache", "int8", "--attention-sink", f"{SINK},{WINDOW}")


def test_bundle_json_and_the_plan_give_the_ring(bundle_int8_sink):
    m = open_bundle(bundle_int8_sink["path"]).manifest
    assert m["export"]["attention_sink"] == {"sink": SINK, "window": WINDOW, "ring_slots": WINDOW + SEQ}
    assert m["export"]["kv_cache"]["storage"] == "int8" and m["export"]["kv_cache"]["positions"] == RING
    assert m["export"]["max_context_len"] == CTX  # the runner's limit: positions, not slots
    buffers = {b["name"]: b for b in m["memory_plan"]["methods"]["forward"]["mutable_buffers"]}
    k = buffers["layers.{i}.attention.k_cache"]
    assert k["dtype"] == "int8" and k["shape"][1] == RING


def test_runners_go_past_the_ring_to_the_context_and_agree(bundle_int8_sink):
    b = open_bundle(bundle_int8_sink["path"])
    stock = StockEngine(b).generate(WORDS, 200)
    python = PythonEngine(b).generate(WORDS, 200)
    assert stock.stop_reason == python.stop_reason == "context"
    assert stock.prompt_tokens + stock.generated_tokens == CTX > RING
    assert stock.text == python.text


def test_the_program_computes_the_eager_ring(bundle_int8_sink, hf_ckpt):
    b = open_bundle(bundle_int8_sink["path"])
    engine = PythonEngine(b)
    ids = torch.randint(0, 1000, (CTX,), generator=torch.Generator().manual_seed(3)).tolist()
    model = Transformer(TextFamily().reference_checkpoint(hf_ckpt).args, CTX, full_logits=True,
                        cache=KVCacheSpec("int8", SINK, WINDOW, SEQ))
    model.load_state_dict(TextFamily().reference(hf_ckpt, CTX).state_dict(), strict=False)
    model.reset_cache()
    with torch.no_grad(), native_output_silenced():
        want = torch.cat([model(torch.tensor([ids[p : p + SEQ]]), torch.tensor([p]))[0] for p in range(0, CTX, SEQ)])
        got = torch.cat([engine.score_chunk(ids[p : p + SEQ], p) for p in range(0, CTX, SEQ)])
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.95
    assert (want - got).abs().max() < 0.05 * want.abs().max()
