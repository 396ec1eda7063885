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
    adapter: str | None = None  # a named adapter's program (bundles built with --adapter NAME=DIR)

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

    b = open_bundle(path).with_adapter(cfg.adapter)
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


# ---- chat -------------------------------------------------------------------------------------

MAX_JSON_FILE = 16 * 2**20  # --messages / --tools: bigger is not a conversation


@dataclass(frozen=True)
class ChatConfig:
    system: str | None = None  # --system: the conversation's system message
    messages: Path | None = None  # --messages FILE: an OpenAI-style message list; one turn answers it
    tools: Path | None = None  # --tools FILE: OpenAI-style function schemas
    tool_choice: str = "auto"  # auto, none, required, or a tool's name
    stop: tuple[str, ...] = ()  # --stop: stop strings


def read_json_file(path: Path, flag: str):
    import json

    path = Path(path).expanduser()
    try:
        if path.stat().st_size > MAX_JSON_FILE:
            raise ConfigError(f"{flag} {path}: larger than {MAX_JSON_FILE // 2**20} MiB")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: not a JSON file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


class Chat:
    """`aot run --chat` / `--messages`: a conversation kept across turns on one ChatSession."""

    def __init__(self, path: Path, run: RunConfig, cfg: ChatConfig):
        from aot.bundle import open_bundle
        from aot.chatformat import check_messages, check_tool_choice, check_tools
        from aot.runner.chat import ChatOptions, ChatSession
        from aot.runner.mllama import is_vision_bundle

        if run.engine not in (None, "python"):
            raise ConfigError(f"--engine {run.engine}: chat runs the bundle's forward through ExecuTorch's Python "
                              "runtime (the stock runner has no hook on the logits for tool grammars); drop --engine")
        if run.image is not None or run.truncate_prompt:
            raise ConfigError("--image and --truncate-prompt do not apply to --chat (old turns go when the context fills)")
        tools = check_tools(read_json_file(cfg.tools, "--tools"), f"--tools {cfg.tools}") if cfg.tools else None
        if cfg.tool_choice != "auto" and not tools:
            raise ConfigError(f"--tool-choice {cfg.tool_choice}: needs --tools FILE")
        choice = check_tool_choice(cfg.tool_choice, tools) if tools else "auto"
        self.messages: list[dict] = []
        if cfg.messages is not None:
            if cfg.system is not None:
                raise ConfigError("--system: put the system message in --messages instead")
            self.messages = check_messages(read_json_file(cfg.messages, "--messages"), f"--messages {cfg.messages}")
        elif cfg.system:
            self.messages = [{"role": "system", "content": cfg.system}]
        b = open_bundle(path).with_adapter(run.adapter)
        if is_vision_bundle(b):
            raise ConfigError(f"{b.root}: chat runs text bundles; use --prompt (and --image) with vision bundles")
        self.session = ChatSession(b)
        self.options = ChatOptions(max_new_tokens=run.max_new_tokens, temperature=run.temperature, seed=run.seed,
                                   stop=cfg.stop, tools=tuple(tools) if tools else None, tool_choice=choice)

    def say(self, role: str, content: str, on_text=None):
        """Add a message (user, or tool for a tool's result) and answer the conversation."""
        self.messages.append({"role": role, "content": content})
        return self.answer(on_text)

    def answer(self, on_text=None):
        turn = self.session.turn(self.messages, self.options, on_text)
        if turn.dropped_messages:
            system = 1 if self.messages[0].get("role") == "system" else 0
            del self.messages[system : system + turn.dropped_messages]
        self.messages.append(turn.message())
        return turn
