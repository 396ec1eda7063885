"""aot/runner/engines.py without a bundle: `sample_tokens` draws from softmax(logits / temperature)
with its own seeded generator, and PythonEngine hands it the temperature and seed it was given."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from aot.runner import engines
from aot.runner.engines import PythonEngine, sample_tokens

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -3.0])
DRAWS = 6000
# Chi-square with 5 degrees of freedom: P(chi2 > 40) is about 1e-7. The draws are seeded, so the
# statistics below are fixed numbers; the bound only has to sit between the right sampler's
# (measured 3.8-7.1) and a wrong one's (another of these temperatures: over 600).
CHI2_BOUND = 40.0


def draw(temperature: float, seed: int | None, steps: int = DRAWS, logits: torch.Tensor = LOGITS,
         eos: frozenset[int] = frozenset()) -> tuple[list[int], list[int]]:
    """(tokens emitted, positions `step` was called at), each step returning the same logits."""
    tokens, positions = [], []

    def step(token: int, pos: int) -> torch.Tensor:
        positions.append(pos)
        return logits

    stamps = sample_tokens(logits, 7, steps, temperature, seed, set(eos), tokens.append, step)
    assert len(stamps) == len(tokens)
    return tokens, positions


def chi2(tokens: list[int], temperature: float) -> float:
    expected = torch.softmax(LOGITS.double() / temperature, -1) * len(tokens)
    counts = Counter(tokens)
    observed = torch.tensor([counts.get(i, 0) for i in range(len(LOGITS))], dtype=torch.float64)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    tokens, _ = draw(temperature, seed=11)
    assert chi2(tokens, temperature) < CHI2_BOUND
    for other in {0.7, 1.0, 2.0} - {temperature}:  # the test can tell the temperatures apart
        assert chi2(tokens, other) > 10 * CHI2_BOUND, other


def test_temperature_zero_is_greedy_and_ignores_the_seed():
    for seed in (None, 0, 5):
        tokens, _ = draw(0.0, seed, steps=50)
        assert tokens == [int(LOGITS.argmax())] * 50
    cold, _ = draw(1e-3, seed=5, steps=200)  # the limit T -> 0 is greedy too
    assert set(cold) == {int(LOGITS.argmax())}


def test_same_seed_same_tokens_different_seed_different_tokens():
    a, _ = draw(1.0, seed=3, steps=200)
    assert draw(1.0, seed=3, steps=200)[0] == a
    others = [draw(1.0, seed=s, steps=200)[0] for s in (4, 5, 6)]
    assert all(o != a for o in others)
    torch.manual_seed(123)  # the global generator is not what it uses
    assert draw(1.0, seed=3, steps=200)[0] == a


def test_stops_before_eos_and_steps_positions_from_the_prompt_end():
    eos = int(torch.softmax(LOGITS / 2.0, -1).argmin())  # rare: some tokens come before it
    tokens, positions = draw(2.0, seed=1, eos={eos})
    assert 0 < len(tokens) < DRAWS and eos not in tokens
    assert positions == list(range(7, 7 + len(tokens)))
    assert draw(0.0, seed=None, eos={int(LOGITS.argmax())})[0] == []


class _FakeTokenizer:
    def encode(self, text, bos, eos):
        return [3, 4]


def _engine(logits: torch.Tensor) -> PythonEngine:
    """A PythonEngine over a fake program whose forward always returns `logits`."""
    engine = PythonEngine.__new__(PythonEngine)
    engine.forward = lambda tokens, pos: logits[None]
    engine.tokenizer, engine.token_bytes = _FakeTokenizer(), lambda ids: b"x" * len(ids)
    engine.bos, engine.eos = 0, set()
    engine.max_seq_len, engine.max_context_len = 8, 4096
    engine.load_s, engine._loaded, engine.full_logits = 0.0, True, False
    return engine


def test_python_engine_passes_temperature_and_seed_through(monkeypatch):
    seen = []

    def spy(logits, pos, steps, temperature, seed, eos, emit, step):
        seen.append((temperature, seed))
        tokens, _ = draw(temperature, seed, steps)
        for t in tokens:
            emit(t)
        return [float(i) for i in range(len(tokens))]

    monkeypatch.setattr(engines, "sample_tokens", spy)
    gen = _engine(LOGITS).generate("hi", 5, temperature=0.8, seed=9)
    assert seen == [(0.8, 9)] and gen.generated_tokens == 5


def test_python_engine_samples_at_the_given_temperature():
    engine = _engine(LOGITS)
    ids = []
    engine.token_bytes = lambda toks: ids.extend(toks) or b"x"
    engine.generate("hi", 3000, temperature=2.0, seed=2)
    assert len(ids) == 3000 and chi2(ids, 2.0) < CHI2_BOUND and chi2(ids, 1.0) > 10 * CHI2_BOUND


def test_python_engine_stops_at_the_context_and_truncates_on_request():
    engine = _engine(LOGITS)
    engine.max_context_len = 10
    gen = engine.generate("hi", 50)  # BOS + 2 prompt tokens: 7 positions left
    assert (gen.prompt_tokens, gen.generated_tokens, gen.stop_reason) == (3, 7, "context")
    assert engine.generate("hi", 4).stop_reason == "max_new_tokens"
    engine.tokenizer = type("T", (), {"encode": lambda self, text, bos, eos: list(range(3, 20))})()
    with pytest.raises(engines.ConfigError, match="18 tokens .* holds 10"):
        engine.generate("long", 4)
    cut = engine.generate("long", 4, truncate=True)
    assert (cut.prompt_truncated_from, cut.prompt_tokens, cut.generated_tokens) == (18, 6, 4)
