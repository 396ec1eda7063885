"""Qualcomm Hexagon NPU (HTP) through ExecuTorch's QNN delegate.

What works here without Qualcomm's SDK: detecting it (never downloading it), and the quantization
recipe itself, `QnnQuantizer` (PT2E), simulated on the host (`aot simulate --delegate qnn`).
Lowering needs the QAIRT SDK (QNN_SDK_ROOT) and is not implemented in aot yet: with or without the
SDK, `aot build --delegate qnn` stops before loading anything, saying which.

ExecuTorch's QNN code downloads an SDK (gigabytes) and libc++ the first time a quantizer or backend
is created on a Linux x86 host without QNN_SDK_ROOT. `no_sdk_download()` marks its setup as done
first, so nothing is fetched: the quantizer then uses its built-in op table.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from aot.backends import Availability, Backend, register
from aot.quant import QuantPlan

# aot scheme -> QnnQuantizer QuantDtype name: 16-bit activations with 4-bit (per-channel) or 8-bit
# weights, or 8-bit both. ExecuTorch's Llama recipe uses 16a4w with 16a8w on sensitive layers.
QNN_SCHEMES = {"16a4w": "use_16a4w", "16a4w-block": "use_16a4w_block", "16a8w": "use_16a8w", "8a8w": "use_8a8w"}
DEFAULT_QAIRT = "2.37.0.250724"  # what executorch 1.5.1's downloader names (qnn_config.sh)


def expected_qairt() -> str:
    try:
        from executorch.backends.qualcomm.scripts.download_qnn_sdk import QNN_VERSION

        return QNN_VERSION
    except Exception:  # the downloader is optional in some builds
        return DEFAULT_QAIRT


def socs() -> list[str]:
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset

    return [c.name for c in QcomChipset if c.name != "UNKNOWN_SM"]


def no_sdk_download() -> None:
    """Stop ExecuTorch's QNN setup from downloading an SDK or libc++ in this process."""
    from executorch.backends.qualcomm.utils import qnn_sdk_setup

    if os.environ.get("QNN_SDK_ROOT") is None:
        qnn_sdk_setup._sdk_ready = True  # its own "already set up" flag: setup returns at once
    # Without an SDK the quantizer falls back to its built-in op table and says so at WARNING.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def qnn_quantizer(scheme: str, graph=None, block: int = 32):
    """QnnQuantizer for `scheme`; block-wise schemes need the exported `graph` to name its linears."""
    no_sdk_download()
    import torch
    from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype

    from executorch.backends.qualcomm.quantizer.quantizer import ModuleQConfig

    quantizer = QnnQuantizer()
    quantizer.set_default_quant_config(getattr(QuantDtype, QNN_SCHEMES[scheme]), is_linear_per_channel=True)
    if "4w" in scheme:
        # The sensitive layer stays at 8-bit weights, as in the published recipe: the output projection.
        quantizer.set_submodule_qconfig_list(
            [(is_output_projection, ModuleQConfig(QuantDtype.use_16a8w, is_linear_per_channel=True))])
    if scheme.endswith("-block"):
        # As ExecuTorch's Qualcomm Llama flow does: every linear and its weight, blocks along the input.
        names = {}
        for node in graph.nodes:
            if node.target == torch.ops.aten.linear.default and not is_output_projection(node):
                names[node.name] = names[node.args[1].name] = (1, block)
        quantizer.set_block_size_map(names)
    return quantizer


def is_output_projection(node) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(name.split(".")[-1].endswith("output") for name in stack)


@register
class Qnn(Backend):
    name = "qnn"
    description = "Qualcomm Hexagon NPU (HTP) through QNN; host simulation of the recipe"
    schemes = tuple(QNN_SCHEMES)

    def availability(self) -> Availability:
        root = os.environ.get("QNN_SDK_ROOT")
        want = f"Qualcomm AI Runtime SDK (QAIRT) {expected_qairt()}"
        if not root:
            return Availability(False, f"QNN_SDK_ROOT is not set: install the {want} from Qualcomm's "
                                       "software center and export QNN_SDK_ROOT=/path/to/qairt/<version> "
                                       "(aot never downloads it); `aot simulate --delegate qnn` works without it")
        lib = Path(root) / "lib" / "x86_64-linux-clang" / "libQnnHtp.so"
        if not lib.is_file():
            return Availability(False, f"QNN_SDK_ROOT={root} has no {lib.relative_to(root)}; point it at the "
                                       f"{want} installation")
        return Availability(False, f"found the SDK at {root}, but aot does not lower to QNN yet; "
                                   "`aot simulate --delegate qnn` measures the recipe's accuracy")

    def partitioners(self, method_name: str, plan: QuantPlan) -> list:
        raise NotImplementedError("aot does not lower to QNN yet")
