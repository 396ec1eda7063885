"""What a lowered program runs where: per method, the ops inside delegate subgraphs and those left
on ExecuTorch's CPU kernels (bundle.json's `delegation`)."""

from __future__ import annotations

import re

# Graph bookkeeping that is not a kernel: Python scalar ops, shape queries, asserts, the memory
# planner's alloc/view nodes.
_NOT_OPS = ("getitem", "sym_size", "_assert_scalar", "_local_scalar_dense", "alloc", "view",
            "add", "sub", "mul", "le", "ge", "lt", "gt", "eq", "floordiv", "executorch_prim")


def _op_name(node) -> str | None:
    name = str(node.target)
    if name.startswith("<"):  # Python functions and edge ops print as <function alloc at 0x...>
        name = getattr(node.target, "__name__", name)
    if any(name == n or name.startswith((n + ".", "aten." + n + ".")) for n in _NOT_OPS):
        return None
    return re.sub(r"(\.out|_out|\.default)$", "", name)


def delegation_report(et_program) -> dict:
    """Per method: kernels run by the delegate vs on ExecuTorch's CPU kernels, by operator."""
    report = {}
    for name in et_program.methods:
        gm = et_program.exported_program(name).graph_module
        delegated, cpu, subgraphs = 0, {}, 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if "executorch_call_delegate" in str(node.target):
                subgraphs += 1
                inner = getattr(gm, node.args[0].target).original_module.graph.nodes
                delegated += sum(1 for n in inner if n.op == "call_function" and _op_name(n))
            elif (op := _op_name(node)) is not None:
                cpu[op] = cpu.get(op, 0) + 1
        report[name] = {
            "delegated_ops": delegated,
            "total_ops": delegated + sum(cpu.values()),
            "delegated_subgraphs": subgraphs,
            "cpu_ops": dict(sorted(cpu.items())),
        }
    return report
