"""Quantization schemes: one table from scheme name to what each layer kind gets.

A scheme says how the transformer's linear layers, the token embedding and the output projection
are stored. `QuantConfig` is what a user asks for (flags or manifest); `QuantConfig.plan()` resolves
the scheme's defaults into a `QuantPlan` of concrete `LayerQuant` recipes, and `apply_plan` hands
them to torchao's `quantize_`. Nothing else in aot knows torchao's config classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from aot.errors import ConfigError

GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class LayerQuant:
    """How one kind of layer is stored.

    activations: "int8-dynamic" (per-token, asymmetric, computed at run time) or "none"
    (weight-only). group_size 0 means one scale per output channel (per-channel).
    """

    bits: int
    group_size: int
    activations: str

    @property
    def name(self) -> str:
        granularity = "per-channel" if self.group_size == 0 else f"g{self.group_size}"
        prefix = "8da" if self.activations == "int8-dynamic" else ""
        return f"{prefix}{self.bits}w {granularity}"


@dataclass(frozen=True)
class QuantPlan:
    """Concrete recipes; None leaves that layer kind in the compute dtype."""

    scheme: str
    dtype: str  # compute dtype of everything not quantized: "float32" or "bfloat16"
    linear: LayerQuant | None
    embedding: LayerQuant | None
    output: LayerQuant | None

    def to_dict(self) -> dict:
        return asdict(self)

    def check_dims(self, dim: int, ffn_hidden: int) -> list[str]:
        """Errors for group sizes that do not divide the input width of the layers they apply to."""
        widths = {"linear": {"dim": dim, "ffn_hidden": ffn_hidden}, "output": {"dim": dim}, "embedding": {"dim": dim}}
        errors: dict[str, None] = {}  # ordered, without repeats (linear and output share a flag)
        for kind, recipe in (("linear", self.linear), ("output", self.output), ("embedding", self.embedding)):
            if recipe is None or recipe.group_size == 0:
                continue
            flag = "--embedding-group-size" if kind == "embedding" else "--group-size"
            for width_name, width in widths[kind].items():
                if width % recipe.group_size:
                    errors[
                        f"{flag} {recipe.group_size} does not divide the model's {width_name} ({width}); "
                        f"choose one of: {_dividing(width)}"
                    ] = None
        return list(errors)


def _dividing(width: int) -> str:
    ok = [str(g) for g in GROUP_SIZES if width % g == 0]
    return ", ".join(ok) if ok else "none of them; use --quant 8da8w (per-channel)"


_INT8_DYNAMIC = "int8-dynamic"

# scheme -> (compute dtype, linear bits or None, default output recipe, default embedding bits)
# Meta's published mobile recipe for 8da4w: linears 4-bit g32 with 8-bit dynamic activations,
# output projection 8da8w per-channel, embedding 8-bit per-channel.
SCHEMES: dict[str, tuple[str, int | None, str, int]] = {
    "none": ("float32", None, "none", 0),
    "bf16": ("bfloat16", None, "none", 0),
    "8da4w": ("float32", 4, "8da8w", 8),
    "8da8w": ("float32", 8, "8da8w", 8),
    # 8da4w after SpinQuant rotations (aot.quant.rotation): Meta's SpinQuant_INT4_EO8 recipe.
    "spinquant": ("float32", 4, "8da8w", 8),
    # NPU schemes (QNN, MediaTek): static 16/8-bit activations, applied by the delegate's PT2E
    # quantizer with calibration, not by torchao; the plan only describes them.
    "16a4w": ("float32", 4, "same", 0),  # 4-bit per output channel
    "16a4w-block": ("float32", 4, "same", 0),  # 4-bit in blocks of --group-size
    "16a8w": ("float32", 8, "same", 0),
    "8a8w": ("float32", 8, "same", 0),
}
NPU_ACTIVATIONS = {"16a4w": "int16-static", "16a4w-block": "int16-static", "16a8w": "int16-static",
                   "8a8w": "int8-static"}
OUTPUT_CHOICES = ("default", "none", "8da8w", "8da4w")
EMBEDDING_CHOICES = ("default", "none", "8", "4")


@dataclass(frozen=True)
class QuantConfig:
    scheme: str = "8da4w"
    group_size: int = 32
    embedding: str = "default"  # bits "8"/"4", "none", or "default" (the scheme's)
    embedding_group_size: int | None = None  # 0: per-channel; None: 0 for 8-bit, 32 for 4-bit
    output: str = "default"

    def __post_init__(self):
        errors = self.errors()
        if errors:
            raise ConfigError("; ".join(errors))

    def errors(self) -> list[str]:
        errors = []
        if self.scheme not in SCHEMES:
            errors.append(f"unknown --quant '{self.scheme}'; choose one of: {', '.join(SCHEMES)}")
        if self.group_size not in GROUP_SIZES:
            errors.append(
                f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, but got {self.group_size}"
            )
        if self.embedding not in EMBEDDING_CHOICES:
            errors.append(
                f"--embedding-quant must be one of {', '.join(EMBEDDING_CHOICES)}, but got '{self.embedding}'"
            )
        if self.embedding_group_size not in (None, 0) + GROUP_SIZES:
            errors.append(
                "--embedding-group-size must be 0 (per-channel) or one of "
                f"{', '.join(map(str, GROUP_SIZES))}, but got {self.embedding_group_size}"
            )
        if self.output not in OUTPUT_CHOICES:
            errors.append(f"--output-quant must be one of {', '.join(OUTPUT_CHOICES)}, but got '{self.output}'")
        if not errors and self.scheme in ("none", "bf16"):
            for flag, value in (("--embedding-quant", self.embedding), ("--output-quant", self.output)):
                if value not in ("default", "none"):
                    errors.append(f"{flag} {value} needs a quantized --quant scheme (8da4w, 8da8w or spinquant)")
        return errors

    def to_dict(self) -> dict:
        return asdict(self)

    def plan(self) -> QuantPlan:
        dtype, linear_bits, default_output, default_emb_bits = SCHEMES[self.scheme]
        if self.scheme in NPU_ACTIVATIONS:
            group = self.group_size if self.scheme.endswith("-block") else 0
            npu = LayerQuant(linear_bits, group, NPU_ACTIVATIONS[self.scheme])
            return QuantPlan(self.scheme, dtype, npu, None, npu)
        linear = None
        if linear_bits is not None:
            linear = LayerQuant(linear_bits, self.group_size if linear_bits == 4 else 0, _INT8_DYNAMIC)
        output_name = default_output if self.output == "default" else self.output
        output = {
            "none": None,
            "8da8w": LayerQuant(8, 0, _INT8_DYNAMIC),
            "8da4w": LayerQuant(4, self.group_size, _INT8_DYNAMIC),
        }[output_name]
        emb_bits = default_emb_bits if self.embedding == "default" else int(self.embedding.replace("none", "0"))
        embedding = None
        if emb_bits:
            group = self.embedding_group_size
            if group is None:
                group = 0 if emb_bits == 8 else 32
            embedding = LayerQuant(emb_bits, group, "none")
        return QuantPlan(self.scheme, dtype, linear, embedding, output)


def _torchao_config(recipe: LayerQuant):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    granularity = PerAxis(0) if recipe.group_size == 0 else PerGroup(recipe.group_size)
    weight_dtype = getattr(torch, f"int{recipe.bits}")
    if recipe.activations == _INT8_DYNAMIC:
        # XNNPACK's blockwise 4-bit kernels keep their scales in bf16; rounding them here makes the
        # eager model compute what the device computes (measured: exact instead of ~6% of the
        # quantization error).
        scale_dtype = torch.bfloat16 if recipe.bits == 4 and recipe.group_size else None
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=weight_dtype, weight_granularity=granularity, weight_scale_dtype=scale_dtype
        )
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity)


def apply_plan(model: nn.Module, plan: QuantPlan, output_name: str = "output",
               parts: tuple[str, ...] | None = None) -> nn.Module:
    """Quantize `model` in place. The output projection is the nn.Linear named `output_name`.

    `parts` (submodule names) limits it to those submodules, so a model can be quantized part by
    part as each is materialised (the rest may still be on the meta device).
    """
    if plan.scheme in NPU_ACTIVATIONS:
        raise ConfigError(f"--quant {plan.scheme} is applied by an NPU delegate's quantizer, not by torchao")

    def inside(fqn: str) -> bool:
        return parts is None or any(fqn == p or fqn.startswith(p + ".") for p in parts)

    if plan.dtype == "bfloat16":
        for name in parts or ("",):
            model.get_submodule(name).to(torch.bfloat16)
    # Tied embeddings share one Parameter: each quantize_ call swaps in a new weight for its
    # module, so the embedding and the output projection end up stored (and quantized) separately.
    steps = (
        (plan.embedding, lambda m, fqn: isinstance(m, nn.Embedding) and inside(fqn)),
        (plan.output, lambda m, fqn: isinstance(m, nn.Linear) and fqn == output_name and inside(fqn)),
        (plan.linear, lambda m, fqn: isinstance(m, nn.Linear) and fqn != output_name and inside(fqn)),
    )
    with torch.no_grad():
        for recipe, filter_fn in steps:
            if recipe is None:
                continue
            config = _torchao_config(recipe)
            for fqn, module in list(model.named_modules()):
                if filter_fn(module, fqn):
                    _quantize_by_rows(module, config)
    return model


# Weights with more rows than CHUNK_ABOVE_ROWS (the 128k-row embedding and output projection) are
# quantized CHUNK_ROWS rows at a time: torchao's quantize_ holds several fp32-sized temporaries of
# the matrix it quantizes (2 GB for Llama 3.2 1B's whole embedding; four of 32 MiB for a 4096-row
# slice). Rows are quantized independently (one scale per row, or per group within a row), so the
# result is the same bytes. Each slice's quantized data is copied into the whole matrix's tensors
# as soon as it exists (concatenating the slices at the end held the quantized matrix twice).
# Load + quantize peak, random weights: 1B 2.34 -> 2.03 GiB (16384-row slices, concatenated).
CHUNK_ABOVE_ROWS = 16384
CHUNK_ROWS = 4096


def _quantize_by_rows(module: nn.Module, config) -> None:
    from torchao.quantization import quantize_

    def quantize(m: nn.Module) -> torch.Tensor:
        quantize_(m, config, filter_fn=lambda mod, fqn: mod is m)
        return m.weight

    weight = module.weight
    rows = weight.shape[0]
    if rows <= CHUNK_ABOVE_ROWS:
        quantize(module)
        return
    data, first = {}, None
    for start in range(0, rows, CHUNK_ROWS):
        part = weight[start : start + CHUNK_ROWS]
        piece = nn.Embedding(*part.shape) if isinstance(module, nn.Embedding) else nn.Linear(part.shape[1], part.shape[0], bias=False)
        piece.weight = nn.Parameter(part, requires_grad=False)
        q = quantize(piece)
        if first is None:
            first = q
            for name in q.tensor_data_names:
                t = getattr(q, name)
                if t.dim() == 0 or t.shape[0] != part.shape[0]:
                    raise AssertionError(f"{name} of {type(q).__name__} is not one row per weight row: {tuple(t.shape)}")
                data[name] = torch.empty((rows, *t.shape[1:]), dtype=t.dtype)
        for name in data:
            data[name][start : start + part.shape[0]] = getattr(q, name)
        del piece, q
    cls, attrs = type(first), {name: getattr(first, name) for name in first.tensor_attribute_names}
    del weight, part, first
    module.weight = nn.Parameter(cls(**data, **attrs), requires_grad=False)


def estimate_weight_bytes(args, plan: QuantPlan | dict) -> int:
    """Bytes the weights take in a .pte under `plan`: int4 packed two per byte, one fp32 scale
    per group (or per output channel), the rest in the compute dtype. The embedding and the
    output projection count separately even when tied: they are stored (and quantized) apart."""
    if isinstance(plan, dict):
        plan = QuantPlan(**{k: LayerQuant(**v) if isinstance(v, dict) else v for k, v in plan.items()})
    dtype_bytes = 2 if plan.dtype == "bfloat16" else 4

    def layer(rows: int, cols: int, recipe: LayerQuant | None) -> float:
        if recipe is None:
            return rows * cols * dtype_bytes
        groups = 1 if recipe.group_size == 0 else cols // recipe.group_size
        return rows * cols * recipe.bits / 8 + rows * groups * 4

    hd = args.head_dim
    per_layer = (
        layer(args.n_heads * hd, args.dim, plan.linear)
        + 2 * layer(args.n_kv_heads * hd, args.dim, plan.linear)
        + layer(args.dim, args.n_heads * hd, plan.linear)
        + 2 * layer(args.ffn_hidden, args.dim, plan.linear)
        + layer(args.dim, args.ffn_hidden, plan.linear)
        + 2 * args.dim * dtype_bytes
    )
    total = (
        layer(args.vocab_size, args.dim, plan.embedding)
        + layer(args.vocab_size, args.dim, plan.output)
        + args.n_layers * per_layer
        + args.dim * dtype_bytes
    )
    return int(total)
