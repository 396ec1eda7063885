"""XNNPACK's memory patches: local workarounds of ExecuTorch internals, used while lowering.

Each patch wraps a hook of the executorch version in UPSTREAM, restores it on exit, and is
instance state of the backend that enters it (aot/backends/xnnpack.py), never a module global.
tests/test_xnnpack_patches.py fails if the upstream hooks change shape under them (their names,
signatures, or the installed version); tests/test_streamed.py builds with and without them and
compares the .pte bytes.

- Int4Hold: 4-bit weights held two per byte between quantization and XNNPACK's preprocess.
- preprocess_shares_weights: XNNPACK's per-subgraph program copy shares the weights.
- free_weights_once_packed: each delegated weight freed once XNNPACK has packed it.
"""

from __future__ import annotations

import contextlib
import copy

UPSTREAM = ("executorch", "1.5.1")  # the version whose internals these patch (pyproject.toml pins it)
# The hooks patched ("module:attribute") and the sha256 (first 16 hex digits) of their source in
# UPSTREAM: tests/test_xnnpack_patches.py fails when either changes, so a new executorch is
# re-checked against these workarounds (and tests/test_streamed.py's byte-for-byte builds) first.
HOOKS = {
    "executorch.backends.xnnpack.xnnpack_preprocess:XnnpackBackend.preprocess": "62f7dc915f1ef40c",
    "executorch.backends.xnnpack.xnnpack_preprocess:XnnpackBackend.copy_exported_program_for_preprocess":
        "161d76674b18cbbd",
    "executorch.exir.backend.backend_api:lower_all_submodules_to_backend": "82b25ee7bd538f0c",
}


class Int4Hold:
    """4-bit weights held two per byte from quantization until XNNPACK reads them.

    torchao's IntxUnpackedToInt8Tensor keeps each 4-bit value in an int8 (2.6 GB of the 3B's
    decoder linears), and torch.export and ExecuTorch's edge passes need only the weights' shapes
    (they trace with fake tensors). So once a part of the model is quantized, each 4-bit qdata
    tensor's values move into a nibble-packed copy and its storage is emptied (the tensor keeps its
    shape and dtype); just before XNNPACK's preprocess reads a delegated subgraph, its tensors are
    unpacked back into their storage. Anything still held when lowering ends is unpacked then, so
    nothing after lowering sees an empty weight.
    """

    def __init__(self):
        self.held: dict[int, tuple] = {}  # storage -> (qdata tensor, packed uint8 [.., cols/2])

    def hold(self, module) -> int:
        import torch

        count = 0
        for m in module.modules():
            w = getattr(m, "weight", None)
            if type(w).__name__ != "IntxUnpackedToInt8Tensor" or w.target_dtype != torch.int4:
                continue
            q = w.qdata
            if (q.dtype != torch.int8 or q.shape[-1] % 2 or not q.is_contiguous() or q.storage_offset()
                    or not q.untyped_storage().resizable()):
                continue
            u = q.view(torch.uint8) & 0xF
            self.held[_storage_key(q)] = (q, (u[..., ::2] | (u[..., 1::2] << 4)).contiguous())
            q.untyped_storage().resize_(0)
            count += 1
        return count

    def release(self, tensors) -> None:
        """Unpack the held weights among `tensors` back into their own storage."""
        import torch

        for t in tensors:
            entry = self.held.pop(_storage_key(t), None)
            if entry is None:
                continue
            q, packed = entry
            q.untyped_storage().resize_(q.numel())
            lo, hi = (packed & 0xF).view(torch.int8), (packed >> 4).view(torch.int8)
            pairs = torch.stack([torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)], -1)
            q.copy_(pairs.reshape(q.shape))

    def release_all(self) -> None:
        self.release([q for q, _ in list(self.held.values())])



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


@contextlib.contextmanager
def free_weights_once_packed(hold: Int4Hold, free: bool = True):
    """Free each delegated weight once XNNPACK has packed it into the delegate's own data.

    After XNNPACK's preprocess, a delegated subgraph's weights live twice until the program is
    serialized: as the graph constants ExecuTorch keeps on the lowered module (never read again:
    the .pte is written from the packed data) and as the packed copy. For an 8da4w model the first
    is the larger (torchao keeps 4-bit values one per int8 byte), so holding it is most of
    lowering's and serialization's peak. A weight is freed only when exactly one delegated
    subgraph consumes it and no method's remaining graph, nor any other subgraph, refers to its
    storage; the tensor keeps its shape, its storage becomes empty. Weights Int4Hold holds two per
    byte are unpacked just before the preprocess that reads them. Local workaround;
    tests/test_streamed.py builds with and without it and compares the .pte bytes, and fails if
    ExecuTorch stops calling the hooks it wraps.
    """
    import torch
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir.backend import backend_api

    lower_all = backend_api.lower_all_submodules_to_backend
    saved_preprocess = XnnpackBackend.__dict__["preprocess"]
    freeable: dict[int, object] = {}  # id(tensor) -> tensor whose storage goes once its subgraph is packed

    def tensors(program):
        return [t for d in (program.state_dict, program.constants) for t in d.values() if isinstance(t, torch.Tensor)]

    def lower_all_freeing(backend_id, method_to_nodes, method_to_program):
        if free and backend_id == XnnpackBackend.__name__:
            users: dict[int, int] = {}  # storage -> subgraphs consuming it (more than one: keep)
            kept: set[int] = set()  # storages the methods' own graphs still hold after lowering
            for method, nodes in method_to_nodes.items():
                deleted = set()  # placeholders that move into a delegate (one weight may have several)
                for node in nodes:
                    deleted |= set(node.meta["toplevel_input_specs_to_delete"])
                    for key in {_storage_key(t) for t in tensors(node.meta["submodule_program"])}:
                        users[key] = users.get(key, 0) + 1
                owner = method_to_program[method]
                table = {**owner.state_dict, **owner.constants}
                kept |= {_storage_key(table[spec.target]) for spec in owner.graph_signature.input_specs
                         if spec.arg.name not in deleted and isinstance(table.get(spec.target), torch.Tensor)}
            for nodes in method_to_nodes.values():
                for node in nodes:
                    for t in tensors(node.meta["submodule_program"]):
                        key = _storage_key(t)
                        # Storages mapped from a file (torch.load(mmap=True)) cannot be resized; the
                        # kernel drops their clean pages on its own.
                        if users.get(key) == 1 and key not in kept and t.untyped_storage().resizable():
                            freeable[id(t)] = t
        try:
            return lower_all(backend_id, method_to_nodes, method_to_program)
        finally:
            freeable.clear()

    def preprocess_then_free(cls, edge_program, compile_specs):
        hold.release(tensors(edge_program))  # held two per byte until now
        result = saved_preprocess.__get__(None, cls)(edge_program, compile_specs)
        for t in tensors(edge_program):
            if freeable.pop(id(t), None) is not None:
                t.untyped_storage().resize_(0)
        return result

    backend_api.lower_all_submodules_to_backend = lower_all_freeing
    XnnpackBackend.preprocess = classmethod(preprocess_then_free)
    try:
        yield
    finally:
        backend_api.lower_all_submodules_to_backend = lower_all
        XnnpackBackend.preprocess = saved_preprocess
        hold.release_all()  # weights no subgraph took (none, with the greedy partitioner)


def _storage_key(t) -> int:
    # The storage's identity (its StorageImpl), not its data pointer: held and freed weights have
    # empty storages, whose data pointers are all 0.
    return t.untyped_storage()._cdata
