"""Meta's prequantized Llama 3.2 checkpoints (`Llama3.2-1B-Instruct-SpinQuant_INT4_EO8` style).

Layout (Meta's consolidated.00.pth, as ExecuTorch's pre_quantization.py reads it): every quantized
module `X` stores `X.weight` as int8 holding the integer values and `X.scales` (float) beside it,
with optional all-zero `X.zeros` (symmetric):
- linear layers of the blocks: 4-bit values in [-8, 7], scales [out, in / group] (group 32);
- `output`: 8-bit per output channel, scales [vocab] (8da8w), or 4-bit groupwise like the linears;
- `tok_embeddings`: 8-bit per row, scales [vocab] (or groupwise [vocab, dim / group]);
- norms in float. params.json has `quantization_args` (`group_size`, and `spinquant: true` when
  the checkpoint was rotated: R1/R2 are already fused, R4 is applied online before w2).

The integers and scales go straight into torchao's IntxUnpackedToInt8Tensor, the tensor aot's own
quantization produces, so export and lowering are the same as for `--quant 8da4w`; nothing is
dequantized or requantized. 4-bit scales are rounded to bf16, which is what XNNPACK's blockwise
kernels store (as aot does for its own 8da4w), so the eager model computes what the device does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from aot.errors import CheckpointError
from aot.quant import LayerQuant, QuantPlan
from aot.quant.rotation import add_online_r4

_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@dataclass(frozen=True)
class Prequantized:
    group_size: int  # of the 4-bit linears
    output: str  # "8da8w" or "8da4w"
    embedding_bits: int  # 8 or 4
    embedding_group_size: int  # 0: per row
    spinquant: bool  # rotated: R4 online before w2

    def to_dict(self) -> dict:
        return asdict(self)

    def plan(self):
        dyn = "int8-dynamic"
        output = LayerQuant(8, 0, dyn) if self.output == "8da8w" else LayerQuant(4, self.group_size, dyn)
        return QuantPlan(
            scheme="spinquant" if self.spinquant else "8da4w",
            dtype="float32",
            linear=LayerQuant(4, self.group_size, dyn),
            embedding=LayerQuant(self.embedding_bits, self.embedding_group_size, "none"),
            output=output,
        )


def detect(sd: dict, params: dict, file) -> Prequantized | None:
    """What a Meta checkpoint holds, or None when it is a plain float checkpoint."""
    if not any(k.endswith(".scales") for k in sd):
        return None
    problems = []
    qargs = params.get("quantization_args") or {}
    group = None
    if params.get("lora_args") and qargs.get("spinquant"):
        problems.append("it carries both SpinQuant rotations and QLoRA adaptors (lora_args); Meta releases one or the other")
    for name in [k for k in sd if k.endswith(".scales") and k.startswith("layers.")]:
        w, s = sd.get(name.removesuffix(".scales") + ".weight"), sd[name]
        if w is None or w.dtype != torch.int8 or s.dim() != 2 or w.shape[1] % s.shape[1]:
            problems.append(f"{name}: expected int8 weights with [out, in / group] scales")
            break
        g = w.shape[1] // s.shape[1]
        if group not in (None, g):
            problems.append(f"{name}: group {g}, other layers use {group}")
            break
        group = g
    if group is None:
        problems.append("no quantized linear layers (layers.*.scales)")
    elif qargs.get("group_size") not in (None, group):
        problems.append(f"params.json quantization_args.group_size {qargs['group_size']} but the weights use {group}")
    out_s = sd.get("output.scales")
    if out_s is None:
        problems.append("output.weight is not quantized (no output.scales)")
    output = "8da8w" if out_s is not None and (out_s.dim() == 1 or out_s.shape[-1] == 1) else "8da4w"
    emb_w, emb_s = sd.get("tok_embeddings.weight"), sd.get("tok_embeddings.scales")
    if emb_s is None or emb_w is None or emb_w.dtype != torch.int8:
        problems.append("tok_embeddings is not quantized (no int8 weight with tok_embeddings.scales)")
        emb_bits, emb_group = 8, 0
    else:
        per_row = emb_s.dim() == 1 or emb_s.shape[-1] == 1
        emb_group = 0 if per_row else emb_w.shape[1] // emb_s.shape[-1]
        emb_bits = 4 if -8 <= int(emb_w.min()) and int(emb_w.max()) <= 7 and not per_row else 8
    if problems:
        raise CheckpointError(f"{file}: a prequantized checkpoint aot cannot read: {'; '.join(problems)}")
    return Prequantized(group, output, emb_bits, emb_group, bool(qargs.get("spinquant", False)))


def _tensor(qdata: torch.Tensor, scales: torch.Tensor, bits: int, dynamic: bool, name: str):
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActQuant,
    )

    rows, cols = qdata.shape
    scales = scales.reshape(rows, -1)
    group = cols // scales.shape[1]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    qmin, qmax = int(qdata.min()), int(qdata.max())
    if qmin < lo or qmax > hi:
        raise CheckpointError(f"{name}: values span [{qmin}, {qmax}], outside {bits}-bit [{lo}, {hi}]")
    scale_dtype = torch.bfloat16 if bits == 4 and dynamic and scales.shape[1] > 1 else torch.float32
    return IntxUnpackedToInt8Tensor(
        qdata=qdata.contiguous(),
        scale=scales.to(scale_dtype).contiguous(),
        zero_point=torch.zeros(scales.shape, dtype=torch.int8),
        target_dtype=getattr(torch, f"int{bits}"),
        block_size=(1, group),
        dtype=torch.float32,
        activation_quantization=ActQuant.INT8_ASYM_PER_TOKEN if dynamic else None,
    )


def load_quantized(model, sd: dict, info: Prequantized, file) -> set[str]:
    """Put every quantized tensor of `sd` into `model` (and R4, for SpinQuant); returns the
    checkpoint names it consumed."""

    modules = dict(model.named_modules())
    targets = [(f"layers.{i}.{lin}", 4, True) for i in range(model.args.n_layers) for lin in _LINEARS]
    targets.append(("output", 8 if info.output == "8da8w" else 4, True))
    targets.append(("tok_embeddings", info.embedding_bits, False))
    used = set()
    for fqn, bits, dynamic in targets:
        w, s = sd.get(f"{fqn}.weight"), sd.get(f"{fqn}.scales")
        if w is None or s is None:
            raise CheckpointError(f"{file}: {fqn} is not quantized like the rest ({fqn}.weight/.scales missing)")
        module = modules[fqn]
        if tuple(w.shape) != tuple(module.weight.shape):
            raise CheckpointError(f"{file}: {fqn}.weight is {list(w.shape)}, the model expects {list(module.weight.shape)}")
        zeros = sd.get(f"{fqn}.zeros")
        if zeros is not None and bool(zeros.any()):
            raise CheckpointError(f"{file}: {fqn}.zeros is not all zero; aot reads symmetric prequantized weights only")
        module.weight = nn.Parameter(_tensor(w, s, bits, dynamic, f"{file}: {fqn}"), requires_grad=False)
        used.update(k for k in (f"{fqn}.weight", f"{fqn}.scales", f"{fqn}.zeros") if k in sd)
    if info.spinquant:
        add_online_r4(model)
    return used
