"""The server's pieces in-process: an upload is kept in one buffer (Python's allocations traced
while it streams in), the app's answers to what the decoder raises (a stub Classifier, driven
through ASGI without a network), the Host names of an address, and token comparison."""

import asyncio
import json
import socket
import tracemalloc

import pytest

pytest.importorskip("fastapi", reason="the server's packages: pip install -r scripts/requirements-serve.txt")

from vim_rpi import server as server_module  # noqa: E402
from vim_rpi.access import host_names, is_loopback, token_matches  # noqa: E402
from vim_rpi.errors import ImageError, ImageTooLargeError  # noqa: E402
from vim_rpi.uploads import UploadError, UploadSlots, read_image  # noqa: E402

SIZE = 8 * 2**20
CHUNK = 64 * 2**10  # what uvicorn hands over at a time


class StreamedRequest:
    """The parts of a Starlette Request that read_image uses; each chunk is a new bytes object,
    as the server's protocol makes them."""

    def __init__(self, body, headers):
        self.headers, self._body, self._at = headers, body, 0

    async def receive(self):
        chunk = self._body[self._at:self._at + CHUNK]  # a copy: a fresh object, like uvicorn's
        self._at += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": self._at < len(self._body)}


def _peak_while_reading(body, headers):
    """(data, Python's peak allocation in bytes while read_image ran)."""

    async def read():
        tracemalloc.start()
        try:
            data = await read_image(StreamedRequest(body, headers), limit=2 * SIZE, idle_s=5, total_s=60,
                                    stopped=asyncio.Event(), claim=UploadSlots(1).claim())
            return data, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    return asyncio.run(read())


@pytest.mark.parametrize("framing", ["content-length", "chunked", "multipart"])
def test_an_upload_is_kept_in_one_buffer(framing):
    """Peak memory while reading an 8 MB upload: one copy of it (plus a chunk, and the growth
    steps of a body of unknown length), not a list of chunks beside their joined copy."""
    body = bytes(range(256)) * (SIZE // 256)
    if framing == "multipart":
        wire = b"--B\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n" + body + b"\r\n--B--\r\n"
        headers = {"content-length": str(len(wire)), "content-type": "multipart/form-data; boundary=B"}
    else:
        wire = body
        headers = {"content-length": str(len(wire))} if framing == "content-length" else {}
    data, peak = _peak_while_reading(wire, headers)
    assert data == body
    allowed = SIZE * (1.25 if framing == "chunked" else 1.0) + 4 * CHUNK
    assert peak <= allowed, f"{peak / SIZE:.2f} x the body"


def test_a_body_over_the_limit_and_a_slot_taken_are_refused():
    slots = UploadSlots(1)
    holder = slots.claim()
    assert holder.take()
    request = StreamedRequest(b"x" * 10, {})
    with pytest.raises(UploadError) as refused:
        asyncio.run(read_image(request, limit=100, idle_s=5, total_s=60, stopped=asyncio.Event(), claim=slots.claim()))
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    holder.release()
    holder.release()  # once only
    assert slots.in_use == 0
    claim = slots.claim()
    with pytest.raises(UploadError) as refused:
        asyncio.run(read_image(StreamedRequest(b"x" * 101, {}), limit=100, idle_s=5, total_s=60, stopped=asyncio.Event(),
                               claim=claim))
    assert refused.value.status == 413 and slots.in_use == 1  # the caller frees it (the route does)
    claim.release()
    assert slots.in_use == 0


class StubClassifier:
    """Stands in for vim_rpi.Classifier: loads at once; its decoder raises what `preprocess` says."""

    model_name, num_classes = "stub", 10
    raises = None

    def __init__(self, **options):
        pass

    def check_topk(self, k):
        return 5 if k is None else k

    def preprocess(self, data):
        raise self.raises


async def _call(app, method, path, body=b""):
    """One request through the ASGI app -> (status, headers, body). The client stays connected."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-length", str(len(body)).encode())],
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000)}
    await app(scope, receive, send)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("raised,status", [
    (ImageTooLargeError("image: 9000 x 9000 RGB needs 232 MB decoded, over the budget of 100 MB; raise it with "
                        "--max-image-mb"), 413),
    (ImageError("image: not an image"), 422),
])
def test_decoder_errors_become_4xx_json(monkeypatch, raised, status):
    """An image over the decoder's memory budget is 413 with its message (the budget and the
    option); another unusable image is 422."""
    monkeypatch.setattr(server_module, "Classifier", StubClassifier)
    monkeypatch.setattr(StubClassifier, "raises", raised)
    app = server_module.create_app(server_module.Settings(grace_s=1))

    async def run():
        async with app.router.lifespan_context(app):
            for _ in range(200):
                if (await _call(app, "GET", "/readyz"))[0] == 200:
                    break
                await asyncio.sleep(0.05)
            return await _call(app, "POST", "/v1/classify", b"\x89PNG not decoded")

    got_status, headers, body = asyncio.run(run())
    assert got_status == status and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": str(raised)}


def test_the_host_names_of_an_address():
    """Loopback: localhost and the address; a network address adds this machine's names."""
    assert host_names("127.0.0.1", []) == {"localhost", "127.0.0.1"}
    assert host_names("[::1]", ["Pi.Lan."]) == {"localhost", "::1", "pi.lan"}
    assert host_names("0.0.0.0", ["*"]) is None
    names = host_names("0.0.0.0", [])
    assert {socket.gethostname().lower(), socket.gethostname().lower() + ".local", "localhost"} <= names
    assert [is_loopback(h) for h in ("localhost", "127.0.0.2", "::1", "[::1]", "0.0.0.0", "192.168.1.2", "pi")] == [
        True, True, True, True, False, False, False]


def test_tokens_are_compared_as_utf8_bytes():
    sent = "Bearer s3cret-ключ".encode().decode("latin-1")  # how the framework hands over the header's bytes
    assert token_matches(sent, "s3cret-ключ") and token_matches("bearer  abc ", "abc")
    assert not token_matches(sent, "s3cret-key")
    for header in (None, "", "abc", "Basic abc", "Bearer abcd", "Bearer ab"):
        assert not token_matches(header, "abc"), header


def test_answers_are_not_held_back_by_nagle():
    """serve_rpi.py opens its port itself; asyncio turns Nagle's algorithm off (TCP_NODELAY) only
    on sockets that say they are TCP, and without that every keep-alive answer waited ~40 ms
    for the client's delayed ACK."""
    from vim_rpi import serve_rpi

    async def nodelay_of_an_accepted_connection():
        accepted = asyncio.get_running_loop().create_future()

        class Note(asyncio.Protocol):
            def connection_made(self, transport):
                accepted.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                                 socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Note, sock=serve_rpi.listen("127.0.0.1", 0))
        with socket.create_connection(server.sockets[0].getsockname()[:2]):
            value = await asyncio.wait_for(accepted, 10)
        server.close()
        return value

    assert asyncio.run(nodelay_of_an_accepted_connection()) == 1
