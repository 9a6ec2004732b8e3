"""What the server tests share: serve_rpi.py in a subprocess on a free loopback port, HTTP
helpers (whole requests, raw bytes, multipart bodies), memory readings of the server process,
and small random-weight checkpoints. Every wait is bounded by TIMEOUT."""

import http.client
import io
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib

import numpy as np
import torch
from PIL import Image

import vim_rpi
from vim_rpi import checkpoint_io

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "vim" / "serve_rpi.py"
TIMEOUT = 60  # seconds: the bound of every wait


def small_checkpoint(path):
    """A 2-block, 64-wide Vim with 10 classes at 64 px: forwards of a few ms."""
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, img_size=64, num_classes=10)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # spread logits: the top-k order is not a tie
    checkpoint_io.save_checkpoint(path, model)
    return path


def encode(pixels, fmt, **options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG whose header claims width x height gray pixels: enough for Pillow's bomb check."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def sample_images(seed):
    """The encoded images every server test sends: a good PNG and JPEG, a truncated JPEG, text,
    and a PNG header claiming 40000 x 40000 pixels (a decompression bomb)."""
    rng = np.random.default_rng(seed)
    jpeg = encode(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8), "JPEG", quality=90)
    return {
        "png": encode(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "PNG"),
        "jpg": jpeg,
        "truncated": jpeg[: len(jpeg) // 3],
        "text": b"not an image\n",
        "bomb": png_header_only(40_000, 40_000),
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve_rpi.py in a subprocess; stderr goes to a file (a full pipe would block it).
    `preexec` runs in the child before it starts (e.g. to lower its open-file limit)."""

    def __init__(self, tmp, checkpoint, *args, env=None, preexec=None, wait_ready=True):
        self.port = free_port()
        self.log_path = tmp / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "-c", str(checkpoint), "--port", str(self.port), "-t", "1", *args],
            stdout=subprocess.DEVNULL, stderr=self.log, env=dict(os.environ, **(env or {})), preexec_fn=preexec)
        deadline = time.monotonic() + TIMEOUT
        while wait_ready and status_of(self, "GET", "/readyz") != 200:
            assert self.process.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "server not ready in time:\n" + self.stderr()
            time.sleep(0.1)

    def stderr(self):
        return self.log_path.read_text()

    def memory_mb(self, field="VmRSS"):
        """VmRSS (now) or VmHWM (the peak since start or reset_peak) of the server, in MB."""
        for line in pathlib.Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field}")

    def open_files(self):
        """How many file descriptors the server holds now."""
        return len(list(pathlib.Path(f"/proc/{self.process.pid}/fd").iterdir()))

    def reset_peak(self):
        """Start VmHWM afresh at the current RSS (Linux: clear_refs 5)."""
        pathlib.Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(TIMEOUT)
        self.log.close()


def request(server, method, path, body=None, headers=None, timeout=TIMEOUT):
    """One HTTP request -> (status, headers, parsed JSON or text)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        kind = response.getheader("content-type", "")
        return response.status, response.headers, json.loads(raw) if "json" in kind and raw else raw.decode(errors="replace")
    finally:
        connection.close()


def status_of(server, method, path, timeout=5):
    """The status of one request, or None if the server does not answer."""
    try:
        return request(server, method, path, timeout=timeout)[0]
    except OSError:
        return None


def classify(server, image, topk=None, headers=None):
    query = "" if topk is None else f"?topk={topk}"
    return request(server, "POST", "/v1/classify" + query, image, headers)


def multipart(fields, boundary=None):
    """A multipart/form-data body of (name, filename, bytes) parts -> (body, headers)."""
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for name, filename, data in fields) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def read_answer(sock, method="GET"):
    """Parse an HTTP answer from a connected socket -> (status, headers, raw body)."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return response.status, response.headers, response.read()


def send_raw(server, head, chunk=b"", repeat=0, timeout=TIMEOUT):
    """Send raw HTTP bytes (the body may be cut off by the server's early answer) and parse the
    answer -> (status, headers, JSON body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            for _ in range(repeat):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        code, headers, raw = read_answer(sock)
        return code, headers, json.loads(raw)


def until(condition, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
