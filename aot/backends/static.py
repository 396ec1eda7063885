"""Static-shape NPU flow shared by QNN and MediaTek: two fixed graphs sharing one KV cache.

The flow is the backends' own prepare step (`StaticShapeBackend.prepare`), so the pipeline never
branches on it. NPUs compile fixed shapes. The model in static-attention form (aot.families.text
.model) is exported twice: a
`prefill` method taking a chunk of exactly `prefill_len` tokens and a `decode` method taking one,
both writing and reading the same k/v cache buffers at the positions they are given. The
delegate's PT2E quantizer annotates each graph; each is calibrated on what it will see on the
device (prefill on chunks of calibration text, decode on the tokens that follow), converted, and the
converted pair is either run on the host (fake-quant simulation: `aot simulate`) or lowered.

A text of n tokens runs as the device runs it: its first `prefill_len` tokens in one prefill call,
then one decode call per remaining token.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
from torch import fx

from aot.backends.base import Backend
from aot.errors import ConfigError
from aot.families import Program
from aot.methods import Method
from aot.native import native_output_silenced
from aot.texts import text_file
from aot.tokenizer import load_tokenizer

PREFILL, DECODE = "prefill", "decode"


@dataclass
class StaticPair:
    """The prefill and decode graphs of one model (exported, prepared or converted)."""

    prefill: fx.GraphModule
    decode: fx.GraphModule
    prefill_len: int

    def caches(self):
        """(name, tensor) of prefill's k/v cache buffers (decode's are the same tensors)."""
        return ((name, buf) for name, buf in self.prefill.named_buffers() if name.endswith(("k_cache", "v_cache")))

    def share_cache(self) -> None:
        """Point decode's k/v cache buffers at prefill's, so both methods read one cache."""
        for name, buf in self.caches():
            owner, _, attr = name.rpartition(".")
            setattr(self.decode.get_submodule(owner) if owner else self.decode, attr, buf)

    def reset_cache(self) -> None:
        for _, buf in self.caches():
            buf.zero_()

    @torch.no_grad()
    def run(self, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab]: one prefill of the first prefill_len tokens, then decode."""
        P = self.prefill_len
        assert len(ids) >= P, (len(ids), P)
        self.reset_cache()
        out = [self.prefill(torch.tensor([ids[:P]]), torch.tensor([0]))]
        for pos in range(P, len(ids)):
            out.append(self.decode(torch.tensor([[ids[pos]]]), torch.tensor([pos])))
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in out])


def export_static(model, prefill_len: int) -> StaticPair:
    """torch.export the prefill and decode graphs of `model` (in static-attention form)."""
    assert model.static
    graphs = {}
    for name, length in ((PREFILL, prefill_len), (DECODE, 1)):
        example = (torch.zeros((1, length), dtype=torch.long), torch.tensor([0]))
        with torch.no_grad():
            graphs[name] = torch.export.export(model, example, strict=False).module()
    pair = StaticPair(graphs[PREFILL], graphs[DECODE], prefill_len)
    pair.share_cache()
    return pair


def quantize_static(pair: StaticPair, backend, scheme: str, group_size: int, kv_bits: int | None,
                    windows: list[list[int]], stages) -> StaticPair:
    """PT2E prepare both graphs with `backend`'s quantizer, calibrate them on `windows` as the
    device would run them, convert.

    The quantizer is made per graph (block-wise recipes name the graph's nodes). Calibration runs
    every window through prefill and decode, so each graph's observers see the activations of its
    own shape.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    label = f"{backend.name} {scheme}" + (f" g{group_size}" if scheme.endswith("-block") else "")
    label += f", {kv_bits}-bit KV cache" if kv_bits else ""
    with stages.stage("quantize", label), contextlib.redirect_stdout(io.StringIO()):
        # QnnQuantizer prints a line per op it leaves in float (repeat_interleave, type_as).
        prepared = StaticPair(*(prepare_pt2e(gm, backend.quantizer(scheme, gm.graph, group_size, kv_bits))
                                for gm in (pair.prefill, pair.decode)), pair.prefill_len)
    prepared.share_cache()
    steps = sum(len(w) - pair.prefill_len + 1 for w in windows)
    with stages.stage("calibrate", f"{len(windows)} windows, {steps} prefill/decode calls"), native_output_silenced():
        done = 0
        for window in windows:
            prepared.run(window)
            done += len(window) - pair.prefill_len + 1
            stages.progress(done, steps)
    with stages.stage("convert"):
        converted = StaticPair(convert_pt2e(prepared.prefill), convert_pt2e(prepared.decode), pair.prefill_len)
        converted.share_cache()
    return converted


# ---- aot build --delegate qnn|mediatek ---------------------------------------------------------

CALIBRATION_WINDOWS = 8


def windows_from(ids: list[int], length: int, count: int) -> list[list[int]]:
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:count]


def calibration_ids(src, cfg, length: int) -> tuple[list[list[int]], dict]:
    """Calibration windows for a build: --calibration text (default: the demo held-out text)
    through the model's tokenizer, or seeded random tokens when there is no tokenizer."""
    if src.tokenizer is None:
        g = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(0, src.args.vocab_size, (CALIBRATION_WINDOWS * length,), generator=g).tolist()
        return windows_from(ids, length, CALIBRATION_WINDOWS), {"file": None, "random_tokens_seed": cfg.seed}
    path = text_file(cfg.calibration)
    tok, _ = load_tokenizer(src.tokenizer.path)
    ids = [src.bos_id] + list(tok.encode(path.read_text(errors="replace"), 0, 0))
    windows = windows_from(ids, length, CALIBRATION_WINDOWS)
    if not windows:
        raise ConfigError(f"--calibration {path}: has {len(ids)} tokens, fewer than one window of {length}")
    return windows, {"file": str(path), "windows": len(windows), "tokens_each": length}


class StaticShapeBackend(Backend):
    """A delegate that compiles fixed shapes (NPUs): its prepare step turns the family's dynamic
    `forward` into `prefill` (max_seq_len tokens) and `decode` (1 token) methods sharing the KV
    cache, quantized by the delegate's PT2E quantizer (`quantizer`) and calibrated on text. The
    family loads the model in fp32 for it (quantizes_at_load is False)."""

    static_shapes = True
    quantizes_at_load = False

    def quantizer(self, scheme: str, graph, group_size: int, kv_bits: int | None):
        """The delegate's PT2E quantizer for one exported graph."""
        raise NotImplementedError

    def input_files(self, cfg, src) -> list:
        """The PT2E calibration text is an input of the build (its sha256 is recorded)."""
        return [text_file(cfg.calibration).absolute()] if src.tokenizer is not None else []

    def prepare(self, program: Program, model, src, cfg, stages) -> Program:
        """Quantize and calibrate the prefill/decode pair; the methods are the converted graphs
        (the pipeline exports them) and the calibration record goes into bundle.json's target."""
        program.methods.clear()  # `forward` is replaced by the pair
        P, ctx = cfg.max_seq_len, cfg.max_context_len
        model.use_static_attention()
        with stages.stage("export", f"prefill [1, {P}], decode [1, 1]"):
            pair = export_static(model, P)
        windows, record = calibration_ids(src, cfg, min(ctx, 2 * P))
        pair = quantize_static(pair, self, cfg.quant.scheme, cfg.quant.group_size, cfg.kv_bits, windows, stages)
        logits = f"[1, S, {src.args.vocab_size}]" if cfg.full_logits else f"[1, {src.args.vocab_size}]"
        methods = []
        for name, gm, length in ((PREFILL, pair.prefill, P), (DECODE, pair.decode, 1)):
            example = (torch.zeros((1, length), dtype=torch.long), torch.tensor([0]))
            methods.append(Method(name, gm, example, None, {
                "inputs": [f"tokens int64 [1, {length}]", "input_pos int64 [1]"],
                "output": f"logits float32 {logits.replace('S', str(length))}",
                "kv_cache": f"shared with {DECODE if name == PREFILL else PREFILL}, {ctx} positions",
            }))
        return Program(methods, share_mutable_buffers=True, target={"calibration": record},
                       label="quantized prefill, decode")
