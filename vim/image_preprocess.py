"""Image loading and the ImageNet evaluation transform, with PIL + numpy only.

``eval_transform`` equals torchvision's
``Resize(int(size / 0.875), BICUBIC) + CenterCrop(size) + ToTensor() + Normalize(mean, std)``
on the same PIL image (the transform Vim's ``datasets.build_transform`` uses for evaluation),
without importing torchvision: it does not import on every machine and costs start-up time and
memory on a Raspberry Pi.

``load_image`` decodes any image Pillow reads into RGB. Unlike torchvision's ImageFolder loader
it applies the EXIF orientation, so a phone photo is classified the way it is displayed. With
``draft_size`` a large JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's
draft mode), which cuts decode time and memory several-fold for camera photos, at the cost of
slightly different pixels; ``preprocess_image(..., exact=True)`` turns that off.
"""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "CROP_PCT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageError",
    "eval_transform",
    "load_image",
    "preprocess_image",
    "resize_size",
    "to_rgb",
]

CROP_PCT = 0.875
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Modes that Image.convert("RGB") maps correctly: 8-bit samples, or 1-bit.
_DIRECT_MODES = {
    "1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
}
_UINT16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Above this many pixels the resized image is not materialized: a 20000 x 1 strip would
# otherwise become 256 x 5,120,000 (3.9 GB) on the way to a 224 x 224 crop.
MAX_RESIZED_PIXELS = 1 << 24


class ImageError(Exception):
    """An image cannot be used; the message names the file and says what is wrong."""


def resize_size(input_size: int) -> int:
    """Short side the image is resized to before the center crop: int(input_size / 0.875)."""
    return int(input_size / CROP_PCT)


def load_image(path, *, draft_size: int | None = None) -> Image.Image:
    """Decode an image file into an RGB PIL image, upright per its EXIF orientation.

    Args:
        path: image file (str or path-like).
        draft_size: if given and the file is a JPEG at least twice as large as needed, decode at
            a reduced scale whose short side is still >= draft_size.

    Returns:
        PIL image, mode "RGB", fully decoded (size (W, H) after EXIF rotation).

    Raises:
        ImageError: missing file, directory, unreadable, not an image, truncated or corrupt,
            larger than Pillow's decompression-bomb limit, or a mode with no RGB meaning.
    """
    if draft_size is not None and (not isinstance(draft_size, int) or draft_size < 1):
        raise ValueError(f"draft_size must be a positive int, got {draft_size!r}")
    path = pathlib.Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; both mean "do not decode".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Opening the file ourselves keeps the decoded image valid after the file is closed.
            with open(path, "rb") as f:
                img = Image.open(f)
                if draft_size is not None:
                    _request_draft(img, draft_size)
                img.load()
            ImageOps.exif_transpose(img, in_place=True)
        except PermissionError:
            raise ImageError(f"{path}: permission denied; check the file's permissions") from None
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not an image file (or not a format Pillow reads)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(
                f"{path}: refusing to decode a possible decompression bomb ({exc}); "
                "downscale the image first"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"{path}: truncated or corrupt image ({exc})") from None
    return to_rgb(img, name=str(path))


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
    scaling because that is the mode older Pillow versions give 16-bit PNGs. Float "F" images
    in [0, 1] are scaled by 255, others clipped to [0, 255] like Pillow.

    Raises:
        ImageError: a mode outside the ones handled here (e.g. Pillow's internal "La").
    """
    if img.mode == "RGB":
        return img
    if img.mode in _DIRECT_MODES:
        with warnings.catch_warnings():
            # Palette transparency is dropped on purpose, as explained above.
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            return img.convert("RGB")
    if img.mode in _UINT16_MODES:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        gray = ((wide + 128) // 257).astype(np.uint8)
    elif img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported image mode {img.mode!r}; convert it to RGB first")
    return Image.fromarray(gray).convert("RGB")


def _check_input_size(input_size) -> None:
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")


def eval_transform(img: Image.Image, input_size: int = 224) -> torch.Tensor:
    """The ImageNet evaluation transform of a PIL image.

    Short side -> s = int(input_size / 0.875) by PIL bicubic, long side -> int(s * long / short)
    (torchvision's rule for Resize(int)), center crop with top = round((h - input_size) / 2),
    scale to [0, 1], normalize with the ImageNet mean/std; all in float32 like torchvision.
    When the resized image would exceed MAX_RESIZED_PIXELS (aspect ratios beyond ~256:1), only
    the crop's region of the source is resized (PIL's box resize: slightly different pixels).

    Args:
        img: PIL image, any mode (converted with ``to_rgb``).
        input_size: side of the square crop.

    Returns:
        float32 tensor (3, input_size, input_size).
    """
    _check_input_size(input_size)
    img = to_rgb(img)
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_short = resize_size(input_size)
    new_long = int(new_short * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    # new_long >= new_short >= input_size, so the crop always fits and needs no padding.
    top = int(round((new_h - input_size) / 2.0))
    left = int(round((new_w - input_size) / 2.0))
    if new_w * new_h > MAX_RESIZED_PIXELS:
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + input_size) * sx, (top + input_size) * sy)
        crop = np.asarray(img.resize((input_size, input_size), Image.Resampling.BICUBIC, box=box))
    else:
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        crop = np.asarray(img)[top : top + input_size, left : left + input_size]  # (h, w, 3) uint8
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    normalized = (crop.astype(np.float32) / np.float32(255.0) - mean) / std  # (h, w, 3)
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))


def preprocess_image(path, input_size: int = 224, exact: bool = False) -> torch.Tensor:
    """Load an image file and apply the evaluation transform.

    Args:
        path: image file.
        input_size: crop side.
        exact: decode JPEGs at full resolution instead of the faster reduced-scale draft
            decode; the result is then bit-for-bit the official pipeline's, except for images
            with an EXIF orientation or 16-bit/float samples (see ``to_rgb``).

    Returns:
        float32 tensor (3, input_size, input_size).

    Raises:
        ImageError: the file cannot be used as an image (see ``load_image``).
    """
    _check_input_size(input_size)
    draft_size = None if exact else resize_size(input_size)
    try:
        return eval_transform(load_image(path, draft_size=draft_size), input_size)
    except MemoryError:
        raise ImageError(f"{path}: not enough memory to decode and resize this image") from None
