"""The HTTP side: a FastAPI app with OpenAI's routes, the memory routes and the chat page.

Every handler reads its body itself (size, UTF-8, JSON, then the pydantic model), so each bad input gets
OpenAI's error shape with a 4xx; anything unforeseen is a 500 whose body says only that (the traceback
goes to the server's log). Model work runs on ``limits.slots`` worker threads; up to ``limits.queue``
more requests wait, and beyond that a request is answered 429 with ``Retry-After`` at once. A streaming
client that goes away stops its decode at the next token and frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from longmem.errors import LongMemError
from longmem.serve.engine import Engine
from longmem.serve.errors import APIError
from longmem.serve.keys import namespace_for
from longmem.serve.schemas import ChatRequest, CompletionRequest, Document, NewMemory

log = logging.getLogger("longmem.serve")

STATIC = Path(__file__).resolve().parent / "static"  # package data: the chat page, no build step
PAGES = {"": ("index.html", "text/html"), "app.js": ("app.js", "text/javascript"),
         "style.css": ("style.css", "text/css")}
CHAT_DEFAULT_MAX_TOKENS = 256  # OpenAI's chat default is "until the context ends"; ours is bounded
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class Slots:
    """``slots`` worker threads for model work and at most ``queue`` jobs waiting for them; one more: 429."""

    def __init__(self, slots: int, queue: int):
        self.executor = ThreadPoolExecutor(slots, thread_name_prefix="longmem-model")
        self.capacity, self.slots = slots + queue, slots
        self.admitted = 0
        self._lock = threading.Lock()

    def submit(self, fn, *args):
        with self._lock:
            if self.admitted >= self.capacity:
                raise APIError(429, f"the server is busy ({self.slots} requests running, {self.capacity - self.slots} "
                                    "waiting); retry after a second", code="server_busy", headers={"Retry-After": "1"})
            self.admitted += 1
        future = self.executor.submit(fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future) -> None:
        with self._lock:
            self.admitted -= 1

    async def run(self, fn, *args):
        """Run ``fn(cancel, *args)`` on a worker; if the caller goes away, the job is dropped or told to stop."""
        cancel = threading.Event()
        future = self.submit(fn, cancel, *args)
        try:
            return await asyncio.wrap_future(future)
        finally:
            if not future.done():
                cancel.set()
                future.cancel()


def create_app(engine: Engine, api_keys: dict[str, str] | None = None) -> FastAPI:
    """The server over a loaded model. ``api_keys``: ``{key: namespace}`` (``read_api_keys``); None: no keys, one
    namespace (the store folder itself)."""
    slots = Slots(engine.limits.slots, engine.limits.queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.closing.set()  # running decodes end at their next token
        slots.executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="longmem", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.slots = engine, slots

    # -- errors -------------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = (f"unknown URL: {request.method} {request.url.path}" if e.status_code == 404 else
                   f"{request.method} is not allowed on {request.url.path}" if e.status_code == 405 else str(e.detail))
        return JSONResponse(APIError(e.status_code, message, code="unknown_url" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(APIError(400, f"invalid request: {e.errors()[0].get('msg')}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, "internal server error; the server's log has the details").body(), status_code=500)

    # -- helpers ------------------------------------------------------------------------------------

    def auth(request: Request) -> str | None:
        if api_keys is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        namespace = namespace_for(api_keys, key.strip()) if scheme.lower() == "bearer" else None
        if namespace is None:
            raise APIError(401, "missing or unknown API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        return namespace

    async def read(request: Request, schema):
        limit = engine.limits.max_body_bytes
        too_big = APIError(413, f"the request body is over this server's limit of {limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_big
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"the request body is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})",
                           code="invalid_encoding") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise APIError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                           code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p.isidentifier()
                             and p not in ("str", "int", "float", "bool", "list", "dict", "TextPart")) or None
            if first["type"] == "missing":
                raise APIError(400, f"missing required parameter '{param}'", param=param,
                               code="missing_required_parameter") from None
            raise APIError(400, f"invalid '{param}': {first['msg']} (got {json.dumps(first.get('input'))[:80]})",
                           param=param, code="invalid_value") from None

    def check_model(name) -> None:
        if name is not None and name != engine.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server runs {engine.model_id!r}",
                           param="model", code="model_not_found")

    def envelope(kind: str) -> dict:
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": engine.model_id}

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def stream(job, args, first: dict | None, piece, last, done_extra=None):
        """Server-sent events: ``first`` (if any), one ``piece(text)`` chunk per new text, ``last(result)``, then
        ``data: [DONE]``. The job runs on a worker as ``job(cancel, on_text, *args)``."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("text", text))

        def run():
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ("done", job(cancel, on_text, *args)))
            except APIError as e:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", e))
            except Exception as e:  # noqa: BLE001 - reported to the client as a server error, logged here
                log.exception("internal error while streaming")
                loop.call_soon_threadsafe(queue.put_nowait, ("error", APIError(500, f"internal server error ({type(e).__name__})")))

        future = slots.submit(run)

        async def events():
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                while True:
                    kind, value = await queue.get()
                    if kind == "text":
                        yield f"data: {json.dumps(piece(value))}\n\n"
                    elif kind == "error":
                        yield f"data: {json.dumps(value.body())}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps(last(value))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # the client went away (or all is sent): the decode stops, the slot is freed
                future.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- OpenAI routes ------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str):
        auth(request)
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "longmem",
                "max_model_len": engine.limits.max_prompt_tokens, "window": engine.model.segment_length}

    @app.post("/v1/completions")
    async def completions(request: Request):
        namespace = auth(request)
        body = await read(request, CompletionRequest)
        check_model(body.model)
        prompts = engine.prompt_ids(body.prompt)
        params = engine.params(body, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        if body.memory is not None:
            engine.header(namespace, body.memory)  # 404 / 400 before the request queues
        echo, top = bool(body.echo), body.logprobs
        if body.stream:
            if len(prompts) > 1 or echo or top is not None:
                raise APIError(400, "stream takes one prompt, without echo or logprobs", param="stream")
            head = envelope("text_completion")
            return stream(complete_one, (namespace, body.memory, prompts[0], params, False, None), None,
                          lambda text: {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]},
                          lambda r: {**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": r[0].finish_reason}]})
        out = envelope("text_completion")
        choices, prompt_n, completion_n = [], 0, 0
        for index, ids in enumerate(prompts):
            result, logprobs = await slots.run(lambda cancel, ids=ids: complete_one(cancel, None, namespace, body.memory,
                                                                                    ids, params, echo, top))
            text = (engine.decode(ids) if echo else "") + result.text
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason})
            prompt_n, completion_n = prompt_n + len(ids), completion_n + len(result.tokens)
        return {**out, "choices": choices, "usage": usage(prompt_n, completion_n)}

    def complete_one(cancel, on_text, namespace, memory_name, ids, params, echo, top):
        memory = engine.open_memory(namespace, memory_name)
        result = engine.generate(ids, memory, params, cancel, on_text)
        logprobs = None
        if top is not None:
            scored = ids + result.tokens
            lp = engine.logprobs(scored, engine.open_memory(namespace, memory_name), top)
            logprobs = lp if echo else {k: v[len(ids):] for k, v in lp.items()}
        return result, logprobs

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        namespace = auth(request)
        body = await read(request, ChatRequest)
        check_model(body.model)
        if body.remember and body.memory is None:
            raise APIError(400, "remember needs a memory: give the memory's name in 'memory'", param="remember")
        if body.memory is not None:
            name = engine.checked_name(body.memory, "memory")
            if not (body.remember and not engine.store(namespace).exists(name)):  # remember creates a missing one
                engine.header(namespace, name)
        text, stops = engine.chat_prompt(body.messages)
        ids = engine.encode(text)
        engine.check_prompt(ids, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = engine.params(body, max_tokens, CHAT_DEFAULT_MAX_TOKENS)
        params.stops = stops + params.stops
        user = next((m.text() for m in reversed(body.messages) if m.role == "user"), "")
        args = (namespace, body.memory, ids, params, user if body.remember else None)
        if body.stream:
            head = envelope("chat.completion.chunk")
            return stream(chat_one, args,
                          {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
                          lambda t: {**head, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]},
                          lambda r: {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": r.finish_reason}],
                                     "usage": usage(r.prompt_tokens, len(r.tokens))})
        result = await slots.run(lambda cancel: chat_one(cancel, None, *args))
        return {**envelope("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": usage(result.prompt_tokens, len(result.tokens))}

    def chat_one(cancel, on_text, namespace, memory_name, ids, params, remember_user):
        exists = memory_name is not None and engine.store(namespace).exists(memory_name)
        result = engine.generate(ids, engine.open_memory(namespace, memory_name if exists else None), params, cancel, on_text)
        if remember_user is not None and not cancel.is_set():
            engine.add_text(namespace, memory_name, engine.exchange_text(remember_user, result.text), "chat")
        return result

    # -- memory routes ------------------------------------------------------------------------------

    @app.get("/v1/memories")
    async def list_memories(request: Request):
        namespace = auth(request)
        return {"object": "list", "data": await asyncio.to_thread(engine.list_memories, namespace)}

    @app.post("/v1/memories", status_code=201)
    async def create_memory(request: Request):
        namespace = auth(request)
        body = await read(request, NewMemory)
        return JSONResponse(await asyncio.to_thread(engine.create, namespace, body.name, body.memory_size), status_code=201)

    @app.get("/v1/memories/{name:path}")
    async def get_memory(request: Request, name: str):
        namespace = auth(request)
        return await asyncio.to_thread(engine.describe, namespace, engine.checked_name(name))

    @app.delete("/v1/memories/{name:path}")
    async def delete_memory(request: Request, name: str):
        namespace = auth(request)
        return await asyncio.to_thread(engine.delete, namespace, engine.checked_name(name))

    @app.post("/v1/memories/{name:path}/documents")
    async def add_document(request: Request, name: str):
        namespace = auth(request)
        engine.checked_name(name)
        body = await read(request, Document)
        if not body.text.strip():
            raise APIError(400, "text is empty: nothing to add", param="text", code="empty_document")
        n, memory = await slots.run(lambda cancel: engine.add_text(namespace, name, body.text, body.source or "api"))
        return {"object": "memory.document", "memory": name, "tokens_added": n, **{k: memory[k] for k in ("tokens", "pending")},
                "sources": len(memory["sources"])}

    # -- the page -----------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "requests": slots.admitted}

    def page(file: str, media: str):
        async def serve_file():
            return FileResponse(STATIC / file, media_type=media)
        return serve_file

    for route, (file, media) in PAGES.items():
        app.get(f"/{route}")(page(file, media))

    return app
