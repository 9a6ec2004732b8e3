"""What vim_rpi.cli gives every front end, checked through the front ends run as users run them:
a reader of stdout that went away (| head) ends them quietly with status 0, in every output mode."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vim_rpi
from vim_rpi import checkpoint_io

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFER, MAIN = ROOT / "vim" / "infer_rpi.py", ROOT / "vim" / "main.py"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small random-weight 10-class checkpoint, an image, a 12-frame video and an image folder
    of 10 classes."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    checkpoint_io.save_checkpoint(root / "small.pth", vim_rpi.create_model(
        "vim_tiny", depth=2, embed_dim=64, img_size=64, num_classes=10))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(root / "a.png")
    for label in range(10):
        (root / "val" / f"class{label}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).save(root / "val" / f"class{label}" / "1.png")
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 120.0, (96, 72))
    for i in range(12):
        writer.write(np.full((72, 96, 3), 20 * i, np.uint8))
    writer.release()
    return root


def _with_closed_stdout(command, stdin=b""):
    """Run `command` with stdout a pipe whose reader is already gone: every write to it fails
    with EPIPE. Returns (exit status, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, input=stdin, timeout=120,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        os.close(write_end)
    return done.returncode, done.stderr.decode()


@pytest.mark.parametrize("mode", [["--json", "{a}", "{a}"], ["{a}", "{a}"], ["--paths-from", "-", "--json"],
                                  ["--paths-from", "-"], ["--video", "{clip}", "--json"], ["--video", "{clip}"]],
                         ids=["json", "text", "paths-json", "paths-text", "video-json", "video-text"])
def test_infer_rpi_ends_quietly_when_the_reader_is_gone(files, mode):
    args = [arg.format(a=files / "a.png", clip=files / "clip.avi") for arg in mode]
    code, err = _with_closed_stdout([sys.executable, str(INFER), *args, "-c", str(files / "small.pth"), "-t", "1",
                                     "-q"], stdin=f"{files / 'a.png'}\n".encode())
    assert (code, err) == (0, "")


@pytest.mark.parametrize("output", [["--json"], []], ids=["json", "text"])
def test_main_eval_ends_quietly_when_the_reader_is_gone(files, output):
    code, err = _with_closed_stdout([sys.executable, str(MAIN), "--eval", "--resume", str(files / "small.pth"),
                                     "--data-path", str(files), "--threads", "1", "-q", *output])
    assert (code, err) == (0, "")
