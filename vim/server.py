"""The HTTP API and web page of `serve_rpi.py`: a FastAPI app around one `Batcher`.

    app = create_app(Settings(classifier=ClassifierConfig(checkpoint="ckpt.pth")))
    uvicorn.run(app)                   # what vim/serve_rpi.py does, with its options

Endpoints: POST /v1/classify (the image as the raw body or as the multipart field "image";
?topk=5), GET /v1/info, GET|HEAD /healthz, GET|HEAD /readyz, GET / (the page), GET /docs (the
API's endpoints, read from GET /openapi.json), GET /favicon.ico. The model is loaded once, in the
batcher's worker thread, when the app starts; /readyz answers 503 until it is warm.

Routes only translate HTTP to batcher calls and results to JSON. Every answer that is not a
success is JSON {"error": "..."}: a client's mistake gets a 4xx, an overloaded, loading or
stopping server 503 with Retry-After, and nothing the client sends can cause a 5xx. What a
request may hold is bounded before the work starts: an upload slot (`uploads`) from its first
body byte until its image is decoded, its body in one buffer of at most `max_upload_mb`, and a
place in the batcher's queue. Uploads stay in memory, never on disk. Host, Origin and the token
are checked by `vim_rpi.access`, uploads read by `vim_rpi.uploads`. Only these, `connections`
and serve_rpi.py import the web framework; it is an optional dependency
(scripts/requirements-serve.txt).
"""

import asyncio
import contextlib
import dataclasses
import logging
import pathlib
import time
from typing import Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException

import vim_rpi
from vim_rpi import cli
from vim_rpi.access import HostAndOrigin, host_names, token_matches
from vim_rpi.batcher import Batcher, NotReady, QueueFull, ShuttingDown
from vim_rpi.classifier import Classifier, ClassifierConfig
from vim_rpi.errors import ConfigError, ImageError, ImageTooLargeError
from vim_rpi.uploads import (IMAGE_FIELD, RETRY_AFTER_STOPPING_S, UploadError, UploadSlots, busy, read_image,
                              stopping)

__all__ = ["Settings", "create_app"]

_QUEUE_FULL = "the queue is full; retry shortly"

_log = logging.getLogger("vim_rpi.serve")

STATIC = pathlib.Path(__file__).resolve().parent / "static"


@dataclasses.dataclass
class Settings:
    """What the app needs; serve_rpi.py fills it from its options.

    classifier: what to load and how (its threads are torch's for the whole process: tune_process).
    token: if set, /v1/* requires "Authorization: Bearer <token>".
    host: the address the server listens on; with allowed_hosts, the Host names it answers to
        (`vim_rpi.access.host_names`). allowed_origins: other sites' pages that may use the API.
    queue: most requests waiting for the model at once (to be decoded, being decoded, or
        decoded); more get 503. max_batch: most run in one forward. decoders: decoding threads.
    uploads: most requests holding upload bytes at once, from their first body byte until their
        image is decoded; more get 503. Memory for bodies: at most uploads x max_upload_mb.
    max_upload_mb: larger request bodies get 413 (refused while streaming, never buffered whole).
    upload_idle_s: an upload that sends nothing for this long gets 408; upload_timeout_s: one
        that takes longer in all gets 408.
    grace_s: on shutdown, how long queued requests may still take; the rest get 503.
    on_load_error: called with the exception when the model cannot be loaded.
    """

    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    token: Optional[str] = None
    host: str = "127.0.0.1"
    allowed_hosts: list = dataclasses.field(default_factory=list)
    allowed_origins: list = dataclasses.field(default_factory=list)
    queue: int = 16
    max_batch: int = 8
    decoders: int = 2
    uploads: int = 8
    max_upload_mb: float = 20.0
    upload_idle_s: float = 10.0
    upload_timeout_s: float = 60.0
    grace_s: float = 10.0
    on_load_error: Optional[Callable[[BaseException], None]] = None


class TopkEntry(BaseModel):
    index: int
    label: str
    prob: float


class Timing(BaseModel):
    queue: float
    preprocess: float
    inference: float


class ClassifyResponse(BaseModel):
    model: str
    topk: list[TopkEntry]
    timing_ms: Timing


class ErrorResponse(BaseModel):
    error: str


def _error(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "empty body, malformed multipart, no 'image' field, or a Host that is not this server's"),
    (401, "token required (Authorization: Bearer <token>)"),
    (403, "a cross-origin request (Origin) not allowed by --allowed-origins"),
    (408, "upload idle longer than --upload-idle-s, or slower than --upload-timeout-s"),
    (413, "upload larger than --max-upload-mb, or an image larger than the decoder's memory budget"),
    (422, "not a usable image (not an image, truncated, too many pixels), or topk out of range"),
    (503, "model loading, queue or uploads full, or shutting down; see Retry-After"),
)}

_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": [IMAGE_FIELD],
                                       "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}}}},
}}}


class _AccessLog:
    """ASGI middleware: one line per request on the log (stderr): method, path, status, ms.
    The path is logged still percent-encoded, so a request cannot forge log lines; bodies and
    headers are never logged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope.get("raw_path") or scope["path"].encode()
            _log.info("%s %s %d %.1f ms", scope["method"], path.decode("ascii", "backslashreplace"), status[0],
                      (time.perf_counter() - start) * 1e3)


async def _result(future, stopped, request):
    """The result of a batcher future, unless the event `stopped` is set first (503: the
    server's grace period is over) or the client disconnects (400, answered to no one). The
    future is cancelled whatever ends the wait, so an abandoned image never reaches the model."""
    result = asyncio.wrap_future(future)
    watchers = [asyncio.ensure_future(stopped.wait()), asyncio.ensure_future(_until_disconnected(request))]
    try:
        await asyncio.wait([result, *watchers], return_when=asyncio.FIRST_COMPLETED)
        if result.done():
            return result.result()
        if stopped.is_set():
            raise stopping("the server shut down before this request ran; retry when it is back")
        raise UploadError(400, "the client disconnected before the answer")
    finally:  # also when this task is cancelled
        for task in (result, *watchers):
            task.cancel()


async def _until_disconnected(request):
    """Returns when the client has gone (after the body was read, the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: Settings) -> FastAPI:
    """The app: load the model when it starts (in the batcher's thread), serve, and on shutdown
    let queued requests finish within `settings.grace_s`; `await app.state.drain()` starts that
    early (serve_rpi.py does when shutdown begins, before uvicorn waits for the connections)."""
    batcher = Batcher(lambda: Classifier(config=settings.classifier, tune_process=True), queue_size=settings.queue,
                      max_batch=settings.max_batch, decoders=settings.decoders, on_load_error=settings.on_load_error)
    limit = int(settings.max_upload_mb * 2**20)
    slots = UploadSlots(settings.uploads)
    stopped = asyncio.Event()  # the grace period is over: requests still waiting get 503
    closing = None  # batcher.close running in a thread, once shutdown has begun

    async def drain():
        """Refuse new work, let queued requests finish within grace_s, then answer the rest 503."""
        nonlocal closing
        if closing is None:
            closing = asyncio.get_running_loop().run_in_executor(None, batcher.close, settings.grace_s)
        await asyncio.shield(closing)
        stopped.set()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await drain()
        await asyncio.get_running_loop().run_in_executor(None, batcher.join)  # answered; now let torch finish

    app = FastAPI(title="Vision Mamba (Vim) image classification", version=vim_rpi.__version__,
                  lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Classify images with a Vim model loaded once. Every error is JSON {\"error\"}.")
    app.state.drain = drain
    if settings.allowed_origins:  # let the browser read the answers to the pages allowed
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["GET", "HEAD", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostAndOrigin, names=host_names(settings.host, settings.allowed_hosts),
                       origins=settings.allowed_origins)
    app.add_middleware(_AccessLog)  # added last: the outermost, so refusals are logged too

    @app.exception_handler(UploadError)
    async def api_error(request, exc):
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}"
                             for e in exc.errors())
        return _error(422, problems)

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):
        _log.error("unexpected %s: %s", type(exc).__name__, exc)
        return _error(500, "internal server error")

    async def require_token(request: Request):  # async: a plain function would take a worker thread per request
        """Dependency of /v1/*: the bearer token, when one is set."""
        if settings.token and not token_matches(request.headers.get("authorization"), settings.token):
            raise UploadError(401, "missing or wrong token: send the header Authorization: Bearer <token>",
                           {"WWW-Authenticate": "Bearer"})

    def not_ready_message():
        if batcher.load_error is not None:
            return "not ready: the model failed to load"
        return "not ready: shutting down" if batcher.classifier is not None else "not ready: the model is loading"

    def classifier():
        """The loaded Classifier, or 503 while loading or shutting down."""
        if not batcher.ready:
            raise stopping(not_ready_message())
        return batcher.classifier

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

    @v1.post("/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
    async def classify(request: Request, topk: int = Query(
            5, description="how many classes to return (a head of fewer classes: all of them)")):
        """Classify one image: the raw request body, or the multipart form field "image"."""
        clf = classifier()
        try:
            topk = clf.check_topk(topk if "topk" in request.query_params else None)
        except ConfigError as error:
            raise UploadError(422, str(error)) from None
        if batcher.waiting >= batcher.queue_size:  # refused before its upload is read
            raise busy(_QUEUE_FULL)
        claim = slots.claim()
        try:
            data = await read_image(request, limit=limit, idle_s=settings.upload_idle_s,
                                    total_s=settings.upload_timeout_s, stopped=stopped, claim=claim)
            future = batcher.submit(data, topk, on_release=claim.release)
        except BaseException as error:  # a refusal, or this task cancelled: the slot is free again
            claim.release()
            if isinstance(error, QueueFull):
                raise busy(_QUEUE_FULL) from None
            if isinstance(error, (NotReady, ShuttingDown)):
                raise stopping(str(error)) from None
            raise
        del data  # the batcher holds the only reference now: it frees the bytes and the slot once decoded
        try:
            prediction = await _result(future, stopped, request)
        except ImageTooLargeError as error:  # the budget is the server's option: name it as its command line does
            raise UploadError(413, error.render(lambda name: f"the server's {cli.flag(name)}")) from None
        except ImageError as error:
            raise UploadError(422, str(error)) from None
        except ShuttingDown as error:
            raise stopping(f"{error}; retry when it is back") from None
        return {"model": clf.model_name, "topk": prediction.topk, "timing_ms": prediction.timing_ms}

    @v1.get("/info", responses={status: _ERRORS[status] for status in (401, 503)})
    async def info():
        """The loaded model and how it runs: model, checkpoint, threads, quantize, torch, backends;
        and the server's limits and load."""
        details = classifier().info()
        details["server"] = {"queue": batcher.queue_size, "waiting": batcher.waiting, "max_batch": batcher.max_batch,
                             "decoders": batcher.decoders, "uploads": slots.size, "uploading": slots.in_use,
                             "max_upload_mb": settings.max_upload_mb, "token_required": bool(settings.token)}
        return details

    app.include_router(v1)

    @app.get("/healthz")
    async def healthz():
        """200 while the process runs."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        """200 once the model is loaded and warmed up, 503 before (and while shutting down)."""
        if not batcher.ready:
            return _error(503, not_ready_message(), {"Retry-After": str(RETRY_AFTER_STOPPING_S)})
        return {"status": "ready"}

    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):  # HEAD: the same answer without its body
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "docs.html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(STATIC / "favicon.ico")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
