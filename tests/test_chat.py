"""Multi-turn chat over a bundle: the KV cache kept between turns (and the answers equal to a
fresh session's), the oldest turns dropped when the context fills, tool calls under the grammar,
a sink + ring cache, and `aot run --chat` / `--messages`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from aot.bundle import open_bundle
from aot.errors import ConfigError
from aot.runner.chat import ChatOptions, ChatSession, Streamer, chat_format
from chat_fixtures import TOOLS
from conftest import cli_build, run_cli

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
WORDS = "the weather in Paris is sunny and 18 degrees send a calendar invite to Alice for Monday".split()


def user(i: int, n: int = 12) -> dict:
    return {"role": "user", "content": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + "?"}


@pytest.fixture(scope="module")
def session(chat_bundle):
    return ChatSession(open_bundle(Path(chat_bundle["path"])))


def test_bundle_records_the_chat_format(chat_bundle):
    chat = chat_bundle["chat"]
    assert chat["source"] == "tokenizer_config.json" and chat["tool_calls"]["format"] == "llama3.2-json"
    assert set(chat_bundle["eos_ids"]) == {128_001, 128_008, 128_009}
    assert any(name.endswith("tokenizer_config.json") for name in chat_bundle["inputs"])
    result = run_cli("inspect", chat_bundle["path"])
    assert "chat      template from tokenizer_config.json" in result.stdout


def test_second_turn_prefills_only_its_own_tokens(chat_bundle, session):
    messages = [SYSTEM, user(0)]
    first = session.turn(messages, ChatOptions(max_new_tokens=8))
    assert first.reused_tokens == 0 and first.generated_tokens == 8
    messages += [first.message(), user(3)]
    second = session.turn(messages, ChatOptions(max_new_tokens=8))
    assert second.reused_tokens >= first.prompt_tokens  # the whole first prompt stayed in the cache
    fresh = ChatSession(open_bundle(Path(chat_bundle["path"])))
    again = fresh.turn(messages, ChatOptions(max_new_tokens=8))
    assert again.reused_tokens == 0 and again.text == second.text
    torch.testing.assert_close(session.prompt_logits(messages), fresh.prompt_logits(messages), atol=1e-4, rtol=1e-4)


def test_a_full_context_drops_the_oldest_exchanges(session):
    messages = [SYSTEM]
    for i in range(80):  # far more than 4096 tokens
        messages += [user(i, 40), {"role": "assistant", "content": " ".join(WORDS[:30])}]
    messages.append(user(99))
    turn = session.turn(messages, ChatOptions(max_new_tokens=16))
    assert turn.dropped_messages > 0 and turn.dropped_messages % 2 == 0  # whole exchanges
    assert turn.prompt_tokens + 16 <= turn.max_context_len
    kept = [SYSTEM, *messages[1 + turn.dropped_messages :]]
    assert turn.prompt_tokens == len(session.encode(kept, None))


def test_a_message_too_long_for_the_context_is_one_line(session):
    with pytest.raises(ConfigError, match="context holds 4096"):
        session.turn([user(0, 9000)], ChatOptions(max_new_tokens=4))


def test_tool_calls_validate_and_the_result_goes_back(session):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed, choice in enumerate(["required", "create_event", "convert_currency", "required"]):
        messages = [SYSTEM, user(seed)]
        turn = session.turn(messages, ChatOptions(max_new_tokens=400, temperature=1.0, seed=seed, tools=tuple(TOOLS),
                                                  tool_choice=choice))
        assert turn.finish_reason == "tool_calls", turn
        call = turn.tool_call
        assert choice in ("required", call["name"])
        jsonschema.validate(call["arguments"], schemas[call["name"]])
        assert json.loads(turn.message()["tool_calls"][0]["function"]["arguments"]) == call["arguments"]
    messages += [turn.message(), {"role": "tool", "content": '{"ok": true}'}]
    after = session.turn(messages, ChatOptions(max_new_tokens=4, tools=tuple(TOOLS), tool_choice="none"))
    assert after.reused_tokens > turn.prompt_tokens and after.tool_call is None


def test_cancel_stops_and_the_next_turn_runs(session):
    calls = []
    turn = session.turn([user(1)], ChatOptions(max_new_tokens=50), cancelled=lambda: calls.append(1) or len(calls) > 3)
    assert turn.finish_reason == "cancelled" and turn.generated_tokens == 3
    assert session.turn([user(1)], ChatOptions(max_new_tokens=2)).generated_tokens == 2


@pytest.fixture(scope="module")
def sink_bundle(chat_ckpt, tmp_path_factory):
    return cli_build(tmp_path_factory.mktemp("bundles") / "chat-sink", "--checkpoint", chat_ckpt, "--quant", "none",
                     "--max-seq-len", 32, "--max-context-len", 4096, "--attention-sink", "4,96")


def test_chat_goes_on_through_a_sink_ring(sink_bundle):
    """Turns far past the ring's 132 slots: each turn's logits equal a fresh session's that runs the
    whole conversation through the ring, and a rewrite older than the last chunk starts a fresh ring."""
    b = open_bundle(Path(sink_bundle["path"]))
    kept, messages = ChatSession(b), [SYSTEM]
    for i in range(4):
        messages.append(user(i, 30))
        logits = kept.prompt_logits(messages)
        torch.testing.assert_close(logits, ChatSession(b).prompt_logits(messages), atol=1e-4, rtol=1e-4)
        messages.append({"role": "assistant", "content": " ".join(WORDS[i:])})
    assert len(kept.cached) > 2 * 132  # sink 4 + window 96 + chunk 32 slots
    shorter = [SYSTEM, user(7, 30)]
    torch.testing.assert_close(kept.prompt_logits(shorter), ChatSession(b).prompt_logits(shorter), atol=1e-4, rtol=1e-4)


def test_cli_messages_and_tools_json(chat_bundle, tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([SYSTEM, user(2)]))
    (tmp_path / "t.json").write_text(json.dumps(TOOLS))
    result = run_cli("run", chat_bundle["path"], "--messages", tmp_path / "m.json", "--tools", tmp_path / "t.json",
                     "--tool-choice", "get_weather", "--max-new-tokens", 300, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] and out["finish_reason"] == "tool_calls" and out["tool_call"]["name"] == "get_weather"
    assert out["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_cli_interactive_chat(chat_bundle):
    result = run_cli("run", chat_bundle["path"], "--chat", "--system", "Be brief", "--max-new-tokens", 4, "--json",
                     input="hello there\n\nhow are you\n")
    assert result.exit_code == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(turns) == 2 and turns[1]["reused_tokens"] >= turns[0]["prompt_tokens"]


@pytest.mark.parametrize("args, match", [
    (["--chat", "--engine", "stock"], "--engine stock: chat runs"),
    (["--messages", "missing.json"], "--messages missing.json: no such file"),
    (["--prompt", "x", "--tools", "t.json"], "--tools: needs --chat or --messages"),
    (["--chat", "--prompt", "x", "--tool-choice", "required"], None),
])
def test_cli_chat_errors(chat_bundle, args, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("run", chat_bundle["path"], *args)
    assert result.exit_code == 3, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
    if match:
        assert match in result.stderr


def test_a_base_bundle_has_no_chat_format():
    class Base:
        root, manifest = Path("b"), {"chat": None}

    with pytest.raises(ConfigError, match="carries no chat format"):
        chat_format(Base())


def test_stop_strings_are_held_back_and_cut():
    seen = []
    s = Streamer(("STOP",), seen.append)
    assert not s.feed("hello S") and "".join(seen) == "hell"
    assert s.feed("TOP and more")
    assert s.close() == "hello " and "".join(seen) == "hello "


# ---- the shipped demo Instruct model (aot/demo/instruct, tools/train_demo_instruct.py) ----------------


@pytest.fixture(scope="module")
def demo_instruct_bundle(tmp_path_factory) -> dict:
    """`make demo`'s chat bundle: `aot build --model demo-instruct` with its defaults (8da4w)."""
    return cli_build(tmp_path_factory.mktemp("bundles") / "demo-instruct", "--model", "demo-instruct")


def test_the_demo_instruct_model_answers_and_calls_its_tools(demo_instruct_bundle):
    """A fresh clone can see chat and a tool call work: the fine-tune answers in words, and offered
    its nine tools (tool choice auto: the model decides to call, the grammar makes the call parse)
    it calls get_weather, as `make demo` shows."""
    from aot.texts import DEMO_INSTRUCT

    b = demo_instruct_bundle
    assert b["chat"]["source"].endswith("tokenizer_config.json") and b["eos_ids"] == [2, 1, 2050]
    said = run_cli("run", b["path"], "--chat", "--prompt", "Hello! What can you do?", "--max-new-tokens", 60, "--json")
    assert said.exit_code == 0, said.stderr
    words = json.loads(said.stdout)
    assert words["finish_reason"] == "stop" and words["text"].strip() and not words.get("tool_call")
    called = run_cli("run", b["path"], "--chat", "--prompt", "What's the weather in Paris?",
                     "--tools", DEMO_INSTRUCT / "tools.json", "--json")
    assert called.exit_code == 0, called.stderr
    call = json.loads(called.stdout)
    assert call["finish_reason"] == "tool_calls" and call["tool_call"]["name"] == "get_weather", call
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in json.loads((DEMO_INSTRUCT / "tools.json").read_text())}
    jsonschema.validate(call["tool_call"]["arguments"], tools["get_weather"])  # (the city: 3.5 M parameters copy few)
