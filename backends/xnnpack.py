"""XNNPACK: ExecuTorch's CPU delegate (arm64 phones, x86-64 hosts)."""

from __future__ import annotations

import contextlib
import copy

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

    def lowering_context(self):
        return preprocess_shares_weights()


@contextlib.contextmanager
def preprocess_shares_weights():
    """Lower without a second copy of every delegated weight.

    ExecuTorch (exir/backend/backend_api.py, lower_all_submodules_to_backend) deep-copies each
    delegated subgraph's program, weights included, before XNNPACK preprocesses any of them: a
    model-sized copy alive for the whole of lowering (1.2 GB of int8 weights for Llama 3.2 1B).
    XNNPACK's preprocess reads those weights and never writes them, so the copy may share them,
    as ExecuTorch's own CUDA backend does in its low-memory mode: the graph is copied, the tensors
    are not. Local workaround; tests/test_streamed.py fails if ExecuTorch stops calling this hook
    or the bundle bytes change.
    """
    import torch
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    saved = XnnpackBackend.__dict__.get("copy_exported_program_for_preprocess")

    def copy_sharing_tensors(cls, edge_program, compile_specs):
        memo = {id(t): t for values in (edge_program.state_dict, edge_program.constants)
                for t in values.values() if isinstance(t, torch.Tensor)}
        return copy.deepcopy(edge_program, memo)

    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_tensors)
    try:
        yield
    finally:
        if saved is None:
            del XnnpackBackend.copy_exported_program_for_preprocess
        else:
            XnnpackBackend.copy_exported_program_for_preprocess = saved
