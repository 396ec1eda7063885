"""A model family yields methods: a name, an export-friendly module, example inputs, dynamic shapes.

Text models have `forward`; vision models will add `vision_encoder`/`text_decoder`, and static-shape
NPU delegates `prefill`/`decode`. Export, lowering and bundling only ever see a list of these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from aot.errors import BuildError


@dataclass
class Method:
    name: str
    module: nn.Module
    example_inputs: tuple
    dynamic_shapes: tuple | None
    signature: dict  # human-readable inputs/output, recorded in bundle.json


def text_methods(model: nn.Module, max_seq_len: int) -> list[Method]:
    """`forward(tokens [1, S], input_pos [1]) -> logits`, S dynamic in 1..max_seq_len."""
    example_len = min(max_seq_len, 8)
    tokens = torch.zeros((1, example_len), dtype=torch.long)
    input_pos = torch.zeros((1,), dtype=torch.long)
    dynamic = ({1: Dim("seq_len", min=1, max=max_seq_len)}, None) if max_seq_len > 1 else None
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).removeprefix("torch.")
    logits = f"[1, S, {model.args.vocab_size}]" if model.full_logits else f"[1, {model.args.vocab_size}]"
    signature = {
        "inputs": [f"tokens int64 [1, S], 1 <= S <= {max_seq_len}", "input_pos int64 [1]"],
        "output": f"logits {dtype} {logits}",
    }
    return [Method("forward", model, (tokens, input_pos), dynamic, signature)]


def export_methods(methods: list[Method]) -> dict[str, ExportedProgram]:
    programs = {}
    for m in methods:
        try:
            with torch.no_grad():
                # torchao's tensor subclasses stay as they are here: to_edge_transform_and_lower's
                # first step is run_decompositions({}), which turns them into quantize/dequantize
                # ops. Doing it here as well cost a second pass over the graph (about 5% of a
                # build) and a second program alive during lowering.
                programs[m.name] = torch.export.export(
                    m.module, m.example_inputs, dynamic_shapes=m.dynamic_shapes, strict=False)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BuildError(f"torch.export of method '{m.name}' failed: {msg}") from e
    return programs
