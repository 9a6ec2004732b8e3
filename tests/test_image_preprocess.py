"""vim/image_preprocess.py against an independent torch re-statement of the torchvision transform.

The reference below redoes Resize(256, BICUBIC) + CenterCrop(224) + ToTensor + Normalize with
torch ops from the resized size and crop offsets the test passes in, so the module's size and
offset arithmetic is checked against numbers worked out by hand.
"""

import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import hostile_images
from vim_rpi import image_budget, image_preprocess
from vim_rpi.errors import ImageTooLargeError
from vim_rpi.image_budget import DEFAULT_MAX_IMAGE_MB
from vim_rpi.image_preprocess import ImageError, eval_transform, load_image, preprocess_image, to_rgb
from vim_rpi.registry import DEFAULT_CROP_PCT

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def reference(img: Image.Image, resized: tuple[int, int], top: int, left: int, crop: int = 224):
    """torchvision's eval transform, given the resized (w, h) and crop offsets."""
    if img.size != resized:
        img = img.resize(resized, Image.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (x[:, top : top + crop, left : left + crop] - MEAN) / STD


def torchvision_like(img: Image.Image, crop: int = 224):
    """The same reference with torchvision's size rule, for tests not about the sizes."""
    w, h = img.size
    s = int(crop / 0.875)
    nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    return reference(img, (nw, nh), int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0)), crop)


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A smooth gradient plus noise: resize and JPEG behave like on a photo, not on pure noise."""
    rng = np.random.default_rng(seed)
    wave = np.outer(np.cos(np.arange(h) / h * 4.0), np.sin(np.arange(w) / w * 6.0))  # (h, w)
    base = (128 + 80 * wave).astype(np.float32)[..., None] + np.float32([0, 30, -30])
    noise = rng.integers(-24, 25, size=(h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).convert(mode)


@pytest.mark.parametrize(
    "size, input_size, resized, top, left",
    [
        ((300, 457), 224, (256, 389), 82, 16),  # (389 - 224) / 2 = 82.5 rounds half to even
        ((457, 300), 224, (389, 256), 16, 82),
        ((256, 256), 224, (256, 256), 16, 16),  # already the right size: no resize at all
        ((256, 391), 224, (256, 391), 84, 16),  # 83.5 rounds up to the even 84
        ((1000, 257), 224, (996, 256), 16, 386),  # 256 * 1000 / 257 = 996.1 truncates
        ((10, 30), 224, (256, 768), 272, 16),  # upscaling
        ((300, 457), 160, (182, 277), 58, 11),  # int(160 / 0.875) = 182
    ],
)
def test_eval_transform_matches_formula(size, input_size, resized, top, left):
    img = noise_image(*size, seed=sum(size))
    out = eval_transform(img, input_size)
    assert out.dtype == torch.float32 and out.shape == (3, input_size, input_size)
    assert torch.equal(out, reference(img, resized, top, left, input_size))


def test_extreme_aspect_ratio_resizes_only_the_crop(monkeypatch):
    """A 20000 x 2 strip would become 256 x 2,560,000 before the crop (2 GB): only the crop's
    region is resized, and it shows the middle of the strip."""
    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(size) or real_resize(
        self, size, *a, **k))
    pixels = np.zeros((2, 20000, 3), dtype=np.uint8)
    pixels[:, 9996:10004] = 255  # a white band in the middle columns, black elsewhere
    out = eval_transform(Image.fromarray(pixels))
    assert out.shape == (3, 224, 224) and sizes == [(224, 224)]
    white = (1.0 - MEAN) / STD
    assert torch.allclose(out, white.expand_as(out), atol=0.05)


def test_box_resize_is_close_to_the_full_resize(monkeypatch):
    img = noise_image(700, 300, seed=5)
    want = torchvision_like(img)
    monkeypatch.setattr(image_preprocess, "MAX_RESIZED_PIXELS", 1000)  # force the box path
    got = eval_transform(img)
    diff = (got - want).abs()
    assert diff.mean() < 1e-3 and diff.max() < 2.5 / 255 / 0.224  # at most 2 levels of 255 apart


def test_eval_transform_rejects_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        eval_transform(noise_image(20, 20), 0)


def test_preprocess_png_equals_reference(tmp_path):
    img = noise_image(333, 250, seed=3)
    path = tmp_path / "a.png"
    img.save(path)
    assert torch.equal(preprocess_image(path), torchvision_like(img))
    assert torch.equal(preprocess_image(str(path), exact=True), torchvision_like(img))


# numpy statements of the EXIF orientations (EXIF 2.3, tag 0x0112) on an (h, w, c) array
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def save_with_orientation(img: Image.Image, path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_applied(tmp_path, orientation):
    path = tmp_path / "photo.jpg"
    save_with_orientation(noise_image(120, 80, seed=orientation), path, orientation)
    with Image.open(path) as raw:  # Pillow leaves the stored (unrotated) pixels alone
        stored = np.asarray(raw.convert("RGB"))
    upright = np.ascontiguousarray(ORIENTATIONS[orientation](stored))
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), upright)
    expected = torchvision_like(Image.fromarray(upright))
    assert torch.equal(preprocess_image(path, exact=True), expected)


def test_rgba_drops_alpha_like_convert_rgb(tmp_path):
    rgb = np.asarray(noise_image(90, 140, seed=5))
    alpha = np.random.default_rng(0).integers(0, 256, size=(140, 90, 1), dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA").save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), rgb)
    assert torch.equal(preprocess_image(path), torchvision_like(Image.fromarray(rgb)))


def test_palette_with_transparency(tmp_path):
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, size=(70, 50), dtype=np.uint8)
    img = Image.fromarray(indices, "L").convert("P")
    img.putpalette(palette.tobytes())
    path = tmp_path / "pal.png"
    img.save(path, transparency=bytes(rng.integers(0, 256, size=256, dtype=np.uint8)))
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    np.testing.assert_array_equal(np.asarray(load_image(path)), palette[indices])


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grayscale_replicated_to_three_channels(tmp_path, mode):
    gray = np.asarray(noise_image(64, 48, seed=7, mode="L"))
    img = Image.fromarray(gray, "L")
    if mode == "LA":
        img = Image.merge("LA", [img, Image.new("L", img.size, 77)])
    path = tmp_path / "gray.png"
    img.save(path)
    loaded = np.asarray(load_image(path))
    np.testing.assert_array_equal(loaded, np.stack([gray] * 3, axis=2))


def test_cmyk_tiff_with_no_black_is_the_complement(tmp_path):
    rgb = np.asarray(noise_image(40, 30, seed=8))
    cmyk = np.concatenate([255 - rgb, np.zeros((30, 40, 1), np.uint8)], axis=2)
    path = tmp_path / "cmyk.tif"
    Image.fromarray(cmyk, "CMYK").save(path)
    np.testing.assert_array_equal(np.asarray(load_image(path)), rgb)


def test_cmyk_jpeg_decodes_close_to_original(tmp_path):
    rgb = np.asarray(noise_image(64, 64, seed=9))
    cmyk = np.concatenate([255 - rgb, np.zeros((64, 64, 1), np.uint8)], axis=2)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(cmyk, "CMYK").save(path, quality=98)
    loaded = np.asarray(load_image(path)).astype(int)
    assert np.abs(loaded - rgb).mean() < 4


def test_16bit_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 257, 1000, 32768, 65277, 65535]], dtype=np.uint16)
    values = np.repeat(values, 3, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    expected = np.round(values / 257.0).astype(np.uint8)  # 65535 / 257 = 255 exactly
    loaded = np.asarray(load_image(path))
    np.testing.assert_array_equal(loaded, np.stack([expected] * 3, axis=2))


@pytest.mark.parametrize(
    "mode, dtype, values",
    [
        ("I;16B", ">u2", [0, 300, 40000, 65535]),
        ("I;16L", "<u2", [0, 300, 40000, 65535]),
        ("I", "<i4", [-5, 0, 300, 40000, 65535, 70000]),  # out of 16-bit range: clipped
    ],
)
def test_other_16bit_layouts(mode, dtype, values):
    img = Image.frombytes(mode, (len(values), 1), np.array(values, dtype=dtype).tobytes())
    expected = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(img))[0, :, 1], expected)


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(np.asarray(to_rgb(unit))[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[-3.0, 12.4, 300.0, np.nan]], dtype=np.float32), "F")
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[0, :, 0], [0, 12, 255, 0])


def test_unsupported_mode_is_image_error():
    with pytest.raises(ImageError, match="unsupported image mode 'La'"):
        to_rgb(Image.new("La", (3, 3)))


def test_eval_transform_converts_non_rgb_input():
    gray = noise_image(50, 80, seed=2, mode="L")
    assert torch.equal(eval_transform(gray), torchvision_like(gray.convert("RGB")))


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (30, 20), color) for color in [(250, 0, 0), (0, 0, 250)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (20, 30, 3)
    assert loaded[..., 0].min() > 200 and loaded[..., 2].max() < 50


def jpeg_scale(short: int, draft: int) -> int:
    """Largest JPEG reduction 1, 2, 4, 8 with ceil(short / k) >= draft."""
    return max(k for k in (1, 2, 4, 8) if math.ceil(short / k) >= draft)


@pytest.mark.parametrize(
    "size, draft",
    [((64, 64), 32), ((95, 140), 32), ((140, 95), 32), ((300, 64), 32), ((600, 500), 32),
     ((257, 700), 32), ((127, 127), 32), ((129, 90), 32), ((1023, 1400), 256),
     ((520, 700), 256), ((511, 300), 256)],
)
def test_draft_keeps_short_side(tmp_path, size, draft):
    path = tmp_path / "d.jpg"
    noise_image(*size, seed=size[0]).save(path, quality=90)
    loaded = load_image(path, draft_size=draft)
    k = jpeg_scale(min(size), draft)
    assert loaded.size == (math.ceil(size[0] / k), math.ceil(size[1] / k))
    assert min(loaded.size) >= draft


@pytest.mark.parametrize("mode, progressive", [("L", False), ("CMYK", False), ("RGB", True)])
def test_draft_other_jpeg_kinds(tmp_path, mode, progressive):
    path = tmp_path / "k.jpg"
    noise_image(600, 500, seed=6, mode=mode).save(path, progressive=progressive)
    exact = load_image(path)
    loaded = load_image(path, draft_size=32)
    assert loaded.mode == "RGB" and loaded.size == (75, 63)  # 1/8 scale
    small_exact = np.asarray(exact.resize((75, 63), Image.BOX), dtype=float)
    assert np.abs(np.asarray(loaded, dtype=float) - small_exact).mean() < 3


@pytest.mark.parametrize("orientation", [6, 8])
def test_draft_with_exif_rotation(tmp_path, orientation):
    path = tmp_path / "r.jpg"
    save_with_orientation(noise_image(300, 130, seed=4), path, orientation)
    loaded = load_image(path, draft_size=32)
    assert loaded.size == (math.ceil(130 / 4), math.ceil(300 / 4))  # rotated, 130 // 32 -> 1/4


def test_draft_ignored_for_png(tmp_path):
    path = tmp_path / "big.png"
    noise_image(600, 400).save(path)
    assert load_image(path, draft_size=32).size == (600, 400)


def test_large_jpeg_draft_close_to_exact(tmp_path, record_property):
    path = tmp_path / "camera.jpg"
    noise_image(3000, 2000, seed=11).save(path, quality=90)
    drafted = load_image(path, draft_size=256)
    assert drafted.size == (750, 500)  # 2000 // 256 = 7 -> 1/4 scale
    fast = preprocess_image(path)
    exact = preprocess_image(path, exact=True)
    with Image.open(path) as raw:
        assert torch.equal(exact, torchvision_like(raw.convert("RGB")))
    diff = (fast - exact).abs()
    record_property("draft_max_abs_diff", float(diff.max()))
    record_property("draft_mean_abs_diff", float(diff.mean()))
    # The resize averages ~8 source pixels per output pixel either way; what remains is
    # JPEG's reduced-scale IDCT vs Pillow's bicubic on the full image.
    assert float(diff.mean()) < 0.02
    assert float(diff.max()) < 0.2


def test_small_jpeg_draft_is_exact(tmp_path):
    path = tmp_path / "small.jpg"
    noise_image(500, 400, seed=12).save(path)  # 400 // 256 = 1: no reduction possible
    assert torch.equal(preprocess_image(path), preprocess_image(path, exact=True))


def test_draft_size_validated(tmp_path):
    with pytest.raises(ValueError, match="draft_size"):
        load_image(tmp_path / "x.jpg", draft_size=0)


def one_line_image_error(path, match):
    with pytest.raises(ImageError, match=match) as info:
        preprocess_image(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    one_line_image_error(tmp_path / "nope.jpg", "no such file")


def test_directory(tmp_path):
    one_line_image_error(tmp_path, "a directory, not a regular file")


def test_path_problems_are_image_errors_for_a_library_caller(tmp_path):
    """What Python 3.11's Path.exists()/is_dir() raise on (a name too long) or a FIFO (whose open
    waits for a writer) is one ImageError too, at once."""
    one_line_image_error(tmp_path / ("x" * 300 + ".jpg"), "name too long")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    one_line_image_error(fifo, "a FIFO")
    link = tmp_path / "dangling.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    one_line_image_error(link, "symbolic link")


def test_a_fifo_put_in_place_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    from vim_rpi import paths

    path = tmp_path / "swapped.jpg"
    os.mkfifo(path)
    monkeypatch.setattr(paths, "file_problem", lambda p: None)  # the file was regular when checked
    one_line_image_error(path, "a FIFO")


@pytest.mark.parametrize("content", [b"hello, this is text\n", b""])
def test_not_an_image(tmp_path, content):
    path = tmp_path / "notes.jpg"
    path.write_bytes(content)
    one_line_image_error(path, "not an image file")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    noise_image(200, 150).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_image_error(path, "truncated or corrupt")


def test_corrupt_png_checksum(tmp_path):
    path = tmp_path / "bad.png"
    noise_image(50, 50).save(path)
    data = bytearray(path.read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 10 : idat + 30] = bytes(20)
    path.write_bytes(bytes(data))
    one_line_image_error(path, "truncated or corrupt")


@pytest.mark.parametrize("side", [40, 60])  # 1600 px: Pillow warns; 3600 px (> 2x): it raises
def test_decompression_bomb(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    noise_image(side, side).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    one_line_image_error(path, "decompression bomb")


def test_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    noise_image(10, 10).save(path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    # Patch the module's opener rather than chmod, which does not stop root.
    monkeypatch.setattr(image_preprocess, "_open_regular", denied)
    one_line_image_error(path, "permission denied")



# --- The memory budget per image (issue 18): hostile files, the arithmetic, the strip conversion ---

MB = 2**20
BIG = 9000  # a side whose 8-bit RGB image alone (309 MB) is over the default budget
# Pillow 10 and later open 16-bit gray PNGs as "I;16" (2 bytes a pixel), older ones as "I" (4).
GRAY16 = Image.open(io.BytesIO(hostile_images.png(1, 1, bit_depth=16, color_type=0, pixel=b"\0\0"))).mode
GRAY16_BYTES = {"I;16": 2, "I": 4}[GRAY16]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Small files that decode to 9000 x 9000 images, written to disk: {name: path}."""
    root = tmp_path_factory.mktemp("hostile")
    files = {
        "gray16.png": hostile_images.png(BIG, BIG, bit_depth=16, color_type=0, pixel=b"\x04\xd2"),
        "rgb.png": hostile_images.png(BIG, BIG),
        "float_rows.tif": hostile_images.float_tiff(BIG, BIG, rows_per_strip=1),
        "float_strip.tif": hostile_images.float_tiff(BIG, BIG, rows_per_strip=BIG),
        "separate.jpg": hostile_images.flat_jpeg(BIG, BIG, "separate"),
        "progressive.jpg": hostile_images.flat_jpeg(BIG, BIG, "progressive"),
        "interleaved.jpg": hostile_images.flat_jpeg(BIG, BIG, "interleaved"),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in files}


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test: what is refused is refused from the header."""
    def refuse(self):
        raise AssertionError(f"decoded a {self.size} {self.mode} image")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# name -> (the size and mode in the message, decoded MB, MB needed in all) for preprocess_image's
# defaults (224 crop of a 256 resize). Decoded: W * H * bytes per pixel (2 for I;16, 4 for F and RGB).
# Needed, by hand: the 8-bit gray copy (81 MB) plus a 8 MB strip for the wide modes; the resize of a
# 9000-pixel side to 256 holds 256 x 9000 (+ 256 x 256) pixels at 1 (gray) or 4 (RGB) bytes; the
# float TIFF in one strip adds libtiff's 309 MB strip buffer and the file; the JPEGs, drafted to
# 1125 x 1125, add libjpeg's 3 x 1125^2 blocks x 64 coefficients x 2 bytes (463.5 MB).
HOSTILE = {
    "gray16.png": (f"9000x9000 {GRAY16}", 77.2 * GRAY16_BYTES, 77.2 * GRAY16_BYTES + 77.2 + 8 + (256 * 9256) / MB),
    "rgb.png": ("9000x9000 RGB", 309.0, 309.0 + 4 * 256 * 9256 / MB),
    "float_rows.tif": ("9000x9000 F", 309.0, 309.0 + 77.2 + 8 + (256 * 9256) / MB),
    "float_strip.tif": ("9000x9000 F", 309.0, 309.0 + 309.0 + 77.2 + 8 + (256 * 9256) / MB),
    "separate.jpg": ("1125x1125 RGB", 4.8, 4.8 + 463.5 + 4 * 256 * (256 + 1125) / MB),
    "progressive.jpg": ("1125x1125 RGB", 4.8, 4.8 + 463.5 + 4 * 256 * (256 + 1125) / MB),
}


def _reported_mb(message, pattern):
    return float(re.search(pattern, message).group(1))


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("as_bytes", [False, True])
def test_hostile_images_are_refused_from_the_header(hostile, no_decoding, name, as_bytes):
    source = hostile[name].read_bytes() if as_bytes else hostile[name]
    with pytest.raises(ImageTooLargeError) as info:
        preprocess_image(source)
    message = str(info.value)
    size_mode, decoded, needed = HOSTILE[name]
    assert "\n" not in message and message.startswith(f"{'image' if as_bytes else hostile[name]}: a {size_mode} image")
    assert _reported_mb(message, r"\(([\d.]+) MB of decoded pixels\)") == pytest.approx(decoded, abs=0.15)
    extra_file = hostile[name].stat().st_size / MB if name == "float_strip.tif" else 0
    assert _reported_mb(message, r"needs ([\d.]+) MB") == pytest.approx(needed + extra_file, abs=0.3)
    assert "over the 128 MB budget per image" in message
    assert "raise the budget with max_image_mb" in message


def test_huge_jpeg_that_draft_makes_small_is_decoded_small(hostile, monkeypatch):
    """9000 x 9000 in one interleaved scan: draft decodes 1125 x 1125 (4.8 MB) a row of blocks at
    a time, so it is classified; at full size (exact) it is 309 MB and refused."""
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    out = preprocess_image(hostile["interleaved.jpg"])
    assert set(decoded) == {(1125, 1125)}
    gray = (128 / 255 - MEAN) / STD
    assert torch.allclose(out, gray.expand_as(out), atol=1e-6)
    with pytest.raises(ImageTooLargeError, match=r"a 9000x9000 RGB image needs 318\.1 MB"):
        preprocess_image(hostile["interleaved.jpg"], exact=True)


def test_the_budget_option_raises_the_limit(hostile):
    out = preprocess_image(hostile["gray16.png"], max_image_mb=250)
    want = (round(1234 / 257) / 255 - MEAN) / STD
    assert torch.allclose(out, want.expand_as(out), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "64", True, None])
def test_budget_must_be_a_positive_number(tmp_path, bad):
    with pytest.raises(ValueError, match="max_image_mb must be a number > 0"):
        preprocess_image(noise_image(8, 8), max_image_mb=bad)


# The full-size RGB result of load_image (no resize) needs, in bytes per pixel of the file's mode:
# RGB 4 (Pillow stores it in 4); palette 1 + 4 for its RGB copy; 16-bit gray 2 (4 as "I") + 1 (8-bit
# copy) + 4 (RGB), plus the 8 MB strip. A budget of 1 MB is 1,048,576 bytes.
@pytest.mark.parametrize("color_type, bit_depth, pixel, per_pixel, fixed, width, rows_ok", [
    (2, 8, b"\x01\x02\x03", 4, 0, 512, 512),  # 512 x 512 x 4 = 1 MB exactly
    (3, 8, b"\x00", 5, 0, 1024, 204),  # 1024 x 204 x 5 = 1,044,480; one more row is 1,049,600
    (0, 16, b"\x01\x00", GRAY16_BYTES + 5, 8 * MB, 1024, 1048576 // (1024 * (GRAY16_BYTES + 5))),
])
def test_budget_edges(tmp_path, color_type, bit_depth, pixel, per_pixel, fixed, width, rows_ok):
    budget_mb = (fixed + MB) / MB
    assert fixed + width * rows_ok * per_pixel <= budget_mb * MB < fixed + width * (rows_ok + 1) * per_pixel
    palette = b"\x10\x20\x30" if color_type == 3 else b""
    ok, over = tmp_path / "ok.png", tmp_path / "over.png"
    ok.write_bytes(hostile_images.png(width, rows_ok, bit_depth=bit_depth, color_type=color_type, pixel=pixel,
                                      palette=palette))
    over.write_bytes(hostile_images.png(width, rows_ok + 1, bit_depth=bit_depth, color_type=color_type,
                                        pixel=pixel, palette=palette))
    assert load_image(ok, max_image_mb=budget_mb).size == (width, rows_ok)
    with pytest.raises(ImageTooLargeError, match=f"a {width}x{rows_ok + 1} "):
        load_image(over, max_image_mb=budget_mb)


def test_rgb_png_just_under_and_over_the_default_budget(tmp_path, no_decoding):
    """8192 x 4096 RGB is 128 MB exactly as load_image's result; one more row is over."""
    path = tmp_path / "edge.png"
    path.write_bytes(hostile_images.png(8192, 4097))
    with pytest.raises(ImageTooLargeError, match=r"needs 128\.1 MB to decode and preprocess \(128\.1 MB of decoded"):
        load_image(path)
    path.write_bytes(hostile_images.png(8192, 4096))
    with pytest.raises(AssertionError, match="decoded a"):  # allowed: it gets as far as decoding
        load_image(path)


def test_multi_frame_files_count_their_first_frame(tmp_path):
    """Animated GIF and PNG, multi-page TIFF: only the first frame is decoded, and only it counts."""
    frames = [noise_image(300, 200, seed=s) for s in range(3)]
    big_second = [frames[0], Image.new("RGB", (3000, 2000), (9, 99, 199))]
    for path, images in ((tmp_path / "anim.gif", frames), (tmp_path / "anim.png", frames),
                         (tmp_path / "pages.tif", big_second)):
        images[0].save(path, save_all=True, append_images=images[1:])
        with Image.open(path) as check:
            assert getattr(check, "n_frames", 1) >= 2
        first = np.asarray(load_image(path))
        assert first.shape == (200, 300, 3)
        # One 300 x 200 frame: 1 or 4 bytes decoded, 4 for its RGB copy: well under 0.5 MB.
        assert np.array_equal(np.asarray(load_image(path, max_image_mb=0.5)), first)
    big_second[1].save(tmp_path / "big_first.tif", save_all=True, append_images=[frames[0]])
    with pytest.raises(ImageTooLargeError, match="a 3000x2000 RGB image"):
        load_image(tmp_path / "big_first.tif", max_image_mb=0.5)


def test_gif_frame_larger_than_its_screen_is_counted(no_decoding):
    """A GIF whose logical screen says 10 x 10 and whose first frame is 3000 x 2000: Pillow grows
    the canvas when it opens the file, and the budget counts the grown canvas."""
    buffer = io.BytesIO()
    Image.new("P", (3000, 2000), 3).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = (10).to_bytes(2, "little") * 2  # the logical screen's width and height
    with pytest.raises(ImageTooLargeError, match=r"image: a 3000x2000 P image needs 28\.7 MB"):
        load_image(bytes(data), max_image_mb=1)


def test_exif_rotation_is_counted_even_when_pillow_sees_it_late(tmp_path):
    """An upright copy is one more image: a budget that fits the decoded image but not the copy
    refuses it, also when a PNG stores its EXIF after the pixels (then Pillow reads it only while
    decoding, and the budget is checked again before the copy)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    img = noise_image(400, 300, seed=3)
    img.save(buffer, "PNG", exif=exif.tobytes())
    late = tmp_path / "late.png"
    late.write_bytes(hostile_images.move_exif_after_pixels(buffer.getvalue()))
    with Image.open(late) as check:
        assert "exif" not in check.info  # not before decoding
    upright = np.rot90(np.asarray(img), -1)
    np.testing.assert_array_equal(np.asarray(load_image(late)), upright)
    one_copy = 400 * 300 * 4 / MB  # 0.458 MB; the decoded image and its upright copy: 0.92 MB
    with pytest.raises(ImageTooLargeError, match=r"a 400x300 RGB image needs 1\.0 MB"):
        load_image(late, max_image_mb=1.5 * one_copy)
    early = tmp_path / "early.jpg"
    save_with_orientation(img, early, 6)
    with pytest.raises(ImageTooLargeError, match=r"a 400x300 RGB image needs 1\.0 MB"):
        load_image(early, max_image_mb=1.5 * one_copy)
    assert load_image(early, max_image_mb=2.1 * one_copy).size == (300, 400)


@pytest.mark.parametrize("compression", [None, "tiff_deflate"])  # Pillow's own decoder, libtiff
def test_tiff_orientation_applied(tmp_path, compression):
    """The orientation is read from the TIFF's tags before decoding, which moves the file."""
    exif = Image.Exif()
    exif[0x0112] = 8
    img = noise_image(60, 40, seed=4)
    path = tmp_path / "r.tif"
    img.save(path, exif=exif, **({"compression": compression} if compression else {}))
    for source in (path, path.read_bytes()):
        np.testing.assert_array_equal(np.asarray(load_image(source)), np.rot90(np.asarray(img), 1))


def test_formats_whose_header_does_not_bound_the_decode_are_refused(tmp_path):
    """An ICO's directory may say 16 x 16 and hold a 9000 x 9000 PNG."""
    path = tmp_path / "icon.ico"
    noise_image(32, 32).save(path)
    with pytest.raises(ImageError, match="ICO images are not read here .*convert it to PNG or JPEG"):
        load_image(path)


def test_bytes_per_pixel_is_what_pillow_allocates():
    """Pillow's arena counts the blocks an image takes: with 4 KB blocks a 1024 x 64 image
    takes 16 blocks per byte of its pixels."""
    core = Image.core
    block_size = core.get_block_size()
    core.set_block_size(4096)
    try:
        for mode in sorted(SUPPORTED_MODES):
            before = core.get_stats()["allocated_blocks"]
            img = Image.new(mode, (1024, 64))
            assert (core.get_stats()["allocated_blocks"] - before) / 16 == image_budget.bytes_per_pixel(mode), mode
            del img
    finally:
        core.set_block_size(block_size)
    assert image_budget.bytes_per_pixel("La") is None


SUPPORTED_MODES = {"1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                   "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


@pytest.mark.parametrize("mode", sorted(SUPPORTED_MODES))
def test_every_mode_converts_to_the_working_mode_the_budget_counts(mode):
    """Random raw bytes in each mode: the 8-bit form is the mode the budget counts, and the
    transform of it (an "L" one resized before it becomes RGB) equals the reference on to_rgb."""
    raw_size = len(Image.new(mode, (41, 29)).tobytes())
    img = Image.frombytes(mode, (41, 29), np.random.default_rng(len(mode)).bytes(raw_size))
    assert image_preprocess._to_working(img).mode == image_budget.working_mode(mode)
    assert torch.equal(eval_transform(img), torchvision_like(to_rgb(img)))


# --- Strip conversion of wide modes, against numpy float64 statements of to_rgb's formula ---

def reference_16bit(values):
    """round(clip(v, 0, 65535) / 257) in float64; v / 257 is never exactly half-way (257 is odd)."""
    return np.round(np.clip(values.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)


def reference_float(values):
    """NaN -> 0, +inf -> 255, -inf -> 0; images in [0, 1] scaled by 255 (rounded to float32, as
    the float32 product is), then rounded to the nearest even integer and clipped."""
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if v.min() >= 0.0 and v.max() <= 1.0:
        v = (v * 255.0).astype(np.float32).astype(np.float64)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def random_wide_images(rng, height, width):
    """(PIL image, values) of random 16-bit, 32-bit and float images, with the edge values."""
    u16 = rng.integers(0, 65536, (height, width)).astype(np.uint16)
    u16.flat[:4] = [0, 128, 129, 65535]
    i32 = rng.integers(-70000, 140000, (height, width)).astype(np.int32)
    unit = rng.random((height, width), dtype=np.float32)
    unit.flat[:2] = [0.0, 1.0]
    wide = (rng.standard_normal((height, width)) * 200).astype(np.float32)
    wide.flat[:4] = [np.nan, np.inf, -np.inf, 254.5]
    unit_but_last = unit.copy()
    unit_but_last[-1, -1] = 1.5  # one pixel, in the last strip, makes the whole image clip instead of scale
    yield Image.frombytes("I;16", (width, height), u16.astype("<u2").tobytes()), u16
    yield Image.frombytes("I;16B", (width, height), u16.astype(">u2").tobytes()), u16
    yield Image.frombytes("I", (width, height), i32.astype("<i4").tobytes()), i32
    for values in (unit, wide, unit_but_last):
        yield Image.frombytes("F", (width, height), values.astype("<f4").tobytes()), values


@pytest.mark.parametrize("strip_pixels, size", [(1 << 18, (700, 1000)), (1000, (333, 257)), (100, (301, 7))])
def test_strip_conversion_equals_the_formula(monkeypatch, strip_pixels, size):
    """Several strips, a partial last one, and strips of one row narrower than the image."""
    monkeypatch.setattr(image_budget, "STRIP_PIXELS", strip_pixels)
    height, width = size
    for img, values in random_wide_images(np.random.default_rng(height), height, width):
        want = reference_16bit(values) if img.mode != "F" else reference_float(values)
        got = np.asarray(to_rgb(img))
        assert got.shape == (height, width, 3), img.mode
        np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2), err_msg=img.mode)


def test_16bit_png_preprocess_equals_the_reference(tmp_path):
    values = np.random.default_rng(5).integers(0, 65536, (300, 420)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    expected = Image.fromarray(reference_16bit(values)).convert("RGB")
    assert torch.equal(preprocess_image(path), torchvision_like(expected))


# --- Peak memory, measured in a fresh process ---

# Imports and warms up once, then forks a child per file: a child's peak RSS (VmHWM) starts at its
# RSS at the fork, so its growth is what preprocessing that file took.
_PEAK_SCRIPT = """
import json, os, sys
from PIL import Image
from vim_rpi import image_preprocess
from vim_rpi.errors import ImageTooLargeError

def peak_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

image_preprocess.preprocess_image(Image.new("I;16", (300, 200)))  # imports and first-call allocations
budget = float(sys.argv[1])
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    child = os.fork()
    if child == 0:
        before = peak_mb()
        try:
            image_preprocess.preprocess_image(data, max_image_mb=budget)  # what Classifier.preprocess runs
            outcome = "ok"
        except ImageTooLargeError:
            outcome = "refused"
        print(json.dumps([path, outcome, peak_mb() - before]), flush=True)
        os._exit(0)
    os.waitpid(child, 0)
"""


def peak_growths(paths, budget_mb=DEFAULT_MAX_IMAGE_MB):
    """{path name: (outcome, growth of the peak RSS in MB)} of preprocessing the bytes of each file."""
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(budget_mb), *map(str, paths)],
                            capture_output=True, text=True, timeout=300, check=True)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(paths), result.stderr
    return {pathlib.Path(path).name: (outcome, growth) for path, outcome, growth in lines}


def test_hostile_images_grow_peak_memory_at_most_200_mb(hostile, record_property):
    """Every 9000 x 9000 file: refused from its header (the interleaved JPEG decoded at 1/8)."""
    growths = peak_growths(list(hostile.values()))
    for name, (outcome, growth) in growths.items():
        record_property(f"peak_growth_mb_{name}", round(growth, 1))
        assert outcome == ("ok" if name == "interleaved.jpg" else "refused"), name
        assert growth <= 200, (name, growth)


def test_allowed_images_stay_within_their_estimate(tmp_path, record_property):
    """Images under the default budget peak at about their estimate: the decoded pixels plus
    bounded extras (8-bit copy, strip, decoder buffers, resize)."""
    files = {
        "rgb_near_budget.png": hostile_images.png(5600, 5600),
        "gray16.png": hostile_images.png(6000, 4000, bit_depth=16, color_type=0, pixel=b"\x80\x00"),
        "float.tif": hostile_images.float_tiff(4000, 3000, rows_per_strip=16),
    }
    estimates = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with open(tmp_path / name, "rb") as f, Image.open(f) as img:
            resize = image_preprocess._resize_buffers(img.size, 224, DEFAULT_CROP_PCT)
            decoder = image_budget.decoder_bytes(img, f, img.size)
            estimates[name] = image_budget.needed_bytes(img.mode, img.size, decoder=decoder, resize=resize)
    for name, (outcome, growth) in peak_growths([tmp_path / name for name in files]).items():
        decoded, needed = estimates[name]
        record_property(f"peak_growth_mb_{name}", round(growth, 1))
        record_property(f"estimate_mb_{name}", round(needed / MB, 1))
        assert needed <= DEFAULT_MAX_IMAGE_MB * MB and outcome == "ok", name
        assert decoded / MB - 2 <= growth <= needed / MB + 4, (name, growth, needed / MB)
