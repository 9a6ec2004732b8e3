"""Image loading and the evaluation transform, with PIL + numpy only.

``eval_transform`` (with the model's crop_pct, mean and std; ImageNet's by default) equals torchvision's
``Resize(int(size / 0.875), BICUBIC) + CenterCrop(size) + ToTensor() + Normalize(mean, std)``
on the same PIL image (the transform Vim's ``datasets.build_transform`` uses for evaluation),
without importing torchvision: it does not import on every machine and costs start-up time and
memory on a Raspberry Pi.

``load_image`` decodes a BMP, GIF, JPEG, PNG, PPM, TIFF or WebP image, from a file or from bytes,
into RGB; ``to_image`` also takes a PIL image or an RGB uint8 numpy array (H, W, 3), e.g. a camera
frame. Unlike torchvision's ImageFolder loader it applies the EXIF orientation, so a phone photo
is classified the way it is displayed. With ``draft_size`` a large JPEG is decoded at 1/2, 1/4 or
1/8 scale in the DCT domain (Pillow's draft mode), which cuts decode time and memory several-fold
for camera photos, at the cost of slightly different pixels; ``preprocess_image(..., exact=True)``
turns that off.

Memory per image is bounded: before decoding, the bytes preprocessing will hold are worked out
from the header (`vim_rpi.image_budget`: decoded pixels, decoder buffers, the 8-bit and upright
copies, the resize) and an image needing more than ``max_image_mb`` (default
``DEFAULT_MAX_IMAGE_MB``) raises ImageTooLargeError. 16-bit, 32-bit and float images are narrowed
to 8 bits a strip of rows at a time, and one-band images are resized before they become RGB, so
no full-size copy wider than 8 bits per band is made.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vim_rpi import image_budget, paths
from vim_rpi.errors import ImageError, ImageTooLargeError
from vim_rpi.image_budget import DEFAULT_MAX_IMAGE_MB, MB
from vim_rpi.registry import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "DEFAULT_MAX_IMAGE_MB",
    "ImageError",
    "ImageTooLargeError",
    "eval_transform",
    "load_image",
    "normalize",
    "preprocess_image",
    "resize_size",
    "to_image",
    "to_rgb",
    "transform_for",
]

# Modes that Image.convert("RGB") maps correctly: 8-bit samples, or 1-bit.
_DIRECT_MODES = {
    "1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
}
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# round(v / 257) for every 16-bit v, the 8-bit value `to_rgb` gives it.
_LUT16 = ((np.arange(65536) + 128) // 257).astype(np.uint8)
# Above this many pixels the resized image is not materialized: a 20000 x 1 strip would
# otherwise become 256 x 5,120,000 (3.9 GB) on the way to a 224 x 224 crop.
MAX_RESIZED_PIXELS = 1 << 24
_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright (EXIF 2.3, tag 0x0112).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def resize_size(input_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Short side the image is resized to before the center crop: int(input_size / crop_pct)."""
    return int(input_size / crop_pct)


def load_image(path, *, draft_size: int | None = None, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> Image.Image:
    """Decode an image file (or its bytes) into an RGB PIL image, upright per its EXIF orientation.

    Args:
        path: image file (str or path-like), or the encoded image as bytes (named "image" in
            messages).
        draft_size: if given and the file is a JPEG at least twice as large as needed, decode at
            a reduced scale whose short side is still >= draft_size.
        max_image_mb: the most memory (MB of 2**20 bytes) decoding and converting it may take;
            the header tells beforehand (see `vim_rpi.image_budget`).

    Returns:
        PIL image, mode "RGB", fully decoded (size (W, H) after EXIF rotation).

    Raises:
        ImageTooLargeError: the image would need more than max_image_mb.
        ImageError: missing file, directory, unreadable, not an image, a format other than BMP,
            GIF, JPEG, PNG, PPM, TIFF and WebP, truncated or corrupt, larger than Pillow's
            decompression-bomb limit, or a mode with no RGB meaning.
        ValueError: draft_size or max_image_mb is not positive.
    """
    _check_draft_size(draft_size)
    image_budget.check_max_image_mb(max_image_mb)
    return _as_rgb(_open(path, draft_size, max_image_mb, None))


def _check_draft_size(draft_size) -> None:
    if draft_size is not None and (not isinstance(draft_size, int) or draft_size < 1):
        raise ValueError(f"draft_size must be a positive int, got {draft_size!r}")


def _open(path, draft_size, budget_mb, fit) -> Image.Image:
    """Decode a file or bytes into 8 bits ("L" or "RGB"), upright; `fit` as in `_check_budget`."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        if not len(path):
            raise ImageError("image: empty (no bytes)")
        return _decode(lambda: io.BytesIO(path), "image", draft_size, budget_mb, fit)
    problem = paths.file_problem(path)
    if problem:
        raise ImageError(problem)
    return _decode(lambda: _open_regular(path), os.fspath(path), draft_size, budget_mb, fit)


def _open_regular(path):
    """The file at `path` opened for reading, if it is still a regular file: opened without
    blocking (a FIFO put there since the check would wait for a writer) and checked again on the
    open descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        problem = paths.not_regular(path, os.fstat(fd).st_mode)
        if problem:
            raise ImageError(problem)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(open_file, name: str, draft_size, budget_mb, fit) -> Image.Image:
    """Decode what `open_file()` returns, within the budget; every failure becomes an ImageError
    naming `name`."""
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; both mean "do not decode".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Opening the file ourselves keeps the decoded image valid after the file is closed.
            with open_file() as f:
                img = Image.open(f)
                if img.format not in image_budget.FORMATS:
                    raise ImageError(f"{name}: {img.format} images are not read here (only "
                                     f"{', '.join(image_budget.FORMATS)}); convert it to PNG or JPEG")
                full_size = img.size
                if draft_size is not None:
                    _request_draft(img, draft_size)
                # A PNG may keep its EXIF after the pixels, where Pillow reads it only by decoding.
                known = img.format != "PNG" or "exif" in img.info
                _check_budget(name, img.mode, img.size, budget_mb, fit,
                              decoder=image_budget.decoder_bytes(img, f, full_size),
                              orientation=img.getexif().get(_ORIENTATION) if known else None)
                img.load()
            orientation = img.getexif().get(_ORIENTATION)
        except PermissionError:
            raise ImageError(f"{name}: permission denied; check the file's permissions") from None
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image file (or not a format Pillow reads)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(
                f"{name}: refusing to decode a possible decompression bomb ({exc}); "
                "downscale the image first"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{name}: truncated or corrupt image ({exc})") from None
    # Again with what the decoder made and the orientation it found, before the copies.
    _check_budget(name, img.mode, img.size, budget_mb, fit, orientation=orientation)
    img = _to_working(img, name)
    method = _UPRIGHT.get(orientation)
    return img if method is None else img.transpose(method)


def _check_budget(name, mode, size, budget_mb, fit, *, decoder=0, orientation=None) -> None:
    """ImageTooLargeError when an image of `mode` and `size` needs more than budget_mb to
    preprocess (see `image_budget.needed_bytes`); ImageError for a mode it cannot convert.

    fit: (input_size, crop_pct) of the resize that follows, or None for a full-size RGB result.
    """
    if image_budget.bytes_per_pixel(mode) is None:
        raise ImageError(f"{name}: unsupported image mode {mode!r}; convert it to RGB first")
    upright = size[::-1] if orientation in (5, 6, 7, 8) else size
    resize = None if fit is None else _resize_buffers(upright, *fit)
    decoded, needed = image_budget.needed_bytes(mode, size, decoder=decoder, rotated=orientation in _UPRIGHT,
                                                resize=resize)
    if needed > budget_mb * MB:
        raise ImageTooLargeError(
            f"{name}: a {size[0]}x{size[1]} {mode} image needs {_mb(needed)} to decode and preprocess "
            f"({_mb(decoded)} of decoded pixels), over the {budget_mb:g} MB budget per image; downscale it, "
            "or raise the budget with --max-image-mb (max_image_mb in Python)")


def _mb(size) -> str:
    """Bytes in MB, rounded up to 0.1: a need over the budget never reads as equal to it."""
    return f"{math.ceil(size / MB * 10) / 10:.1f} MB"


def to_image(image, *, draft_size: int | None = None, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> Image.Image:
    """Any supported input as an RGB PIL image: a path, encoded bytes (see `load_image`), a PIL
    image (any mode, orientation kept as given), or an RGB uint8 numpy array (H, W, 3).

    Raises:
        ImageTooLargeError: converting it would need more than max_image_mb.
        ImageError: the input cannot be used as an image (the message says why).
        TypeError: an input of another type.
    """
    _check_draft_size(draft_size)
    image_budget.check_max_image_mb(max_image_mb)
    return _as_rgb(_prepare(image, draft_size, max_image_mb, None))


def _prepare(image, draft_size, budget_mb, fit) -> Image.Image:
    """Any input `to_image` takes, within the budget, as an 8-bit ("L" or "RGB") PIL image."""
    if isinstance(image, Image.Image):
        _check_budget("image", image.mode, image.size, budget_mb, fit)
        return _to_working(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ImageError(f"image array: expected RGB uint8 of shape (height, width, 3), got {image.dtype} "
                             f"{image.shape}")
        _check_budget("image array", "RGB", image.shape[1::-1], budget_mb, fit)
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return _open(image, draft_size, budget_mb, fit)
    raise TypeError(f"image must be a path, bytes, a PIL image or a numpy array, got {type(image).__name__}")


def _request_draft(img: Image.Image, draft_size: int) -> None:
    """Have a JPEG decode at the largest reduction k in (8, 4, 2, 1) with short side >= draft_size.

    The decoder outputs ceil(W / k) x ceil(H / k). Pillow's draft() takes k as min(W // w, H // h)
    rounded down to a power of two, which is exactly k when asked for a square of side
    short // k. EXIF rotation, applied later, swaps W and H but keeps the short side.
    Formats other than JPEG ignore draft().
    """
    short = min(img.size)
    k = max((k for k in (2, 4, 8) if -(-short // k) >= draft_size), default=1)
    if k > 1:
        img.draft(None, (short // k, short // k))


def to_rgb(img: Image.Image, *, name: str = "image") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Alpha is dropped without compositing (what torchvision's ImageFolder loader does with
    ``convert("RGB")``, so results match the official pipeline). Pillow's own conversion clips
    16-bit samples at 255, which turns most 16-bit images white, so they are scaled to 8 bits
    instead (round(v / 257), mapping 0..65535 onto 0..255); 32-bit "I" images get the same
    scaling (after clipping to 0..65535) because that is the mode older Pillow versions give 16-bit
    PNGs. Float "F" images in [0, 1] are scaled by 255, others clipped to [0, 255] like Pillow
    (NaN -> 0, +inf -> 255, -inf -> 0).

    Raises:
        ImageError: a mode outside the ones handled here (e.g. Pillow's internal "La").
    """
    return _as_rgb(_to_working(img, name))


def _as_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_working(img: Image.Image, name: str = "image") -> Image.Image:
    """`to_rgb`'s pixels in 8 bits without the full-size RGB copy of a one-band image: mode "L"
    for one-band modes (and "LA", whose alpha is dropped), else "RGB"
    (`image_budget.working_mode`). Resizing "L" and then repeating it into three bands gives the
    same bytes as resizing its RGB conversion: Pillow resamples each band alike."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("1", "LA"):
        return img.convert("L")
    if img.mode in _DIRECT_MODES:
        with warnings.catch_warnings():
            # Palette transparency is dropped on purpose, as explained in to_rgb.
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            return img.convert("RGB")
    if img.mode in _UINT16_MODES or img.mode == "F":
        return _narrow(img)
    raise ImageError(f"{name}: unsupported image mode {img.mode!r}; convert it to RGB first")


def _finite(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)


def _narrow(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float image as mode "L" with `to_rgb`'s scaling, computed a strip of
    about image_budget.STRIP_PIXELS pixels at a time: the only full-size array is the 8-bit result.
    A float image is read twice: its [0, 1] test looks at every pixel first."""
    width, height = img.size
    rows = max(1, image_budget.STRIP_PIXELS // max(width, 1))

    def strips():
        for top in range(0, height, rows):
            yield top, np.asarray(img.crop((0, top, width, min(top + rows, height))))

    if img.mode == "F":
        low, high = math.inf, -math.inf
        for _, values in strips():
            if values.size:
                values = _finite(values)
                low, high = min(low, float(values.min())), max(high, float(values.max()))
        unit = low >= 0.0 and high <= 1.0

        def narrow(values):
            values = _finite(values)
            if unit:
                values = values * 255.0
            return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        def narrow(values):
            return _LUT16[np.clip(values, 0, 65535) if values.dtype.kind == "i" else values]

    out = np.empty((height, width), dtype=np.uint8)
    for top, values in strips():
        out[top : top + len(values)] = narrow(values)
    return Image.fromarray(out)


def _check_input_size(input_size) -> None:
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")


def _resize_plan(width, height, input_size, crop_pct):
    """(new_w, new_h, top, left, box): the resized size and the crop's offsets in it, and the
    source region to resize straight to the crop when the resized image would exceed
    MAX_RESIZED_PIXELS (else None)."""
    short, long = min(width, height), max(width, height)
    new_short = resize_size(input_size, crop_pct)
    new_long = int(new_short * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    # new_long >= new_short >= input_size, so the crop always fits and needs no padding.
    top = int(round((new_h - input_size) / 2.0))
    left = int(round((new_w - input_size) / 2.0))
    box = None
    if new_w * new_h > MAX_RESIZED_PIXELS:
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + input_size) * sx, (top + input_size) * sy)
    return new_w, new_h, top, left, box


def _resize_buffers(size, input_size, crop_pct):
    """(width, height, source_rows) of what `_transform`'s resize holds: its output, and the
    horizontal pass's output (width x the source rows the vertical pass reads: the box's rows
    plus the bicubic support of 2 output pixels each side)."""
    width, height = size
    new_w, new_h, _, _, box = _resize_plan(width, height, input_size, crop_pct)
    if box is None:
        return (0, 0, 0) if (new_w, new_h) == (width, height) else (new_w, new_h, height)
    scale = max(height / new_h, 1.0)
    return input_size, input_size, min(height, math.ceil((input_size + 4) * scale) + 2)


def eval_transform(img: Image.Image, input_size: int = 224, *, crop_pct: float = DEFAULT_CROP_PCT,
                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """The evaluation transform of a PIL image (the model's pretrained cfg gives crop_pct, mean, std).

    Short side -> s = int(input_size / crop_pct) by PIL bicubic, long side -> int(s * long / short)
    (torchvision's rule for Resize(int)), center crop with top = round((h - input_size) / 2),
    scale to [0, 1], normalize with mean/std; all in float32 like torchvision.
    When the resized image would exceed MAX_RESIZED_PIXELS (aspect ratios beyond ~256:1), only
    the crop's region of the source is resized (PIL's box resize: slightly different pixels).

    Args:
        img: PIL image, any mode (converted as ``to_rgb`` does).
        input_size: side of the square crop.
        crop_pct, mean, std: the crop fraction and per-channel normalization.

    Returns:
        float32 tensor (3, input_size, input_size).
    """
    _check_input_size(input_size)
    return _transform(_to_working(img), input_size, crop_pct, mean, std)


def _transform(img: Image.Image, input_size, crop_pct, mean, std) -> torch.Tensor:
    """`eval_transform` of an "L" or "RGB" image; "L" becomes three bands after the crop."""
    new_w, new_h, top, left, box = _resize_plan(*img.size, input_size, crop_pct)
    if box is not None:
        img = img.resize((input_size, input_size), Image.Resampling.BICUBIC, box=box)
    else:
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + input_size, top + input_size))
    crop = np.asarray(img)  # (h, w, 3) or (h, w) uint8
    if crop.ndim == 2:
        crop = np.repeat(crop[:, :, None], 3, axis=2)
    return normalize(crop, mean, std)


def transform_for(cfg, input_size: int):
    """The evaluation transform (PIL image -> tensor) a model's pretrained cfg asks for: a
    picklable callable, so DataLoader worker processes can use it."""
    if cfg.get("interpolation", "bicubic") != "bicubic":
        raise ValueError(f"only bicubic resizing is implemented, the cfg asks for {cfg['interpolation']!r}")
    return functools.partial(eval_transform, input_size=input_size, crop_pct=cfg["crop_pct"], mean=tuple(cfg["mean"]),
                             std=tuple(cfg["std"]))


def normalize(pixels, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """uint8 (h, w, 3) pixels -> float32 (3, h, w): (pixels / 255 - mean) / std, as torchvision's
    ToTensor + Normalize compute it."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    normalized = (pixels.astype(np.float32) / np.float32(255.0) - mean) / std  # (h, w, 3)
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def preprocess_image(path, input_size: int = 224, exact: bool = False, *, crop_pct: float = DEFAULT_CROP_PCT,
                     mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                     max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> torch.Tensor:
    """Load an image (any input `to_image` takes) and apply the evaluation transform.

    Args:
        path: image file, encoded bytes, PIL image or RGB uint8 array (H, W, 3).
        input_size: crop side.
        exact: decode JPEGs at full resolution instead of the faster reduced-scale draft
            decode; the result is then bit-for-bit the official pipeline's, except for images
            with an EXIF orientation or 16-bit/float samples (see ``to_rgb``).
        crop_pct, mean, std: see ``eval_transform``.
        max_image_mb: the most memory (MB of 2**20 bytes) decoding, converting and resizing this
            image may take, checked from its header before decoding (see `vim_rpi.image_budget`).

    Returns:
        float32 tensor (3, input_size, input_size).

    Raises:
        ImageTooLargeError: the image would need more than max_image_mb.
        ImageError: the file cannot be used as an image (see ``load_image``).
        ValueError: input_size or max_image_mb is not positive.
    """
    _check_input_size(input_size)
    image_budget.check_max_image_mb(max_image_mb)
    draft_size = None if exact else resize_size(input_size, crop_pct)
    try:
        img = _prepare(path, draft_size, max_image_mb, (input_size, crop_pct))
        return _transform(img, input_size, crop_pct, mean, std)
    except MemoryError:
        name = path if isinstance(path, (str, os.PathLike)) else "image"
        raise ImageError(f"{name}: not enough memory to decode and resize this image") from None
