"""`aot run` and `aot bench`: their options (with the defaults the CLI shows), and run's choice of
engine: ExecuTorch's TextLLMRunner for text bundles unless --engine python; aot's own runner for
vision bundles, whose cross-attention image state the stock runners do not carry.

Light to import (no torch until generate() runs), so `aot --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aot.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    max_new_tokens: int = 64  # at most: generation also stops at EOS and at the bundle's context
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None  # sampling seed (--engine python)
    engine: str | None = None  # stock or python; default: stock, vision bundles: python
    image: Path | None = None  # vision bundles: the image; <|image|> in the prompt marks its place
    truncate_prompt: bool = False  # a prompt too long for the context keeps BOS and its tail

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, but got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, but got {self.temperature}")


@dataclass(frozen=True)
class BenchConfig:
    # None: aot.speed's defaults (pp 128, tg 64), shrunk to fit the bundle's context.
    prompt_tokens: int | None = None  # pp N
    decode_tokens: int | None = None  # tg N
    repeats: int = 5  # measured runs, after one warm-up


def generate(path: Path, prompt: str, cfg: RunConfig, on_text=None):
    """Generate from the bundle at `path`, streaming text to `on_text`; a runner Generation."""
    # Lazy (slow: the runners import torch and ExecuTorch, ~3 s): `aot run --help` reads this
    # module's RunConfig for its defaults and should not pay for them.
    from aot.bundle import open_bundle
    from aot.runner.engines import make_engine
    from aot.runner.mllama import VisionEngine, is_vision_bundle

    b = open_bundle(path)
    if is_vision_bundle(b):
        if cfg.engine not in (None, "python"):
            raise ConfigError(f"--engine {cfg.engine}: ExecuTorch's text runners do not run vision bundles "
                              "(cross-attention image state); drop --engine to use aot's runner")
        return VisionEngine(b).generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.seed, on_text,
                                        image=cfg.image, truncate=cfg.truncate_prompt)
    if cfg.image is not None:
        raise ConfigError(f"--image: {b.root} is a text bundle ({b.manifest['model']['name']}); images need a "
                          "vision bundle (aot build --model 11b-vision or a Mllama --checkpoint)")
    return make_engine(cfg.engine or "stock", b).generate(prompt, cfg.max_new_tokens, cfg.temperature, cfg.seed,
                                                         on_text, truncate=cfg.truncate_prompt)
