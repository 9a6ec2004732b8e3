"""checkpoint_download against a loopback HTTP server started by each test."""

import http.server
import os
import socket
import threading

import pytest

from vim_rpi import checkpoint_download, factory
from vim_rpi.checkpoint_download import DownloadError, resolve_checkpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` (path -> bytes); `server.mode` decides how the body is sent."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        body = server.files.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
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
    httpd.files, httpd.requests, httpd.mode = {}, [], "ok"
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
    assert resolve_checkpoint(str(ckpt)) == ckpt
    assert resolve_checkpoint(ckpt) == ckpt
    with pytest.raises(DownloadError, match="not found: .*nope.pth"):
        resolve_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(DownloadError, match="not a file"):
        resolve_checkpoint(tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VIM_RPI_CACHE", str(tmp_path / "c"))
    assert checkpoint_download.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("VIM_RPI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert checkpoint_download.default_cache_dir() == tmp_path / ".cache" / "vim-rpi"


def test_download_then_cache_hit_without_network(server, tmp_path, capsys):
    body = _checkpoint_bytes(3_000_000)
    server.files["/repo/resolve/main/w%20t.pth"] = body
    url = server.base + "/repo/resolve/main/w%20t.pth?download=true"
    path = resolve_checkpoint(url, cache_dir=tmp_path)
    assert path == tmp_path / "w t.pth"
    assert path.read_bytes() == body
    assert "100%" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["w t.pth"]

    server.shutdown()  # a cache hit must not need the network at all
    assert resolve_checkpoint(url, cache_dir=tmp_path) == path
    assert len(server.requests) == 1


def test_default_checkpoint_is_the_released_vim_tiny(monkeypatch, tmp_path):
    name = "vim_t_midclstok_76p1acc.pth"
    assert factory.default_checkpoint() == f"https://huggingface.co/hustvl/Vim-tiny-midclstok/resolve/main/{name}"
    (tmp_path / name).write_bytes(b"cached")
    monkeypatch.setenv("VIM_RPI_CACHE", str(tmp_path))
    assert resolve_checkpoint(factory.default_checkpoint()) == tmp_path / name


def test_no_progress_and_no_content_length(server, tmp_path, capsys):
    server.mode = "no-length"
    server.files["/a.pth"] = b"\x80\x02" + b"abc" * 1000  # a legacy (pickle) checkpoint
    path = resolve_checkpoint(server.base + "/a.pth", cache_dir=tmp_path / "new", progress=False)
    assert path.read_bytes() == b"\x80\x02" + b"abc" * 1000
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("mode", ["length-cut", "chunked-cut", "stall"])
def test_interrupted_download_leaves_nothing_and_can_retry(server, tmp_path, monkeypatch, mode):
    monkeypatch.setattr(checkpoint_download, "_TIMEOUT_S", 0.2)
    body = _checkpoint_bytes(500_000)
    server.files["/w.pth"] = body
    server.mode = mode
    with pytest.raises(DownloadError, match="interrupted|cut off") as err:
        resolve_checkpoint(server.base + "/w.pth", cache_dir=tmp_path, progress=False)
    assert "run again" in str(err.value)
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary

    server.mode = "ok"
    path = resolve_checkpoint(server.base + "/w.pth", cache_dir=tmp_path, progress=False)
    assert path.read_bytes() == body


def test_offline_message(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/w.pth"
    with pytest.raises(DownloadError) as err:
        resolve_checkpoint(url, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "offline" in message and "--checkpoint PATH" in message and url in message
    assert "\n" not in message
    assert not (tmp_path / "cache").exists()


def test_http_error_and_unusable_url_or_cache(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        resolve_checkpoint(server.base + "/missing.pth", cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    with pytest.raises(DownloadError, match="file name"):
        resolve_checkpoint(server.base + "/", cache_dir=tmp_path)
    server.files["/w.pth"] = b"w"
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(DownloadError, match="VIM_RPI_CACHE"):
        resolve_checkpoint(server.base + "/w.pth", cache_dir=blocker / "cache")


def test_error_page_is_not_cached_and_files_are_readable(server, tmp_path):
    server.files["/w.pth"] = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    with pytest.raises(DownloadError, match=r"did not send a PyTorch checkpoint \(it starts with '<!DOCTYPE html>"):
        resolve_checkpoint(server.base + "/w.pth", cache_dir=tmp_path, progress=False)
    assert os.listdir(tmp_path) == []  # the next run downloads again instead of failing forever
    body = _checkpoint_bytes(10_000)
    server.files["/w.pth"] = body
    old = os.umask(0o022)
    try:
        path = resolve_checkpoint(server.base + "/w.pth", cache_dir=tmp_path, progress=False)
    finally:
        os.umask(old)
    assert path.read_bytes() == body and (path.stat().st_mode & 0o777) == 0o644
