"""Released weights through huggingface_hub, against a loopback server that answers like the
Hub's file endpoint, set as HF_ENDPOINT (a "mirror").

The fake Hub serves `/{repo_id}/resolve/{revision}/{filename}`: HEAD with the headers
`hf_hub_download` reads (X-Repo-Commit, ETag, Content-Length; Accept-Ranges), GET with the same
headers and Range requests answered by 206 and Content-Range. huggingface_hub reads HF_ENDPOINT,
HF_HUB_OFFLINE and HF_HOME when it is imported, so everything that fetches from the Hub runs in a
subprocess with its own environment: infer_rpi.py as users run it, or a small fetch script.
"""

import hashlib
import http.server
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import urllib.parse

import pytest
import torch

import vim_rpi
from vim_rpi import checkpoint_io, hub

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFER = ROOT / "vim" / "infer_rpi.py"
SAMPLE = ROOT / "vim" / "data" / "sample.jpg"
REPO, FILE = "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"
SPEC = f"hf-hub:{REPO}/{FILE}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMALL = dict(depth=2, embed_dim=64)  # a small model in the released file's place: fast to build and load

# Fetch one spec in a fresh interpreter; prints the local file, or the DownloadError and exits 3.
# huggingface_hub waits between retries with time.sleep; a test need not wait.
_FETCH = """
import sys, time
time.sleep = lambda seconds: None
from vim_rpi import hub
try:
    print(hub.fetch_checkpoint(sys.argv[1], progress=False))
except hub.DownloadError as err:
    print(f"DownloadError: {err}")
    sys.exit(3)
"""


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's file endpoint for `server.files` ((repo_id, filename) -> bytes). Every request
    is logged as (method, path, Range header). With `server.cut_next`, the next GET of a whole
    file sends half of it and closes the connection."""

    protocol_version = "HTTP/1.1"

    def _find(self):
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        return self.server.files.get((match.group(1), match.group(3))) if match else None

    def _reply(self, with_body):
        server = self.server
        server.log.append((self.command, self.path, self.headers.get("Range")))
        body = self._find()
        if body is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1)) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if with_body:
            if server.cut_next and not start:
                server.cut_next = False
                self.wfile.write(body[: len(body) // 2])
            else:
                self.wfile.write(body[start:])
        self.close_connection = True

    def do_HEAD(self):
        self._reply(with_body=False)

    def do_GET(self):
        self._reply(with_body=True)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small random-weight checkpoint in the released file's layout, as bytes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / FILE
    checkpoint_io.save_checkpoint(path, vim_rpi.create_model("vim_tiny", **SMALL))
    return path.read_bytes()


@pytest.fixture
def hub_server(weights):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    httpd.daemon_threads = True
    httpd.files, httpd.log, httpd.cut_next = {(REPO, FILE): weights}, [], False
    httpd.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


def _env(tmp_path, endpoint, **extra):
    """A clean environment: HF_HOME and VIM_RPI_CACHE in tmp_path, HF_ENDPOINT `endpoint`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), VIM_RPI_CACHE=str(tmp_path / "vim-rpi"), HF_ENDPOINT=endpoint, **extra)
    return env


def _infer(args, env, timeout=180):
    done = subprocess.run([sys.executable, str(INFER), "-t", "1", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def _fetch(spec, env, timeout=120):
    done = subprocess.run([sys.executable, "-c", _FETCH, spec], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout.strip()


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sample_through_the_mirror_then_offline_with_the_server_gone(hub_server, tmp_path, weights):
    env = _env(tmp_path, hub_server.endpoint)
    code, out, err = _infer(["--json"], env)
    assert code == 0, err
    report = json.loads(out)  # stdout is the JSON object alone: no progress in it
    assert report["results"][0]["image"] == str(SAMPLE) and len(report["results"][0]["topk"]) == 5
    assert f"no image given: classifying the bundled sample {SAMPLE}" in err
    assert f"downloading {FILE}" in err and "100%" in err
    assert "\r" not in err  # stderr is a pipe: whole lines, no redraws
    cached = pathlib.Path(report["checkpoint"])
    assert cached.is_relative_to(tmp_path / "hf" / "hub" / "models--hustvl--Vim-tiny-midclstok")
    assert cached.read_bytes() == weights
    assert [(method, path) for method, path, _ in hub_server.log if "/resolve/" in path] == \
        [("HEAD", f"/{REPO}/resolve/main/{FILE}"), ("GET", f"/{REPO}/resolve/main/{FILE}")]
    assert not (tmp_path / "vim-rpi").exists()  # Hub files go to the Hub cache only
    requests = len(hub_server.log)
    assert _fetch(SPEC, env) == (0, str(cached))
    assert not [path for _, path, _ in hub_server.log[requests:] if "/resolve/" in path]  # cached: not asked again

    hub_server.shutdown()
    hub_server.server_close()
    code, out, err = _infer(["--json", "-q"], _env(tmp_path, hub_server.endpoint, HF_HUB_OFFLINE="1"))
    assert code == 0, err
    assert err == ""  # -q: no progress, no information
    assert json.loads(out)["checkpoint"] == str(cached)


def test_cut_connection_is_resumed_with_a_range_request(hub_server, tmp_path):
    # huggingface_hub writes what it receives in chunks of 10 MiB: a 24 MiB file cut after 12 MiB
    # leaves 10 MiB on disk, and the retry asks for the bytes from there on.
    body = os.urandom(24 << 20)
    hub_server.files[(REPO, FILE)] = body
    hub_server.cut_next = True
    code, out = _fetch(SPEC, _env(tmp_path, hub_server.endpoint))
    assert code == 0, out
    assert pathlib.Path(out).read_bytes() == body
    gets = [rng for method, path, rng in hub_server.log if method == "GET" and "/resolve/" in path]
    assert len(gets) == 2 and gets[0] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", gets[1]).group(1))
    assert 0 < resumed_at <= len(body) // 2  # the second request asked only for what was missing


def test_released_file_in_the_old_cache_is_used_without_a_request(hub_server, tmp_path):
    legacy = tmp_path / "vim-rpi" / FILE
    legacy.parent.mkdir()
    legacy.write_bytes(b"PK\x03\x04 fetched by an older version")
    code, out = _fetch(SPEC, _env(tmp_path, hub_server.endpoint))
    assert code == 0, out
    assert out == str(legacy)
    assert hub_server.log == []
    assert not (tmp_path / "hf").exists()


def test_damaged_cached_download_is_fetched_again(hub_server, tmp_path, weights):
    legacy = tmp_path / "vim-rpi" / FILE
    legacy.parent.mkdir()
    legacy.write_bytes(b"PK\x03\x04" + os.urandom(5000))  # looks like a zip, is not one
    code, out, err = _infer(["--json", str(SAMPLE)], _env(tmp_path, hub_server.endpoint))
    assert code == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning: "))
    assert str(legacy) in warning and f"cached download of {SPEC}: fetching it again" in warning
    assert not legacy.exists()
    assert pathlib.Path(json.loads(out)["checkpoint"]).read_bytes() == weights


def test_damaged_cached_download_offline_says_where_it_is_and_what_to_do(hub_server, tmp_path):
    env = _env(tmp_path, hub_server.endpoint)
    code, cached = _fetch(SPEC, env)
    assert code == 0, cached
    pathlib.Path(cached).resolve().write_bytes(os.urandom(5000))  # the blob the snapshot entry links to
    code, out, err = _infer([str(SAMPLE), "-q"], dict(env, HF_HUB_OFFLINE="1"))
    assert code == 3 and out == ""
    warning, error = err.splitlines()  # -q keeps warnings and errors
    assert warning.startswith("warning: ") and error.startswith("error: "), err
    assert error.startswith(f"error: {cached} is not a readable PyTorch checkpoint")
    assert f"cached download of {SPEC}, and fetching it again failed" in error
    assert "HF_HUB_OFFLINE is set" in error and "--checkpoint PATH" in error


def test_offline_mode_with_nothing_cached(tmp_path):
    code, out = _fetch(SPEC, _env(tmp_path, "http://127.0.0.1:9", HF_HUB_OFFLINE="1"))
    assert code == 3
    assert FILE in out and "HF_HUB_OFFLINE is set" in out and "--checkpoint PATH" in out
    assert str(tmp_path / "hf" / "hub") in out  # where it looked


def test_unreachable_endpoint_names_file_endpoint_mirror_and_checkpoint(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    code, out = _fetch(SPEC, _env(tmp_path, endpoint))
    assert code == 3
    assert FILE in out and REPO in out and endpoint in out
    assert "HF_ENDPOINT" in out and "--checkpoint PATH" in out and "\n" not in out


# infer_rpi.py with huggingface_hub's waits between retries (1 + 2 + 4 + 8 + 8 s) skipped.
_INFER_WITHOUT_WAITS = """
import runpy, sys, time
time.sleep = lambda seconds: None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class _Failing(http.server.BaseHTTPRequestHandler):
    """A Hub endpoint that answers every request with 500, counting them."""

    def _fail(self):
        self.server.requests += 1
        self.send_response(500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _fail

    def log_message(self, *args):
        pass


def test_each_hub_retry_is_at_most_one_line_and_none_with_q(tmp_path):
    failing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    failing.requests = 0
    threading.Thread(target=failing.serve_forever, args=(0.05,), daemon=True).start()
    endpoints = {"refused": f"http://127.0.0.1:{_closed_port()}",
                 "HTTP 500": f"http://127.0.0.1:{failing.server_address[1]}"}
    said = {}
    try:
        for name, endpoint in endpoints.items():
            for quiet in (False, True):
                done = subprocess.run([sys.executable, "-c", _INFER_WITHOUT_WAITS, str(INFER), str(SAMPLE), "-t", "1",
                                       *(["-q"] if quiet else [])], env=_env(tmp_path, endpoint), capture_output=True,
                                      text=True, timeout=120)
                lines = done.stderr.splitlines()
                assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
                assert lines[-1].startswith("error: ") and endpoint in lines[-1], (name, lines)
                retries = lines[:-1]  # the image is given: nothing else is said before the fetch
                if quiet:
                    assert retries == [], (name, lines)
                else:  # huggingface_hub retries 5 times; one line each, said once
                    assert 1 <= len(retries) <= 5 and len(set(retries)) == len(retries), (name, lines)
                    said[name] = len(retries)
        assert failing.requests >= 2 * (said["HTTP 500"] + 1)  # two runs, each a first try and a line per retry
    finally:
        failing.shutdown()
        failing.server_close()


def test_missing_file_on_the_mirror(hub_server, tmp_path):
    code, out = _fetch(f"hf-hub:{REPO}/nope.pth", _env(tmp_path, hub_server.endpoint))
    assert code == 3
    assert "HTTP 404" in out and "nope.pth" in out and "HF_ENDPOINT" in out


def test_bad_hub_reference():
    with pytest.raises(vim_rpi.DownloadError, match="hf-hub:OWNER/REPO/FILE"):
        hub.fetch_checkpoint("hf-hub:only-a-repo")
    with pytest.raises(vim_rpi.DownloadError, match=r"cannot fetch w.pth of a\.\.b/c: \w*Error"):
        hub.fetch_checkpoint("hf-hub:a..b/c/w.pth")  # refused before any request


# The timm stand-in of tests/test_models_mamba.py, in a fresh interpreter that has HF_ENDPOINT.
_TIMM = """
import sys, types
registered = {}
models = types.ModuleType("timm.models")
models.is_model = lambda name: name in registered
models.register_model = lambda fn: registered.setdefault(fn.__name__, fn)
models.create_model = lambda name, pretrained=False, **kwargs: registered[name](pretrained=pretrained, **kwargs)
timm = types.ModuleType("timm")
timm.models, timm.create_model = models, models.create_model
sys.modules["timm"], sys.modules["timm.models"] = timm, models
import torch
from vim_rpi import models_mamba
model = timm.create_model(sys.argv[1], pretrained=True, pretrained_cfg=models_mamba.default_cfgs[sys.argv[1]],
                          depth=2, embed_dim=64)
print(model(torch.zeros(1, 3, 224, 224)).shape[-1], models_mamba.default_cfgs[sys.argv[1]]["hf_hub_id"])
"""


def test_timm_create_model_pretrained_fetches_from_the_hub(hub_server, tmp_path):
    name = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
    done = subprocess.run([sys.executable, "-c", _TIMM, name], env=_env(tmp_path, hub_server.endpoint),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000", REPO]
    assert ("GET", f"/{REPO}/resolve/main/{FILE}", None) in hub_server.log
