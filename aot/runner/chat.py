"""Multi-turn chat over a bundle's `forward`, in the bundle's own chat format, with the KV cache
kept between turns: a turn prefills only the tokens its conversation does not share with what the
cache already holds (the longest common prefix; llama.cpp's server does the same), so a long
history is not prefilled again. When a conversation outgrows the context, its oldest exchanges go
(the system message stays) and the turn says how many. Tool calls are written under a grammar
(aot.runner.grammar) and come back as {name, arguments}.

ExecuTorch's C++ TextLLMRunner has no hook on the logits, which a grammar needs, so chat runs the
same program's `forward` through ExecuTorch's Python runtime (the kernels, the cache and the
memory plan are the bundle's; only the sampling loop is aot's).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from aot.bundle import Bundle
from aot.chatformat import ChatFormat, check_tool_choice, check_tools
from aot.errors import ConfigError
from aot.native import native_output_silenced
from aot.runner.engines import PythonEngine, sample_token
from aot.runner.grammar import Grammars, parse_call
from aot.runner.pte import PteProgram
from aot.runner.text import Utf8Stream

OnText = Callable[[str], None]


@dataclass(frozen=True)
class ChatOptions:
    max_new_tokens: int = 256  # at most, per turn
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = None  # sampling seed; None: a fresh one per turn
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    tools: tuple | None = None  # OpenAI-style tools (aot.chatformat.check_tools)
    tool_choice: str = "auto"  # auto, none, required, or a tool's name

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, but got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be in [0, 100], but got {self.temperature}")


@dataclass
class ChatTurn:
    text: str  # the assistant's words ("" for a tool call)
    tool_call: dict | None  # {"name", "arguments"} when the turn is a call
    finish_reason: str  # stop (EOS or a stop string), length, tool_calls, context, cancelled
    prompt_tokens: int  # the rendered conversation's tokens
    reused_tokens: int  # of those, already in the KV cache from earlier turns
    generated_tokens: int
    ttft_s: float  # turn start -> first token sampled (render, tokenize, prefill)
    prefill_tps: float  # prefilled (not reused) tokens per second
    decode_tps: float
    max_context_len: int
    dropped_messages: int = 0  # oldest messages dropped so the conversation fits the context
    mask_ms: list = field(default_factory=list, repr=False)  # grammar mask cost per constrained token

    def message(self) -> dict:
        """The turn as an OpenAI-style assistant message (to append to the conversation)."""
        if self.tool_call is not None:
            import json

            return {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_0", "type": "function",
                "function": {"name": self.tool_call["name"], "arguments": json.dumps(self.tool_call["arguments"])}}]}
        return {"role": "assistant", "content": self.text}

    def to_dict(self) -> dict:
        d = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items() if k != "mask_ms"}
        return {**d, "message": self.message()}


def chat_format(bundle: Bundle) -> ChatFormat:
    rec = bundle.manifest.get("chat")
    if not rec:
        raise ConfigError(
            f"{bundle.root}: this bundle carries no chat format (its checkpoint had no chat_template and no "
            "Llama 3 header tokens: a base model?); build it from an Instruct checkpoint, or use --prompt")
    return ChatFormat.from_record(rec)


class ChatSession:
    """One conversation's KV cache over a loaded bundle; `turn` answers the conversation so far."""

    def __init__(self, bundle: Bundle):
        self.format = chat_format(bundle)
        self.engine = PythonEngine(bundle)
        self.bundle = bundle
        self.cached: list[int] = []  # token ids whose K/V sit in the cache, from position 0
        sink = bundle.manifest["export"].get("attention_sink")
        self.ring = sink is not None  # a sink + ring cache: see _reusable
        self.eos = set(self.engine.eos) | set(self.format.stop_ids.values())
        vocab = self.engine.meta.get("get_vocab_size") or bundle.manifest["model"]["args"]["vocab_size"]
        self.vocab_size = int(vocab)
        self.grammars = Grammars(bundle.tokenizer, self.vocab_size, sorted(self.eos))

    @property
    def max_context_len(self) -> int:
        return self.engine.max_context_len

    def encode(self, messages: list[dict], tools) -> list[int]:
        return self.format.encode(self.engine.tokenizer, messages, list(tools) if tools else None)

    # ---- one turn ---------------------------------------------------------------------------

    def turn(self, messages: list[dict], opts: ChatOptions = ChatOptions(), on_text: OnText | None = None,
             cancelled: Callable[[], bool] = lambda: False) -> ChatTurn:
        start = time.perf_counter()
        tools = check_tools(list(opts.tools), "tools") if opts.tools else None
        choice = check_tool_choice(opts.tool_choice, tools, "tool_choice") if tools else "none"
        if tools and self.format.tool_format is None:
            raise ConfigError(f"{self.bundle.root}: this bundle's chat template does not take tools")
        ids, dropped = self.fit(messages, tools, opts.max_new_tokens)
        reused = self._reusable(ids)
        with native_output_silenced():  # XNNPACK's cpuinfo logs on first use
            logits = self._prefill(ids, reused)
            turn = self._decode(logits, ids, opts, tools, choice, on_text, cancelled, start)
        turn.reused_tokens, turn.dropped_messages = reused, dropped
        turn.prefill_tps = (len(ids) - reused) / turn.ttft_s if turn.ttft_s else 0.0
        return turn

    def prompt_logits(self, messages: list[dict], tools=None) -> torch.Tensor:
        """The logits [vocab] that start the assistant's turn, through the same cache reuse a turn
        makes (for tests and scoring)."""
        ids, _ = self.fit(messages, tools, 1)
        with native_output_silenced():
            return self._prefill(ids, self._reusable(ids))

    def fit(self, messages: list[dict], tools, max_new_tokens: int) -> tuple[list[int], int]:
        """The conversation's ids, its oldest exchanges dropped until it leaves room for
        max_new_tokens (the system message and the last exchange always stay)."""
        context = self.max_context_len
        system = 1 if messages and messages[0].get("role") == "system" else 0
        kept, dropped = list(messages), 0
        while True:
            ids = self.encode(kept, tools)
            if len(ids) + min(max_new_tokens, context // 2) <= context:
                return ids, dropped
            # the next user message after the first exchange starts what is kept
            users = [i for i, m in enumerate(kept) if i > system and m.get("role") == "user"]
            if not users:
                if len(ids) < context:
                    return ids, dropped
                raise ConfigError(
                    f"the conversation's last message makes a {len(ids)}-token prompt and this bundle's context holds "
                    f"{context}; shorten it (or the system message and tools), or rebuild with a larger --max-context-len")
            dropped += users[0] - system
            kept = kept[:system] + kept[users[0]:]

    def _reusable(self, ids: list[int]) -> int:
        """Leading ids already in the cache. At least the last id is run again (its logits start
        the turn). A sink + ring cache can rewrite only its last chunk's positions in place (older
        slots may hold positions the mask no longer describes); past that, a fresh cache."""
        n = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)
        if self.ring and n < len(self.cached) - self.engine.max_seq_len:
            self._fresh_cache()
            return 0
        return n

    def _fresh_cache(self) -> None:
        """A newly loaded forward method: its planned buffers (the ring) start as the bundle gives them."""
        with native_output_silenced():
            self.engine.forward = PteProgram(self.bundle.pte, self.bundle.data_path).forward()
        self.cached = []

    def _prefill(self, ids: list[int], reused: int) -> torch.Tensor:
        n = self.engine.max_seq_len
        logits = None
        for pos in range(reused, len(ids), n):
            logits = self.engine.forward(torch.tensor([ids[pos : pos + n]]), torch.tensor([pos]))
        self.cached = list(ids)
        return self.engine._last(logits)

    def _step(self, token: int) -> torch.Tensor:
        pos = len(self.cached)
        logits = self.engine.forward(torch.tensor([[token]]), torch.tensor([pos]))
        self.cached.append(token)
        return self.engine._last(logits)

    def _decode(self, logits, ids, opts: ChatOptions, tools, choice, on_text, cancelled, start) -> ChatTurn:
        gen = torch.Generator()
        gen.manual_seed(opts.seed) if opts.seed is not None else gen.seed()
        steps = min(opts.max_new_tokens, self.max_context_len - len(ids))
        text, stream = Streamer(opts.stop, on_text), Utf8Stream(byte_level=False)
        constraint = self.grammars.constraint(tools, choice) if choice not in ("auto", "none") else None
        call_ids: list[int] = []
        stamps: list[float] = []
        finish = "length" if steps == opts.max_new_tokens else "context"
        for i in range(steps):
            if cancelled():
                finish = "cancelled"
                break
            if constraint is not None:
                token = sample_token(constraint.mask(logits), opts.temperature, gen)
            else:
                token = sample_token(logits, opts.temperature, gen)
                if i == 0 and choice == "auto" and self._starts_call(token):
                    constraint = self.grammars.constraint(tools, choice)  # the call is written under the grammar
                    token = sample_token(constraint.mask(logits), opts.temperature, gen)
            stamps.append(time.perf_counter())
            if constraint is not None:
                if token in self.eos and constraint.done:
                    finish = "tool_calls"
                    break
                constraint.consume(token)
                call_ids.append(token)
                logits = self._step(token)
                if constraint.matcher.is_stopped():
                    finish = "tool_calls"
                    break
                continue
            if token in self.eos:
                finish = "stop"
                break
            if text.feed(stream.feed(self.engine.token_bytes([token]))):
                logits = self._step(token)
                finish = "stop"
                break
            logits = self._step(token)
        ttft = (stamps[0] - start) if stamps else time.perf_counter() - start
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        call = None
        if constraint is not None:
            body = self.engine.token_bytes(call_ids).decode("utf-8", errors="replace")
            if finish == "tool_calls":
                call = parse_call(body)
            else:  # cut off (length, context, cancelled): what was written, not a call
                text.feed(body)
        else:
            text.feed(stream.flush())
        return ChatTurn(text.close(call is not None), call, finish, len(ids), 0, len(stamps), ttft, 0.0, decode,
                        self.max_context_len, mask_ms=[s * 1000 for s in constraint.mask_seconds] if constraint else [])

    def _starts_call(self, token: int) -> bool:
        piece = self.engine.token_bytes([token]).decode("utf-8", errors="ignore")
        return piece.lstrip().startswith("{") or piece == "<|python_tag|>"


class Streamer:
    """The turn's text, streamed to `on_text` as it grows; text that may be the start of a stop
    string is held back until it is not. feed() returns True once a stop string appeared."""

    def __init__(self, stop: tuple[str, ...], on_text: OnText | None):
        self.stop, self.on_text, self.text, self.sent = tuple(s for s in stop if s), on_text, "", 0

    def feed(self, piece: str) -> bool:
        self.text += piece
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text = self.text[:at]
                self._send(len(self.text))
                return True
        hold = max((len(s) - 1 for s in self.stop), default=0)
        self._send(len(self.text) - hold)
        return False

    def close(self, is_call: bool = False) -> str:
        if is_call:
            return ""
        self._send(len(self.text))
        return self.text

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            if self.on_text:
                self.on_text(self.text[self.sent : upto])
            self.sent = upto
