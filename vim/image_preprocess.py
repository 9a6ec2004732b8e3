"""Image loading and the evaluation transform, with PIL + numpy only.

``eval_transform`` (with the model's crop_pct, mean and std; ImageNet's by default) equals torchvision's
``Resize(int(size / 0.875), BICUBIC) + CenterCrop(size) + ToTensor() + Normalize(mean, std)``
on the same PIL image (the transform Vim's ``datasets.build_transform`` uses for evaluation),
without importing torchvision: it does not import on every machine and costs start-up time and
memory on a Raspberry Pi.

``load_image`` decodes any image Pillow reads, from a file or from bytes, into RGB;
``to_image`` also takes a PIL image or an RGB uint8 numpy array (H, W, 3), e.g. a camera frame. Unlike torchvision's ImageFolder loader
it applies the EXIF orientation, so a phone photo is classified the way it is displayed. With
``draft_size`` a large JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's
draft mode), which cuts decode time and memory several-fold for camera photos, at the cost of
slightly different pixels; ``preprocess_image(..., exact=True)`` turns that off.
"""

from __future__ import annotations

import functools
import io
import os
import pathlib
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vim_rpi.errors import ImageError
from vim_rpi.registry import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    "ImageError",
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
# Above this many pixels the resized image is not materialized: a 20000 x 1 strip would
# otherwise become 256 x 5,120,000 (3.9 GB) on the way to a 224 x 224 crop.
MAX_RESIZED_PIXELS = 1 << 24


def resize_size(input_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Short side the image is resized to before the center crop: int(input_size / crop_pct)."""
    return int(input_size / crop_pct)


def load_image(path, *, draft_size: int | None = None) -> Image.Image:
    """Decode an image file (or its bytes) into an RGB PIL image, upright per its EXIF orientation.

    Args:
        path: image file (str or path-like), or the encoded image as bytes (named "image" in
            messages).
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
    if isinstance(path, (bytes, bytearray, memoryview)):
        if not len(path):
            raise ImageError("image: empty (no bytes)")
        return _decode(lambda: io.BytesIO(path), "image", draft_size)
    path = pathlib.Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    return _decode(lambda: open(path, "rb"), str(path), draft_size)


def _decode(open_file, name: str, draft_size) -> Image.Image:
    """Decode what `open_file()` returns; every failure becomes an ImageError naming `name`."""
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; both mean "do not decode".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Opening the file ourselves keeps the decoded image valid after the file is closed.
            with open_file() as f:
                img = Image.open(f)
                if draft_size is not None:
                    _request_draft(img, draft_size)
                img.load()
            ImageOps.exif_transpose(img, in_place=True)
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
    return to_rgb(img, name=name)


def to_image(image, *, draft_size: int | None = None) -> Image.Image:
    """Any supported input as an RGB PIL image: a path, encoded bytes (see `load_image`), a PIL
    image (any mode, orientation kept as given), or an RGB uint8 numpy array (H, W, 3).

    Raises:
        ImageError: the input cannot be used as an image (the message says why).
        TypeError: an input of another type.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ImageError(f"image array: expected RGB uint8 of shape (height, width, 3), got {image.dtype} "
                             f"{image.shape}")
        return Image.fromarray(np.ascontiguousarray(image), "RGB")
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return load_image(image, draft_size=draft_size)
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


def eval_transform(img: Image.Image, input_size: int = 224, *, crop_pct: float = DEFAULT_CROP_PCT,
                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """The evaluation transform of a PIL image (the model's pretrained cfg gives crop_pct, mean, std).

    Short side -> s = int(input_size / crop_pct) by PIL bicubic, long side -> int(s * long / short)
    (torchvision's rule for Resize(int)), center crop with top = round((h - input_size) / 2),
    scale to [0, 1], normalize with mean/std; all in float32 like torchvision.
    When the resized image would exceed MAX_RESIZED_PIXELS (aspect ratios beyond ~256:1), only
    the crop's region of the source is resized (PIL's box resize: slightly different pixels).

    Args:
        img: PIL image, any mode (converted with ``to_rgb``).
        input_size: side of the square crop.
        crop_pct, mean, std: the crop fraction and per-channel normalization.

    Returns:
        float32 tensor (3, input_size, input_size).
    """
    _check_input_size(input_size)
    img = to_rgb(img)
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_short = resize_size(input_size, crop_pct)
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
                     mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """Load an image (any input `to_image` takes) and apply the evaluation transform.

    Args:
        path: image file, encoded bytes, PIL image or RGB uint8 array (H, W, 3).
        input_size: crop side.
        exact: decode JPEGs at full resolution instead of the faster reduced-scale draft
            decode; the result is then bit-for-bit the official pipeline's, except for images
            with an EXIF orientation or 16-bit/float samples (see ``to_rgb``).
        crop_pct, mean, std: see ``eval_transform``.

    Returns:
        float32 tensor (3, input_size, input_size).

    Raises:
        ImageError: the file cannot be used as an image (see ``load_image``).
    """
    _check_input_size(input_size)
    draft_size = None if exact else resize_size(input_size, crop_pct)
    try:
        return eval_transform(to_image(path, draft_size=draft_size), input_size, crop_pct=crop_pct, mean=mean, std=std)
    except MemoryError:
        name = path if isinstance(path, (str, os.PathLike)) else "image"
        raise ImageError(f"{name}: not enough memory to decode and resize this image") from None
