"""The HTTP surface of `aot serve`: its options (ServeConfig, whose defaults the CLI shows), OpenAI's
wire format (request bodies as pydantic models, checked once on the way in; `chat.completion` and
`text_completion` objects and their stream chunks; errors as OpenAI shapes them, {"error":
{"message", "type", "param", "code"}}) and the FastAPI app: routes, API key, body limit, and every
error as a JSON body (FastAPI's 422 included, as a 400).

No torch here (`aot serve --help` reads ServeConfig): aot.serve's Service turns the requests into
generations on the bundle.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from aot import __version__
from aot.errors import ConfigError

if TYPE_CHECKING:
    from aot.runner.chat import ChatTurn
    from aot.serve import Service

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: a free port (the start line gives the real one)
    api_key: str | None = None  # required beyond loopback; then every /v1 request needs `Bearer KEY`
    queue: int = 8  # requests that may wait while one generates; more get 429
    max_request_bytes: int = 2**20  # request bodies beyond: 413
    max_tokens: int | None = None  # cap on a request's max_tokens; None: the bundle's context
    request_timeout: float | None = None  # seconds a request may wait in the queue (then 503); None: no limit
    model_name: str | None = None  # the `model` clients name; None: the bundle's model name

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in [0, 65535], but got {self.port}")
        if self.queue < 1:
            raise ConfigError(f"--queue must be >= 1, but got {self.queue}")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"--max-request-bytes must be >= 1024, but got {self.max_request_bytes}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be >= 1, but got {self.max_tokens}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout must be > 0 seconds, but got {self.request_timeout}")
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError("--model-name must not be empty")
        if not self.api_key and not is_loopback(self.host):
            raise ConfigError(f"--host {self.host} listens beyond this machine: give --api-key KEY (or set AOT_API_KEY), "
                              "or listen on 127.0.0.1")


# ---- errors ---------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers or {}

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- requests -------------------------------------------------------------------------------


class _Body(BaseModel):
    # Clients send fields aot has no use for (user, metadata, store, parallel_tool_calls): ignored.
    # The ones that would change the answer, if ignored, are refused in `refuse_unsupported`.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON string, as OpenAI sends it back


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def plain(self, index: int) -> dict:
        """The message as chat templates take it: text content, OpenAI's `developer` as system."""
        m = self.model_dump(exclude_none=True)
        if m["role"] == "developer":  # OpenAI's newer name for the system role
            m["role"] = "system"
        if isinstance(self.content, list):
            other = [p.type for p in self.content if p.type != "text"]
            if other:
                raise ApiError(400, f"messages[{index}].content: {other[0]} parts are not supported (a text bundle)",
                               param=f"messages.{index}.content")
            m["content"] = "".join(p.text or "" for p in self.content)
        return m


class _Generate(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's range
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    top_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None

    def refuse_unsupported(self) -> None:
        """Options aot's sampler does not have, at a value that would change the answer: 400."""
        if self.n not in (None, 1):
            raise ApiError(400, f"n must be 1 (one generation at a time), but got {self.n}", param="n")
        for name, neutral in (("top_p", 1), ("frequency_penalty", 0), ("presence_penalty", 0)):
            value = getattr(self, name)
            if value is not None and value != neutral:
                raise ApiError(400, f"{name} is not supported (aot samples with temperature only); omit it or "
                               f"send {neutral}", param=name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Generate):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    logprobs: bool | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise ApiError(400, "logprobs is not supported", param="logprobs")
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, "response_format: only text is supported (tool calls are grammar-constrained JSON)",
                           param="response_format")


class CompletionRequest(_Generate):
    prompt: str | list[str] | list[int]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name, value in (("echo", self.echo), ("logprobs", self.logprobs), ("suffix", self.suffix)):
            if value:
                raise ApiError(400, f"{name} is not supported", param=name)
        if self.best_of not in (None, 1):
            raise ApiError(400, f"best_of must be 1, but got {self.best_of}", param="best_of")


def parse(model: type[_Generate], body: bytes) -> _Generate:
    """A request body, checked: 400 with OpenAI's error body for bad JSON, wrong types, missing fields."""
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than json can decode
        raise ApiError(400, f"the request body is not valid JSON ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e.errors()) from None
    req.refuse_unsupported()
    return req


def _invalid(errors: list) -> ApiError:
    """pydantic's first complaint, as a 400 naming the field (`messages.0.role`)."""
    first = (errors or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ---- responses ------------------------------------------------------------------------------

FINISH = {"stop": "stop", "length": "length", "context": "length", "tool_calls": "tool_calls"}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Reply:
    """One response's objects: `chat` (chat.completion[.chunk]) or `text` (text_completion)."""

    kind: Literal["chat", "text"]
    model: str
    fingerprint: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.kind == "chat" else "cmpl-") + secrets.token_hex(12)

    def _head(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def whole(self, turn: ChatTurn) -> dict:
        if self.kind == "text":
            choice = {"index": 0, "text": turn.text, "logprobs": None, "finish_reason": FINISH[turn.finish_reason]}
        else:
            message = {"role": "assistant", "content": turn.text, "refusal": None}
            if turn.tool_call is not None:
                message.update(content=None, tool_calls=[self._call(turn)])
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH[turn.finish_reason]}
        return {**self._head(False), "choices": [choice], "usage": usage(turn)}

    def start(self) -> list[dict]:
        """The chunks before any text: a chat stream names the role first."""
        return [self.piece("", role=True)] if self.kind == "chat" else []

    def piece(self, text: str, role: bool = False) -> dict:
        if self.kind == "text":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        else:
            delta = {"role": "assistant", "content": text, "refusal": None} if role else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**self._head(True), "choices": [choice]}

    def end(self, turn: ChatTurn, include_usage: bool) -> list[dict]:
        """The last chunks: the tool call (known whole only once written), the finish reason, usage."""
        chunks = []
        finish = FINISH[turn.finish_reason]
        if self.kind == "text":
            chunks.append({**self._head(True), "choices": [
                {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}]})
        else:
            if turn.tool_call is not None:
                chunks.append({**self._head(True), "choices": [{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, **self._call(turn)}]}, "logprobs": None, "finish_reason": None}]})
            chunks.append({**self._head(True), "choices": [
                {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]})
        if include_usage:
            chunks.append({**self._head(True), "choices": [], "usage": usage(turn)})
        return chunks

    def _call(self, turn: ChatTurn) -> dict:
        call = turn.tool_call
        return {"id": "call_" + self.id.rpartition("-")[2], "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def usage(turn: ChatTurn) -> dict:
    return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.generated_tokens,
            "total_tokens": turn.prompt_tokens + turn.generated_tokens}


# ---- the app --------------------------------------------------------------------------------


STALL_S = 30.0  # a body that stops arriving, or a stream nobody reads, is dropped after this long
# (--request-timeout, when it is set and shorter)


def stall_limit(cfg: ServeConfig) -> float:
    return min(cfg.request_timeout, STALL_S) if cfg.request_timeout else STALL_S


async def read_body(request: Request, limit: int, stall: float = STALL_S) -> bytes:
    """The body, refused (413) past `limit` bytes, before it is all read when Content-Length says so;
    408 when the client stops sending it for `stall` seconds (a slow client holds a connection, never
    the bundle)."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes (--max-request-bytes)",
                         code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), stall)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body stopped arriving for {stall:g} s; send it whole",
                           code="timeout") from None
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(service: Service) -> FastAPI:
    # /openapi.json describes the API as it is, request bodies included (the routes read their own
    # bodies to cap their size first, so FastAPI cannot infer them): what clients generate from and
    # what schemathesis fuzzes (tests/test_untrusted_serve.py).
    app = FastAPI(title="aot serve", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    key = service.cfg.api_key.encode() if service.cfg.api_key else None

    async def authorize(request: Request) -> None:  # async: FastAPI runs a sync one on a thread pool
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [service.card]}

    @v1.get("/models/{name:path}")
    async def model(name: str) -> dict:
        if name != service.model:
            raise ApiError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return service.card

    @v1.post("/chat/completions", openapi_extra=_body_schema(ChatRequest), responses=_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await read_body(request, service.cfg.max_request_bytes, stall_limit(service.cfg)))
        reply = Reply("chat", service.model, service.fingerprint)
        return await service.respond(request, service.chat(req), req.stream, reply, req.include_usage)

    @v1.post("/completions", openapi_extra=_body_schema(CompletionRequest), responses=_RESPONSES)
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await read_body(request, service.cfg.max_request_bytes, stall_limit(service.cfg)))
        reply = Reply("text", service.model, service.fingerprint)
        return await service.respond(request, service.completion(req), req.stream, reply, req.include_usage)

    @app.get("/health")
    async def health() -> dict:
        w = service.worker
        return {"status": "stopping" if w.stopping else "ok", "model": service.model,
                "busy": w.current is not None, "waiting": len(w.waiting), "requests": dict(w.counts)}

    app.include_router(v1)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)  # FastAPI's 422, in OpenAI's shape and status
    async def invalid(_, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(_invalid(e.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)  # unknown paths (404), wrong methods (405)
    async def http_error(_, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(Exception)  # a bug: a 500 body (uvicorn logs the traceback); the server goes on
    async def crashed(_, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error ({type(e).__name__})", "server_error"), status_code=500)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatRequest, CompletionRequest):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            if key is not None:
                schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in schema["paths"].items():
                    if path.startswith("/v1/"):
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


_ERROR = {"description": "an OpenAI error body: {error: {message, type, param, code}}",
          "content": {"application/json": {"schema": {"type": "object", "required": ["error"]}}}}
_RESPONSES = {400: _ERROR, 401: _ERROR, 404: _ERROR, 408: _ERROR, 413: _ERROR, 429: _ERROR, 503: _ERROR}
