"""scripts/fresh_pi/fake_hub.py, the Hub stand-in of the fresh-Pi check: huggingface_hub fetches
a file through it as HF_ENDPOINT, Range requests resume, and nothing outside its root is served."""

import hashlib
import os
import pathlib
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

HUB = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "fresh_pi" / "fake_hub.py"
REPO, FILE = "owner/some-repo", "weights/model.pth"


@pytest.fixture
def hub(tmp_path):
    body = os.urandom(300_000)
    (tmp_path / "root" / REPO / "weights").mkdir(parents=True)
    (tmp_path / "root" / REPO / FILE).write_bytes(body)
    (tmp_path / "secret.txt").write_text("not served")
    port_file = tmp_path / "port"
    server = subprocess.Popen([sys.executable, str(HUB), str(tmp_path / "root"), str(port_file)],
                              stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.05)
        assert port_file.exists(), "the stand-in Hub did not start"
        yield f"http://127.0.0.1:{port_file.read_text().strip()}", body, server
    finally:
        server.terminate()
        server.wait(10)


def _get(url, **headers):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_huggingface_hub_fetches_through_it(hub, tmp_path):
    endpoint, body, server = hub
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"))
    code = f"from vim_rpi import hub; print(hub.fetch_checkpoint('hf-hub:{REPO}/{FILE}', progress=False))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pathlib.Path(done.stdout.strip()).read_bytes() == body
    server.terminate()
    log = server.communicate(timeout=10)[0].splitlines()
    assert f"GET /{REPO}/resolve/main/{FILE} 200" in log


def test_headers_ranges_and_refusals(hub, tmp_path):
    endpoint, body, _ = hub
    url = f"{endpoint}/{REPO}/resolve/main/{FILE}"
    status, headers, data = _get(url)
    assert (status, data) == (200, body)
    assert headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"' and len(headers["X-Repo-Commit"]) == 40
    status, headers, data = _get(url, Range="bytes=1000-")
    assert (status, data, headers["Content-Range"]) == (206, body[1000:], f"bytes 1000-{len(body) - 1}/{len(body)}")
    assert _get(url, Range=f"bytes={len(body)}-")[0] == 416
    for path in (f"/{REPO}/resolve/main/missing.pth", f"/{REPO}/resolve/main/../../../secret.txt",
                 f"/{REPO}/resolve/main/%2e%2e/%2e%2e/%2e%2e/secret.txt", "/api/models/owner/some-repo",
                 f"/%2e%2e/%2e%2e/resolve/main/{tmp_path.name}/secret.txt"):
        status, headers, _ = _get(endpoint + path)
        assert status == 404 and headers["X-Error-Code"] == "EntryNotFound", path
