"""Tool calls under the grammar: whatever the logits, the call parses and validates against its
tool's schema (jsonschema as the independent check), in the compact form the template renders."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from aot.chatformat import check_tools
from aot.runner.grammar import MAX_STRING, Grammars, bounded, call_schema, parse_call
from aot.runner.text import TokenBytes
from aot.texts import DEMO_CHECKPOINT
from chat_fixtures import TOOLS

pytestmark = pytest.mark.oracle
TOKENIZER = DEMO_CHECKPOINT / "tokenizer.json"


@pytest.fixture(scope="module")
def grammars():
    return Grammars(TOKENIZER, 2048, [1, 2])


def generate(grammars, tools, choice, seed, temperature=1.0, limit=3000):
    """A call sampled from random logits (biased towards closing quotes, so strings end before
    their 256-character bound and the test stays fast)."""
    c = grammars.constraint(tools, choice)
    table = TokenBytes(TOKENIZER).table
    quote = torch.tensor([6.0 if b'"' in table.get(i, b"") else 0.0 for i in range(2048)])
    gen, ids = torch.Generator().manual_seed(seed), []
    while not c.done:
        logits = c.mask(torch.randn(2048, generator=gen) * 4 + quote)
        token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        c.consume(token)
        ids.append(token)
        assert len(ids) < limit, "the grammar let a call run on"
    return TokenBytes(TOKENIZER)(ids).decode("utf-8")


@pytest.mark.parametrize("choice", ["auto", "get_weather", "create_event", "convert_currency"])
def test_random_logits_always_give_a_valid_call(grammars, choice):
    tools = check_tools(TOOLS, "tools")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for seed in range(6):
        text = generate(grammars, tools, choice, seed)
        call = parse_call(text)
        assert choice in ("auto", call["name"])
        jsonschema.validate(call["arguments"], schemas[call["name"]])
        # compact, as the template re-renders a past call (so the next turn's prompt repeats it)
        assert text.startswith(json.dumps({"name": call["name"]})[:-1] + ', "parameters": {')
        assert json.loads(text) == {"name": call["name"], "parameters": call["arguments"]}


def test_bounds_added_only_where_the_schema_has_none():
    s = bounded({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string", "maxLength": 3},
                                                   "c": {"type": "array", "items": {"type": "string"}},
                                                   "d": {"type": "string", "enum": ["x"]}}})
    p = s["properties"]
    assert p["a"]["maxLength"] == MAX_STRING and p["b"]["maxLength"] == 3 and "maxLength" not in p["d"]
    assert p["c"]["maxItems"] == 32 and p["c"]["items"]["maxLength"] == MAX_STRING
    assert s["additionalProperties"] is False


def test_call_schema_names_one_tool_or_any():
    tools = check_tools(TOOLS, "tools")
    assert len(call_schema(tools)["anyOf"]) == 3
    one = call_schema(tools, "get_weather")
    assert one["properties"]["name"] == {"const": "get_weather"}


def test_numbers_end_even_where_their_logits_want_more_digits(grammars):
    """A number's fraction has no bound in JSON schema: logits that favour digits wrote
    1,000-digit fractions (bench/chat.py, 9 calls of 200 at Llama 3's vocabulary) until bounded()
    capped them at six decimals; the call still validates against the schema as the user wrote it."""
    tools = [{"type": "function", "function": {"name": "pay", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}, "rate": {"type": "number", "minimum": 0,
                                                                                 "maximum": 1}},
        "required": ["amount", "rate"]}}}]
    table = TokenBytes(TOKENIZER).table
    digits = torch.tensor([8.0 if table.get(i, b"x").isdigit() else 0.0 for i in range(2048)])
    c = grammars.constraint(check_tools(tools, "tools"), "pay")
    gen, ids = torch.Generator().manual_seed(0), []
    while not c.done:
        token = int(torch.multinomial(torch.softmax(c.mask(torch.randn(2048, generator=gen) + digits), -1), 1,
                                      generator=gen))
        c.consume(token)
        ids.append(token)
        assert len(ids) < 400, "the grammar let a number run on"
    call = parse_call(TokenBytes(TOKENIZER)(ids).decode("utf-8"))
    jsonschema.validate(call["arguments"], tools[0]["function"]["parameters"])
    for key in ("amount", "rate"):
        assert len(repr(call["arguments"][key]).partition(".")[2]) <= 6, call
    assert bounded({"type": "number", "enum": [0.1234567]}) == {"type": "number", "enum": [0.1234567]}
