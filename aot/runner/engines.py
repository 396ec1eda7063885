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
from pathlib import Path
from typing import Callable

import torch

from aot.bundle import Bundle
from aot.errors import ConfigError
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

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _rates(prompt_tokens: int, start: float, stamps: list[float], load_s: float) -> tuple[float, float, float]:
    """(ttft, prefill tok/s, decode tok/s) from the generate() start and per-token timestamps."""
    if not stamps:
        return 0.0, 0.0, 0.0
    ttft = max(stamps[0] - start - load_s, 1e-9)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ttft, prompt_tokens / ttft, decode


def sample_tokens(logits: torch.Tensor, pos: int, steps: int, temperature: float, seed: int | None, eos: set[int],
                  emit: Callable[[int], None], step: Callable[[int, int], torch.Tensor]) -> list[float]:
    """Sample (greedy at temperature 0) up to `steps` tokens from `logits`, the prompt's last
    logits: each token goes to `emit` and then to `step(token, position)` for the next logits;
    stops before an EOS id. Returns each emitted token's timestamp (for the rates)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)
    stamps = []
    for _ in range(steps):
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=gen))
        else:
            token = int(logits.argmax())
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
            self.runner = TextLLMRunner(str(bundle.pte), str(tokenizer))
        self.init_s = time.perf_counter() - start  # tokenizer and metadata; the program loads lazily
        self._loaded = False

    def generate(self, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, on_text: OnText | None = None) -> Generation:
        from executorch.extension.llm.runner import GenerationConfig

        if seed is not None and temperature > 0:
            raise ConfigError(
                "--seed needs --engine python: ExecuTorch's runner seeds its own sampler"
            )
        sink, stamps, stats = TextSink(self.byte_level, on_text), [], []

        def on_piece(piece: str) -> None:
            stamps.append(time.perf_counter())
            sink.feed(piece)

        # num_bos=1: Llama prompts start with <|begin_of_text|>, which the runner adds only when asked.
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, num_bos=1, echo=False)
        self.runner.reset()  # each call is a fresh sequence at position 0
        start = time.perf_counter()
        with native_output_silenced((1, 2)):
            self.runner.generate(prompt, config, token_callback=on_piece, stats_callback=stats.append)
        text = sink.close()
        s = stats[-1]
        load_s = (s.model_load_end_ms - s.model_load_start_ms) / 1000 if not self._loaded else 0.0
        self._loaded = True
        ttft, prefill, decode = _rates(s.num_prompt_tokens, start, stamps, load_s)
        return Generation(text, self.name, s.num_prompt_tokens, len(stamps), load_s, ttft, prefill, decode)


class PythonEngine:
    name = "python"

    def __init__(self, bundle: Bundle):
        bundle.require_host_runnable()
        bundle.require_text_runner("the forward-method engine")
        load_kernels()  # imports, not counted as load time
        start = time.perf_counter()
        with native_output_silenced():
            program = PteProgram(bundle.pte)
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
                 seed: int | None = None, on_text: OnText | None = None) -> Generation:
        ids = self.encode(prompt)
        if len(ids) >= self.max_context_len:
            raise ConfigError(f"the prompt is {len(ids)} tokens; this bundle's context holds {self.max_context_len}")
        with native_output_silenced():  # XNNPACK's cpuinfo logs on first use
            return self._generate(ids, max_new_tokens, temperature, seed, on_text)

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
        return Generation(text, self.name, len(ids), len(stamps), load_s, ttft, prefill, decode)

    @staticmethod
    def _last(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1] if logits.dim() == 3 else logits[0]

    def score(self, ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [len(ids), vocab]: row i predicts ids[i + 1]."""
        if len(ids) > self.max_context_len:
            raise ConfigError(f"{len(ids)} tokens do not fit this bundle's context ({self.max_context_len})")
        with native_output_silenced():
            return self._score(ids)

    def _score(self, ids: list[int]) -> torch.Tensor:
        rows = []
        if self.full_logits:
            for pos in range(0, len(ids), self.max_seq_len):
                chunk = torch.tensor([ids[pos : pos + self.max_seq_len]])
                rows.append(self.forward(chunk, torch.tensor([pos]))[0])
        else:  # the bundle returns the last position's logits: feed one token per call
            for pos, token in enumerate(ids):
                rows.append(self.forward(torch.tensor([[token]]), torch.tensor([pos])))
        return torch.cat(rows).float()


ENGINES = {"stock": StockEngine, "python": PythonEngine}


def make_engine(name: str, bundle: Bundle):
    if name not in ENGINES:
        raise ConfigError(f"unknown --engine '{name}'; choose one of: {', '.join(ENGINES)}")
    return ENGINES[name](bundle)
