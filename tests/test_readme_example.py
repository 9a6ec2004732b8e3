"""README's Python example runs exactly as printed, in a fresh process from another directory.

No network here: the released Vim-Tiny file name is put into the download cache with random
weights of the same architecture (the cache is keyed by file name), so `Classifier()` finds it
there as it would after its first download, and a generated photo stands in for cat.jpg.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vim_rpi
from vim_rpi import checkpoint_io, factory

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_example():
    text = README.read_text()
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- readme-example --> block"
    return match.group(1)


def test_example_is_short():
    assert len(readme_example().strip().splitlines()) <= 10


@pytest.mark.slow
def test_readme_example_runs_as_printed(tmp_path):
    torch.manual_seed(0)
    model = vim_rpi.create_model("vim_tiny")
    cache = tmp_path / "cache"
    cache.mkdir()
    checkpoint_io.save_checkpoint(cache / factory.default_checkpoint().rsplit("/", 1)[1], model)
    work = tmp_path / "work"
    work.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(work / "cat.jpg", quality=90)
    env = {**os.environ, "VIM_RPI_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", readme_example()], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6
    probs = [float(re.match(r"\s*([\d.]+)%  \S", line).group(1)) for line in lines[:5]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.05
    assert re.fullmatch(r"\d+ ms", lines[5])
