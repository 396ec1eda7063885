"""`aot serve BUNDLE`: an OpenAI-compatible HTTP endpoint (/v1/chat/completions, /v1/completions,
/v1/models) over one bundle, so clients and eval tools talk to the exact program that ships.

One ChatSession owns the bundle's KV cache and runs one generation at a time, so a single worker
thread owns it; requests wait in a bounded queue (beyond it: 429) and the asyncio side only parses,
checks and streams. Successive requests of one conversation reuse the cache (ChatSession keeps the
longest common prefix). A client that goes away cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import AsyncIterator, Callable

import uvicorn
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aot.bundle import open_bundle
from aot.chatformat import check_messages, check_tool_choice, check_tools
from aot.errors import AotError, ConfigError
from aot.native import native_output_silenced
from aot.runner.chat import ChatOptions, ChatSession, ChatTurn, OnText
from aot.runner.mllama import is_vision_bundle
from aot.serve_api import (
    SSE_DONE,
    STALL_S,
    ApiError,
    ChatRequest,
    CompletionRequest,
    Reply,
    ServeConfig,
    create_app,
    sse,
    stall_limit,
)

log = logging.getLogger("uvicorn.error")
Run = Callable[[ChatSession, "OnText | None", Callable[[], bool]], ChatTurn]
# How long the worker waits for a streamed piece to reach the socket before it goes on (a client
# that reads slowly then gets its pieces queued, and the generation does not stall on it).
HANDOFF_S = 1.0


class Job:
    """One request's generation, shared by the event loop and the worker thread: the worker posts
    (kind, value) events (started, text, done, error) into the loop's queue."""

    def __init__(self, run: Run, stream: bool, stall: float = STALL_S):
        self.run, self.stream, self.stall = run, stream, stall
        self.unsent = 0.0  # seconds the loop has not managed to write the stream (a client not reading)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()  # the client went away, timed out, or the server stops
        self.sent = threading.Event()  # the loop wrote the last streamed piece

    def post(self, kind: str, value=None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is gone
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def emit(self, piece: str) -> None:
        """on_text, on the worker thread. ExecuTorch's forward holds the GIL for a whole step, so the
        loop could write this piece only after the next token's forward: wait until it is written."""
        self.sent.clear()
        self.post("text", piece)
        if self.sent.wait(HANDOFF_S):
            self.unsent = 0.0
            return
        self.unsent += HANDOFF_S
        if self.unsent >= self.stall:  # the client stopped reading: it holds the bundle no longer
            log.warning("aot serve: a stream was not read for %.0f s; its generation is cancelled", self.unsent)
            self.cancel.set()


class Worker(threading.Thread):
    """The one thread that runs generations on the session, in arrival order."""

    def __init__(self, session: ChatSession, queue: int):
        super().__init__(name="aot-serve-generate", daemon=True)
        self.session, self.size = session, queue
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.current: Job | None = None
        self.stopping = False
        self.counts = {"done": 0, "cancelled": 0, "failed": 0}

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
            if len(self.waiting) >= self.size:
                raise ApiError(429, f"{len(self.waiting)} requests are already waiting for this bundle (--queue "
                               f"{self.size}); retry shortly", "requests", code="rate_limit_exceeded",
                               headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.cond.notify()

    def withdraw(self, job: Job) -> None:
        """Stop a job: out of the queue if it waits there, cancelled at its next token if it runs."""
        job.cancel.set()
        job.sent.set()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            for job in self.waiting:
                job.cancel.set()
                job.post("error", ApiError(503, "the server is shutting down", "server_error", code="shutting_down"))
            self.waiting.clear()
            if self.current is not None:
                self.withdraw(self.current)
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                job = self.current = self.waiting.popleft()
            try:
                self._generate(job)
            finally:
                with self.cond:
                    self.current = None

    def _generate(self, job: Job) -> None:
        job.post("started")
        try:
            turn = job.run(self.session, job.emit if job.stream else None, job.cancel.is_set)
        except ApiError as e:
            job.post("error", e)
        except ConfigError as e:  # the request's fault: a prompt past the context, tools the template refuses
            # ChatSession.fit's message is the only one that says "context holds" (see the report)
            code = "context_length_exceeded" if "context holds" in str(e) else None
            job.post("error", ApiError(400, str(e), param="messages" if code else None, code=code))
        except Exception as e:  # a bug or a runtime failure: this request fails, the server keeps serving
            self.counts["failed"] += 1
            log.exception("aot serve: a generation failed")
            kind = e.kind if isinstance(e, AotError) else "internal"
            with contextlib.suppress(Exception):  # before the reply, so the client never sees a stale cache
                self.session._fresh_cache()  # the KV cache may hold what the failed call half wrote
            job.post("error", ApiError(500, f"the generation failed ({kind}: {type(e).__name__}: {e})", "server_error"))
        else:
            self.counts["cancelled" if turn.finish_reason == "cancelled" else "done"] += 1
            job.post("done", turn)


# ---- requests to generations ----------------------------------------------------------------


def complete(session: ChatSession, prompt, opts: ChatOptions, on_text: OnText | None,
             cancelled: Callable[[], bool]) -> ChatTurn:
    """A raw continuation (/v1/completions): BOS + the prompt's tokens (or the ids given), no chat
    template, on the same session and cache."""
    engine = session.engine
    ids = list(prompt) if isinstance(prompt, list) else engine.encode(prompt)
    if not ids:
        raise ApiError(400, "prompt: expected text or at least one token id", param="prompt")
    if max(ids) >= session.vocab_size or min(ids) < 0:
        raise ApiError(400, f"prompt: token ids must be in [0, {session.vocab_size})", param="prompt")
    if len(ids) >= session.max_context_len:
        raise ApiError(400, f"the prompt is {len(ids)} tokens (BOS included) and this bundle's context holds "
                       f"{session.max_context_len}; shorten it", param="prompt", code="context_length_exceeded")
    # ChatSession's own prefill (cache reuse) and sampling loop, without the chat template: see the report
    start = time.perf_counter()
    reused = session._reusable(ids)
    with native_output_silenced():  # as ChatSession.turn: XNNPACK's cpuinfo logs on first use
        logits = session._prefill(ids, reused)
        turn = session._decode(logits, ids, opts, None, "none", on_text, cancelled, start)
    turn.reused_tokens = reused
    return turn


class Service:
    """The checks that turn a request into a generation, and the generation into a response."""

    def __init__(self, session: ChatSession, cfg: ServeConfig, worker: Worker):
        self.session, self.cfg, self.worker = session, cfg, worker
        m = session.bundle.manifest
        self.model = cfg.model_name or m["model"]["name"]
        self.fingerprint = "fp_" + m["files"]["model.pte"]["sha256"][:10]  # which program answered
        created = int(datetime.fromisoformat(m["created"]).timestamp())
        self.card = {"id": self.model, "object": "model", "created": created, "owned_by": "aot"}
        self.cap = cfg.max_tokens or session.max_context_len

    def options(self, req, max_tokens: int | None, tools=None, tool_choice: str = "none") -> ChatOptions:
        if req.model != self.model:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.model!r}",
                           param="model", code="model_not_found")
        if max_tokens is not None and max_tokens > self.cap:
            raise ApiError(400, f"max_tokens is {max_tokens}, but this server allows at most {self.cap}",
                           param="max_tokens")
        try:
            return ChatOptions(max_new_tokens=max_tokens or self.cap, temperature=1.0 if req.temperature is None
                               else req.temperature, seed=req.seed, stop=req.stops, tools=tools,
                               tool_choice=tool_choice)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None

    def chat(self, req: ChatRequest) -> Run:
        messages = [m.plain(i) for i, m in enumerate(req.messages)]
        _checked("messages", check_messages, messages, "messages")
        tools = _checked("tools", check_tools, req.tools, "tools") if req.tools is not None else None
        choice = None
        if req.tool_choice is not None:
            choice = _checked("tool_choice", check_tool_choice, req.tool_choice, tools, "tool_choice")
        opts = self.options(req, req.max_completion_tokens or req.max_tokens, tuple(tools) if tools else None,
                            choice or ("auto" if tools else "none"))
        return lambda session, on_text, cancelled: session.turn(messages, opts, on_text, cancelled)

    def completion(self, req: CompletionRequest) -> Run:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request (n = 1)", param="prompt")
            prompt = prompt[0]
        opts = self.options(req, req.max_tokens)
        return lambda session, on_text, cancelled: complete(session, prompt, opts, on_text, cancelled)

    async def respond(self, request: Request, run: Run, stream: bool, reply: Reply, include_usage: bool) -> Response:
        job = Job(run, stream, stall_limit(self.cfg))
        self.worker.submit(job)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            event = await _next(job, watch, self.cfg.request_timeout)
            if event == ("started", None):
                event = await _next(job, watch, None)
        except BaseException:
            self.worker.withdraw(job)
            raise
        finally:
            watch.cancel()
        kind, value = event
        if kind == "disconnected":
            self.worker.withdraw(job)
            return Response(status_code=499)  # nobody reads it
        if kind == "timeout":
            self.worker.withdraw(job)
            raise ApiError(503, f"the request waited {self.cfg.request_timeout:g} s for the bundle "
                           "(--request-timeout); retry later", "server_error", code="timeout")
        if kind == "error":
            raise value
        if kind == "done" and value.finish_reason == "cancelled":
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        if not stream:
            return JSONResponse(reply.whole(value))
        return StreamingResponse(self._chunks(job, event, reply, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _chunks(self, job: Job, event: tuple, reply: Reply, include_usage: bool) -> AsyncIterator[bytes]:
        head = b"".join(sse(chunk) for chunk in reply.start())  # sent with the first piece: one write
        try:
            while True:
                kind, value = event
                if kind == "text":
                    yield head + sse(reply.piece(value))
                    head = b""
                    job.sent.set()  # written: the worker may run the next token
                elif kind == "error":  # after the stream began: the error as the stream's last event
                    yield head + sse(value.body())
                    return
                elif kind == "done":
                    if value.finish_reason == "cancelled":  # the server stops: the stream ends unfinished
                        return
                    yield head + b"".join(sse(chunk) for chunk in reply.end(value, include_usage)) + SSE_DONE
                    return
                event = await job.events.get()
        finally:  # also when Starlette cancels the stream because the client disconnected
            self.worker.withdraw(job)


def _checked(param: str, check: Callable, *args):
    """aot.chatformat's checks, their ConfigError as a 400 naming `param`."""
    try:
        return check(*args)
    except ConfigError as e:
        raise ApiError(400, str(e), param=param) from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(job: Job, watch: asyncio.Future, timeout: float | None) -> tuple:
    """The job's next event, ("disconnected", None) when the client goes first, ("timeout", None)."""
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    return ("disconnected", None) if watch in done else ("timeout", None)


# ---- running it -----------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame) -> None:
        self.on_exit()  # cancel the generation now: uvicorn waits for open responses to finish
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        # signals() holds them, from before the start line on. uvicorn's own version re-raises the
        # signal once it has shut down, for its default action (KeyboardInterrupt, death by
        # SIGTERM); aot has shut down cleanly by then and exits 0.
        yield

    @contextlib.contextmanager
    def signals(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening socket (port 0: a free one) and its URL."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto must say TCP: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto is
        # IPPROTO_TCP, and with Nagle on, every response on a kept-alive connection waits ~40 ms
        # for the client's delayed ACK (socket.create_server leaves proto 0).
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    real = sock.getsockname()[1]
    return sock, f"http://{f'[{host}]' if ':' in host else host}:{real}"


def open_session(path: Path) -> ChatSession:
    bundle = open_bundle(path)
    if is_vision_bundle(bundle):
        raise ConfigError(f"{bundle.root}: aot serve runs text bundles (chat and completions)")
    return ChatSession(bundle)


class Server:
    """The app over one session, on its socket; run() blocks until stop(), SIGINT or SIGTERM."""

    def __init__(self, session: ChatSession, cfg: ServeConfig, debug: bool = False):
        self.worker = Worker(session, cfg.queue)
        self.service = Service(session, cfg, self.worker)
        self.sock, self.url = listen(cfg.host, cfg.port)
        config = uvicorn.Config(create_app(self.service), log_level="info" if debug else "warning",
                                access_log=debug, timeout_graceful_shutdown=10, lifespan="off")
        self.uvicorn = _Uvicorn(config, self.worker.stop)

    def info(self) -> dict:
        s = self.service
        return {"url": self.url, "model": s.model, "max_context_len": s.session.max_context_len, "max_tokens": s.cap,
                "queue": s.cfg.queue, "api_key": s.cfg.api_key is not None}

    def run(self, on_listening: Callable[[dict], None]) -> dict:
        """Serve; `on_listening` gets info() once clients can connect. Returns the request counts."""
        self.worker.start()
        try:
            with self.uvicorn.signals():  # a Ctrl-C right after the start line stops the server as cleanly
                on_listening(self.info())
                self.uvicorn.run(sockets=[self.sock])
        finally:
            self.worker.stop()
            self.worker.join(timeout=5)
            self.sock.close()
        return dict(self.worker.counts)

    def stop(self) -> None:
        self.worker.stop()
        self.uvicorn.should_exit = True


def serve(path: Path, cfg: ServeConfig, on_listening: Callable[[dict], None], debug: bool = False) -> dict:
    """Serve the bundle at `path` (aot serve) until SIGINT/SIGTERM; the request counts."""
    return Server(open_session(path), cfg, debug).run(on_listening)
