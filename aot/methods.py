"""A program's methods: a name, an export-friendly module, example inputs, dynamic shapes.

Text models have `forward`, vision models `vision_encoder`/`text_decoder` (aot/families), and
static-shape NPU delegates turn `forward` into `prefill`/`decode` (aot/backends/static.py). Export,
lowering and bundling only ever see a list of these.
"""

from __future__ import annotations

import inspect
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


def export_methods(methods: list[Method], weights_tag: str | None = None) -> dict[str, ExportedProgram]:
    """torch.export each method; with `weights_tag`, its weights are tagged for a named-data file
    of that name (tag_weights)."""
    programs = {}
    if weights_tag is not None and len(methods) > 1:
        # The emitter names a non-delegated external constant by its FQN, and one data file holds
        # every method's: the vision encoder's and the text decoder's `layers.0.*` would collide.
        methods = [_under_its_name(m) for m in methods]
    for m in methods:
        try:
            with torch.no_grad():
                # torchao's tensor subclasses stay as they are here: to_edge_transform_and_lower's
                # first step is run_decompositions({}), which turns them into quantize/dequantize
                # ops. Doing it here as well cost a second pass over the graph (about 5% of a
                # build) and a second program alive during lowering.
                programs[m.name] = torch.export.export(
                    m.module, m.example_inputs, dynamic_shapes=m.dynamic_shapes, strict=False)
                if weights_tag is not None:
                    programs[m.name] = tag_weights(programs[m.name], weights_tag)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BuildError(f"torch.export of method '{m.name}' failed: {msg}") from e
    return programs


def tag_weights(ep: ExportedProgram, tag: str) -> ExportedProgram:
    """`ep` with its weights tagged `tag` (node.meta["custom"]["delegate_constant_tag"], which
    XNNPACK reads for the weights it packs and aot.pipeline's emitter callback for the constants it
    keeps). torchao's quantized weights are tensor subclasses that torch.export flattens into plain
    placeholders only when decomposing, so the program is decomposed first (to_edge's own first
    step; done again there, it finds nothing left to do) and those placeholders are tagged.

    Only weights are tagged: parameters and persistent buffers. Non-persistent buffers (the rope
    tables, masks) follow from the context length and stay in the program, so one weights file
    serves every context and KV-cache type of a model and recipe. An unmerged LoRA adapter's
    weights (aot.adapters.LoRALinear's lora_a/lora_b) stay in the program too: the weights file is
    the foundation every adapter's program shares."""
    from torch.export.graph_signature import InputKind

    ep = ep.run_decompositions({})
    mutated = set(ep.graph_signature.buffers_to_mutate.values())  # the KV cache is state, not weights
    weights = {s.arg.name for s in ep.graph_signature.input_specs
               if (s.kind == InputKind.PARAMETER or (s.kind == InputKind.BUFFER and s.persistent))
               and s.target not in mutated and not _is_adapter_weight(s.target)}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in weights:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = tag
    return ep


def _is_adapter_weight(target: str | None) -> bool:
    parts = (target or "").split(".")
    return "lora_a" in parts or "lora_b" in parts


class _Named(nn.Module):
    """`module` as the attribute `name`: its weights' FQNs start with the method's name."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.add_module(name, module)
        self._method = name

    def forward(self, *args):
        return getattr(self, self._method)(*args)


def _under_its_name(m: Method) -> Method:
    shapes = m.dynamic_shapes
    if shapes is not None:
        # _Named.forward takes one *args: the shapes of every positional input, those of the
        # module's own *args (one tuple, last, in its dynamic_shapes) spread out among them
        kinds = [p.kind for p in inspect.signature(m.module.forward).parameters.values()]
        if inspect.Parameter.VAR_POSITIONAL in kinds:
            k = kinds.index(inspect.Parameter.VAR_POSITIONAL)
            shapes = (*shapes[:k], *shapes[k])
        shapes = (tuple(shapes),)
    return Method(m.name, _Named(m.name, m.module), m.example_inputs, shapes, m.signature)
