"""XNNPACK: ExecuTorch's CPU delegate (arm64 phones, x86-64 hosts)."""

from __future__ import annotations

import contextlib

from aot.backends.base import Availability, Backend
from aot.backends.registry import register
from aot.backends.xnnpack_patches import Int4Hold, free_weights_once_packed, preprocess_shares_weights
from aot.quant import QuantPlan


@register
class Xnnpack(Backend):
    name = "xnnpack"
    description = "CPU (arm64, x86-64) through XNNPACK"
    schemes = ("none", "bf16", "8da4w", "8da8w", "spinquant")
    kv_caches = ("fp32", "int8")

    def __init__(self, free_packed_weights: bool = True, hold_int4_packed: bool = True):
        # free_packed_weights: release each delegated weight as soon as XNNPACK has packed it
        # (False: keep every weight until the program is serialized, as ExecuTorch does).
        # hold_int4_packed: between quantization and lowering, hold 4-bit weights two per byte
        # (False: one int8 per weight, as torchao keeps them). Either way the same .pte bytes
        # (tests/test_streamed.py).
        self.free_packed_weights = free_packed_weights
        self.hold_int4_packed = hold_int4_packed
        self.int4_hold = Int4Hold()

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

    def lowering_context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(super().lowering_context())  # compact dependency maps while partitioning
        stack.enter_context(preprocess_shares_weights())
        stack.enter_context(free_weights_once_packed(self.int4_hold, free=self.free_packed_weights))
        return stack

    def hold_weights(self, module) -> int:
        """Hold `module`'s 4-bit weights two per byte until lowering (see Int4Hold)."""
        return self.int4_hold.hold(module) if self.hold_int4_packed else 0

    def forget_held(self) -> None:
        self.int4_hold.held.clear()

    @contextlib.contextmanager
    def keeping_weights(self):
        saved, self.free_packed_weights = self.free_packed_weights, False
        try:
            yield
        finally:
            self.free_packed_weights = saved
