"""MediaTek APU through ExecuTorch's NeuroPilot delegate.

Lowering needs MediaTek's NeuroPilot SDK (`mtk_converter` and `mtk_neuron`, which cannot be installed
from the public registries); aot detects them and stops `aot build --delegate mediatek` before
loading anything, saying what to install. The quantizer, `NeuropilotQuantizer`, is pure Python, but
`executorch.backends.mediatek` imports the partitioner (and so `mtk_converter`) in its __init__:
`neuropilot_quantizer()` loads the quantizer package without running that __init__, so the recipe
is simulated on the host (`aot simulate --delegate mediatek`) with no SDK.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from aot.backends.base import Availability
from aot.backends.registry import register
from aot.backends.static import StaticShapeBackend
from aot.quant import QuantPlan

MEDIATEK_SOCS = ("mt6989", "mt6991", "mt6993")  # Dimensity 9300, 9400, 9500 (NeuropilotBackend's list)
# aot scheme -> NeuroPilot Precision
PRECISIONS = {"16a4w": "A16W4", "16a8w": "A16W8", "8a8w": "A8W8"}
SDK_MODULES = ("mtk_converter", "mtk_neuron")
PACKAGE = "executorch.backends.mediatek"


def _missing_sdk() -> list[str]:
    return [m for m in SDK_MODULES if importlib.util.find_spec(m) is None]


def neuropilot_quantizer(scheme: str):
    if not _missing_sdk() or PACKAGE in sys.modules:
        quantizer = importlib.import_module(PACKAGE + ".quantizer")
    else:
        # Import the quantizer subpackage under a bare parent package (its __init__ would import
        # mtk_converter), then drop the bare parent so a later real import is not shadowed.
        spec = importlib.util.find_spec(PACKAGE)
        parent = types.ModuleType(PACKAGE)
        parent.__path__, parent.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules[PACKAGE] = parent
        try:
            quantizer = importlib.import_module(PACKAGE + ".quantizer")
        finally:
            del sys.modules[PACKAGE]
    q = quantizer.NeuropilotQuantizer()
    q.setup_precision(getattr(quantizer.Precision, PRECISIONS[scheme]))
    return _float_only(q)


def _float_only(inner):
    """NeuropilotQuantizer annotates every add/compare, integer ones included (the static graphs'
    position arithmetic), which PT2E cannot quantize; keep its annotations on float tensors only."""
    from torchao.quantization.pt2e.quantizer import Quantizer
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    def is_float(node) -> bool:
        val = getattr(node, "meta", {}).get("val")
        return val is not None and getattr(val, "dtype", None) is not None and val.dtype.is_floating_point

    class FloatOnly(Quantizer):
        def transform_for_annotation(self, model):
            return inner.transform_for_annotation(model)

        def annotate(self, model):
            inner.annotate(model)
            for node in model.graph.nodes:
                ann = node.meta.get(Q_ANNOTATION_KEY)
                if ann is None:
                    continue
                if not is_float(node):
                    del node.meta[Q_ANNOTATION_KEY]
                    continue
                for arg in [a for a in ann.input_qspec_map if not is_float(a)]:
                    del ann.input_qspec_map[arg]
            return model

        def validate(self, model):
            inner.validate(model)

    return FloatOnly()


@register
class MediaTek(StaticShapeBackend):
    name = "mediatek"
    description = "MediaTek APU (Dimensity 9300/9400/9500) through NeuroPilot; host simulation of the recipe"
    schemes = tuple(PRECISIONS)

    def socs(self) -> tuple[str, ...]:
        return MEDIATEK_SOCS

    def availability(self) -> Availability:
        missing = _missing_sdk()
        if missing:
            return Availability(False, f"MediaTek's NeuroPilot SDK is not installed (no `{'`, `'.join(missing)}` "
                                       "module): install its mtk_converter and mtk_neuron wheels from MediaTek's "
                                       "NeuroPilot portal into this environment (aot never downloads them); "
                                       "`aot simulate --delegate mediatek` works without them")
        return Availability(True, "mtk_converter and mtk_neuron found")

    def quantizer(self, scheme: str, graph, group_size: int, kv_bits: int | None):
        return neuropilot_quantizer(scheme)

    def partitioners(self, method_name: str, plan: QuantPlan, soc: str | None = None) -> list:
        # Needs the SDK (availability checked first); not run on aot's CI machines.
        from executorch.backends.mediatek import NeuropilotPartitioner
        from executorch.exir.backend.compile_spec_schema import CompileSpec

        specs = [CompileSpec("platform-config", (soc or MEDIATEK_SOCS[0]).encode())]
        return [NeuropilotPartitioner(specs)]
