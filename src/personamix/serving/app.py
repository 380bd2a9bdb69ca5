"""`personamix serve`: an OpenAI-compatible HTTP server (FastAPI) over one Generator.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream: true` as
server-sent events in OpenAI's chunk format), GET /v1/models, GET /v1/settings (every
setting a request may give, with defaults and limits), GET /health, and a playground page at /.
The request and response shapes are in protocol.py.

Each request runs its sampler in a worker thread of its own. With the batched backend the
steps of all requests in flight share model forwards; on other backends their forwards take
turns. Either way a seeded request's output does not depend on its neighbours (up to float
rounding of larger matmuls). At most `max_pending` requests are admitted at once; beyond that
the answer is 429 with Retry-After. A stream whose client goes away, before or during the
stream, stops its generation and frees its slot.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..errors import EngineError, EngineTimeout, EngineUnreachable, PersonamixError, SettingError
from ..generator import Generator, TextStream
from .protocol import (
    ChatRequest,
    ChatShape,
    CompletionRequest,
    CompletionShape,
    adapter_groups,
    error_body,
    settings_schema,
)
from .protocol import Request as ApiRequest


class ApiError(Exception):
    """An error answered as OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class Admission:
    """A bounded count of requests in flight (queued or running); `enter` returns the slot to release."""

    def __init__(self, limit: int, libc=None):
        self.limit, self.active, self._lock, self._libc = limit, 0, threading.Lock(), libc

    def enter(self) -> Slot:
        with self._lock:
            if self.active >= self.limit:
                raise ApiError(429, f"server busy: {self.active} requests in flight (limit {self.limit}); retry later",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.active += 1
        return Slot(self)

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
            idle = self.active == 0
        if idle and self._libc is not None:
            self._libc.malloc_trim(0)   # idle: hand the freed heap back to the OS


class Slot:
    """One admitted request's place; `release` is safe to call more than once, from any thread."""

    def __init__(self, admission: Admission):
        self._admission, self._lock, self._held = admission, threading.Lock(), True

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._admission.leave()


class Counters:
    """Server counters written from worker threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.streams_cancelled = 0    # streams stopped early because their client went away

    def stream_cancelled(self) -> None:
        with self._lock:
            self.streams_cancelled += 1


def _glibc():
    """glibc, with at most 2 malloc arenas: every request thread otherwise gets an arena of its
    own, and freed activations stay scattered over them (RSS drifted up by 13% per 64 requests in
    the load test although the live tensors did not grow; with 2 arenas + a trim when idle it is
    flat). None where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 2)    # M_ARENA_MAX
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


class EventStream:
    """One streamed generation. A producer thread, started when the response first asks for an
    event, runs the sampler and queues its pieces; `close` (the response is over, however it
    ended) stops the producer, or, if it never started, closes the generation itself. The slot
    is released exactly once either way."""

    def __init__(self, stream: TextStream, slot: Slot, counters: Counters):
        self.stream, self.slot, self.counters = stream, slot, counters
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def start(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        with self._lock:
            if self.cancelled.is_set():
                return
            self._started = True
        threading.Thread(target=self._produce, args=(loop, queue), daemon=True).start()

    def _produce(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        def put(kind: str, value) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        last = ("error", RuntimeError("the generation stopped unexpectedly"))
        try:
            for piece in self.stream:
                if self.cancelled.is_set():
                    self.counters.stream_cancelled()
                    break
                put("piece", piece)
            last = ("end", None)
        except Exception as e:   # reported to the client as an error event
            last = ("error", e)
        finally:
            try:
                self.stream.close()
            finally:
                self.slot.release()
                # the last event only now: a client that sends its next request the moment it reads
                # [DONE] finds this slot free (queued before the release, the 16-client load test on
                # kept-alive connections got a 429 about once a run), and it is queued however the
                # generation or its closing ended, so the response never waits for it in vain
                put(*last)

    def close(self) -> None:
        with self._lock:
            self.cancelled.set()
            started = self._started
        if not started:
            self.stream.close()
            self.slot.release()


class SSEResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close` once the response is over, however it ended:
    streamed to the end, the client gone before the first event or during the stream, or the
    server shutting down (the body's own `finally` does not run if it was never started)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Server:
    """The state of one server: the generator, admission, worker threads, counters."""

    def __init__(self, gen: Generator, model_id: str, max_pending: int, max_body_bytes: int,
                 default_max_tokens: int):
        self.gen, self.model_id = gen, model_id
        self.max_body_bytes, self.default_max_tokens = max_body_bytes, default_max_tokens
        libc = _glibc()
        self.admission = Admission(max_pending, libc)
        pool = getattr(gen.backend, "pool", None)
        if pool is not None and libc is not None:   # the KV pool dropped later than the idle trim: trim again
            pool.on_drop = lambda: libc.malloc_trim(0)
        # one thread per admitted request, so that all of them can be in a forward at once (with the
        # batched backend they then share it); asyncio's default pool has only cpu_count + 4 threads
        self.workers = ThreadPoolExecutor(max_workers=max_pending, thread_name_prefix="personamix")
        self.counters = Counters()
        self.created = int(time.time())

    async def parse(self, request: Request, schema: type[BaseModel]) -> ApiRequest:
        """The request body as `schema`, or an ApiError naming what is wrong with it."""
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {self.max_body_bytes} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
        try:   # NaN/Infinity are not JSON (RFC 8259), though Python's parser accepts them by default
            data = json.loads(raw, parse_constant=_reject_constant)
        except ValueError as e:      # JSONDecodeError, UnicodeDecodeError, or a rejected constant
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise ApiError(400, describe_errors(e.errors()), first_param(e.errors())) from None
        if req.model not in (None, self.model_id):
            raise ApiError(404, f"model {req.model!r} is not served here; GET /v1/models lists {self.model_id!r}",
                           "model", "model_not_found")
        return req

    def open(self, prompt, req: ApiRequest) -> TextStream:
        """Start a generation (a completion prompt is plain text; chat messages get the chat template)."""
        try:
            return self.gen.stream(prompt, req.params(self.default_max_tokens),
                                   chat_template=not isinstance(prompt, str))
        except SettingError as e:
            raise ApiError(400, str(e), e.param) from None
        except EngineError as e:
            raise engine_error(e) from None
        except PersonamixError as e:
            raise ApiError(400, str(e)) from None

    async def respond(self, prompt, req: ApiRequest, shape):
        slot = self.admission.enter()
        loop = asyncio.get_running_loop()
        try:
            stream = await loop.run_in_executor(self.workers, self.open, prompt, req)
        except BaseException:
            slot.release()
            raise
        rid = f"{shape.prefix}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            events = EventStream(stream, slot, self.counters)
            return SSEResponse(self.sse(events, rid, shape), on_close=events.close)
        try:
            await loop.run_in_executor(self.workers, _drain, stream)
        except EngineError as e:      # the engine behind a remote backend failed mid-generation
            raise engine_error(e) from None
        finally:
            slot.release()
        r = stream.result
        return JSONResponse(shape.full(rid, self.created, self.model_id, r.text, r.finish_reason,
                                       len(r.prompt_ids), len(r.token_ids), stats_payload(stream)))

    async def sse(self, events: EventStream, rid: str, shape):
        """The server-sent events of one stream: a role chunk, text chunks, a final chunk with
        stats and usage (or an error event), then [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()
        events.start(asyncio.get_running_loop(), queue)
        yield sse_event(shape.chunk(rid, self.created, self.model_id, "", None, role=True))
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield sse_event(shape.chunk(rid, self.created, self.model_id, value, None))
            elif kind == "error":
                e = engine_error(value) if isinstance(value, EngineError) else None
                yield sse_event(error_body(str(value), code=e.code if e else None, kind="server_error"))
                return
            else:
                r = events.stream.result
                final = shape.chunk(rid, self.created, self.model_id, "", r.finish_reason if r else "stop")
                final["personamix"] = stats_payload(events.stream)
                final["usage"] = None if r is None else {
                    "prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.token_ids),
                    "total_tokens": len(r.prompt_ids) + len(r.token_ids)}
                yield sse_event(final)
                yield "data: [DONE]\n\n"
                return

    def models(self) -> dict:
        gen, created = self.gen, self.created
        entries = [{"id": self.model_id, "object": "model", "created": created, "owned_by": "personamix",
                    "adapters": list(gen.adapter_names)}]
        entries += [{"id": f"{self.model_id}:{name}", "object": "model", "created": created,
                     "owned_by": "personamix", "parent": self.model_id, "adapter": name}
                    for name in gen.adapter_names]
        return {"object": "list", "data": entries}

    def health(self) -> JSONResponse:
        backend = self.gen.backend
        body = {"status": "ok", "model": self.model_id, "adapters": list(self.gen.adapter_names),
                "in_flight": self.admission.active, "max_pending": self.admission.limit, "backend": backend.kind,
                "device": str(backend.device),
                "dtype": str(backend.dtype).removeprefix("torch.") if backend.dtype is not None else None,
                "linear_kernel": backend.linear_kernel}
        if backend.shares_forwards:   # cross-request batching: calls / forwards = mean batch size
            body["batching"] = {"forwards": backend.forwards, "calls": backend.calls,
                                "row_tokens": backend.row_tokens, "prompt_row_tokens": backend.prompt_row_tokens,
                                "busy_s": round(backend.busy_s, 3), "waited_s": round(backend.waited_s, 3),
                                "gather_wait": backend.gather_wait, "kv_keep_idle_s": backend.pool.keep_idle_s,
                                "kv_pool_held": bool(backend.pool.k), "plain_decoder": backend.decoder is not None,
                                "pointwise_ops": backend.decoder.ops.name if backend.decoder is not None else None,
                                "turns_taken_over": None if backend.turns is None else backend.turns.taken_over}
            graphs = backend.graphs
            body["batching"]["cuda_graphs"] = None if graphs is None else {
                "captured": graphs.captures, "replays": graphs.replays, "shapes": len(graphs.steps),
                "failed": graphs.failed}
            cache = backend.prefix_cache
            if cache is not None:   # prompt rows that started after a cached prefix, tokens not recomputed
                body["prefix_cache"] = {"lookups": cache.lookups, "hits": cache.hits,
                                        "tokens_saved": cache.tokens_saved, "blocks": len(cache), "bytes": cache.nbytes}
        if backend.scores_remotely:   # a front over an engine is only as healthy as its engine
            ok = backend.client.healthy()
            body["engine"] = {"url": backend.client.info.url, "ok": ok, "calls": backend.calls,
                              "round_trips": backend.round_trips}
            if not ok:
                body["status"] = "engine unavailable"
                return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    def settings(self) -> dict:
        return {"model": self.model_id, "settings": settings_schema(self.default_max_tokens),
                "context_length": self.gen.backend.max_length, "max_pending": self.admission.limit,
                "adapters": list(self.gen.adapter_names), "groups": adapter_groups(self.gen.adapter_names),
                "backend": self.gen.backend.kind,
                "engine": self.gen.backend.client.info.url if self.gen.backend.scores_remotely else None}


def create_app(gen: Generator, model_id: str, *, max_pending: int = 16, max_body_bytes: int = 1 << 20,
               default_max_tokens: int = 128) -> FastAPI:
    """The ASGI app serving `gen` under the name `model_id`."""
    server = Server(gen, model_id, max_pending, max_body_bytes, default_max_tokens)
    app = FastAPI(title="personamix", version=__version__)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        kind = "rate_limit_error" if e.status == 429 else ("server_error" if e.status >= 500 else
                                                          "invalid_request_error")
        return JSONResponse(error_body(e.message, e.param, e.code, kind), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return JSONResponse(error_body(describe_errors(e.errors()), first_param(e.errors())), status_code=400)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await server.parse(request, ChatRequest)
        return await server.respond([m.model_dump() for m in req.messages], req, ChatShape)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await server.parse(request, CompletionRequest)
        return await server.respond(req.prompt, req, CompletionShape)

    app.get("/v1/models")(server.models)
    app.get("/v1/settings")(server.settings)
    app.get("/health")(server.health)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("personamix.serving").joinpath("playground.html").read_text(encoding="utf-8")

    return app


def serve(gen: Generator, model_id: str, host: str = "127.0.0.1", port: int = 8000, max_pending: int = 16) -> None:
    import uvicorn

    uvicorn.run(create_app(gen, model_id, max_pending=max_pending), host=host, port=port, log_level="info")


def engine_error(e: EngineError) -> ApiError:
    """The answer of a front whose engine failed: 503 unreachable, 504 timed out, 502 otherwise."""
    code = ("engine_unreachable" if isinstance(e, EngineUnreachable) else
            "engine_timeout" if isinstance(e, EngineTimeout) else "engine_error")
    return ApiError(e.status, str(e), code=code, headers={"Retry-After": "1"} if e.status != 502 else None)


def _drain(stream: TextStream) -> None:
    for _ in stream:
        pass


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def describe_errors(errors) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def first_param(errors) -> str | None:
    if not errors:
        return None
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"]
    return ".".join(loc) or None


def stats_payload(stream: TextStream) -> dict:
    r = stream.result
    return {"stats": stream.stats.to_dict(), "weights": r.weights if r else None, "seed": r.seed if r else None}


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


__all__ = ["create_app", "serve", "ApiError", "Admission"]
