"""`slimllm serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

    slimllm serve --model DIR --port 8000
    curl localhost:8000/v1/completions -d '{"prompt": "Open the file", "max_tokens": 20}'

A Starlette (ASGI) app run by uvicorn. Routes: POST /v1/completions and /v1/chat/completions
(streamed as server-sent events with `stream: true`), GET /v1/models, /health and /metrics
(Prometheus text). The wire format is serve_protocol.py's, the counters serve_metrics.py's, the
chat prompt chat.py's; each choice of a request is one `Request` of
`slimllm.jaxbackend.batching.Scheduler`, whose thread calls back with every token. Those
callbacks cross to the event loop through an asyncio queue per HTTP request.

What a client sends never crashes the server: a bad request is a 4xx in OpenAI's error JSON,
anything unexpected a JSON 500, and the server keeps serving. A client that disconnects
cancels its requests, freeing their batch slots at the next step. SIGTERM (or Ctrl-C) drains:
new requests get 503 with Retry-After while the running and queued ones finish, for at most
`--drain-timeout` seconds (then they are cancelled and their streams end with finish_reason
"length" and [DONE]); then the process exits with status 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from slimllm.jaxbackend.batching import Event, QueueFull, Request, Scheduler
from slimllm.reference.errors import OptionError, SlimllmError
from slimllm.strict_json import dumps

from . import chat
from .serve_metrics import Metrics
from .serve_protocol import (
    FINISH,
    ApiError,
    Job,
    TextStream,
    choice_body,
    envelope,
    option_error,
    parse,
    sse,
    usage,
)

MAX_BODY = 4 * 2**20  # bytes of a request body
RETRY_AFTER = "2"  # seconds, with 429 (queue full) and 503 (draining)
WARMUP_TOKENS = 2


class Service:
    """What the routes share: the model, its scheduler, chat template, counters, drain state."""

    def __init__(self, model, scheduler: Scheduler, name: str, drain_timeout: float = 30.0):
        self.model, self.scheduler, self.name = model, scheduler, name
        self.tokenizer = model.tokenizer
        self.drain_timeout = drain_timeout
        self.template, self.special = chat.load_template(model.source)
        self.metrics = Metrics()
        self.draining = False
        self.live: set[Live] = set()  # HTTP requests generating now
        self.loop: asyncio.AbstractEventLoop | None = None

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as token ids")
        return self.tokenizer.encode(text, add_special)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one Service per process
    def piece(self, token: int) -> str:
        """A token's own text (special tokens spelled out), for logprobs."""
        if self.tokenizer is None:
            return str(token)
        return self.tokenizer.decode([token], skip_special=False)

    def render(self, messages: list[dict]) -> list[int]:
        """The chat prompt's ids. The tokenizer adds its special tokens (BOS) only when the
        rendered text does not already begin with BOS, so that it is never doubled."""
        if self.template is None:
            raise ApiError(
                400,
                f"model {self.name!r} has no chat template (no chat_template in its "
                "tokenizer_config.json, no chat_template.jinja): use /v1/completions",
                "messages",
                "chat_template_missing",
            )
        try:
            text = chat.render(self.template, messages, self.special)
        except chat.TemplateError as err:
            raise ApiError(400, str(err), "messages") from None
        bos = self.special.get("bos_token")
        return self.encode(text, add_special=not (bos and text.startswith(bos)))


class Live:
    """One HTTP request's choices in the scheduler: their events, from the scheduler's thread,
    queued for the event loop; the tickets, to cancel them."""

    def __init__(self, service: Service, job: Job):
        self.service, self.job = service, job
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tickets = {}
        self.open = {c.index for c in job.choices}  # choices without their final event yet

    def listener(self, index: int):
        """The `on_event` of choice `index`: time it, count it, hand it to the event loop."""
        metrics = self.service.metrics
        start, last = time.perf_counter(), None

        def on_event(event: Event) -> None:
            nonlocal last
            now = time.perf_counter()
            if event.token is not None:
                metrics.token(now, now - start if last is None else None, last and now - last)
                last = now
            if event.finish_reason is not None:
                metrics.finish(event.finish_reason)
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return on_event

    def submit(self, requests: dict) -> None:
        """Every choice into the scheduler, or none (a full queue: 429; draining: 503)."""
        try:
            for index, request in requests.items():
                self.tickets[index] = self.service.scheduler.submit(request)
        except QueueFull as err:
            self.cancel()
            status = 503 if self.service.draining else 429
            raise ApiError(status, str(err), code="overloaded", headers=retry()) from None
        self.service.live.add(self)

    def cancel(self) -> None:
        """Cancel the choices still running (their slots are freed at the next step)."""
        for index in self.open:
            if index in self.tickets:
                self.service.scheduler.cancel(self.tickets[index])

    def end(self) -> None:
        """A final event for every open choice (after the scheduler has stopped)."""
        for index in list(self.open):
            self.queue.put_nowait((index, Event(None, finish_reason="cancelled")))

    async def next(self) -> tuple[int, Event]:
        """The next (choice index, event) of an open choice."""
        while True:
            index, event = await self.queue.get()
            if index in self.open:
                if event.finish_reason is not None:
                    self.open.discard(index)
                return index, event

    async def events(self):
        """(choice index, event) until every choice has had its final event."""
        while self.open:
            yield await self.next()


def retry() -> dict:
    return {"Retry-After": RETRY_AFTER}


# ---------------------------------------------------------------- routes


async def read_json(request: HttpRequest):
    """The body as JSON: at most MAX_BODY bytes (413), valid JSON (400)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None


async def completions(request: HttpRequest) -> Response:
    return await generate(request, chat=False)


async def chat_completions(request: HttpRequest) -> Response:
    return await generate(request, chat=True)


async def generate(request: HttpRequest, chat: bool) -> Response:
    service: Service = request.app.state.service
    if service.draining:
        raise ApiError(503, "the server is shutting down", code="draining", headers=retry())
    body = await read_json(request)
    job = parse(body, chat, service.encode, service.render, service.name)
    live = Live(service, job)
    scheduler, model = service.scheduler, service.model
    requests = {}
    for choice in job.choices:
        stopping = job.stopping(choice, scheduler.cache_len, model.eos_ids, service.decode)
        requests[choice.index] = Request(
            choice.prompt,
            stopping,
            job.sampling,
            choice.seed,
            job.logprobs,
            live.listener(choice.index),
        )
        try:
            scheduler.check(requests[choice.index])
        except OptionError as err:
            raise option_error(err, chat) from None
    live.submit(requests)
    service.metrics.prompt(sum(len(c.prompt) for c in job.choices))
    if job.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return EventStream(stream(service, live), media_type="text/event-stream", headers=headers)
    try:
        return JSONResponse(await collect(service, live, request))
    finally:
        live.cancel()
        service.live.discard(live)


async def collect(service: Service, live: Live, request: HttpRequest) -> dict:
    """The whole reply of a request that is not streamed (cancelled if the client leaves)."""
    job = live.job
    streams = {c.index: TextStream(service.decode, job.stop) for c in job.choices}
    finish, generated = {}, 0
    while live.open:
        try:
            index, event = await asyncio.wait_for(live.next(), timeout=1.0)
        except TimeoutError:
            if await request.is_disconnected():
                return {}  # nobody to answer; the caller cancels the choices
            continue
        if event.token is not None:
            streams[index].push(event.token, event.logprob, event.top_logprobs)
            generated += 1
        if event.finish_reason is not None:
            finish[index] = FINISH.get(event.finish_reason, "length")
    choices = []
    for c in job.choices:
        s = streams[c.index]
        s.finish()
        body = choice_body(job, c.index, s.text, s.tokens, finish[c.index], service.piece, False)
        choices.append(body)
    return envelope(job, service.name, chunk=False) | {
        "choices": choices,
        "usage": usage(job.prompt_tokens, generated),
    }


async def stream(service: Service, live: Live):
    """The reply as server-sent events: OpenAI chunks, then [DONE]."""
    job = live.job
    head = envelope(job, service.name, chunk=True) | ({"usage": None} if job.include_usage else {})
    streams = {c.index: TextStream(service.decode, job.stop) for c in job.choices}
    generated = 0

    def chunk(index, text, tokens, finish=None):
        body = choice_body(job, index, text, tokens, finish, service.piece, True)
        return sse(dumps(head | {"choices": [body]}))

    try:
        if job.chat:  # the first delta names the role, as OpenAI's does
            for c in job.choices:
                delta = {"role": "assistant", "content": ""}
                body = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
                yield sse(dumps(head | {"choices": [body]}))
        async for index, event in live.events():
            text, tokens = "", []
            if event.token is not None:
                text, tokens = streams[index].push(event.token, event.logprob, event.top_logprobs)
                generated += 1
            if event.finish_reason is not None:
                more, rest = streams[index].finish()
                finish = FINISH.get(event.finish_reason, "length")
                yield chunk(index, text + more, tokens + rest, finish)
            elif text or tokens:
                yield chunk(index, text, tokens)
        if job.include_usage:
            last = head | {"choices": [], "usage": usage(job.prompt_tokens, generated)}
            yield sse(dumps(last))
        yield sse("[DONE]")
    finally:  # the client left (the task was cancelled) or the reply is complete
        live.cancel()
        service.live.discard(live)


class EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator, so a client that leaves
    mid-stream cancels its requests at once (not when the generator is collected)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def models(request: HttpRequest) -> Response:
    service: Service = request.app.state.service
    entry = {"id": service.name, "object": "model", "created": 0, "owned_by": "slimllm"}
    return JSONResponse({"object": "list", "data": [entry]})


async def health(request: HttpRequest) -> Response:
    service: Service = request.app.state.service
    if service.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers=retry())
    if not service.scheduler.alive():
        return JSONResponse({"status": "scheduler stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: HttpRequest) -> Response:
    service: Service = request.app.state.service
    text = service.metrics.render(service.scheduler.metrics(), service.draining)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------- errors


async def api_error(request: HttpRequest, err: ApiError) -> Response:
    request.app.state.service.metrics.error(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def http_error(request: HttpRequest, err: HTTPException) -> Response:
    """404 and 405 from the router, in OpenAI's error shape."""
    request.app.state.service.metrics.error(err.status_code)
    message = f"{err.detail}: {request.method} {request.url.path}"
    body = ApiError(err.status_code, message, code=None).body()
    return JSONResponse(body, status_code=err.status_code, headers=err.headers)


async def server_error(request: HttpRequest, err: Exception) -> Response:
    """Anything unexpected: a JSON 500 (the traceback goes to the log); the server goes on."""
    request.app.state.service.metrics.error(500)
    body = ApiError(500, f"internal error: {type(err).__name__}", code="internal_error").body()
    return JSONResponse(body, status_code=500)


def create_app(service: Service, warmup: bool = True) -> Starlette:
    """The ASGI app; its lifespan starts the scheduler (and compiles a first request) and
    shuts it down."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.loop = asyncio.get_running_loop()
        service.scheduler.start()
        if warmup:
            await asyncio.to_thread(warm, service)
        yield
        await asyncio.to_thread(service.scheduler.shutdown, False, 0.0)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.service = service
    return app


def warm(service: Service) -> None:
    """One short greedy request, so that the first client does not wait for compilation."""
    from slimllm.reference.generate import Stopping

    done = threading.Event()
    prompt = [service.model.bos_id or 0]

    def on_event(event: Event) -> None:
        if event.finish_reason is not None:
            done.set()

    service.scheduler.submit(Request(prompt, Stopping(WARMUP_TOKENS), on_event=on_event))
    done.wait(timeout=600)


# ---------------------------------------------------------------- the process


class Server(uvicorn.Server):
    """uvicorn's server, with slimllm's drain on SIGTERM/SIGINT and its one start line."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"slimllm: serving {self.service.name} on http://{host}:{port}", flush=True)

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's own handler stops at once and re-raises the signal when done (a SIGTERM
        # exit status); this one drains first and lets the process exit with status 0.
        if self.service.draining or not self.started:
            self.should_exit = self.force_exit = True
            return
        self.service.draining = True
        threading.Thread(target=self.drain, name="slimllm-drain", daemon=True).start()

    def drain(self) -> None:
        """Let running and queued requests finish (bounded), end what is left, then stop."""
        service = self.service
        service.scheduler.shutdown(drain=True, timeout=service.drain_timeout)
        if service.loop is not None:  # requests the scheduler left without a final event
            for live in list(service.live):
                service.loop.call_soon_threadsafe(live.end)
        deadline = time.monotonic() + 5.0
        while service.live and time.monotonic() < deadline:
            time.sleep(0.02)
        self.should_exit = True


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the model loads: an address in use or a
    host that does not resolve is one line (a SlimllmError), not uvicorn's exit status 3."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as err:  # socket.gaierror included
        reason = err.strerror or str(err)
        raise SlimllmError(f"cannot listen on {host}:{port}: {reason}") from None


def serve(model, scheduler: Scheduler, name: str, sock: socket.socket, drain_timeout: float):
    """Run the server on `sock` (from `listen`) until a signal has drained it."""
    service = Service(model, scheduler, name, drain_timeout)
    app = create_app(service)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    try:
        Server(config, service).run(sockets=[sock])
    finally:
        scheduler.shutdown(drain=False, timeout=0.0)
    if scheduler.error is not None:
        raise SlimllmError(f"the scheduler failed: {scheduler.error!r}")
