"""Qualcomm Hexagon NPU (HTP) through ExecuTorch's QNN delegate.

What works here without Qualcomm's SDK: detecting it (never downloading it), and the quantization
recipe itself, `QnnQuantizer` (PT2E) on the static prefill/decode graphs (aot.backends.static), simulated on the
host (`aot simulate --delegate qnn`). Lowering (`QnnPartitioner` for `--soc`) needs the QAIRT SDK
(QNN_SDK_ROOT); without it `aot build --delegate qnn` stops before loading anything, saying so.

ExecuTorch's QNN code downloads an SDK (gigabytes) and libc++ the first time a quantizer or backend
is created on a Linux x86 host without QNN_SDK_ROOT. `no_sdk_download()` marks its setup as done
first, so nothing is fetched: the quantizer then uses its built-in op table.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from aot.backends.base import Availability
from aot.backends.registry import register
from aot.backends.static import StaticShapeBackend
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


DEFAULT_SOC = "SM8650"  # Snapdragon 8 Gen 3, the first Llama 3.2 QNN target


def soc_names() -> tuple[str, ...]:
    """QcomChipset names (Snapdragon phones and compute chips), the default first."""
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset

    names = [c.name for c in QcomChipset if c.name != "UNKNOWN_SM"]
    return (DEFAULT_SOC, *sorted(n for n in names if n != DEFAULT_SOC))


def no_sdk_download() -> None:
    """Stop ExecuTorch's QNN setup from downloading an SDK or libc++ in this process."""
    from executorch.backends.qualcomm.utils import qnn_sdk_setup

    if os.environ.get("QNN_SDK_ROOT") is None:
        qnn_sdk_setup._sdk_ready = True  # its own "already set up" flag: setup returns at once
    # Without an SDK the quantizer falls back to its built-in op table and says so at WARNING.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def qnn_quantizer(scheme: str, graph=None, block: int = 32, kv_bits: int | None = None):
    """QnnQuantizer for `scheme`; block-wise schemes need the exported `graph` to name its linears.
    kv_bits 8 stores what is written to the KV cache at 8 bits whatever the activations' width."""
    no_sdk_download()
    import torch
    from executorch.backends.qualcomm.quantizer.quantizer import ModuleQConfig, QnnQuantizer, QuantDtype
    from torchao.quantization.pt2e import MinMaxObserver

    # Activation ranges by min/max over all calibration calls, as ExecuTorch's Qualcomm Llama recipe
    # does: the default moving average tracks the range of the last calls, which for the one-token
    # decode graph is one token's range, and clips every outlier token (decode top-1 fell to 62%).
    quantizer = QnnQuantizer()
    quantizer.set_default_quant_config(getattr(QuantDtype, QNN_SCHEMES[scheme]), is_linear_per_channel=True,
                                       act_observer=MinMaxObserver)
    if "4w" in scheme:
        # The sensitive layer stays at 8-bit weights, as in the published recipe: the output projection.
        quantizer.set_submodule_qconfig_list([(is_output_projection, ModuleQConfig(
            QuantDtype.use_16a8w, is_linear_per_channel=True, act_observer=MinMaxObserver))])
    if scheme.endswith("-block"):
        # As ExecuTorch's Qualcomm Llama flow does: every linear and its weight, blocks along the input.
        names = {}
        for node in graph.nodes:
            if node.target == torch.ops.aten.linear.default and not is_output_projection(node):
                names[node.name] = names[node.args[1].name] = (1, block)
        quantizer.set_block_size_map(names)
    if kv_bits == 8:
        quantizer.add_custom_quant_annotations((annotate_kv_cache_8bit,))
    return quantizer


def annotate_kv_cache_8bit(gm) -> None:
    """Quantize the values written into the k/v caches (index_copy in static attention) to 8 bits,
    symmetric per tensor, as ExecuTorch's Qualcomm Llama recipe keeps its KV cache; the cache's
    readers share those parameters."""
    import torch
    from executorch.backends.qualcomm.quantizer.qconfig import get_8a8w_qnn_ptq_config
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    spec = get_8a8w_qnn_ptq_config(act_symmetric=True).input_activation
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.index_copy.default,
                                                          torch.ops.aten.index_copy_.default):
            value = node.args[3]
            node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(
                input_qspec_map={value: spec}, output_qspec=SharedQuantizationSpec((value, node)), _annotated=True)


def is_output_projection(node) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(name.split(".")[-1].endswith("output") for name in stack)


@register
class Qnn(StaticShapeBackend):
    name = "qnn"
    description = "Qualcomm Hexagon NPU (HTP) through QNN; host simulation of the recipe"
    schemes = tuple(QNN_SCHEMES)
    kv_bits = (8, 16)
    kv_caches = ("int8", "int16")

    def socs(self) -> tuple[str, ...]:
        return soc_names()

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
        return Availability(True, f"QAIRT SDK at {root}")

    def quantizer(self, scheme: str, graph, group_size: int, kv_bits: int | None):
        return qnn_quantizer(scheme, graph, group_size, kv_bits)

    def partitioners(self, method_name: str, plan: QuantPlan, soc: str | None = None) -> list:
        # Needs the SDK's libQnnHtp.so (availability checked first); not run on aot's CI machines.
        from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
        from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
        from executorch.backends.qualcomm.utils.utils import (
            generate_htp_compiler_spec,
            generate_qnn_executorch_compiler_spec,
        )

        specs = generate_qnn_executorch_compiler_spec(
            soc_model=getattr(QcomChipset, soc or DEFAULT_SOC),
            backend_options=generate_htp_compiler_spec(use_fp16=False),
        )
        return [QnnPartitioner(specs)]
