"""bundle.json's `delegation`: what aot.delegation counts, and how that differs from ExecuTorch's
devtools helper (executorch.devtools.backend_debug.get_delegation_info), which is not used: it keys
operators by node name ("aten_slice_copy_tensor", "update_cache" without its namespace), from which
ours ("aten.slice_copy.Tensor", "llama.update_cache") cannot be recovered, and it counts graph
bookkeeping (getitem, alloc, sym_size, Python scalar ops) as nodes. Only the subgraph count agrees."""

from __future__ import annotations

import operator
from types import SimpleNamespace

import pytest
import torch
from torch import fx, nn

from aot.delegation import delegation_report

aten = torch.ops.aten


def executorch_call_delegate(*args):  # stands in for the higher-order op (matched by name)
    raise NotImplementedError


def alloc(*args):  # stands in for executorch.exir.memory.alloc (matched by __name__)
    raise NotImplementedError


def _args(target, x) -> tuple:
    return (x, 0) if target in (operator.add, operator.getitem) else (x,)  # Python's take two


def _graph(calls) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    for target in calls:
        x = g.call_function(target, _args(target, x))
    g.output(x)
    return fx.GraphModule(nn.Module(), g)


def _program(cpu_calls, delegates) -> SimpleNamespace:
    root = nn.Module()
    g = fx.Graph()
    x = g.placeholder("x")
    for i, inner in enumerate(delegates):
        setattr(root, f"lowered_module_{i}", SimpleNamespace(original_module=_graph(inner)))
        lowered = g.get_attr(f"lowered_module_{i}")
        x = g.call_function(operator.getitem, (g.call_function(executorch_call_delegate, (lowered, x)), 0))
    for target in cpu_calls:
        x = g.call_function(target, _args(target, x))
    g.output(x)
    gm = fx.GraphModule(root, g)
    return SimpleNamespace(methods={"forward": None}, exported_program=lambda name: SimpleNamespace(graph_module=gm))


def test_report_counts_kernels_by_operator_and_skips_bookkeeping():
    program = _program(
        cpu_calls=[aten.cumsum.out, aten.select_copy.int_out, aten.slice_copy.Tensor_out, aten.cumsum.out,
                   alloc, aten.sym_size.int, operator.add],
        delegates=[[aten.linear.default, operator.getitem, aten._softmax.default], [aten.linear.default]],
    )
    assert delegation_report(program) == {"forward": {
        "delegated_ops": 3,
        "total_ops": 7,
        "delegated_subgraphs": 2,
        "cpu_ops": {"aten.cumsum": 2, "aten.select_copy.int": 1, "aten.slice_copy.Tensor": 1},
    }}


def test_report_keeps_its_aten_add_mul_sub_exclusion():
    """`_NOT_OPS` drops aten.add/sub/mul.* along with Python's operator.add/sub/mul: bundle.json's
    figures have always been counted so (changing that changes every bundle's `delegation`)."""
    program = _program(cpu_calls=[aten.add.out, aten.mul.out], delegates=[[aten.mul.Tensor, aten.linear.default]])
    r = delegation_report(program)["forward"]
    assert (r["delegated_ops"], r["total_ops"], r["cpu_ops"]) == (1, 1, {})


@pytest.mark.slow
@pytest.mark.oracle
def test_executorchs_delegation_info_agrees_on_subgraphs_and_counts_bookkeeping_besides():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x):
            h = torch.cumsum(torch.softmax(self.a(x), -1), -1)  # cumsum stays on CPU between 2 subgraphs
            return self.b(h * 2.0 + 1.0)

    ep = torch.export.export(M().eval(), (torch.randn(2, 16),))
    program = to_edge_transform_and_lower({"forward": ep}, partitioner=[XnnpackPartitioner()]).to_executorch()
    ours = delegation_report(program)["forward"]
    info = get_delegation_info(program.exported_program("forward").graph_module)
    by_op = {k: (v.delegated, v.non_delegated) for k, v in info.delegation_by_operator.items()}

    assert ours == {"delegated_ops": 3, "total_ops": 4, "delegated_subgraphs": 2, "cpu_ops": {"aten.cumsum": 1}}
    assert info.num_delegated_subgraphs == ours["delegated_subgraphs"]
    # Theirs: the same kernels plus aten mul/add inside the delegate, and getitem/alloc outside it.
    assert by_op == {"aten_linear_default": (2, 0), "aten__softmax_default": (1, 0), "aten_mul_tensor": (1, 0),
                     "aten_add_tensor": (1, 0), "aten_cumsum_default": (0, 1), "getitem": (0, 2), "alloc": (0, 1)}
    assert (info.num_delegated_nodes, info.num_non_delegated_nodes) == (5, 4)
