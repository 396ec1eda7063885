"""MediaTek APU through ExecuTorch's NeuroPilot delegate.

Lowering needs MediaTek's NeuroPilot SDK (`mtk_converter`, which ExecuTorch's
`executorch.backends.mediatek` imports at import time and which cannot be installed from the public
registries). aot detects it and stops `aot build --delegate mediatek` before loading anything,
saying what to install. Host simulation of NeuroPilot's quantizer is not implemented yet.
"""

from __future__ import annotations

import importlib.util

from aot.backends import Availability, Backend, register
from aot.quant import QuantPlan

MEDIATEK_SOCS = ("mt6989", "mt6991")  # Dimensity 9300, 9400


@register
class MediaTek(Backend):
    name = "mediatek"
    description = "MediaTek APU (Dimensity 9300/9400) through NeuroPilot"
    schemes = ("16a4w", "16a8w", "8a8w")

    def availability(self) -> Availability:
        if importlib.util.find_spec("mtk_converter") is None:
            return Availability(False, "MediaTek's NeuroPilot SDK is not installed (no `mtk_converter` module): "
                                       "install its mtk_converter wheel from MediaTek's NeuroPilot portal "
                                       "into this environment (aot never downloads it)")
        return Availability(False, "found mtk_converter, but aot does not lower to MediaTek yet")

    def partitioners(self, method_name: str, plan: QuantPlan) -> list:
        raise NotImplementedError("aot does not lower to MediaTek yet")
