"""`personamix serve`: an OpenAI-compatible HTTP server (FastAPI) over one Generator.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream: true` as
server-sent events in OpenAI's chunk format), GET /v1/models, GET /health, and a playground
page at /. Extension fields in the request body: persona, weights, aggregation, method, k,
window, gamma, warmup, top_k, seed. Responses carry `personamix: {stats, weights, seed}`.

Each request runs in its own worker thread; forwards of the backend are serialised by its lock,
so concurrent requests are independent (same seed -> same output). At most `max_pending`
requests are admitted at once; beyond that the answer is 429 with Retry-After.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import PersonamixError
from .generator import Generator
from .samplers import METHODS


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, gt=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    # personamix extensions
    persona: str | None = None
    weights: dict[str, float] | None = None
    aggregation: Literal["linear", "geometric"] = "linear"
    method: str = "scr"
    k: int = Field(default=4, ge=1, le=64)
    window: int = Field(default=20, ge=1, le=10_000)
    gamma: float = Field(default=1.2, ge=1.0, le=1e6)
    warmup: int = Field(default=5, ge=1, le=10_000)
    top_k: int = Field(default=0, ge=0)

    def sampling(self, default_max_tokens: int) -> dict[str, Any]:
        if self.method not in METHODS:
            raise PersonamixError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        kw = dict(method=self.method, max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
                  seed=self.seed, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, k=self.k,
                  window=self.window, gamma=self.gamma, warmup=self.warmup, aggregation=self.aggregation)
        if self.method != "base":
            kw.update(persona=self.persona, weights=self.weights)
        elif self.persona or self.weights:
            raise PersonamixError("method 'base' samples the reference alone: drop persona/weights")
        return kw


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _error_body(message: str, param: str | None = None, code: str | None = None,
                kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Admission:
    """A bounded count of requests in flight (queued or running)."""

    def __init__(self, limit: int, libc=None):
        self.limit, self.active, self._lock, self._libc = limit, 0, threading.Lock(), libc

    def enter(self) -> None:
        with self._lock:
            if self.active >= self.limit:
                raise ApiError(429, f"server busy: {self.active} requests in flight (limit {self.limit}); retry later",
                               code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.active += 1

    def leave(self) -> None:
        with self._lock:
            self.active -= 1
            idle = self.active == 0
        if idle and self._libc is not None:
            self._libc.malloc_trim(0)   # idle: hand the freed heap back to the OS


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



def _stats_payload(stream) -> dict:
    r = stream.result
    return {"stats": stream.stats.to_dict(), "weights": r.weights if r else None, "seed": r.seed if r else None}


def create_app(gen: Generator, model_id: str, *, max_pending: int = 16, max_body_bytes: int = 1 << 20,
               default_max_tokens: int = 128):
    """The ASGI app serving `gen` under the name `model_id`."""
    app = FastAPI(title="personamix", version="0.1.0")
    admission = _Admission(max_pending, _glibc())
    # one thread per admitted request, so that all of them can be in a forward at once (with the
    # batched backend they then share it); asyncio's default pool has only cpu_count + 4 threads
    workers = ThreadPoolExecutor(max_workers=max_pending, thread_name_prefix="personamix")
    app.state.admission = admission
    app.state.streams_cancelled = 0    # streams stopped early because their client went away
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        kind = "rate_limit_error" if e.status == 429 else "invalid_request_error"
        return JSONResponse(_error_body(e.message, e.param, e.code, kind), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return JSONResponse(_error_body(_describe(e.errors()), _param(e.errors())), status_code=400)

    async def _body(request: Request, schema: type[BaseModel]) -> BaseModel:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {max_body_bytes} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        try:   # NaN/Infinity are not JSON (RFC 8259), though Python's parser accepts them by default
            data = json.loads(raw, parse_constant=_reject_constant)
        except ValueError as e:      # JSONDecodeError, UnicodeDecodeError, or a rejected constant
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise ApiError(400, _describe(e.errors()), _param(e.errors())) from None
        if req.model not in (None, model_id):
            raise ApiError(404, f"model {req.model!r} is not served here; GET /v1/models lists {model_id!r}",
                           "model", "model_not_found")
        return req

    def _open(prompt, req: _Common):
        try:   # a completion prompt is plain text; chat messages get the model's chat template
            return gen.stream(prompt, chat_template=not isinstance(prompt, str), **req.sampling(default_max_tokens))
        except PersonamixError as e:
            raise ApiError(400, str(e)) from None

    async def _run(prompt, req: _Common, shape):
        admission.enter()
        try:
            stream = await asyncio.get_running_loop().run_in_executor(workers, _open, prompt, req)
        except BaseException:
            admission.leave()
            raise
        rid = f"{shape.prefix}-{uuid.uuid4().hex[:24]}"
        if not req.stream:
            try:
                await asyncio.get_running_loop().run_in_executor(workers, lambda: [None for _ in stream])
            finally:
                admission.leave()
            r = stream.result
            return JSONResponse(shape.full(rid, created, model_id, r.text, r.finish_reason,
                                           len(r.prompt_ids), len(r.token_ids), _stats_payload(stream)))
        return StreamingResponse(_sse(stream, rid, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _sse(stream, rid: str, shape):
        """Pieces are produced in a worker thread; a client that goes away cancels this
        generator, which stops the worker and closes the sampler (freeing its caches)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def produce():
            try:
                for piece in stream:
                    if cancelled.is_set():
                        app.state.streams_cancelled += 1
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
            except Exception as e:  # noqa: BLE001 - reported to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, ("error", str(e)))
            finally:
                stream.close()
                admission.leave()

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            yield _event(shape.chunk(rid, created, model_id, "", None, role=True))
            while True:
                kind, value = await queue.get()
                if kind == "piece":
                    yield _event(shape.chunk(rid, created, model_id, value, None))
                elif kind == "error":
                    yield _event(_error_body(value, kind="server_error"))
                    break
                else:
                    r = stream.result
                    final = shape.chunk(rid, created, model_id, "", r.finish_reason if r else "stop")
                    final["personamix"] = _stats_payload(stream)
                    final["usage"] = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.token_ids),
                                      "total_tokens": len(r.prompt_ids) + len(r.token_ids)} if r else None
                    yield _event(final)
                    yield "data: [DONE]\n\n"
                    break
        finally:
            cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await _body(request, ChatRequest)
        return await _run([m.model_dump() for m in req.messages], req, _ChatShape)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _body(request, CompletionRequest)
        return await _run(req.prompt, req, _CompletionShape)

    @app.get("/v1/models")
    async def models():
        entries = [{"id": model_id, "object": "model", "created": created, "owned_by": "personamix",
                    "adapters": list(gen.adapter_names)}]
        entries += [{"id": f"{model_id}:{name}", "object": "model", "created": created, "owned_by": "personamix",
                     "parent": model_id, "adapter": name} for name in gen.adapter_names]
        return {"object": "list", "data": entries}

    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": model_id, "adapters": list(gen.adapter_names),
                "in_flight": admission.active, "max_pending": admission.limit,
                "backend": type(gen.backend).__name__}
        if hasattr(gen.backend, "forwards"):   # cross-request batching: calls / forwards = mean batch size
            body["batching"] = {"forwards": gen.backend.forwards, "calls": gen.backend.calls}
        return body

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files("personamix").joinpath("playground.html").read_text(encoding="utf-8")

    return app


def _describe(errors) -> str:
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _param(errors) -> str | None:
    if not errors:
        return None
    loc = [str(x) for x in errors[0].get("loc", ()) if x != "body"]
    return ".".join(loc) or None


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _ChatShape:
    prefix = "chatcmpl"

    @staticmethod
    def full(rid, created, model, text, finish, n_prompt, n_new, extra) -> dict:
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new},
                "personamix": extra}

    @staticmethod
    def chunk(rid, created, model, text, finish, role: bool = False) -> dict:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class _CompletionShape:
    prefix = "cmpl"

    @staticmethod
    def full(rid, created, model, text, finish, n_prompt, n_new, extra) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new},
                "personamix": extra}

    @staticmethod
    def chunk(rid, created, model, text, finish, role: bool = False) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def serve(gen: Generator, model_id: str, host: str = "127.0.0.1", port: int = 8000, max_pending: int = 16) -> None:
    import uvicorn

    uvicorn.run(create_app(gen, model_id, max_pending=max_pending), host=host, port=port, log_level="info")
