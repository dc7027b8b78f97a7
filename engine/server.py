"""An OpenAI-compatible HTTP server over the continuous-batching runtime (FastAPI + uvicorn).

    app = create_app(llm, model_name="bitnet-b1.58-2B-4T", max_batch=16)   # an ASGI app
    serve(llm, "127.0.0.1", 8000)                                          # or run it until SIGINT/SIGTERM

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.
One engine thread steps the runtime (every running request decodes in the same step) and hands
each step's text to the event loop in one call, which files each request's piece in its handler's
mailbox; handlers only validate, queue and format.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import threading
import time
import traceback
import uuid
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictBool, StrictStr, ValidationError
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from .llm import LLM
from .runtime import Runtime
from .sampling import SamplingParams
from .tokenizer import TokenizerError

MAX_BODY_BYTES = 1 << 20        # a larger request body is answered 413
SHUTDOWN_GRACE_SECONDS = 5      # on SIGINT/SIGTERM, running answers get this long to finish
RETRY_AFTER_SECONDS = 1         # told to clients refused with 429
log = logging.getLogger("engine.server")


# ---- errors, in OpenAI's shape ----------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, named by its field path (e.g. messages.0.role)."""
    first = e.errors()[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first['msg']}")
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(400, f"{param or 'the request body'}: {first['msg']}", param=param)


# ---- request bodies ---------------------------------------------------------------------------
def plain(check, message: str):
    """A field validated by `check` (value -> normalized value, or None when invalid), so that an
    error names the field itself rather than a branch of a union."""
    def validate(value):
        out = check(value)
        if out is None:
            raise PydanticCustomError("invalid", message)
        return out
    return PlainValidator(validate)


def _text_content(v):
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in v):
        return "".join(p["text"] for p in v)


def _stop(v):
    v = [] if v is None else [v] if isinstance(v, str) else v
    if isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) and s for s in v):
        return v


def _one_prompt(v):
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]  # OpenAI's array form, holding one prompt
    if isinstance(v, str) or (isinstance(v, list) and all(type(t) is int for t in v)):
        return v


Temperature = Annotated[float, Field(strict=True, ge=0, le=2)]
TopP = Annotated[float, Field(strict=True, ge=0, le=1)]
Seed = Annotated[int, Field(strict=True, ge=-(2 ** 63), le=2 ** 64 - 1)]   # what torch accepts
TokenCount = Annotated[int, Field(strict=True, ge=1)]
Content = Annotated[str, plain(_text_content, "content must be a string or a list of {type: text, text} parts")]
Stop = Annotated[list[str], plain(_stop, "stop must be a non-empty string or a list of at most 4 of them")]
Prompt = Annotated[str | list[int], plain(_one_prompt, "prompt must be a string or a list of token ids "
                                                       "(one prompt per request)")]
# fields we cannot honour: refused unless they hold their neutral value (silently ignoring
# tools or logit_bias would give answers that look right and are not)
UNSUPPORTED = {"tools": [], "functions": [], "tool_choice": "none", "logit_bias": {}, "logprobs": False,
               "top_logprobs": 0, "echo": False, "best_of": 1, "suffix": "", "presence_penalty": 0,
               "frequency_penalty": 0, "response_format": {"type": "text"}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored, as OpenAI's clients send many."""
    model_config = ConfigDict(extra="allow")
    model: StrictStr | None = None          # any name is accepted: this server holds one model
    max_tokens: TokenCount | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop = []
    n: Literal[1] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False           # not OpenAI's: keep going past end tokens (benchmarks)

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in (None, UNSUPPORTED[name]):
                raise ApiError(400, f"{name} is not supported by this server", param=name)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Content


class ChatRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: TokenCount | None = None   # the newer name of max_tokens; wins over it


class CompletionRequest(SamplingFields):
    prompt: Prompt    # text (BOS added), or token ids (used as they are)


# ---- the engine thread ------------------------------------------------------------------------
class EngineFailed(Exception):
    """The runtime raised while stepping; every request in flight is failed with it."""


class Mailbox:
    """What the engine has for one request, read on the event loop: text pieces, then None (done) or
    an EngineFailed. Lighter than an asyncio.Queue: a list, and a future only while the reader waits."""
    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list:
        """Everything filed since the last take (waits for at least one item)."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        items, self.items = self.items, []
        return items


class Engine:
    """Owns the runtime: one thread steps it while there is work (and sleeps when there is none),
    then hands the step's text to the server's loop, one call per step, into each request's Mailbox."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self._queues: dict = {}                 # Request -> its Mailbox
        self._lock = threading.Lock()           # adding a request and registering its queue are one act
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, prompt: list[int], params: SamplingParams):
        """Queue a request (ValueError for a prompt the runtime refuses); returns it and its mailbox."""
        queue = Mailbox()
        with self._lock:
            req = self.rt.add(prompt, params)
            self._queues[req] = queue
        self._wake.set()
        return req, queue

    def cancel(self, req) -> None:
        self.rt.cancel(req)
        self._wake.set()

    def _run(self) -> None:
        if self.rt.device.type == "cuda" and self.rt.device.index is not None:
            torch.cuda.set_device(self.rt.device)  # the current device is per thread
        while not self._stopping:
            self._wake.clear()                  # cleared before looking, so no add is missed
            if not self.rt.has_work:
                self._wake.wait()
                continue
            try:
                events = self.rt.step()
            except Exception as e:  # fail the requests in flight, keep serving new ones
                log.error("the runtime failed:\n%s", traceback.format_exc())
                self._fail_all(EngineFailed(f"the engine failed: {e}"))
                continue
            self._deliver(events)

    def _deliver(self, events) -> None:
        batch = []
        with self._lock:
            for req, piece in events:
                queue = self._queues.pop(req, None) if req.finished else self._queues.get(req)
                if queue is not None:
                    batch.append((queue, piece, req.finished))
        if batch:  # one hop to the event loop per step, not one per request
            self._loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, error: EngineFailed) -> None:
        with self._lock:
            reqs, self._queues = list(self._queues.items()), {}
        for req, _ in reqs:
            self.rt.cancel(req)
        self._loop.call_soon_threadsafe(_put_all, [(q, error, True) for _, q in reqs])


def _put_all(batch) -> None:
    for queue, item, finished in batch:
        if item:
            queue.put(item)
        if finished and not isinstance(item, EngineFailed):
            queue.put(None)


class Job:
    """One admitted request as its handler sees it: text pieces to await, and cleanup."""

    def __init__(self, service: "Service", req, queue: Mailbox):
        self.service, self.req, self.queue = service, req, queue
        self.closed = False

    async def pieces(self):
        """Text as it is decoded; pieces that piled up while the client was slow come out joined."""
        while True:
            items = await self.queue.take()
            if len(items) == 1 and isinstance(items[0], str):   # the usual case: one piece
                yield items[0]
                continue
            text = "".join(i for i in items if isinstance(i, str))
            if text:
                yield text
            for item in items:
                if isinstance(item, EngineFailed):
                    raise item
            if None in items:
                return

    async def text(self, request: Request) -> str:
        """The whole answer; cancelled at once if the client goes away first."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(request))
        try:
            return "".join([piece async for piece in self.pieces()])
        finally:
            watcher.cancel()

    async def _cancel_on_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.service.engine.cancel(self.req)

    def close(self) -> None:
        """Cancel the request if it is still going, and give its place back (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if not self.req.finished:
            self.service.engine.cancel(self.req)
        self.service.admitted -= 1

    def usage(self) -> dict:
        prompt, completion = len(self.req.prompt), len(self.req.output)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Service:
    """What the handlers share: the model's name, the engine, and admission (the bounded queue)."""

    def __init__(self, llm: LLM, model_name: str, max_batch: int, max_queue: int):
        self.model_name = model_name
        self.engine = Engine(llm.runtime(max_batch))
        self.max_queue = max_queue
        self.admitted = 0       # requests admitted and not finished; touched on the event loop only
        self.created = int(time.time())

    @property
    def context(self) -> int:
        return self.engine.rt.max_len

    def admit(self, prompt: list[int], body: SamplingFields, asked: int | None) -> Job:
        try:
            self.engine.rt.check_prompt(prompt)
        except ValueError as e:
            too_long = len(prompt) >= self.context
            raise ApiError(400, str(e), param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded" if too_long else None) from None
        if self.admitted >= self.max_queue:
            raise ApiError(429, f"the server is busy ({self.admitted} requests in progress); retry shortly",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        params = sampling_params(body, asked, room=self.context - len(prompt))
        req, queue = self.engine.submit(prompt, params)
        self.admitted += 1
        return Job(self, req, queue)


def sampling_params(body: SamplingFields, asked: int | None, room: int) -> SamplingParams:
    """OpenAI's fields -> SamplingParams. max_tokens is clamped to the room the context leaves."""
    top_p = 1.0 if body.top_p is None else body.top_p
    return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=top_p or 1.0, top_k=1 if top_p == 0 else 0,   # top_p 0: the likeliest token
                          max_new_tokens=min(asked or room, room), seed=body.seed, stop=body.stop,
                          ignore_eos=body.ignore_eos)


# ---- response shapes --------------------------------------------------------------------------
def choice(fields: dict, reason: str | None = None) -> dict:
    return {"index": 0, **fields, "logprobs": None, "finish_reason": reason}


class ChatShape:
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"
    opening = {"delta": {"role": "assistant", "content": ""}}   # the first chunk names the role
    closing = {"delta": {}}

    @staticmethod
    def delta(text: str) -> dict:
        return {"delta": {"content": text}}

    @staticmethod
    def whole(text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}


class TextShape:
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"
    opening = None
    closing = {"text": ""}

    @staticmethod
    def delta(text: str) -> dict:
        return {"text": text}

    @staticmethod
    def whole(text: str) -> dict:
        return {"text": text}


def sse(data) -> str:
    """One server-sent event: `data: <JSON or text>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


async def event_stream(job: Job, shape, head: dict, include_usage: bool):
    """The answer as server-sent events, in OpenAI's chunk shape, ending with data: [DONE]."""
    extra = {"usage": None} if include_usage else {}

    def chunk(fields: dict, reason: str | None = None) -> str:
        return sse({**head, "choices": [choice(fields, reason)], **extra})

    # a text chunk is the same JSON every time but for the text: serialize the rest once
    marker = "\x00text\x00"
    before, after = chunk(shape.delta(marker)).split(json.dumps(marker))
    if shape.opening is not None:
        yield chunk(shape.opening)
    try:
        async for piece in job.pieces():
            yield before + json.dumps(piece, ensure_ascii=False) + after
    except EngineFailed as e:
        yield sse(ApiError(500, str(e), type="server_error").body())
    else:
        yield chunk(shape.closing, job.req.finish_reason)
        if include_usage:
            yield sse({**head, "choices": [], "usage": job.usage()})
    yield sse("[DONE]")


class JobStream(StreamingResponse):
    """A streamed answer whose request is cancelled and released however the response ends
    (finished, client gone, server stopping), even if the body never started."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def answer(service: Service, request: Request, body: SamplingFields, shape, encode):
    """Tokenize (off the event loop), admit, then stream or return the whole answer."""
    body.refuse_unsupported()
    try:
        prompt = await asyncio.to_thread(encode)
    except TokenizerError as e:
        raise ApiError(400, str(e), param="messages") from None
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    asked = getattr(body, field)
    if asked is not None and asked > service.context:
        raise ApiError(400, f"{field} is {asked}; the whole context holds {service.context} tokens", param=field)
    job = service.admit(prompt, body, asked)
    head = {"id": f"{shape.prefix}-{uuid.uuid4().hex}", "object": shape.chunk_object,
            "created": int(time.time()), "model": service.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return JobStream(job, event_stream(job, shape, head, include_usage))
    try:
        text = await job.text(request)
    except EngineFailed as e:
        raise ApiError(500, str(e), type="server_error") from None
    finally:
        job.close()
    if job.req.finish_reason == "cancelled":
        raise ApiError(499, "the request was cancelled")
    return JSONResponse({**head, "object": shape.object, "choices": [choice(shape.whole(text), job.req.finish_reason)],
                         "usage": job.usage()})


# ---- the app ----------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413 before the app sees them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than {self.limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_large.response()(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # read the body here (it is small), then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await too_large.response()(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def parse(request: Request, model: type[BaseModel]):
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise validation_error(e) from None


def create_app(llm: LLM, model_name: str | None = None, max_batch: int = 16, max_queue: int | None = None,
               api_key: str | None = None, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app. It owns `llm` while it runs: do not call llm.generate beside it.
    max_queue: requests admitted at once (running + waiting for a slot), default 4 x max_batch."""
    name = model_name or (llm.path.name if llm.path else "bitnet")
    service = Service(llm, name, max_batch, max_queue or 4 * max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.engine.start(asyncio.get_running_loop())
        yield
        service.engine.stop()

    async def api_error(request, e: ApiError):
        return e.response()

    async def http_error(request, e: HTTPException):  # FastAPI's own 404, 405, ... in OpenAI's shape
        return ApiError(e.status_code, str(e.detail), headers=e.headers).response()

    async def require_key(request: Request):
        given = request.headers.get("authorization", "")
        if api_key and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    app = FastAPI(title="bitnet-engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers={ApiError: api_error, HTTPException: http_error})
    app.state.service = service
    app.add_middleware(BodyLimit, limit=max_body)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatRequest)
        messages = [m.model_dump() for m in body.messages]
        return await answer(service, request, body, ChatShape, lambda: llm.tokenizer.encode_chat(messages))

    @v1.post("/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        prompt = body.prompt
        return await answer(service, request, body, TextShape,
                            lambda: llm.encode(prompt) if isinstance(prompt, str) else list(prompt))

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": service.created,
                                            "owned_by": "bitnet-engine", "context_length": service.context}]}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        rt = service.engine.rt
        return {"status": "ok", "model": name, "running": len(rt.running) + len(rt.prefilling),
                "waiting": len(rt.waiting), "admitted": service.admitted, "max_batch": rt.max_batch,
                "max_queue": service.max_queue}

    return app


# ---- running it -------------------------------------------------------------------------------
def display_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listening_socket(config: uvicorn.Config):
    """The server's socket, bound here (so that port 0 works and the URL is real), with TCP_NODELAY,
    which the connections it accepts inherit on Linux: each streamed chunk leaves at once instead
    of waiting for the client to acknowledge the previous one (Nagle's algorithm against delayed
    ACKs held chunks of a keep-alive connection back by 40 ms)."""
    sock = config.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          max_batch: int = 16, max_queue: int | None = None, api_key: str | None = None) -> int:
    """Serve until SIGINT or SIGTERM; prints the URL once the socket listens. Returns 0."""
    app = create_app(llm, model_name, max_batch, max_queue, api_key)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    server = uvicorn.Server(config)

    def stop(*_):  # also what uvicorn calls when it re-raises the signal that stopped it: exit 0
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    sock = listening_socket(config)
    url = display_url(host, sock.getsockname()[1])
    print(f"serving {app.state.service.model_name} at {url}/v1 (OpenAI API; Ctrl-C stops)", flush=True)
    server.run(sockets=[sock])
    return 0


@contextlib.contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run `app` in a thread (tests, benchmarks); yields its base URL, stops it on exit."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    server = uvicorn.Server(config)
    sock = listening_socket(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise RuntimeError("the server did not start")
    try:
        yield display_url(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
