"""Mutated requests against a real server: raw and multipart bodies with bytes flipped, cut or
repeated, odd and oversized headers, malformed framing, odd targets and query strings. Every
answer must be below 500, and every error JSON {"error": ...}; the server keeps serving. The
seed is fixed and the count and the time are bounded; the statuses are printed to the test log."""

import collections
import json
import random
import socket
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server's packages: pip install -r scripts/requirements-serve.txt")

from serve_helpers import TIMEOUT, Server, encode, read_answer, small_checkpoint, status_of  # noqa: E402

CASES = 500
TIME_BUDGET_S = 120
IDLE_S = 1  # --upload-idle-s: a body shorter than announced is answered 408 after this


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    srv = Server(root, small_checkpoint(root / "small.pth"), "--max-upload-mb", "1", "--upload-idle-s", str(IDLE_S),
                 "--header-timeout-s", "3")
    yield srv
    srv.stop()


def _image():
    pixels = np.random.default_rng(4).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return encode(pixels, "PNG")


def _mutate_bytes(rng, data):
    """Flip, delete, insert or repeat a few bytes, or cut the tail."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not data:
            break
        at = rng.randrange(len(data))
        kind = rng.choice(["flip", "delete", "insert", "repeat", "cut"])
        if kind == "flip":
            data[at] = rng.randrange(256)
        elif kind == "delete":
            del data[at:at + rng.randint(1, 16)]
        elif kind == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "repeat":
            data[at:at] = data[at:at + rng.randint(1, 64)] * rng.randint(1, 4)
        else:
            del data[at:]
    return bytes(data)


def _multipart(rng, image):
    boundary = rng.choice(["b", "x" * 70, "----WebKitFormBoundary7MA4YWxkTrZu0gW", "b" * 300, "", "\"quoted\"",
                           "a;b", "é", "b\tc"])
    name = rng.choice(["image", "img", "", "image\"; filename=\"x", "IMAGE"])
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode("utf-8") + image + f"\r\n--{boundary}--\r\n".encode("utf-8")
    if rng.random() < 0.6:
        body = _mutate_bytes(rng, body)
    content_type = rng.choice([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                               f"multipart/form-data; boundary=\"{boundary}\"", f"multipart/mixed; boundary={boundary}",
                               f"multipart/form-data; boundary={boundary}; charset=utf-8"])
    return body, [("Content-Type", content_type)]


ODD_HEADERS = [
    ("X-Long", "v" * 8000), ("Accept", "*/*"), ("Content-Type", "image/png; q=\x7f"), ("Authorization", "Bearer \xff"),
    ("Authorization", "Basic " + "A" * 500), ("Origin", "null"), ("Origin", "http://127.0.0.1"), ("Expect", "100-continue"),
    ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Content-Encoding", "gzip"), ("Range", "bytes=0-1"),
    ("Cookie", "a=" + "b" * 1000), ("X-Forwarded-For", "1.2.3.4"), ("Transfer-Encoding", "identity"),
    ("Content-Type", ""), ("Content-Type", "text/plain; boundary=x"), ("If-None-Match", "*"),
]

TARGETS = [
    "/v1/classify", "/v1/classify?topk=3", "/v1/classify?topk=-1", "/v1/classify?topk=1e9", "/v1/classify?topk=%00",
    "/v1/classify?topk=99999999999999999999", "/v1/classify?topk=3&topk=4", "/v1/classify?%zz", "/v1//classify",
    "/v1/classify/", "/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/%00", "/healthz?x=" + "y" * 3000,
    "/docs", "/openapi.json", "/favicon.ico", "/v1/info", "/readyz", "/", "/static/app.js", "*",
    "http://127.0.0.1/v1/classify",
]


def _case(rng, image):
    """One request as raw bytes, and whether its body is cut short of its Content-Length."""
    method = rng.choice(["POST"] * 6 + ["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
    target = rng.choice(TARGETS[:8] * 3 + TARGETS)
    version = rng.choice(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 "])
    headers = [("Host", rng.choice(["127.0.0.1"] * 6 + ["localhost:1", "[::1]", "evil.example", "", "a@b"]))]
    kind = rng.choice(["raw", "raw", "multipart", "none", "junk"])
    if kind == "raw":
        body = image if rng.random() < 0.3 else _mutate_bytes(rng, image)
    elif kind == "multipart":
        body, extra = _multipart(rng, image)
        headers += extra
    elif kind == "junk":
        body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 2000)))
    else:
        body = b""
    headers += rng.sample(ODD_HEADERS, rng.randint(0, 3))
    framing = rng.choice(["length"] * 6 + ["chunked", "bad chunked", "both", "wrong length", "short"])
    short = False
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "wrong length":
        headers.append(("Content-Length", rng.choice(["-1", "abc", "1e3", " 5", "0x10", "99999999999999999999"])))
    elif framing == "short":  # announces more than it sends: the server waits, then answers 408
        headers.append(("Content-Length", str(len(body) + 10)))
        short = True
    else:
        headers.append(("Transfer-Encoding", "chunked"))
        if framing == "both":
            headers.append(("Content-Length", str(len(body))))
        size = f"{len(body):x}" if framing != "bad chunked" else rng.choice(["zz", "-1", "", "fffffffffffffffff"])
        body = f"{size}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    if rng.random() < 0.1:
        rng.shuffle(headers)
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1", "replace") + body, method, short


def test_mutated_requests_get_no_5xx_and_json_errors(server, capsys):
    rng = random.Random(18)
    image = _image()
    statuses, unanswered, start = collections.Counter(), [], time.monotonic()
    for i in range(CASES):
        if time.monotonic() - start > TIME_BUDGET_S:
            break
        raw, method, short = _case(rng, image)
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            try:
                sock.sendall(raw)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered (and closed) before all was sent
            try:
                status, headers, body = read_answer(sock, method)
            except (ConnectionError, OSError, ValueError) as error:  # http.client's errors included
                unanswered.append((i, raw[:200], repr(error)))
                continue
        statuses[status] += 1
        assert status < 500, (raw[:500], status, body[:500])
        if status >= 400:
            assert headers.get("content-type") == "application/json", (raw[:500], status, headers, body[:200])
            if method != "HEAD":
                assert set(json.loads(body)) == {"error"}, (raw[:500], body[:200])
    done = sum(statuses.values()) + len(unanswered)
    with capsys.disabled():
        print(f"\n[reliability] fuzz: {done} mutated requests in {time.monotonic() - start:.1f} s, statuses "
              f"{dict(sorted(statuses.items()))}, 5xx: {sum(n for s, n in statuses.items() if s >= 500)}, "
              f"closed without an answer: {len(unanswered)}")
    assert done >= 100
    assert not unanswered, unanswered[:5]
    assert status_of(server, "GET", "/healthz") == 200
    assert "Traceback" not in server.stderr()
