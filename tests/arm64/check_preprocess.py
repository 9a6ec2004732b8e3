"""Emulated Raspberry Pi checks: our evaluation transform equals torchvision's on aarch64.

torchvision does not import on the x86 CI machine, so this is where the two are compared;
run by scripts/ci_arm64.sh.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from vim_rpi import image_preprocess

# (width, height, mode, format): odd sizes, both orientations, up- and down-scaling.
IMAGES = [
    (257, 311, "RGB", "PNG"),
    (640, 427, "RGBA", "PNG"),
    (1000, 225, "L", "PNG"),
    (224, 224, "P", "PNG"),
    (99, 130, "RGB", "PNG"),
    (333, 517, "RGB", "JPEG"),
]


def torchvision_eval(input_size=224):
    """Vim's evaluation transform, built the way upstream's datasets.build_transform does."""
    return transforms.Compose([
        transforms.Resize(int(input_size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])


def make_image(path, width, height, mode, fmt, seed):
    """Noise over a gradient: noise stresses the bicubic taps, the gradient the crop offsets."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(0.5 * ramp + rng.uniform(0, 128, (height, width, 4)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGBA")
    img = img.convert("RGB").quantize(64) if mode == "P" else img.convert(mode)
    img.save(path, fmt)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (width, height, mode, fmt) in enumerate(IMAGES):
        path = folder / f"img{i}_{width}x{height}_{mode}.{fmt.lower()}"
        make_image(path, width, height, mode, fmt, seed=i)
        paths.append(path)
    return paths


def official(path, input_size=224):
    """torchvision's ImageFolder loader (convert("RGB")) followed by the eval transform."""
    with Image.open(path) as img:
        return torchvision_eval(input_size)(img.convert("RGB"))


@pytest.mark.parametrize("input_size", [224, 160])
def test_eval_transform_equals_torchvision(images, input_size, capsys):
    max_diff = 0.0
    for path in images:
        expected = official(path, input_size)
        ours = image_preprocess.eval_transform(image_preprocess.load_image(path), input_size)
        assert ours.dtype == torch.float32 and ours.shape == expected.shape == (3, input_size, input_size)
        max_diff = max(max_diff, (ours - expected).abs().max().item())
    with capsys.disabled():
        print(f"\npreprocess {input_size}px: max |ours - torchvision| = {max_diff:.3g} "
              f"over {len(images)} images")
    assert max_diff <= 1e-6


def test_preprocess_image_exact_equals_torchvision(images):
    for path in images:
        ours = image_preprocess.preprocess_image(path, 224, exact=True)
        torch.testing.assert_close(ours, official(path), rtol=0, atol=1e-6)
