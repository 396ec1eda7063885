"""Two ways to run a bundle on this host, with one result type.

- `StockEngine`: ExecuTorch's C++ TextLLMRunner (the code the Android/iOS demo apps run) through
  its Python bindings. The default: what it measures is what an app gets.
- `PythonEngine`: a plain loop over `forward` through ExecuTorch's Python runtime. For debugging,
  seeded sampling and teacher-forced scoring (logits at every position).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from aot.bundle import Bundle
from aot.errors import BundleError, ConfigError
from aot.native import native_output_silenced
from aot.runner.pte import PteProgram, load_kernels
from aot.runner.text import TextSink, TokenBytes, stream_tokenizer
from aot.tokenizer import load_tokenizer

OnText = Callable[[str], None]


@dataclass
class Generation:
    text: str
    engine: str
    prompt_tokens: int
    generated_tokens: int
    load_s: float  # program load (first call only; 0 afterwards)
    ttft_s: float  # prompt in -> first generated token out (tokenize + prefill + sample)
    prefill_tps: float
    decode_tps: float  # tokens after the first, per second
    image_s: float = 0.0  # vision bundles: the image encoder's time for this turn's image
    stop_reason: str = "max_new_tokens"  # "eos", "max_new_tokens", or "context" (the bundle's context is full)
    max_context_len: int = 0  # the bundle's context: prompt + generated tokens never pass it
    prompt_truncated_from: int | None = None  # --truncate-prompt: the prompt's tokens (BOS included) before the cut

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def fit_prompt(prompt_tokens: int, max_new_tokens: int, context: int, truncate: bool) -> int:
    """How many of a prompt's tokens (BOS included) to run in a bundle of `context` positions: all
    of them, or with `truncate` (--truncate-prompt) BOS and the prompt's tail, cut to leave room for
    max_new_tokens (for one token, when max_new_tokens alone nearly fills the context). Uncut, a
    prompt that leaves no room for one generated token is a ConfigError."""
    room = max_new_tokens if max_new_tokens <= context - 2 else 1
    if truncate:
        return min(prompt_tokens, context - room)
    if prompt_tokens >= context:
        raise ConfigError(
            f"the prompt is {prompt_tokens} tokens (BOS included) and this bundle's context holds {context}, "
            f"which leaves no room to generate; shorten the prompt, pass --truncate-prompt (keeps BOS and the "
            f"prompt's last {context - room - 1} tokens), or rebuild with a larger --max-context-len"
        )
    return prompt_tokens


def keep_tail(ids: list[int], keep: int) -> list[int]:
    """BOS (ids[0]) and the last keep - 1 of the other ids."""
    return ids if keep >= len(ids) else ids[:1] + ids[len(ids) - keep + 1 :]


def stop_reason(generated: int, steps: int, max_new_tokens: int) -> str:
    """Why generation ended after `generated` of the `steps` tokens it was allowed (max_new_tokens,
    clamped to what the context holds after the prompt)."""
    if generated < steps:
        return "eos"
    return "context" if steps < max_new_tokens else "max_new_tokens"


def _rates(prompt_tokens: int, start: float, stamps: list[float], load_s: float) -> tuple[float, float, float]:
    """(ttft, prefill tok/s, decode tok/s) from the generate() start and per-token timestamps."""
    if not stamps:
        return 0.0, 0.0, 0.0
    ttft = max(stamps[0] - start - load_s, 1e-9)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ttft, prompt_tokens / ttft, decode


def sample_token(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    """One token from logits [vocab]: greedy at temperature 0, else sampled with `gen`."""
    if temperature > 0:
        return int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen))
    return int(logits.argmax())


def sample_tokens(logits: torch.Tensor, pos: int, steps: int, temperature: float, seed: int | None, eos: set[int],
                  emit: Callable[[int], None], step: Callable[[int, int], torch.Tensor]) -> list[float]:
    """Sample (greedy at temperature 0) up to `steps` tokens from `logits`, the prompt's last
    logits: each token goes to `emit` and then to `step(token, position)` for the next logits;
    stops before an EOS id. Returns each emitted token's timestamp (for the rates)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)
    stamps = []
    for _ in range(steps):
        token = sample_token(logits, temperature, gen)
        if token in eos:
            break
        stamps.append(time.perf_counter())
        emit(token)
        logits = step(token, pos)
        pos += 1
    return stamps


class StockEngine:
    name = "stock"

    def __init__(self, bundle: Bundle):
        bundle.require_host_runnable()
        bundle.require_text_runner("ExecuTorch's TextLLMRunner")
        load_kernels()  # llama::custom_sdpa/update_cache and quantized embeddings for the runner
        with native_output_silenced():
            from executorch.extension.llm.runner import TextLLMRunner

        self._tmp = tempfile.TemporaryDirectory(prefix="aot-run-")
        tokenizer, self.byte_level = stream_tokenizer(bundle.tokenizer, Path(self._tmp.name))
        start = time.perf_counter()
        with native_output_silenced((1, 2)):  # the C++ runner logs every step to stdout/stderr
            self.runner = TextLLMRunner(str(bundle.pte), str(tokenizer),
                                        None if bundle.data_path is None else str(bundle.data_path))
        self.init_s = time.perf_counter() - start  # tokenizer and metadata; the program loads lazily
        # The runner's own tokenizer file and class, so prompts are counted as it will count them.
        self.tokenizer, _ = load_tokenizer(tokenizer)
        self._bundle_tokenizer = bundle.tokenizer
        # Positions a sequence may reach (get_max_context_len; with an attention sink, not the cache's length).
        self.max_context_len = bundle.manifest["export"]["max_context_len"]
        self._loaded = False

    @cached_property
    def token_bytes(self) -> TokenBytes:
        return TokenBytes(self._bundle_tokenizer)

    def count(self, text: str) -> int:
        """Tokens the runner makes of `text`, BOS included (it encodes with num_bos=1)."""
        return len(self.tokenizer.encode(text, 1, 0))

    def fit_text(self, ids: list[int], keep: int, tail: bool = False) -> str:
        """Text of the first (or with `tail` the last) keep - 1 of `ids` (no BOS), decoded, that the
        runner tokenizes to at most `keep` tokens: cut further while re-tokenizing makes more."""
        n = min(keep - 1, len(ids))
        while True:
            part = ids[len(ids) - n :] if tail else ids[:n]
            text = self.token_bytes(part).decode("utf-8", errors="ignore")
            excess = self.count(text) - keep
            if excess <= 0 or n == 0:
                return text
            n = max(0, n - excess)

    def generate(self, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, on_text: OnText | None = None, truncate: bool = False) -> Generation:
        from executorch.extension.llm.runner import GenerationConfig

        if seed is not None and temperature > 0:
            raise ConfigError(
                "--seed needs --engine python: ExecuTorch's runner seeds its own sampler"
            )
        if not prompt:  # the runner reads an empty prompt as "continue the last prefill()"
            raise ConfigError("--prompt is empty: ExecuTorch's runner needs at least one token of text "
                              "(--engine python starts from BOS alone)")
        context, given = self.max_context_len, self.count(prompt)
        keep = fit_prompt(given, max_new_tokens, context, truncate)
        if keep < given:  # the runner takes text: the kept token tail, decoded
            prompt = self.fit_text(list(self.tokenizer.encode(prompt, 0, 0)), keep, tail=True)
        n_prompt = self.count(prompt)
        # Clamped here: the runner (1.5.1) generates past its context and fails there instead.
        steps = min(max_new_tokens, context - n_prompt)
        sink, stamps, stats = TextSink(self.byte_level, on_text), [], []

        def on_piece(piece: str) -> None:
            stamps.append(time.perf_counter())
            sink.feed(piece)

        # num_bos=1: Llama prompts start with <|begin_of_text|>, which the runner adds only when asked.
        config = GenerationConfig(max_new_tokens=steps, temperature=temperature, num_bos=1, echo=False)
        self.runner.reset()  # each call is a fresh sequence at position 0
        start = time.perf_counter()
        try:
            with native_output_silenced((1, 2)):
                self.runner.generate(prompt, config, token_callback=on_piece, stats_callback=stats.append)
        except RuntimeError as e:
            raise BundleError(
                f"ExecuTorch's TextLLMRunner failed ({e}) on a {n_prompt}-token prompt after {len(stamps)} of "
                f"{steps} tokens (context {context}); try --engine python to see whether the program runs"
            ) from None
        text = sink.close()
        s = stats[-1]
        load_s = (s.model_load_end_ms - s.model_load_start_ms) / 1000 if not self._loaded else 0.0
        self._loaded = True
        ttft, prefill, decode = _rates(s.num_prompt_tokens, start, stamps, load_s)
        return Generation(text, self.name, s.num_prompt_tokens, len(stamps), load_s, ttft, prefill, decode,
                          stop_reason=stop_reason(len(stamps), steps, max_new_tokens), max_context_len=context,
                          prompt_truncated_from=given if keep < given else None)


class PythonEngine:
    name = "python"

    def __init__(self, bundle: Bundle):
        bundle.require_host_runnable()
        bundle.require_text_runner("the forward-method engine")
        load_kernels()  # imports, not counted as load time
        start = time.perf_counter()
        with native_output_silenced():
            program = PteProgram(bundle.pte, bundle.data_path)
            self.meta = program.metadata()
            self.forward = program.forward()
        self.load_s = time.perf_counter() - start
        self.tokenizer, _ = load_tokenizer(bundle.tokenizer)
        self.token_bytes = TokenBytes(bundle.tokenizer)
        self.bos = self.meta["get_bos_id"]
        self.eos = set(self.meta["get_eos_ids"])
        self.max_seq_len = self.meta["get_max_seq_len"]
        self.max_context_len = self.meta["get_max_context_len"]
        self.full_logits = bundle.manifest["export"].get("full_logits", False)
        self._loaded = False

    def encode(self, text: str) -> list[int]:
        return [self.bos] + list(self.tokenizer.encode(text, 0, 0))

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        """Run ids from position 0 in chunks; logits [vocab] after the last one."""
        logits = None
        for pos in range(0, len(ids), self.max_seq_len):
            chunk = torch.tensor([ids[pos : pos + self.max_seq_len]])
            logits = self.forward(chunk, torch.tensor([pos]))
        return self._last(logits)

    def generate(self, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, on_text: OnText | None = None, truncate: bool = False) -> Generation:
        ids = self.encode(prompt)
        keep = fit_prompt(len(ids), max_new_tokens, self.max_context_len, truncate)
        with native_output_silenced():  # XNNPACK's cpuinfo logs on first use
            gen = self._generate(keep_tail(ids, keep), max_new_tokens, temperature, seed, on_text)
        gen.prompt_truncated_from = len(ids) if keep < len(ids) else None
        return gen

    def _generate(self, ids, max_new_tokens, temperature, seed, on_text) -> Generation:
        sink = TextSink(byte_level=False, on_text=on_text)
        start = time.perf_counter()
        steps = min(max_new_tokens, self.max_context_len - len(ids))
        stamps = sample_tokens(self._prefill(ids), len(ids), steps, temperature, seed, self.eos,
                               lambda token: sink.feed(self.token_bytes([token])),
                               lambda token, pos: self._last(self.forward(torch.tensor([[token]]), torch.tensor([pos]))))
        text = sink.close()
        load_s = 0.0 if self._loaded else self.load_s
        self._loaded = True
        ttft, prefill, decode = _rates(len(ids), start, stamps, 0.0)
        return Generation(text, self.name, len(ids), len(stamps), load_s, ttft, prefill, decode,
                          stop_reason=stop_reason(len(stamps), steps, max_new_tokens),
                          max_context_len=self.max_context_len)

    @staticmethod
    def _last(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1] if logits.dim() == 3 else logits[0]

    def score(self, ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [len(ids), vocab]: row i predicts ids[i + 1]."""
        if len(ids) > self.max_context_len:
            raise ConfigError(f"{len(ids)} tokens do not fit this bundle's context ({self.max_context_len})")
        n = self.max_seq_len
        with native_output_silenced():
            return torch.cat([self.score_chunk(ids[pos : pos + n], pos) for pos in range(0, len(ids), n)])

    def score_chunk(self, window: list[int], pos: int) -> torch.Tensor:
        """Teacher-forced logits [len(window), vocab] of tokens placed at pos.. (after the earlier
        chunks of the same sequence); at most max_seq_len tokens."""
        if self.full_logits:
            return self.forward(torch.tensor([window]), torch.tensor([pos]))[0].float()
        return torch.cat([self.forward(torch.tensor([[t]]), torch.tensor([pos + i])) for i, t in enumerate(window)]).float()


ENGINES = {"stock": StockEngine, "python": PythonEngine}


def make_engine(name: str, bundle: Bundle):
    if name not in ENGINES:
        raise ConfigError(f"unknown --engine '{name}'; choose one of: {', '.join(ENGINES)}")
    return ENGINES[name](bundle)
