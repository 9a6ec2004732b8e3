"""vim_rpi.hub's plain-URL downloads and local paths, against a loopback HTTP server started by
each test (the Hub path: tests/test_hub.py)."""

import http.server
import os
import socket
import threading

import pytest

from vim_rpi import factory, hub
from vim_rpi.hub import DownloadError
from vim_rpi.hub import fetch_checkpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` (path -> bytes); `server.mode` decides how the body is sent."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        server.ranges.append(self.headers.get("Range"))
        body = server.files.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        if server.mode == "cut-once":  # the first reply stops halfway; Range requests are honoured
            start = int(self.headers["Range"][len("bytes="):-1]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(body) - start))
            self.send_header("ETag", '"v1"')
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                assert self.headers.get("If-Range") == '"v1"'
            self.end_headers()
            self.wfile.write(body[start:] if start else body[: len(body) // 2])
            self.close_connection = True
            return
        self.send_response(200)
        if server.mode == "chunked-cut":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = body[: len(body) // 2]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(body), half))
        elif server.mode == "no-length":
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if server.mode == "stall":
                self.wfile.write(body[:100])
                self.wfile.flush()
                server.release.wait(10)
            elif server.mode == "length-cut":
                self.wfile.write(body[: len(body) // 2])
            else:
                self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests, httpd.ranges, httpd.mode = {}, [], [], "ok"
    httpd.release = threading.Event()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def _checkpoint_bytes(size: int) -> bytes:
    """Bytes that start like a torch.save file (a zip archive), random after that."""
    return b"PK\x03\x04" + os.urandom(size - 4)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_path_is_returned_and_missing_path_named(tmp_path):
    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(b"x")
    assert fetch_checkpoint(str(ckpt)) == ckpt
    assert fetch_checkpoint(ckpt) == ckpt
    with pytest.raises(DownloadError, match="not found: .*nope.pth"):
        fetch_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(DownloadError, match="a directory, not a regular file"):
        fetch_checkpoint(tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VIM_RPI_CACHE", str(tmp_path / "c"))
    assert hub.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VIM_RPI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.default_cache_dir() == tmp_path / ".cache" / "vim-rpi"


def test_download_then_cache_hit_without_network(server, tmp_path, capsys):
    body = _checkpoint_bytes(3_000_000)
    server.files["/repo/resolve/main/w%20t.pth"] = body
    url = server.base + "/repo/resolve/main/w%20t.pth?download=true"
    path = fetch_checkpoint(url, cache_dir=tmp_path)
    assert path == tmp_path / "w t.pth"
    assert path.read_bytes() == body
    assert "100%" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["w t.pth"]

    server.shutdown()  # a cache hit must not need the network at all
    assert fetch_checkpoint(url, cache_dir=tmp_path) == path
    assert len(server.requests) == 1


def test_default_checkpoint_is_the_released_vim_tiny():
    name = "vim_t_midclstok_76p1acc.pth"
    assert factory.default_checkpoint() == f"hf-hub:hustvl/Vim-tiny-midclstok/{name}"
    assert factory.default_checkpoint("vim_small_stride8").endswith("/vim_s_midclstok_ft_81p6acc.pth")


def test_no_progress_and_no_content_length(server, tmp_path, capsys):
    server.mode = "no-length"
    server.files["/a.pth"] = b"\x80\x02" + b"abc" * 1000  # a legacy (pickle) checkpoint
    path = fetch_checkpoint(server.base + "/a.pth", cache_dir=tmp_path / "new", progress=False)
    assert path.read_bytes() == b"\x80\x02" + b"abc" * 1000
    assert capsys.readouterr().err == ""


def test_cut_connection_resumes_with_a_range_request(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub, "_RETRY_WAIT_S", 0)
    body = _checkpoint_bytes(400_000)
    server.files["/w.pth"] = body
    server.mode = "cut-once"
    path = fetch_checkpoint(server.base + "/w.pth", cache_dir=tmp_path)
    assert path.read_bytes() == body
    assert server.ranges == [None, f"bytes={len(body) // 2}-"]  # the second request asked for the rest only
    assert os.listdir(tmp_path) == ["w.pth"]
    assert "\r" not in capsys.readouterr().err  # stderr is not a terminal: plain lines


@pytest.mark.parametrize("mode", ["length-cut", "chunked-cut", "stall"])
def test_interrupted_download_leaves_nothing_and_can_retry(server, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(hub, "_TIMEOUT_S", 0.2)
    monkeypatch.setattr(hub, "_RETRY_WAIT_S", 0)
    body = _checkpoint_bytes(500_000)
    server.files["/w.pth"] = body
    server.mode = mode
    with pytest.raises(DownloadError, match="interrupted|cut off") as err:
        fetch_checkpoint(server.base + "/w.pth", cache_dir=tmp_path, progress=False)
    assert "run again" in str(err.value)
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary

    server.mode = "ok"
    path = fetch_checkpoint(server.base + "/w.pth", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == body


def test_offline_message(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/w.pth"
    with pytest.raises(DownloadError) as err:
        fetch_checkpoint(url, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "offline" in message and "--checkpoint PATH" in message and url in message
    assert "\n" not in message
    assert not (tmp_path / "cache").exists()


def test_http_error_and_unusable_url_or_cache(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch_checkpoint(server.base + "/missing.pth", cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(DownloadError, match="file name"):
        fetch_checkpoint(server.base + "/", cache_dir=tmp_path)
    server.files["/w.pth"] = b"w"
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(DownloadError, match="VIM_RPI_CACHE"):
        fetch_checkpoint(server.base + "/w.pth", cache_dir=blocker / "cache")


def test_error_page_is_not_cached_and_files_are_readable(server, tmp_path):
    server.files["/w.pth"] = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    with pytest.raises(DownloadError, match=r"did not send a PyTorch checkpoint \(it starts with '<!DOCTYPE html>"):
        fetch_checkpoint(server.base + "/w.pth", cache_dir=tmp_path, progress=False)
    assert os.listdir(tmp_path) == []  # the next run downloads again instead of failing forever
    body = _checkpoint_bytes(10_000)
    server.files["/w.pth"] = body
    old = os.umask(0o027)
    try:
        with pytest.MonkeyPatch.context() as patch:  # setting the umask would race with other threads' files
            patch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
            path = fetch_checkpoint(server.base + "/w.pth", cache_dir=tmp_path, progress=False)
    finally:
        os.umask(old)
    assert path.read_bytes() == body and (path.stat().st_mode & 0o777) == 0o640
