"""Reading an uploaded image from an HTTP request, within its bounds.

    slots = UploadSlots(8)
    claim = slots.claim()
    data = await read_image(request, limit=20 * 2**20, idle_s=10, total_s=60, stopped=event, claim=claim)
    batcher.submit(data, topk, on_release=claim.release)                          # frees the slot once decoded

The image is the raw request body, or the multipart form field "image". What one upload can
take is bounded before it takes it:
- memory: the body is refused above `limit` bytes (by Content-Length before reading, and by
  counting while streaming) and is kept in one buffer, handed over without a copy (CPython's
  BytesIO.getvalue returns its own buffer), so bodies in memory stay below uploads x limit;
- an upload slot, taken with the first body byte (a client that sends headers and then nothing
  holds none) and freed once the image is decoded or the request ends; none free: 503;
- time: a body that sends nothing for `idle_s`, or takes longer than `total_s`, gets 408; one
  still coming when the server stops gets 503.
Refusals are UploadError (an HTTP status, a message, extra headers); the server answers them
as JSON. It reads the ASGI messages of a Starlette `Request` (receive, headers).
"""

import asyncio
import io
import threading

from python_multipart.multipart import MultipartParser, parse_options_header

__all__ = ["IMAGE_FIELD", "RETRY_AFTER_BUSY_S", "RETRY_AFTER_STOPPING_S", "UploadError", "busy", "stopping",
           "UploadSlots", "Claim", "read_image"]

IMAGE_FIELD = "image"  # the multipart form field that carries the image
RETRY_AFTER_BUSY_S = 1  # a full queue (or every upload slot taken) drains within a few forwards
RETRY_AFTER_STOPPING_S = 5  # loading takes seconds on a Pi; so does a restart


class UploadError(Exception):
    """A request refused (an upload here; the server raises it for every refusal): the HTTP
    status, the message and extra headers of the answer."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def busy(message):
    """503: full for now (queue, upload slots)."""
    return UploadError(503, message, {"Retry-After": str(RETRY_AFTER_BUSY_S)})


def stopping(message):
    """503: the model is loading or the server is stopping."""
    return UploadError(503, message, {"Retry-After": str(RETRY_AFTER_STOPPING_S)})


class UploadSlots:
    """At most `size` uploads hold bytes at once."""

    def __init__(self, size):
        self.size, self.in_use, self._lock = size, 0, threading.Lock()

    def claim(self):
        """A request's claim, to take a slot with its first body byte."""
        return Claim(self)


class Claim:
    """One request's hold on an upload slot: taken once, freed once (by the route, or by a
    decoder thread once the image is decoded)."""

    def __init__(self, slots):
        self._slots, self.held, self._freed = slots, False, threading.Lock()

    def take(self):
        """True if the request now holds a slot (or already did); False when all are held."""
        with self._slots._lock:
            if not self.held and self._slots.in_use < self._slots.size:
                self._slots.in_use += 1
                self.held = True
            return self.held

    def release(self):
        if self.held and self._freed.acquire(blocking=False):
            with self._slots._lock:
                self._slots.in_use -= 1


class _Body:
    """An upload's bytes in one buffer, handed over without a copy: CPython's BytesIO.getvalue
    returns its own buffer (trimmed in place). With the length announced, the first write
    sizes the buffer once (after the first byte came, so a client that sends none costs none)."""

    def __init__(self, expected=0):
        self._buffer, self.size, self._expected = io.BytesIO(), 0, expected

    def write(self, data):
        if self.size == 0 and self._expected > len(data):
            self._buffer.seek(self._expected - 1)
            self._buffer.write(b"\0")
            self._buffer.seek(0)
        self._buffer.write(data)
        self.size += len(data)

    def finish(self):
        self._buffer.truncate(self.size)
        value = self._buffer.getvalue()
        self._buffer = None
        return value


class _ImageField:
    """Collects the bytes of the multipart field named "image" while the body streams in.
    Raises ValueError (python_multipart's errors) for a malformed body or boundary, and
    UploadError from finish() when there is no such field."""

    def __init__(self, boundary, expected):
        self.body, self.found, self._expected = None, False, expected
        self._header_name, self._header_value, self._headers = b"", b"", {}
        self._current = None  # the _Body while inside the image part
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data, "on_part_end": self._part_end})

    def write(self, chunk):
        self._parser.write(chunk)

    def finish(self):
        self._parser.finalize()
        if not self.found:
            raise UploadError(400, f"multipart upload without a file field named {IMAGE_FIELD!r}")
        return self.body.finish()

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
            self._current = _Body(self._expected)

    def _part_data(self, data, start, end):
        if self._current is not None:
            self._current.write(memoryview(data)[start:end])

    def _part_end(self):
        if self._current is not None:
            self.body, self.found, self._current = self._current, True, None


async def read_image(request, *, limit, idle_s, total_s, stopped, claim):
    """The uploaded image's bytes: the raw body, or the multipart field "image". Refuses a body
    above `limit` bytes by Content-Length before reading and by counting while streaming (413),
    one that sends nothing for `idle_s` or takes longer than `total_s` in all (408), and one
    still coming when the asyncio.Event `stopped` is set (503: the server is stopping); takes
    the upload slot of `claim` with the first body byte (503 when none is free). The bytes are
    referenced from this coroutine only (no task result keeps them once the caller lets go)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise UploadError(400, f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise UploadError(413, f"upload of {int(length)} bytes is above the limit of {limit} bytes (--max-upload-mb)")
    expected = int(length) if length is not None else 0
    content_type, options = parse_options_header(request.headers.get("content-type"))
    deadline = asyncio.get_running_loop().time() + total_s
    stopping = asyncio.ensure_future(stopped.wait())
    total = 0
    try:
        if content_type == b"multipart/form-data":
            if not options.get(b"boundary"):
                raise UploadError(400, "multipart/form-data without a boundary")
            sink = _ImageField(options[b"boundary"], expected)
        else:
            sink = _Body(expected)
        while True:
            message = await _receive(request, stopping, deadline, idle_s, total_s)
            if message["type"] == "http.disconnect":
                raise UploadError(400, "the client disconnected during the upload")
            chunk = message.get("body", b"")
            if chunk and not claim.take():
                raise busy("every upload slot is taken (--uploads); retry shortly")
            total += len(chunk)
            if total > limit:
                raise UploadError(413, f"upload is above the limit of {limit} bytes (--max-upload-mb)")
            sink.write(chunk)
            if not message.get("more_body", False):
                break
        data = sink.finish()
        if not data:
            raise UploadError(400, f"empty image: send the image as the request body or as the multipart field "
                                f"{IMAGE_FIELD!r}")
    except ValueError as error:  # python_multipart's errors: a malformed body, a boundary over 256 bytes
        raise UploadError(400, f"malformed multipart body: {error}") from None
    finally:
        stopping.cancel()
    return data


async def _receive(request, stopping, deadline, idle_s, total_s):
    """The next ASGI message of the request, within the idle and total limits, unless the
    task `stopping` completes first."""
    loop = asyncio.get_running_loop()
    receiving = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({receiving, stopping}, timeout=max(min(idle_s, deadline - loop.time()), 0),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        receiving.cancel()  # nothing if it is done
    if stopping.done():
        raise stopping("the server is shutting down; retry when it is back")
    if receiving.done():
        return receiving.result()
    if loop.time() >= deadline:
        raise UploadError(408, f"the upload took longer than {total_s:g} s (--upload-timeout-s)")
    raise UploadError(408, f"the upload sent nothing for {idle_s:g} s (--upload-idle-s)")
