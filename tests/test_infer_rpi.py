"""infer_rpi.py end to end: real files, a random-weight checkpoint in the released layout, and
subprocesses run the way a user runs the script."""

import http.server
import io
import importlib.util
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import threading
import zlib

import pytest
import torch
from PIL import Image

from vim_rpi import checkpoint_io, factory
from vim_rpi import image_preprocess
from vim_rpi import imagenet_labels
import vim_rpi
from vim_rpi import quantization

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "vim" / "infer_rpi.py"

# Reports every top-level package the process tries to import, so a test can prove that
# torchvision and timm are never even attempted (a failed attempt leaves no trace in sys.modules).
_IMPORT_SPY = """
import atexit, runpy, sys
seen = set()
class Spy:
    def find_spec(self, name, path=None, target=None):
        seen.add(name.partition(".")[0])
sys.meta_path.insert(0, Spy())
atexit.register(lambda: print("IMPORTS", *sorted(seen), file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(cache_dir):
    env = dict(os.environ, VIM_RPI_CACHE=str(cache_dir))
    env.pop("CAUSAL_CONV1D_FORCE_FALLBACK", None)
    env.pop("SELECTIVE_SCAN_FORCE_FALLBACK", None)
    return env


def _start(args, cache_dir, spy=False):
    """Start infer_rpi.py in a subprocess; returns the Popen (stdout/stderr as text pipes)."""
    if spy:
        command = [sys.executable, "-c", _IMPORT_SPY, str(SCRIPT), *map(str, args)]
        env = dict(_env(cache_dir), PYTHONPATH=str(SCRIPT.parent))
    else:
        command = [sys.executable, str(SCRIPT), *map(str, args)]
        env = _env(cache_dir)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process, timeout=60):
    out, err = process.communicate(timeout=timeout)
    assert "Traceback" not in err, err
    return process.returncode, out, err


def _run(args, cache_dir, **kwargs):
    return _finish(_start(args, cache_dir, **kwargs))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small random-weight checkpoint (with a different model_ema) and a set of images."""
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    small = dict(depth=2, embed_dim=64, num_classes=1000)
    model = vim_rpi.create_model("vim_tiny", **small)
    ema = vim_rpi.create_model("vim_tiny", **small)
    ckpt = root / "small.pth"
    checkpoint_io.save_checkpoint(ckpt, model, model_ema=ema, epoch=3)

    ten = vim_rpi.create_model("vim_tiny", depth=2, embed_dim=64, num_classes=10)
    ckpt10 = root / "ten.pth"
    checkpoint_io.save_checkpoint(ckpt10, ten)

    images = root / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(1)

    def noise(h, w, channels=3):
        return torch.randint(0, 256, (h, w, channels), generator=generator, dtype=torch.uint8).numpy()

    Image.fromarray(noise(300, 420)).save(images / "wide.jpg", quality=90)
    Image.fromarray(noise(500, 260, 4), "RGBA").save(images / "tall.png")
    (images / "folder").mkdir()
    (images / "notes.jpg").write_text("not an image\n")
    whole = (images / "wide.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (images / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    return {"root": root, "ckpt": ckpt, "ckpt10": ckpt10, "images": images}


def _png_header_only(width, height):
    """A PNG whose header claims width x height gray pixels: enough for Pillow's bomb check."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _expected_topk(ckpt, image, k, *, ema=False, quantize="none", input_size=None):
    """The same classification computed in this process, independently of infer_rpi."""
    model, info = factory.load_model(ckpt, ema=ema, input_size=input_size)
    model = quantization.quantize_model(model, quantize)
    x = image_preprocess.preprocess_image(image, info["input_size"])
    with torch.inference_mode():
        probs = torch.softmax(model(x[None])[0], dim=-1)
    top = probs.topk(k)
    return top.indices.tolist(), top.values.tolist()


def _check_schema(report, k, threads):
    assert set(report) - {"benchmark"} == {"model", "checkpoint", "threads", "quantize", "torch",
                                           "backend", "peak_rss_mb", "timing_ms", "results"}
    assert report["timing_ms"]["load"] > 0
    assert isinstance(report["model"], str) and isinstance(report["checkpoint"], str)
    assert report["threads"] == threads
    assert report["torch"] == torch.__version__
    # The script forces the pure-PyTorch kernels for its own process.
    assert report["backend"]["selective_scan"] == ("numba" if importlib.util.find_spec("numba") else "torch")
    assert report["backend"]["causal_conv1d"] == report["backend"]["selective_scan"]  # the fused kernel runs the conv
    assert 50 < report["peak_rss_mb"] < 2000
    labels = imagenet_labels.imagenet_labels()
    for result in report["results"]:
        if "error" in result:
            assert isinstance(result["error"], str) and "topk" not in result
            continue
        probs = [entry["prob"] for entry in result["topk"]]
        assert len(probs) == k
        assert probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6
        for entry in result["topk"]:
            assert entry["label"] == labels[entry["index"]]
        assert set(result["timing_ms"]) == {"preprocess", "inference"}
        assert all(v > 0 for v in result["timing_ms"].values())


_BAD_IMAGES = ["missing.jpg", "folder", "notes.jpg", "truncated.jpg", "bomb.png"]


def _image_args(images):
    """A good image, every kind of bad one, and a good one given with the older --image."""
    return [images / "wide.jpg", *(images / name for name in _BAD_IMAGES), "--image", images / "tall.png"]


def _check_error_lines(err):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(_BAD_IMAGES), err
    for name, line in zip(_BAD_IMAGES, errors):
        assert name in line


def test_text_output_bad_images_and_no_torchvision_or_timm(files):
    images = files["images"]
    code, out, err = _run([*_image_args(images), "-c", files["ckpt"], "-t", "1"], files["root"], spy=True)
    assert code == 4, err  # some images failed, the others were still classified
    _check_error_lines(err)
    imports = set(err.splitlines()[-1].split()[1:])
    assert {"torch", "numpy", "PIL", "mamba_ssm", "causal_conv1d"} <= imports
    assert not imports & {"torchvision", "timm", "cv2", "picamera2"}  # OpenCV and picamera2: only for --video

    lines = out.splitlines()
    for name in _BAD_IMAGES:
        assert lines[lines.index(str(images / name)) + 1].startswith("  failed: ")
    expected, _ = _expected_topk(files["ckpt"], images / "tall.png", 5)
    labels = imagenet_labels.imagenet_labels()
    table = lines[lines.index(str(images / "tall.png")) + 1:]
    assert table[0].split() == ["rank", "prob", "class"]
    for rank, (line, index) in enumerate(zip(table[1:6], expected), 1):
        assert line.split(None, 2)[0] == str(rank)
        assert line.split(None, 2)[2] == labels[index]
    assert "peak RSS" in out and "load" in out and "inference" in out


def test_json_equals_in_process_computation_and_benchmark(files):
    images = files["images"]
    code, out, err = _run([*_image_args(images), "-c", files["ckpt"], "--json", "-k", "7", "-t", "1",
                           "--benchmark", "3", "-q"], files["root"])
    assert code == 4
    _check_error_lines(err)
    assert len(err.splitlines()) == len(_BAD_IMAGES)  # -q: nothing else on stderr
    report = json.loads(out)
    _check_schema(report, k=7, threads=1)
    assert report["checkpoint"] == str(files["ckpt"])
    results = report["results"]
    expected_order = [images / "wide.jpg", *(images / name for name in _BAD_IMAGES), images / "tall.png"]
    assert [r["image"] for r in results] == [str(p) for p in expected_order]
    assert ["topk" in r for r in results] == [True] + [False] * len(_BAD_IMAGES) + [True]
    for result in (results[0], results[-1]):
        indices, probs = _expected_topk(files["ckpt"], result["image"], 7)
        assert [e["index"] for e in result["topk"]] == indices
        assert [e["prob"] for e in result["topk"]] == pytest.approx(probs, abs=1e-5)
    bench = report["benchmark"]
    assert bench["runs"] == 3
    assert 0 < bench["median_ms"] <= bench["p90_ms"]


def test_ema_int8_input_size_and_small_head(files):
    image = files["images"] / "tall.png"
    ema = _start([image, "-c", files["ckpt"], "--json", "-k", "3", "-t", "1", "--ema",
                  "--quantize", "dynamic-int8", "--input-size", "160"], files["root"])
    ten = _start([image, "-c", files["ckpt10"], "--json", "-k", "10", "-t", "1"], files["root"])

    code, out, err = _finish(ema)
    assert code == 0, err
    report = json.loads(out)
    _check_schema(report, k=3, threads=1)
    assert report["quantize"] == "dynamic-int8"
    indices, probs = _expected_topk(files["ckpt"], image, 3, ema=True, quantize="dynamic-int8",
                                    input_size=160)
    plain, _ = _expected_topk(files["ckpt"], image, 3)
    assert indices != plain  # the EMA weights at 160 pixels really are a different computation
    topk = report["results"][0]["topk"]
    assert [e["index"] for e in topk] == indices
    assert [e["prob"] for e in topk] == pytest.approx(probs, abs=1e-5)

    code, out, err = _finish(ten)
    assert code == 0, err
    topk = json.loads(out)["results"][0]["topk"]
    assert sorted(e["label"] for e in topk) == sorted(f"class {i}" for i in range(10))
    assert sum(e["prob"] for e in topk) == pytest.approx(1.0, abs=1e-5)


def test_checkpoint_errors_and_late_usage_error(files, main_in_process, tmp_path):
    image = files["images"] / "wide.jpg"
    not_a_checkpoint = tmp_path / "weights.pth"
    not_a_checkpoint.write_bytes(os.urandom(1000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    cases = [
        ([image, "-c", tmp_path / "nope.pth"], 3, "nope.pth"),
        ([image, "-c", not_a_checkpoint], 3, "weights.pth"),
        ([image, "-c", files["ckpt"], "-m", "vim_small"], 3, "does not match"),
        ([image, "-c", f"http://127.0.0.1:{closed_port}/w.pth"], 3, "--checkpoint PATH"),
        ([image, "-c", files["ckpt10"], "-k", "11"], 2, "at most"),
    ]
    for args, expected_code, needle in cases:
        code, out, err = main_in_process([*args, "-q", "-t", "1"])
        assert code == expected_code, err
        assert out == ""
        lines = err.strip().splitlines()
        assert needle in lines[-1], err
        if expected_code == 3:
            assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "cache").exists()  # the offline run left nothing behind


class _MakesADirectory:
    """Unpickling this calls os.mkdir (a module torch's safe loader blocks): code in a checkpoint."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_checkpoint_with_code_is_refused_then_loads_with_trust_checkpoint(files, main_in_process, tmp_path):
    target = tmp_path / "made_by_unpickling"
    ckpt = tmp_path / "with_code.pth"
    obj = checkpoint_io.read_checkpoint(files["ckpt"])
    torch.save({**obj, "payload": _MakesADirectory(target)}, ckpt)
    image = files["images"] / "wide.jpg"
    code, out, err = main_in_process([image, "-c", ckpt, "-q", "-t", "1"])
    assert code == 3 and out == "" and not target.exists()
    assert err.splitlines() == [err.strip()] and f"refers to {os.mkdir.__module__}.mkdir" in err
    assert "--trust-checkpoint" in err and "not a readable" not in err
    code, out, err = main_in_process([image, "-c", ckpt, "-q", "-t", "1", "--json", "--trust-checkpoint"])
    assert code == 0, err
    assert target.is_dir() and "topk" in json.loads(out)["results"][0]
    assert "error" not in err


@pytest.mark.parametrize("args, needle", [
    (["x.jpg", "--topk", "0"], "--topk"),
    (["x.jpg", "--threads", "0"], "--threads"),
    (["x.jpg", "--model", "vim_tinny"], "Did you mean: vim_tiny"),
    (["x.jpg", "--device", "cuda"], "CUDA is not available"),
    (["x.jpg", "--device", "gpu"], "device"),
    (["x.jpg", "--benchmark", "-1"], "--benchmark"),
    (["x.jpg", "--quantize", "int4"], "invalid choice"),
    (["x.jpg", "--model", "vim_base"], "pass --checkpoint PATH"),
])
def test_usage_errors_exit_2_before_any_work(args, needle, main_in_process):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = main_in_process(args)
    assert code == 2 and out == ""
    assert needle in err.splitlines()[-1]


def test_bad_scan_kernel_setting_is_a_usage_error(main_in_process, monkeypatch):
    monkeypatch.setenv("SELECTIVE_SCAN_CPU_BACKEND", "fast")
    code, out, err = main_in_process(["x.jpg"])
    assert code == 2 and out == "" and "SELECTIVE_SCAN_CPU_BACKEND" in err.splitlines()[-1]


class _CheckpointServer(http.server.BaseHTTPRequestHandler):
    """Serves `server.body` at any path and counts requests."""

    def do_GET(self):
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args):
        pass


def test_download_once_then_cache_hit(files, main_in_process, tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CheckpointServer)
    httpd.body, httpd.requests = files["ckpt"].read_bytes(), 0
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/hub/small.pth"
    args = [files["images"] / "wide.jpg", "-c", url, "--json", "-t", "1"]
    try:
        code, out, err = main_in_process(args)
        assert code == 0, err
        assert "downloading small.pth" in err and "100%" in err
        cached = tmp_path / "cache" / "small.pth"
        assert json.loads(out)["checkpoint"] == str(cached)
        assert cached.read_bytes() == httpd.body
        assert httpd.requests == 1

        code, out, err = main_in_process(args)
        assert code == 0, err
        assert "downloading" not in err
        assert httpd.requests == 1  # served from the cache
        assert os.listdir(tmp_path / "cache") == ["small.pth"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_file_name_that_is_not_utf8_is_printed_escaped(files, main_in_process, monkeypatch, tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name on a UTF-8 system: a lone surrogate in Python
    Image.open(files["images"] / "tall.png").save(tmp_path / name)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    code, _, err = main_in_process([tmp_path / name, "-c", files["ckpt"], "-k", "1", "-t", "1"])
    assert code == 0, err
    stdout.flush()
    assert b"caf\\udce9.png" in stdout.buffer.getvalue()  # escaped, not a crash
