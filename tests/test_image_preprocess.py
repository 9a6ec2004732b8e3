"""vim/image_preprocess.py against an independent torch re-statement of the torchvision transform.

The reference below redoes Resize(256, BICUBIC) + CenterCrop(224) + ToTensor + Normalize with
torch ops from the resized size and crop offsets the test passes in, so the module's size and
offset arithmetic is checked against numbers worked out by hand.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vim_rpi import image_preprocess
from vim_rpi.image_preprocess import ImageError, eval_transform, load_image, preprocess_image, to_rgb

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
    one_line_image_error(tmp_path, "is a directory")


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

    # Patch the module's `open` rather than chmod, which does not stop root.
    monkeypatch.setattr(image_preprocess, "open", denied, raising=False)
    one_line_image_error(path, "permission denied")

