"""`aot serve`: the real server (uvicorn, in a subprocess) over the tiny chat bundle, talked to with
the official openai client and with raw HTTP for malformed requests; and the same app over a fake
session in a thread, for what a random-weights model cannot be made to do on cue (fail, hold a
generation open until released)."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import openai
import pytest

from aot.errors import ConfigError
from aot.runner.chat import ChatTurn
from aot.serve import Server
from aot.serve_api import ServeConfig
from chat_fixtures import TOOLS
from conftest import run_cli

AOT = Path(sys.executable).with_name("aot")
KEY = "test-key-123"
CAP = 400  # the module server's --max-tokens
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- helpers --------------------------------------------------------------------------------


def call(url: str, method: str, path: str, body=None, headers: dict | None = None, key: str | None = KEY):
    """(status, headers, JSON body) of one raw request; `body` bytes as they are, else as JSON."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **auth, **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if raw else None
    finally:
        conn.close()


def errors(reply: tuple) -> tuple[int, dict]:
    """(status, body) of call()'s reply."""
    return reply[0], reply[2]


def assert_error(status: int, body: dict, expected: int) -> None:
    assert status == expected, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def start_server(path, *flags: str) -> tuple[subprocess.Popen, dict, Path]:
    """`aot serve PATH --port 0 --json FLAGS` and its start line; stderr goes to a file (a pipe
    nobody reads could fill and block the server)."""
    err = Path(os.environ.get("TMPDIR", "/tmp")) / f"aot-serve-{os.getpid()}-{time.monotonic_ns()}.err"
    env = {k: v for k, v in os.environ.items() if k != "AOT_API_KEY"}
    proc = subprocess.Popen([str(AOT), "serve", str(path), "--port", "0", "--json", *flags], stdout=subprocess.PIPE,
                            stderr=err.open("w"), text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 240)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        pytest.fail(f"aot serve did not start: {err.read_text()[-2000:]}")
    return proc, json.loads(line), err


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def health(url: str) -> dict:
    return call(url, "GET", "/health", key=None)[2]


def wait_for(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ---- the real server over the chat bundle ---------------------------------------------------


@pytest.fixture(scope="module")
def server(chat_bundle):
    proc, info, err = start_server(chat_bundle["path"], "--queue", "1", "--max-tokens", str(CAP), "--api-key", KEY)
    yield SimpleNamespace(url=info["url"], model=info["model"], info=info, client=client(info["url"]), proc=proc,
                          err=err)
    stop_server(proc)  # test_sigint_... (the last to use it) has stopped it already
    assert "Traceback" not in err.read_text(), err.read_text()[-3000:]


def test_models_lists_the_bundle(server):
    assert server.info["ok"] is True and server.info["url"].startswith("http://127.0.0.1:")
    assert [m.id for m in server.client.models.list().data] == [server.model]
    assert server.client.models.retrieve(server.model).id == server.model


def test_chat_stream_concatenates_to_the_same_text(server):
    kw = dict(model=server.model, messages=USER, max_tokens=24)
    server.client.chat.completions.create(**kw, temperature=0)  # both below then reuse the same cached prefix
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
        whole = server.client.chat.completions.create(**kw, **sampling)
        assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
        assert whole.choices[0].finish_reason in ("stop", "length") and whole.choices[0].message.content
        chunks = list(server.client.chat.completions.create(**kw, **sampling, stream=True,
                                                           stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
        u = whole.usage
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens <= 24


@pytest.mark.parametrize("choice", ["named", "required"])
def test_tool_call_validates_and_its_result_goes_back(server, choice):
    tools, tool_choice = (TOOLS, {"type": "function", "function": {"name": "get_weather"}}) if choice == "named" \
        else (TOOLS[:1], "required")  # get_weather only: the other schemas allow calls longer than CAP
    r = server.client.chat.completions.create(model=server.model, messages=USER, tools=tools,
                                              tool_choice=tool_choice, max_tokens=CAP, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    message = r.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1
    call_ = message.tool_calls[0]
    assert call_.type == "function" and call_.function.name == "get_weather" and call_.id.startswith("call_")
    jsonschema.validate(json.loads(call_.function.arguments), TOOLS[0]["function"]["parameters"])

    history = USER + [message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call_.id, "content": '{"temperature": 18, "sky": "sunny"}'}]
    after = server.client.chat.completions.create(model=server.model, messages=history, tools=tools,
                                                  tool_choice="none", max_tokens=8, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length") and after.choices[0].message.tool_calls is None
    streamed = list(server.client.chat.completions.create(model=server.model, messages=USER, tools=tools,
                                                          tool_choice=tool_choice, max_tokens=CAP, temperature=0,
                                                          stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.arguments == call_.function.arguments
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_completions_continue_raw_text(server):
    kw = dict(model=server.model, prompt="def fibonacci(n):", max_tokens=12, temperature=0)
    server.client.completions.create(**kw)
    whole = server.client.completions.create(**kw)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 1 and whole.usage.completion_tokens <= 12
    text = "".join(c.choices[0].text for c in server.client.completions.create(**kw, stream=True) if c.choices)
    assert text == whole.choices[0].text


LONG = "hello world, this is a long message. " * 1500  # past the bundle's 4096-token context
ERRORS = {
    "bad JSON": (b'{"model": ', None, 400),
    "not an object": (b"[1, 2]", None, 400),
    "missing messages": ({"model": "MODEL"}, "messages", 400),
    "empty messages": ({"model": "MODEL", "messages": []}, "messages", 400),
    "wrong type": ({"model": "MODEL", "messages": USER, "max_tokens": "many"}, "max_tokens", 400),
    "unknown role": ({"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, "messages", 400),
    "content not text": ({"model": "MODEL", "messages": [{"role": "user", "content": 5}]}, None, 400),
    "bad tools": ({"model": "MODEL", "messages": USER, "tools": [{"type": "function"}]}, "tools", 400),
    "bad tool_choice": ({"model": "MODEL", "messages": USER, "tools": TOOLS, "tool_choice": "fly"}, "tool_choice", 400),
    "n=2": ({"model": "MODEL", "messages": USER, "n": 2}, "n", 400),
    "top_p": ({"model": "MODEL", "messages": USER, "top_p": 0.5}, "top_p", 400),
    "max_tokens over the cap": ({"model": "MODEL", "messages": USER, "max_tokens": CAP + 1}, "max_tokens", 400),
    "temperature out of range": ({"model": "MODEL", "messages": USER, "temperature": 3}, "temperature", 400),
    "prompt past the context": ({"model": "MODEL", "messages": [{"role": "user", "content": LONG}]}, "messages", 400),
    "wrong model": ({"model": "gpt-17", "messages": USER}, "model", 404),
    "body too large": (b" " * (2**20 + 1), None, 413),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_malformed_requests_get_openai_error_bodies(server, case):
    body, param, expected = ERRORS[case]
    if isinstance(body, dict):
        body = {**body, "model": server.model if body["model"] == "MODEL" else body["model"]}
    status, _, reply = call(server.url, "POST", "/v1/chat/completions", body)
    assert_error(status, reply, expected)
    if param is not None:
        assert reply["error"]["param"] and reply["error"]["param"].startswith(param), reply
    if case == "prompt past the context":
        assert "context" in reply["error"]["message"] and reply["error"]["code"] == "context_length_exceeded"
    assert call(server.url, "GET", "/v1/models")[0] == 200  # still serving


def test_other_errors_get_openai_error_bodies(server):
    assert_error(*errors(call(server.url, "GET", "/v1/models", key="wrong")), 401)
    assert_error(*errors(call(server.url, "GET", "/v1/models", key=None)), 401)
    with pytest.raises(openai.AuthenticationError):
        client(server.url, "wrong").chat.completions.create(model=server.model, messages=USER, max_tokens=1)
    assert_error(*errors(call(server.url, "GET", "/v1/nothing")), 404)
    assert_error(*errors(call(server.url, "GET", "/v1/chat/completions")), 405)
    status, _, reply = call(server.url, "POST", "/v1/completions", {"model": server.model, "prompt": LONG})
    assert_error(status, reply, 400)
    assert reply["error"]["code"] == "context_length_exceeded"
    assert_error(*errors(call(server.url, "POST", "/v1/completions", {"model": server.model, "prompt": "x",
                                                                      "echo": True})), 400)


def test_queue_full_gets_429_and_a_dropped_stream_frees_the_bundle(server):
    """--queue 1: one generating (A, streaming, then dropped), one waiting (B), the third refused."""
    before = health(server.url)["requests"]["cancelled"]
    a = server.client.chat.completions.create(model=server.model, messages=USER, max_tokens=CAP, temperature=0,
                                              stream=True)
    next(iter(a))  # A is generating
    b_text: list[str] = []
    b = threading.Thread(target=lambda: b_text.extend(
        c.choices[0].delta.content or "" for c in server.client.chat.completions.create(
            model=server.model, messages=USER, max_tokens=6, stream=True) if c.choices))
    b.start()
    assert wait_for(lambda: health(server.url)["waiting"] == 1)
    status, headers, body = call(server.url, "POST", "/v1/chat/completions",
                                 {"model": server.model, "messages": USER, "max_tokens": 4})
    assert_error(status, body, 429)
    assert headers["retry-after"] == "1" and body["error"]["code"] == "rate_limit_exceeded"
    a.close()  # the client goes away mid-stream: its generation stops, B runs
    b.join(60)
    assert not b.is_alive() and "".join(b_text)
    assert health(server.url)["requests"]["cancelled"] == before + 1


def test_disconnect_mid_stream_does_not_block_the_next_request(server):
    before = health(server.url)["requests"]["cancelled"]
    stream = server.client.chat.completions.create(model=server.model, messages=USER, max_tokens=CAP, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    assert wait_for(lambda: health(server.url)["requests"]["cancelled"] == before + 1)
    start = time.monotonic()
    r = server.client.chat.completions.create(model=server.model, messages=USER, max_tokens=4)
    assert r.choices[0].message.content is not None and time.monotonic() - start < 30
    assert not health(server.url)["busy"]


def test_sigint_cancels_the_generation_and_exits_cleanly(server):
    """The last test of the module server: it stops it (a server of its own would cost a start)."""
    u = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(
        {"model": server.model, "messages": USER, "max_tokens": CAP, "stream": True}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")  # generating
    start = time.monotonic()
    server.proc.send_signal(signal.SIGINT)
    rest = r.read()  # the stream ends, unfinished
    assert server.proc.wait(60) == 0
    assert time.monotonic() - start < 30
    assert b"[DONE]" not in rest
    text = server.err.read_text()
    assert "Traceback" not in text and "interrupted" not in text, text
    assert json.loads(server.proc.stdout.readline())["stopped"] is True
    conn.close()


# ---- without a bundle -----------------------------------------------------------------------


def test_listening_beyond_loopback_needs_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("AOT_API_KEY", raising=False)
    result = run_cli("serve", tmp_path / "no-bundle", "--host", "0.0.0.0")
    assert result.exit_code == ConfigError.exit_code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0], result.stderr
    assert ServeConfig(host="::1").host == "::1" and ServeConfig(host="localhost", api_key=None)
    assert ServeConfig(host="0.0.0.0", api_key="k").api_key == "k"
    for bad in ({"port": 70000}, {"queue": 0}, {"max_tokens": 0}, {"request_timeout": 0}):
        with pytest.raises(ConfigError):
            ServeConfig(**bad)


class FakeSession:
    """What aot.serve uses of a ChatSession: "Hello" in two pieces; "boom" fails; "hold" writes x
    until cancelled or released ("flood": 64 KiB pieces of x)."""

    max_context_len, vocab_size = 64, 100

    def __init__(self):
        self.bundle = SimpleNamespace(manifest={"model": {"name": "fake"}, "created": "2026-01-01T00:00:00+00:00",
                                                "files": {"model.pte": {"sha256": "0" * 64}}})
        self.release, self.fresh = threading.Event(), 0

    def turn(self, messages, opts, on_text=None, cancelled=lambda: False) -> ChatTurn:
        last, pieces = messages[-1]["content"], []
        if last == "boom":
            raise RuntimeError("boom")
        while last in ("hold", "flood") and not cancelled() and not self.release.wait(0.01):
            piece = "x" if last == "hold" else "x" * 65536
            pieces.append(piece)
            on_text and on_text(piece)
        if last not in ("hold", "flood"):
            for p in ("Hel", "lo"):
                pieces.append(p)
                on_text and on_text(p)
        finish = "cancelled" if cancelled() else "stop"
        return ChatTurn("".join(pieces), None, finish, 3, 0, len(pieces), 0.0, 0.0, 0.0, self.max_context_len)

    def _fresh_cache(self) -> None:
        self.fresh += 1


@contextmanager
def fake_server(**cfg):
    session = FakeSession()
    srv = Server(session, ServeConfig(port=0, **cfg))
    thread = threading.Thread(target=srv.run, args=(lambda info: None,), daemon=True)
    thread.start()
    try:
        yield srv.url, session, srv
    finally:
        session.release.set()
        srv.stop()
        thread.join(10)


def say(url: str, text: str, **kw):
    return call(url, "POST", "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": text}],
                                                      **kw}, key=None)


def test_a_failing_generation_is_a_500_and_the_server_goes_on():
    with fake_server() as (url, session, _):
        status, _, body = say(url, "boom")
        assert_error(status, body, 500)
        assert body["error"]["type"] == "server_error" and "boom" in body["error"]["message"]
        assert session.fresh == 1  # the cache is started afresh
        status, _, body = say(url, "hi")
        assert status == 200 and body["choices"][0]["message"]["content"] == "Hello"
        assert health(url)["requests"] == {"done": 1, "cancelled": 0, "failed": 1}


def test_waiting_past_the_request_timeout_is_a_503_and_full_queue_a_429():
    with fake_server(queue=1, request_timeout=0.3) as (url, session, _):
        held = client(url, "none").chat.completions.create(model="fake", messages=[{"role": "user", "content": "hold"}],
                                                           stream=True)
        next(iter(held))
        results: list = []
        waiter = threading.Thread(target=lambda: results.append(say(url, "hi")))
        waiter.start()
        assert wait_for(lambda: health(url)["waiting"] == 1, 5)
        assert_error(*errors(say(url, "hi")), 429)
        waiter.join(10)
        assert_error(results[0][0], results[0][2], 503)
        assert results[0][2]["error"]["code"] == "timeout" and health(url)["waiting"] == 0
        held.close()
        assert wait_for(lambda: health(url)["requests"]["cancelled"] == 1, 5)
        assert say(url, "hi")[0] == 200


def test_stop_ends_an_open_stream_and_refuses_the_waiting():
    """What SIGINT does first (uvicorn's handle_exit calls the worker's stop): the running
    generation is cancelled, its stream ends unfinished, the waiting requests get 503."""
    with fake_server() as (url, session, srv):
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "fake", "messages": [{"role": "user", "content": "hold"}], "stream": True}).encode())
        r = conn.getresponse()
        assert r.readline().startswith(b"data: ")
        waiting: list = []
        waiter = threading.Thread(target=lambda: waiting.append(say(url, "hi")))
        waiter.start()
        assert wait_for(lambda: health(url)["waiting"] == 1, 5)
        srv.worker.stop()
        assert b"[DONE]" not in r.read()
        conn.close()
        waiter.join(10)
        assert_error(waiting[0][0], waiting[0][2], 503)
        assert_error(*errors(say(url, "hi")), 503)
