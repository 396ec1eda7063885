"""Model families: what a build of one kind of model needs to know about it.

A family turns a build configuration into a `Source` (architecture, tokenizer, special ids, the
quantization plan, the input files), loads its model (quantized as it streams in, when the backend
quantizes at load), names its methods (a `Program` of `aot.methods.Method`s), and says what its
runner metadata, bundle.json fields and fp32 reference are. The pipeline (aot/pipeline.py) is the
same straight line for every family:

    resolve -> load(plan) -> backend.prepare -> export -> lower -> serialize -> write

Members, each in its own folder with the same file names (model.py, checkpoint.py, family.py):
`text` (Llama 3.2 1B/3B) and `vision` (Llama 3.2 11B/90B Vision). Shared layers live in
families/common.py. Families never import backends, the pipeline or the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aot.families.base import Family, Program, Source
from aot.families.text.family import TextFamily
from aot.families.vision.family import VisionFamily

if TYPE_CHECKING:
    from aot.config import BuildConfig

__all__ = ["Family", "Program", "Source", "TextFamily", "VisionFamily", "families", "family_for", "model_names"]

# The most specific first: text claims whatever no other family does.
FAMILIES: tuple[Family, ...] = (VisionFamily(), TextFamily())


def families() -> tuple[Family, ...]:
    return FAMILIES


def family_for(cfg: BuildConfig) -> Family:
    return next(f for f in FAMILIES if f.claims(cfg))


def model_names() -> dict[str, object]:
    """Every --model name with its architecture, across the families."""
    return {name: args for f in reversed(FAMILIES) for name, args in f.models.items()}  # text sizes first
