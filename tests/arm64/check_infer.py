"""Emulated Raspberry Pi checks: vim/infer_rpi.py end to end in a child aarch64 python.

The child is started through sys.executable, which the harness points at its qemu wrapper;
run by scripts/ci_arm64.sh.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vim_rpi
from vim_rpi import checkpoint_io, factory, image_preprocess, imagenet_labels

INFER = Path(__file__).resolve().parents[2] / "vim" / "infer_rpi.py"
MODEL = "vim_tiny"
EXIT_IMAGE = 4  # some images failed, the others were classified


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A depth-2, width-64 Vim-Tiny at 112 pixels (49 patches) with random weights, saved as a
    training checkpoint; the stored architecture tells infer_rpi.py the input size."""
    torch.manual_seed(0)
    model = vim_rpi.create_model(MODEL, depth=2, embed_dim=64, img_size=112)
    # A wide head spreads the logits, so the top-5 order is not decided by rounding.
    torch.nn.init.normal_(model.head.weight, std=1.0)
    path = tmp_path_factory.mktemp("ckpt") / "vim_tiny_depth2.pth"
    checkpoint_io.save_checkpoint(path, model, epoch=3)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (241, 317, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kernel", ["torch", "numba"])  # numba: the fused kernels of each v2 mixer
def test_infer_rpi_reports_what_the_model_computes(checkpoint, image, tmp_path, kernel):
    missing = tmp_path / "missing.jpg"
    cmd = [sys.executable, str(INFER), "--json", "-q", "-m", MODEL, "-c", str(checkpoint), "-k", "5",
           "-t", "2", str(image), str(missing)]
    env = {**os.environ, "SELECTIVE_SCAN_CPU_BACKEND": kernel}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == EXIT_IMAGE, proc.stderr
    report = json.loads(proc.stdout)
    good, bad = report["results"]
    assert "topk" not in bad and str(missing) in bad["error"]
    assert report["torch"] == torch.__version__
    assert report["backend"]["selective_scan"] == kernel

    model, info = factory.load_model(checkpoint, MODEL)
    assert info["input_size"] == 112
    x = image_preprocess.preprocess_image(image, 112)
    with torch.no_grad():
        probs = torch.softmax(model(x.unsqueeze(0))[0], dim=-1)
    top = probs.topk(5)
    labels = imagenet_labels.imagenet_labels()
    assert [e["index"] for e in good["topk"]] == top.indices.tolist()
    assert [e["label"] for e in good["topk"]] == [labels[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([e["prob"] for e in good["topk"]], top.values.tolist(), rtol=1e-4)
