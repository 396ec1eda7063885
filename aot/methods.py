"""A program's methods: a name, an export-friendly module, example inputs, dynamic shapes.

Text models have `forward`, vision models `vision_encoder`/`text_decoder` (aot/families), and
static-shape NPU delegates turn `forward` into `prefill`/`decode` (aot/backends/static.py). Export,
lowering and bundling only ever see a list of these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.export import ExportedProgram

from aot.errors import BuildError


@dataclass
class Method:
    name: str
    module: nn.Module
    example_inputs: tuple
    dynamic_shapes: tuple | None
    signature: dict  # human-readable inputs/output, recorded in bundle.json


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
