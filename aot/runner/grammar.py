"""Tool calls that always parse: while the model writes a call, each token's logits are masked by a
grammar built from the tools' JSON schemas (llguidance, chosen by its per-token mask cost at a
128K vocabulary: bench/grammar_mask.py), so the call is JSON that validates against its schema.

A call is Llama 3.2's JSON form, `{"name": NAME, "parameters": {...}}`, written compactly as the
chat template renders a past call (json.dumps' separators), so the next turn's prompt repeats the
generated tokens and the KV cache keeps them.
"""

from __future__ import annotations

import json
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from aot.errors import ConfigError
from aot.runner.text import tiktoken_as_tokenizer_json

# Compact, in the order the template renders a past call; ", " and ": " as json.dumps writes them.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A call must end: strings, arrays and numbers whose schema sets no bound get one, objects take only the keys
# they name (a model that never closes a string would otherwise write until max_tokens and leave
# an unparseable call).
MAX_STRING, MAX_ITEMS, MAX_NUMBER = 256, 32, 2**53  # 2**53: the integers a JSON number holds exactly
NUMBER_STEP = 1e-6  # a number's finest decimal: six places
BOUNDS_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const")


def bounded(schema):
    """`schema` with maxLength on unbounded strings, maxItems on unbounded arrays, a range on
    unbounded numbers and at most six decimals, and no keys objects do not name: every call ends."""
    if isinstance(schema, list):
        return [bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v) if k in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "additionalProperties", "not")
           else v for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: bounded(v) for k, v in schema["properties"].items()}
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: bounded(v) for k, v in schema[key].items()}
    types = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    if "string" in types and not any(k in schema for k in ("maxLength", "enum", "const", "pattern", "format")):
        out["maxLength"] = MAX_STRING
    if "array" in types and "maxItems" not in schema:
        out["maxItems"] = MAX_ITEMS
    if ("number" in types or "integer" in types) and not any(k in schema for k in BOUNDS_KEYS):
        out.update(minimum=-MAX_NUMBER, maximum=MAX_NUMBER)  # and so a bounded count of whole digits
    if "number" in types and not any(k in schema for k in ("multipleOf", "enum", "const")):
        # and of decimals: without it a number's fraction may go on for ever (measured: random
        # logits wrote 1,000-digit fractions; llguidance writes a multipleOf as a digit count)
        out["multipleOf"] = NUMBER_STEP
    if "object" in types and "additionalProperties" not in schema:
        out["additionalProperties"] = False  # only the keys the schema names (OpenAI's strict mode)
    return out


def call_schema(tools: list[dict], choice: str = "auto") -> dict:
    """JSON schema of one call: any of the tools (or the one `choice` names)."""
    fns = [t["function"] for t in tools if choice in ("auto", "required") or t["function"]["name"] == choice]
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                "properties": {"name": {"const": f["name"]}, "parameters": bounded(f["parameters"])}} for f in fns]
    return {"x-guidance": COMPACT, **(options[0] if len(options) == 1 else {"anyOf": options})}


def parse_call(text: str) -> dict:
    """{name, arguments} of a generated call."""
    call = json.loads(text)
    return {"name": call["name"], "arguments": call["parameters"]}


class Grammars:
    """llguidance's view of one bundle's tokenizer (built once: ~0.1-1 s at 128K tokens)."""

    def __init__(self, tokenizer: Path, vocab_size: int, eos_ids: list[int]):
        self.path, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)

    @cached_property
    def tokenizer(self):
        import llguidance

        text = self.path.read_text() if self.path.suffix == ".json" else json.dumps(tiktoken_as_tokenizer_json(self.path))
        return llguidance.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=self.eos_ids)

    def constraint(self, tools: list[dict], choice: str = "auto") -> Constraint:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(call_schema(tools, choice))
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConfigError(f"--tools: the tools' schemas do not make a grammar ({matcher.get_error()})")
        return Constraint(matcher, self.vocab_size)


_IDS = np.arange(32)  # bit i of bitmask word w: token 32 * w + i (little-endian words, as llguidance writes them)


class Constraint:
    """One call being written: mask(logits) before sampling, consume(token) after."""

    def __init__(self, matcher, vocab_size: int):
        import llguidance.numpy as llnp  # (llguidance.torch imports torch's compiler: ~3 s)

        self.matcher, self.vocab_size, self._fill = matcher, vocab_size, llnp.fill_next_token_bitmask
        self._np = llnp.allocate_token_bitmask(1, vocab_size)  # int32 [1, ceil(V / 32)], bit i: token allowed
        self.mask_seconds: list[float] = []  # per-token cost (compute + apply), for the benchmark

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] with every token the grammar refuses at -inf. (llguidance.torch's own
        apply_token_bitmask_inplace goes through torch.compile: seconds on first use, then ~7 ms a
        token on CPU; unpacking the bits here costs a fraction of a millisecond at 128K.)"""
        start = time.perf_counter()
        self._fill(self.matcher, self._np, 0)
        words, vocab = self._np[0], logits.shape[-1]
        set_words = np.flatnonzero(words)
        if set_words.size * 32 < vocab // 8:  # a few tokens allowed (keys, punctuation, enums): gather them
            bits = np.unpackbits(words[set_words].view(np.uint8), bitorder="little").reshape(-1, 32).astype(bool)
            ids = (set_words[:, None] * 32 + _IDS)[bits]
            ids = torch.from_numpy(ids[ids < vocab])
            out = torch.full((vocab,), float("-inf"))
            out[ids] = logits[ids].float()
        else:  # inside a string nearly every token is: one pass over the unpacked bits
            allowed = np.unpackbits(words.view(np.uint8), bitorder="little", count=vocab)
            out = torch.where(torch.from_numpy(allowed).bool(), logits.float(), float("-inf"))
        self.mask_seconds.append(time.perf_counter() - start)
        return out

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the tool-call grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The call is complete: only EOS may follow."""
        return self.matcher.is_stopped() or self.matcher.is_accepting()
