"""XNNPACK: ExecuTorch's CPU delegate (arm64 phones, x86-64 hosts)."""

from __future__ import annotations

from aot.backends import Availability, Backend, register
from aot.quant import QuantPlan


@register
class Xnnpack(Backend):
    name = "xnnpack"
    description = "CPU (arm64, x86-64) through XNNPACK"
    schemes = ("none", "bf16", "8da4w", "8da8w", "spinquant")

    def availability(self) -> Availability:
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
            from executorch.runtime import Runtime
        except ImportError as e:
            return Availability(False, f"executorch's XNNPACK partitioner does not import ({e}); reinstall executorch")
        if not Runtime.get().backend_registry.is_available("XnnpackBackend"):
            return Availability(False, "this executorch runtime was built without XnnpackBackend")
        return Availability(True, "partitioner and runtime kernel present (executorch wheel)")

    def partitioners(self, method_name: str, plan: QuantPlan, soc: str | None = None) -> list:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # Greedy: dynamically quantized linears and every fp32/bf16 op XNNPACK supports.
        return [XnnpackPartitioner(enable_bf16=plan.dtype == "bfloat16")]
