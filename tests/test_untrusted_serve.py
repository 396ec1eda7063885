"""`aot serve` under a fuzzer nobody here wrote: schemathesis generates requests (valid and invalid)
from the server's own /openapi.json and checks every answer: no 5xx, every error an OpenAI error
body, and the server still serving afterwards. Then what a fuzzer does not try: bodies and token
counts past the caps, a client that stops sending its body, one that stops reading its stream.

The server is aot's real HTTP stack (FastAPI app, uvicorn, the worker and its queue) over the fake
session of test_serve.py, so thousands of requests take seconds; tests/test_serve.py runs the same
stack over a real bundle."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from test_serve import fake_server, health, say



@pytest.fixture(scope="module")
def fuzz_server():
    with fake_server(max_tokens=8, max_request_bytes=64 << 10) as (url, session, srv):
        yield url


def _openai_error_body(ctx, response, case):
    """Every 4xx is JSON of OpenAI's error shape: {"error": {"message": str, "type", "param", "code"}}."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)
            and isinstance(body["error"].get("message"), str) and body["error"]["message"]):
        raise AssertionError(f"{response.status_code} without an OpenAI error body: {response.content[:200]!r}")
    return None


errors_are_openai_bodies = schemathesis.check(_openai_error_body)
OPERATIONS = ["GET /health", "GET /v1/models", "GET /v1/models/{name}", "POST /v1/chat/completions",
              "POST /v1/completions"]


@pytest.mark.parametrize("operation,mode", [(o, "positive") for o in OPERATIONS]
                         + [(o, "negative") for o in OPERATIONS if o.startswith("POST")])  # GETs: nothing to violate
def test_schemathesis_finds_no_5xx_and_only_json_errors(fuzz_server, operation, mode):
    """Each operation of /openapi.json, valid (positive) and invalid (negative) requests as
    schemathesis generates them (the pytest plugin of schemathesis 4.32 does not load under this
    pytest; its strategies are driven by hypothesis directly)."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")
    ops = {f"{o.method.upper()} {o.path}": o for o in (r.ok() for r in schema.get_all_operations())}
    assert set(ops) == set(OPERATIONS)
    statuses: dict[int, int] = {}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=ops[operation].as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def run(case):
        response = case.call_and_validate(base_url=fuzz_server, checks=[not_a_server_error, errors_are_openai_bodies],
                                          timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    run()
    assert statuses and not any(code >= 500 for code in statuses), statuses


def test_the_server_keeps_serving_after_the_fuzzer(fuzz_server):
    status, _, body = say(fuzz_server, "hi")
    assert status == 200 and body["choices"][0]["message"]["content"] == "Hello"
    assert health(fuzz_server)["status"] == "ok" and health(fuzz_server)["requests"]["failed"] == 0


def test_the_schema_describes_the_request_bodies(fuzz_server):
    spec = requests.get(fuzz_server + "/openapi.json", timeout=10).json()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatRequest")
    assert "messages" in spec["components"]["schemas"]["ChatRequest"]["required"]
    assert "prompt" in spec["components"]["schemas"]["CompletionRequest"]["required"]


def test_oversize_bodies_and_token_counts_are_refused():
    with fake_server(max_tokens=8, max_request_bytes=4096) as (url, _, _srv):
        big = {"model": "fake", "messages": [{"role": "user", "content": "x" * 10_000}]}
        r = requests.post(url + "/v1/chat/completions", json=big, timeout=10)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # chunked, no Content-Length: refused once the bytes read pass the cap
        r = requests.post(url + "/v1/chat/completions", data=iter([b"{" + b" " * 2000] * 4), timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        for tokens in (0, -1, 10**30, "many", 1.5):
            status, _, body = say(url, "hi", max_tokens=tokens)
            assert status == 400 and "max_tokens" in body["error"]["message"], (tokens, body)
        status, _, body = say(url, "hi", max_tokens=10**6)  # past the cap: capped, or refused, never run
        assert status in (200, 400), body
        if status == 200:
            assert body["usage"]["completion_tokens"] <= 8
        deep = "[" * 100_000 + "]" * 100_000
        r = requests.post(url + "/v1/chat/completions", data=deep[:4000], timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 400


def _raw(url: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connect(), so the window it advertises stays small
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect((host, int(port)))
    return s


def test_a_client_that_stops_sending_its_body_is_dropped_and_blocks_nothing():
    with fake_server(request_timeout=2.0) as (url, _, _srv):
        s = _raw(url)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        start = time.monotonic()
        status, _, body = say(url, "hi")  # meanwhile others are served at once
        assert status == 200 and time.monotonic() - start < 2.0
        s.settimeout(15)
        answer = b""
        while b'"error"' not in answer and (chunk := s.recv(4096)):
            answer += chunk
        assert b" 408 " in answer.split(b"\r\n")[0] and b'"error"' in answer, answer[:300]
        s.close()


def test_a_client_that_stops_reading_its_stream_gives_up_the_bundle():
    """A stream nobody reads is cancelled after --request-timeout (30 s without one); the request
    behind it is served, not made to wait out the whole generation."""
    with fake_server(request_timeout=4.0) as (url, session, _srv):
        s = _raw(url, rcvbuf=4096)
        body = json.dumps({"model": "fake", "stream": True, "messages": [{"role": "user", "content": "flood"}]})
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        time.sleep(2.5)  # it generates 64 KiB pieces; nobody reads; the socket buffers fill (~0.5 s)
        start = time.monotonic()
        status, _, reply = say(url, "hi")
        waited = time.monotonic() - start
        s.close()
        assert status == 200, reply
        assert waited < 4.0, waited  # inside its own --request-timeout
        assert health(url)["requests"]["cancelled"] >= 1
