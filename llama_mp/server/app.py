"""The HTTP side of rank 0: FastAPI routes, the API key, body limits and OpenAI's error JSON.

Runs on uvicorn in a thread of its own (`HttpServer`), so it answers while the model loads (503, and
GET /health says "loading") and while the main thread steps the batch. Every request is checked here
(protocol.py) before anything is queued: what is refused never reaches the scheduler or another rank.
Answers come from the scheduler as events; a streamed answer is sent as server-sent events ending with
`data: [DONE]`. A client that disconnects has its sequences cancelled, which frees their slots at the
next step.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import socket
import sys
import threading
import time
from typing import AsyncIterator, Dict, List

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..checks import JsonProblem, parse_json_bytes
from ..errors import LlamaMPError
from .protocol import (ApiError, Job, choice, detokenize, envelope, model_card, models_list, parse_chat,
                       parse_completion, streamed_calls, tokenize, tokenizer_info, tool_calls, usage)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .scheduler import Event, Generation, Sink
from .state import FAILED, READY, ServerState

def error_response(error: ApiError) -> Response:
    # ASCII JSON: a message may quote what a client sent (a URL's model name), and that need not be text
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.status in (408, 413):  # the body was not read to its end: what is left of it is no next request
        headers["Connection"] = "close"
    return Response(json.dumps(error.body()), status_code=error.status, headers=headers,
                    media_type="application/json")


def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY' (the server's "
                            "--api_key).", "invalid_request_error", None, "invalid_api_key")


MAX_JSON_DEPTH = 32  # the deepest nesting a valid request has is 4 (messages, content parts); more is refused
_SURROGATE = re.compile("[\ud800-\udfff]")


async def _read_json(request: Request, limit: int, within_s: float):
    """The body as JSON text, refusing more than `limit` bytes (413) without reading past the limit, a body
    that takes longer than `within_s` to arrive (408: a client sending it a byte at a time holds a
    connection for ever otherwise), one that is not UTF-8 text, not JSON, nested deeper than any request
    is, or that holds a lone surrogate ("\ud800": no text has one, and the tokenizers cannot encode it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body has {declared} bytes; this server takes at most {limit} "
                            "(--max_body_bytes).", "invalid_request_error", None, "request_too_large")

    async def receive() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"The request body is over {limit} bytes, the most this server takes "
                                    "(--max_body_bytes).", "invalid_request_error", None, "request_too_large")
        return bytes(body)

    try:
        raw = await asyncio.wait_for(receive(), within_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {within_s:g} s; send it at once.",
                       "invalid_request_error", None, "request_timeout") from None
    except ClientDisconnect:  # nobody reads this answer, but the request ends here, without a traceback
        raise ApiError(400, "The connection closed before the whole request body arrived.") from None
    try:
        body = parse_json_bytes(raw)
    except JsonProblem as e:
        raise ApiError(400, f"The request body {e.reason}.", param=e.field) from None
    _check_json(body)
    return body


def _check_json(body) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and strings (or keys) with a lone surrogate, naming
    where. Walked with a stack of its own: no recursion, whatever the body."""
    stack = [(body, "the body", None, 1)]  # (value, where it is, the top-level field it is in, depth)
    while stack:
        value, where, field, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"The request body is nested deeper than the {MAX_JSON_DEPTH} levels this server "
                                f"reads (at {where}).", param=field)
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                raise ApiError(400, f"{where} holds a lone UTF-16 surrogate (\\u{ord(found.group()):04x} at "
                                    f"character {found.start()}), which is not text; send the whole character it "
                                    "is half of, or leave it out.", param=field)
        elif isinstance(value, dict):
            for key, item in value.items():
                inner = key if depth == 1 else f"{where}.{key}"
                stack.append((key, f"the name of {inner}", field or key, depth + 1))
                stack.append((item, inner, field or key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", field, depth + 1) for i, item in enumerate(value))


GONE = object()  # put in a request's queue when its client disconnects


class _Answer:
    """The sequences of one job, the queue their events arrive in (on the event loop's thread), and a
    watch on the client: once it disconnects, the events stop and the sequences are cancelled."""

    def __init__(self, state: ServerState, job: Job, request: Request, arrived: float):
        self.job, self.state, self.request = job, state, request
        self.tracker = state.metrics.tracker(arrived)
        self.queue: "asyncio.Queue" = asyncio.Queue()
        self.seqs: List[Generation] = state.scheduler.submit(job.sequences, Sink(asyncio.get_running_loop(),
                                                                                self.queue))
        self.open = len(self.seqs)
        self.gone = False
        self.watch = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        # The body has been read, so the next message is the disconnection (or the end of the response).
        # The sequences are cancelled here, not by whoever reads the events: a streamed answer whose
        # client vanished mid-send is abandoned by Starlette without being resumed.
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.state.scheduler.cancel(self.seqs)
        self.queue.put_nowait(GONE)

    async def events(self) -> AsyncIterator[Event]:
        while self.open:
            event = await self.queue.get()
            if event is GONE:
                self.gone = True
                return
            if event.finish_reason is not None or event.error is not None:
                self.open -= 1
            if event.text or event.logprobs or event.finish_reason:
                self.tracker.piece(event.index)
            if event.finish_reason is not None:
                self.tracker.finished(event.finish_reason, _prompt_tokens(self.job, event), event.completion_tokens)
            yield event

    async def prompt_logprobs(self, event: Event) -> list:
        """The `logprobs` entries of the prompt whose scores `event` carries, written out in a worker
        thread: a long prompt's text takes a moment, and the event loop serves every other client."""
        return await asyncio.to_thread(self.state.scheduler.prompt_logprobs, self.job.sequences[event.index],
                                       event.prompt_scores)

    def close(self) -> None:
        """The answer is over (sent, failed or abandoned): stop watching; cancel what still runs."""
        self.watch.cancel()
        self.state.scheduler.cancel(self.seqs)


def _sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def _prompt_tokens(job: Job, event: Event) -> int:
    """The prompt tokens a finished sequence adds to `usage` and the metrics: a prompt once, however many samples."""
    return event.prompt_tokens if job.sequences[event.index].sample == 0 else 0


def _count(counts: List[int], job: Job, event: Event) -> None:
    """Add a finished sequence's tokens to `usage` [prompt, completion, cached prompt tokens]."""
    counts[0] += _prompt_tokens(job, event)
    counts[1] += event.completion_tokens
    counts[2] += event.cached_tokens if job.sequences[event.index].sample == 0 else 0


async def _whole(answer: _Answer) -> JSONResponse:
    job = answer.job
    texts: Dict[int, List[str]] = {i: [job.echo_texts[i]] if job.echo_texts else [] for i in range(len(answer.seqs))}
    logprobs: Dict[int, list] = {i: [] for i in range(len(answer.seqs))}
    finish: Dict[int, str] = {}
    counts = [0, 0, 0]  # prompt, completion and cached prompt tokens
    try:
        async for event in answer.events():
            if event.error is not None:
                return error_response(event.error)
            if event.prompt_scores is not None:  # the echoed prompt's entries come first
                logprobs[event.index][:0] = await answer.prompt_logprobs(event)
            texts[event.index].append(event.text)
            if event.logprobs:
                logprobs[event.index] += event.logprobs
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
                _count(counts, job, event)
    finally:
        answer.close()  # a no-op for finished sequences; frees the slots of a vanished client
    want_lp = job.sequences[0].logprobs is not None
    choices = [choice(job, i, "".join(texts[i]), finish.get(i), logprobs[i] if want_lp else None, delta=False)
               for i in range(len(answer.seqs))]
    return JSONResponse(envelope(job, choices, usage(*counts), chunk=False))


async def _streamed(answer: _Answer) -> AsyncIterator[bytes]:
    job = answer.job
    counts = [0, 0, 0]  # prompt, completion and cached prompt tokens
    offsets = [len(t) for t in job.echo_texts] or [0] * len(answer.seqs)
    scored = job.sequences[0].score_prompt  # the echoed prompt waits for its scores, and comes with them
    # With tools offered, an answer is held until it ends: Meta's rules read a call anywhere in the text, so
    # only the whole text says whether it is one (then it streams as calls) or text (then as one piece).
    held: Dict[int, List[Event]] = {i: [] for i in range(len(answer.seqs))} if job.tools else {}
    try:
        for i in range(len(answer.seqs)):  # the first chunk: the chat role, or the echoed prompt
            if job.kind == "chat" or (job.echo_texts and not scored):
                text = job.echo_texts[i] if job.echo_texts else ""
                yield _sse(envelope(job, [choice(job, i, text, None, None, delta=True, first=True)], None, True))
        async for event in answer.events():
            if event.error is not None:
                yield _sse(event.error.body())
                break
            if event.prompt_scores is not None:
                entries = await answer.prompt_logprobs(event)
                piece = choice(job, event.index, job.echo_texts[event.index], None, entries, delta=True, first=True)
                yield _sse(envelope(job, [piece], None, True))
            if event.finish_reason is not None:
                _count(counts, job, event)
            if held:
                held[event.index].append(event)
                if event.finish_reason is None:
                    continue
                text = "".join(e.text for e in held[event.index])
                calls = tool_calls(job, text)
                if calls:
                    for piece in streamed_calls(job, event.index, calls, event.finish_reason):
                        yield _sse(envelope(job, [piece], None, True))
                    continue
                event.text = text
                if event.logprobs is not None:
                    event.logprobs = [entry for e in held[event.index] for entry in (e.logprobs or [])]
            if event.text or event.logprobs or event.finish_reason:
                piece = choice(job, event.index, event.text, event.finish_reason, event.logprobs, delta=True,
                               text_offset=offsets[event.index])
                offsets[event.index] += len(event.text)
                yield _sse(envelope(job, [piece], None, True))
        else:
            if job.include_usage and not answer.gone:
                yield _sse(envelope(job, [], usage(*counts), True))
        if not answer.gone:
            yield _sse(b"[DONE]")
    finally:
        answer.close()


def make_app(state: ServerState) -> FastAPI:
    """The ASGI app: GET /health, GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions, and
    vLLM's POST /tokenize, POST /detokenize, GET /tokenizer_info and GET /metrics (Prometheus)."""
    app = FastAPI(title="llama_mp", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):
        # Not a refusal but a fault of this server; the client still gets OpenAI's error JSON with the cause
        return error_response(ApiError(500, f"The server failed on this request ({type(error).__name__}: "
                                            f"{str(error)[:300]}).", "server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        if error.status_code == 404:
            message = f"Unknown route {request.method} {request.url.path}; see GET /v1/models, POST " \
                      "/v1/completions, POST /v1/chat/completions, POST /tokenize, POST /detokenize, GET " \
                      "/tokenizer_info and GET /metrics."
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        else:
            message = str(error.detail)
        return error_response(ApiError(error.status_code, message, "invalid_request_error", None,
                                       "not_found" if error.status_code == 404 else None))

    @app.get("/health")
    async def health():
        status = 200 if state.phase == READY else 503
        body = {"status": "ok" if status == 200 else state.phase}
        if state.phase == FAILED:
            body["reason"] = state.reason
        if state.scheduler is not None:  # what an operator (or a test) wants to see of the batch
            body.update(state.scheduler.stats())
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        if state.limits is None:
            raise state.unavailable()
        return models_list(state.limits, state.created)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _authorize(state, request)
        if state.limits is None:
            raise state.unavailable()
        if model_id != state.limits.model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves "
                                f"'{state.limits.model_name}'.", "invalid_request_error", "model", "model_not_found")
        return model_card(state.limits, state.created)

    async def run(request: Request, parse) -> object:
        arrived = time.monotonic()
        _authorize(state, request)
        body = await _read_json(request, state.max_body_bytes, state.receive_timeout_s)
        busy = state.unavailable()
        if busy is not None:
            raise busy
        job = parse(body, state.tokenizer, state.limits)
        answer = _Answer(state, job, request, arrived)
        if not job.stream:
            state.open_requests += 1
            try:
                return await _whole(answer)
            finally:
                state.open_requests -= 1

        async def counted():
            state.open_requests += 1
            try:
                async for chunk in _streamed(answer):
                    yield chunk
            finally:
                state.open_requests -= 1

        return StreamingResponse(counted(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def ready(request: Request) -> None:
        _authorize(state, request)
        if state.limits is None:
            raise state.unavailable()

    @app.get("/metrics")
    async def metrics(request: Request):
        _authorize(state, request)
        return Response(state.metrics.text(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        await ready(request)
        body = await _read_json(request, state.max_body_bytes, state.receive_timeout_s)
        # a long text takes a moment to encode: in a worker thread, while the loop serves the other clients
        return await asyncio.to_thread(tokenize, body, state.tokenizer, state.limits)

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        await ready(request)
        body = await _read_json(request, state.max_body_bytes, state.receive_timeout_s)
        return await asyncio.to_thread(detokenize, body, state.tokenizer, state.limits)

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request):
        await ready(request)
        return tokenizer_info(state.tokenizer, state.limits)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, parse_chat)

    return app


# ----------------------------------------------------------------------------------------------------
# The server thread


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a LlamaMPError that says what to do."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise LlamaMPError(f"Cannot listen on {host}:{port} ({e.strerror or e}). Pick another --port (or --host), "
                           f"or find what holds it with `ss -ltnp | grep :{port}`.") from None
    sock.set_inheritable(True)
    return sock


def _bounded_head_protocol(head_timeout_s: float):
    """uvicorn's h11 protocol with a bound on how long a request's line and headers may take to arrive.

    uvicorn times out neither a new connection that sends nothing nor a request head sent a byte at a time
    (its keep-alive timer stops at the first byte): a client could hold a connection, and then all of them,
    for ever. Here a timer starts when a connection opens, or when the first byte of its next request comes,
    and stops when the head is whole (the request starts; its body then has the app's bound). A head not
    whole in time gets a 408 in OpenAI's error JSON and the connection closes. Only the h11 parser is
    subclassed (h11 is what uvicorn runs without httptools); nothing is read per byte beyond what h11 reads."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedHead(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_timer = None
            self._time_head()

        def _time_head(self) -> None:
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(head_timeout_s, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if before is None or before.response_complete:  # these bytes begin or continue a request head
                self._time_head()
            super().data_received(data)
            if self.cycle is not before:  # the head was whole: a request started
                self._stop_head_timer()

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _head_too_slow(self) -> None:
            self.head_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            body = json.dumps(ApiError(408, f"The request line and headers did not arrive within {head_timeout_s:g} "
                                            "s; send them at once.", "invalid_request_error", None,
                                       "request_timeout").body()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return BoundedHead


class HttpServer:
    """uvicorn serving `app` on an already bound socket, in a daemon thread; a request's head must arrive
    within `head_timeout_s` (`_bounded_head_protocol`)."""

    def __init__(self, app: FastAPI, sock: socket.socket, head_timeout_s: float):
        import uvicorn

        self.sock = sock
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, timeout_keep_alive=5,
                                http=_bounded_head_protocol(head_timeout_s))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="llama_mp-http")

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LlamaMPError(f"The HTTP server on {self.address} did not start; see the messages above.")
            time.sleep(0.01)

    def stop(self, wait_s: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(wait_s)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
