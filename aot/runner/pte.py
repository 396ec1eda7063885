"""A .pte through ExecuTorch's Python runtime: its methods, its metadata, and a forward call.

The C++ LLM runner (TextLLMRunner) is what apps use; this is the plain path for inspection,
debugging and teacher-forced scoring.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aot.errors import BundleError
from aot.native import native_output_silenced

# Constant methods the LLM runners read; lists (get_eos_ids) come back whole, scalars unwrapped.
METADATA_METHODS = (
    "get_max_seq_len",
    "get_max_context_len",
    "get_vocab_size",
    "get_n_layers",
    "use_kv_cache",
    "use_sdpa_with_kv_cache",
    "enable_dynamic_shape",
    "get_bos_id",
    "get_eos_ids",
    # vision bundles (Llama 3.2 Vision)
    "get_image_token_id",
    "get_max_num_tiles",
    "get_tile_size",
    "get_num_patches",
    "get_n_cross_layers",
)


def load_kernels() -> None:
    """Register the kernels a bundle's CPU ops need (LLM custom ops, quantized embeddings)."""
    with native_output_silenced():  # XNNPACK's cpuinfo logs when the runtime library loads
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        Runtime.get()


class PteProgram:
    def __init__(self, path: Path, data_path: Path | None = None):
        """`data_path`: the bundle's model.ptd when its weights are external (Bundle.data_path)."""
        load_kernels()
        from executorch.runtime import Runtime

        self.path = Path(path)
        try:
            self.program = Runtime.get().load_program(str(self.path), data_path=None if data_path is None else str(data_path))
        except Exception as e:
            raise BundleError(f"{self.path}: ExecuTorch cannot load this program ({e}); rebuild the bundle") from None
        self.method_names = sorted(self.program.method_names)

    def metadata(self) -> dict:
        out = {}
        for name in METADATA_METHODS:
            if name in self.method_names:
                values = list(self.program.load_method(name).execute([]))
                out[name] = values if name == "get_eos_ids" else values[0]
        return out

    def method_meta(self, name: str) -> dict:
        meta = self.program.metadata(name)
        return {
            "inputs": [str(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())],
            "outputs": [str(meta.output_tensor_meta(i)) for i in range(meta.num_outputs())],
        }

    def forward(self) -> "Forward":
        return Forward(self.program.load_method("forward"))


class Forward:
    """Stateful forward: the KV cache lives in the loaded method between calls."""

    def __init__(self, method):
        self.method = method

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.method.execute([tokens.to(torch.long), input_pos.to(torch.long)])[0]
