"""The HTTP API and web page of `serve_rpi.py`: a FastAPI app around one `Batcher`.

    app = create_app(Settings(classifier_options={"checkpoint": "ckpt.pth"}))
    uvicorn.run(app)                   # what vim/serve_rpi.py does, with its options

Endpoints: POST /v1/classify (the image as the raw body or as the multipart field "image";
?topk=5), GET /v1/info, GET /healthz, GET /readyz, GET / (the page), GET /docs (the API's
endpoints, read from GET /openapi.json). The model is loaded once, in the batcher's worker
thread, when the app starts; /readyz answers 503 until it is warm.

Routes only translate HTTP to batcher calls and results to JSON. Every answer that is not a
success is JSON {"error": "..."}: a client's mistake gets a 4xx, an overloaded or loading server
503 with Retry-After, and nothing the client sends can cause a 5xx. Uploads are read into memory
only (never to disk) and refused past the size limit while streaming. Only this module and
serve_rpi.py import the web framework; it is an optional dependency
(scripts/requirements-serve.txt).
"""

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import pathlib
import time
from typing import Callable, Optional

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

import vim_rpi
from vim_rpi.batcher import Batcher, NotReady, QueueFull, ShuttingDown
from vim_rpi.classifier import Classifier
from vim_rpi.errors import ConfigError, ImageError

__all__ = ["Settings", "create_app"]

_log = logging.getLogger("vim_rpi.serve")

STATIC = pathlib.Path(__file__).resolve().parent / "static"
IMAGE_FIELD = "image"  # the multipart form field that carries the image
_RETRY_AFTER_FULL_S = 1  # a full queue drains within a few forwards
_RETRY_AFTER_LOADING_S = 5  # loading takes seconds on a Pi


@dataclasses.dataclass
class Settings:
    """What the app needs; serve_rpi.py fills it from its options.

    classifier_options: keyword arguments of `vim_rpi.Classifier` (checkpoint, model, threads, ...).
    token: if set, /v1/* requires "Authorization: Bearer <token>".
    queue: most requests in the server at once besides the running forward (uploading, decoding,
        waiting for the model); more get 503. max_batch: most run in one forward.
    max_upload_mb: larger request bodies get 413 (refused while streaming, never buffered whole).
    upload_timeout_s: an upload that takes longer gets 408 and gives its place in the queue back.
    grace_s: on shutdown, how long queued requests may still take.
    on_load_error: called with the exception when the model cannot be loaded.
    """

    classifier_options: dict = dataclasses.field(default_factory=dict)
    token: Optional[str] = None
    queue: int = 16
    max_batch: int = 8
    max_upload_mb: float = 20.0
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


class ApiError(Exception):
    """An answer other than success: status, message and extra headers."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status, message, headers=None):
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "empty body, malformed multipart, or no 'image' field"),
    (401, "token required (Authorization: Bearer <token>)"),
    (408, "upload slower than --upload-timeout-s"),
    (413, "upload larger than --max-upload-mb"),
    (422, "not a usable image (not an image, truncated, too many pixels), or topk out of range"),
    (503, "model loading, queue full or shutting down; see Retry-After"),
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


class _ImageField:
    """Collects the bytes of the multipart field named "image" while the body streams in."""

    def __init__(self, boundary):
        self.data, self.found = None, False
        self._header_name, self._header_value, self._headers = b"", b"", {}
        self._current = None  # list of chunks while inside the image part
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data, "on_part_end": self._part_end})

    def write(self, chunk):
        self._parser.write(chunk)

    def finish(self):
        self._parser.finalize()
        return self.data

    def _part_begin(self):
        self._headers, self._current = {}, None

    def _field(self, data, start, end):
        self._header_name += data[start:end]

    def _value(self, data, start, end):
        self._header_value += data[start:end]

    def _header_end(self):
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == IMAGE_FIELD.encode() and not self.found:
            self._current = []

    def _part_data(self, data, start, end):
        if self._current is not None:
            self._current.append(data[start:end])

    def _part_end(self):
        if self._current is not None:
            self.data, self.found, self._current = b"".join(self._current), True, None


async def _read_image(request, limit):
    """The uploaded image's bytes: the raw body, or the multipart field "image". Refuses bodies
    above `limit` bytes by Content-Length before reading, and by counting while streaming."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise ApiError(413, f"upload of {int(length)} bytes is above the limit of {limit} bytes")
    content_type, options = parse_options_header(request.headers.get("content-type"))
    multipart = content_type == b"multipart/form-data"
    if multipart and not options.get(b"boundary"):
        raise ApiError(400, "multipart/form-data without a boundary")
    form = _ImageField(options[b"boundary"]) if multipart else None
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"upload is above the limit of {limit} bytes")
            if form is not None:
                form.write(chunk)
            else:
                chunks.append(chunk)
        data = form.finish() if form is not None else b"".join(chunks)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected during the upload") from None
    except ValueError as error:  # python_multipart's parse errors
        raise ApiError(400, f"malformed multipart body: {error}") from None
    if form is not None and not form.found:
        raise ApiError(400, f"multipart upload without a file field named {IMAGE_FIELD!r}")
    if not data:
        raise ApiError(400, f"empty image: send the image as the request body or as the multipart field "
                            f"{IMAGE_FIELD!r}")
    return data


async def _until_disconnected(request):
    """Returns when the client has gone (after the body was read, the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _result_unless_disconnected(request, future):
    """The result of a batcher future; if the client disconnects first, the future is cancelled
    so its image never reaches the model (and the route answers to no one)."""
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not result.done():
            raise ApiError(400, "the client disconnected before the answer")
        return result.result()
    finally:  # also when this task is cancelled (e.g. shutdown's grace period ran out)
        result.cancel()
        gone.cancel()


def create_app(settings: Settings) -> FastAPI:
    """The app: load the model when it starts (in the batcher's thread), serve, and on shutdown
    let queued requests finish within `settings.grace_s`."""
    batcher = Batcher(lambda: Classifier(**settings.classifier_options), queue_size=settings.queue,
                      max_batch=settings.max_batch, on_load_error=settings.on_load_error)
    limit = int(settings.max_upload_mb * 2**20)
    uploading = 0  # classify requests reading their body (only the event loop's thread touches it)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.close, settings.grace_s)

    app = FastAPI(title="Vision Mamba (Vim) image classification", version=vim_rpi.__version__,
                  lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Classify images with a Vim model loaded once. Every error is JSON {\"error\"}.")
    app.add_middleware(_AccessLog)

    @app.exception_handler(ApiError)
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

    def require_token(request: Request):
        """Dependency of /v1/*: the bearer token, compared in constant time, when one is set."""
        if not settings.token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
            raise ApiError(401, "missing or wrong token: send the header Authorization: Bearer <token>",
                           {"WWW-Authenticate": "Bearer"})

    def not_ready_message():
        if batcher.load_error is not None:
            return "not ready: the model failed to load"
        return "not ready: shutting down" if batcher.classifier is not None else "not ready: the model is loading"

    def classifier():
        """The loaded Classifier, or 503 while loading or shutting down."""
        if not batcher.ready:
            raise ApiError(503, not_ready_message(), {"Retry-After": str(_RETRY_AFTER_LOADING_S)})
        return batcher.classifier

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

    @v1.post("/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
    async def classify(request: Request, topk: Optional[int] = Query(
            None, description="how many classes to return [5, or every class of a smaller head]")):
        """Classify one image: the raw request body, or the multipart form field "image"."""
        nonlocal uploading
        clf = classifier()
        try:
            topk = clf.check_topk(topk)
        except ConfigError as error:
            raise ApiError(422, str(error).replace("--topk", "topk")) from None
        # Uploads in progress count against the queue too, so memory stays below queue x upload limit;
        # a full queue is refused before the upload is read.
        if batcher.waiting + uploading >= batcher.queue_size:
            raise ApiError(503, "the queue is full; retry shortly", {"Retry-After": str(_RETRY_AFTER_FULL_S)})
        uploading += 1
        try:
            data = await asyncio.wait_for(_read_image(request, limit), settings.upload_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the upload took longer than {settings.upload_timeout_s:g} s") from None
        finally:
            uploading -= 1
        try:
            prediction = await _result_unless_disconnected(request, batcher.submit(data, topk))
        except QueueFull:
            raise ApiError(503, "the queue is full; retry shortly", {"Retry-After": str(_RETRY_AFTER_FULL_S)}) from None
        except (NotReady, ShuttingDown) as error:
            raise ApiError(503, str(error), {"Retry-After": str(_RETRY_AFTER_LOADING_S)}) from None
        except ImageError as error:
            raise ApiError(422, str(error)) from None
        return {"model": clf.model_name, "topk": prediction.topk, "timing_ms": prediction.timing_ms}

    @v1.get("/info", responses={status: _ERRORS[status] for status in (401, 503)})
    async def info():
        """The loaded model and how it runs: model, checkpoint, threads, quantize, torch, backends;
        and the server's queue."""
        details = classifier().info()
        details["server"] = {"queue": batcher.queue_size, "waiting": batcher.waiting, "max_batch": batcher.max_batch,
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
            return _error(503, not_ready_message(), {"Retry-After": str(_RETRY_AFTER_LOADING_S)})
        return {"status": "ready"}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return FileResponse(STATIC / "docs.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
