"""What preprocessing one image will hold in memory, worked out from its header before decoding.

The sum ``needed_bytes`` returns is what `image_preprocess` checks against the per-image budget
(``max_image_mb``, default ``DEFAULT_MAX_IMAGE_MB``). It counts, in bytes:

- the decoded pixels: width x height x ``bytes_per_pixel(mode)``. Pillow stores "1", "L" and "P"
  in 1 byte, the 16-bit "I;16*" modes in 2, and "I", "F" and every multi-band mode in 4 (3-band
  modes such as "RGB" are padded to 4 bytes);
- the decoder's own buffers (``decoder_bytes``): libjpeg keeps every DCT coefficient of a
  progressive JPEG, or of one whose first scan does not interleave all components, at full
  resolution even when draft mode decodes a reduced scale (2 bytes each); libtiff decodes a
  compressed TIFF strip by strip (or tile by tile) into a buffer of one strip, and a file may
  declare a single strip as large as the image, and libtiff maps the whole file when it reads
  one from disk; libwebp's animation decoder, which Pillow uses for every WebP, keeps two 4-byte
  canvases, Pillow copies the frame once more, and the encoded file is held twice;
- the 8-bit copy the conversion makes (``working_mode``: "L" for one-band modes, "RGB" for the
  others, none when the image is already in it) and, for the wide modes converted strip by
  strip, one strip's scratch (``STRIP_BYTES``);
- the upright copy when the EXIF orientation rotates or flips the image;
- the resize to the model's scale (its output and the horizontal pass's intermediate), or for a
  full-size RGB result the RGB copy of a one-band image.

Only ``FORMATS`` are decoded: their headers state the size and mode the decoder will produce. Other
Pillow plugins (ICO, ICNS, PSD, EPS, TGA, ...) may decode an embedded image of another size, or
make extra full-size copies, so no header check could bound them.
"""

import math
import os
import struct

from PIL import JpegImagePlugin

__all__ = ["DEFAULT_MAX_IMAGE_MB", "MB", "FORMATS", "STRIP_PIXELS", "STRIP_BYTES", "check_max_image_mb",
           "bytes_per_pixel", "working_mode", "decoder_bytes", "needed_bytes"]

MB = 1 << 20
# A 1 GB Pi leaves about 480 MB beside its OS (about 200 MB) and the warm server (about 340 MB):
# two decodes at the budget (256 MB) and four 20 MB uploads (80 MB) fit. 128 MB holds a 12 MP photo
# decoded at full size and rotated (96 MB), a 4000x3000 RGBA PNG (96 MB), a 6000x4000 16-bit PNG
# (78 MB) and, drafted to 1000x750, a 48 MP phone JPEG (4 MB; 142 MB if it were progressive).
DEFAULT_MAX_IMAGE_MB = 128

# Formats whose header states what the decoder allocates (torchvision's IMG_EXTENSIONS plus GIF;
# MPO is how Pillow opens many phones' JPEGs).
FORMATS = ("BMP", "GIF", "JPEG", "MPO", "PNG", "PPM", "TIFF", "WEBP")

_ONE_BYTE = {"1", "L", "P"}
_TWO_BYTES = {"I;16", "I;16L", "I;16B", "I;16N"}
_FOUR_BYTES = {"I", "F", "LA", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
# One-band modes whose 8-bit form is "L"; every other mode becomes "RGB".
_TO_GRAY = {"1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
# Modes narrowed to 8 bits strip by strip. A strip of STRIP_PIXELS pixels holds at most a few
# arrays of 2 to 8 bytes a pixel at once (its bytes, float32 temporaries, numpy's intp copy of
# 16-bit indices into the lookup table): STRIP_BYTES bounds them.
_WIDE = _TWO_BYTES | {"I", "F"}
STRIP_PIXELS = 1 << 18
STRIP_BYTES = 32 * STRIP_PIXELS

_JPEG_COEFFICIENT_BYTES = 2  # libjpeg's JCOEF is a short
_PHOTOMETRIC_YCBCR = 6  # TIFF tag 262 value that Pillow decodes through libtiff's RGBA interface


def check_max_image_mb(value, name="max_image_mb"):
    """ValueError unless `value` is a budget: a number > 0 (inf: no budget). `name` is the option
    the message names."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def bytes_per_pixel(mode):
    """Bytes Pillow stores per pixel of `mode`, or None for a mode preprocessing does not handle."""
    if mode in _ONE_BYTE:
        return 1
    if mode in _TWO_BYTES:
        return 2
    if mode in _FOUR_BYTES:
        return 4
    return None


def working_mode(mode):
    """The 8-bit mode a `mode` image is converted to before resizing: "L" or "RGB"."""
    return "L" if mode in _TO_GRAY else "RGB"


def decoder_bytes(img, fp, full_size):
    """Bytes the decoder of the opened (not yet loaded) `img` holds besides the decoded pixels.

    Args:
        img: a PIL image from Image.open, after any draft request.
        fp: the seekable binary file it was opened from (read to find a JPEG's first scan; its
            position is restored).
        full_size: (width, height) before draft.
    """
    width, height = full_size
    if isinstance(img, JpegImagePlugin.JpegImageFile):
        buffered = img.info.get("progressive") or _first_scan_components(fp) != len(img.layer)
        return _jpeg_coefficient_bytes(width, height, img.layer) if buffered else 0
    if img.format == "TIFF" and img.tile and img.tile[0][0] == "libtiff":
        return _tiff_block_bytes(img.tag_v2, width, height) + _file_size(fp)
    if img.format == "WEBP":
        return 3 * width * height * 4 + 2 * _file_size(fp)
    return 0


def needed_bytes(mode, size, *, decoder=0, rotated=False, resize=None):
    """(decoded bytes, bytes preprocessing holds in all) for an image of `mode` and (W, H) `size`.

    Args:
        decoder: the decoder's buffers (``decoder_bytes``).
        rotated: the EXIF orientation makes an upright copy.
        resize: (width, height, source_rows) of the resize to the model's scale (the horizontal
            pass holds width x source_rows), or None when the result is the full-size RGB image.

    Raises:
        ValueError: a mode preprocessing does not handle (``bytes_per_pixel`` is None).
    """
    bpp = bytes_per_pixel(mode)
    if bpp is None:
        raise ValueError(f"unsupported image mode {mode!r}")
    pixels = size[0] * size[1]
    decoded = pixels * bpp
    work = working_mode(mode)
    work_bpp = bytes_per_pixel(work)
    total = decoded + decoder
    if work != mode:
        total += pixels * work_bpp + (STRIP_BYTES if mode in _WIDE else 0)
    if rotated:
        total += pixels * work_bpp
    if resize is None:
        total += pixels * 4 if work == "L" else 0
    else:
        out_w, out_h, rows = resize
        total += out_w * (out_h + rows) * work_bpp
    return decoded, total


def _file_size(fp):
    position = fp.tell()
    try:
        return fp.seek(0, os.SEEK_END)
    finally:
        fp.seek(position)


def _jpeg_coefficient_bytes(width, height, components):
    """libjpeg's whole-image coefficient buffer: each component's 8x8 blocks at its sampling
    rate, rounded up to whole MCUs. `components` is Pillow's JPEG layer list (id, h, v, table)."""
    h_max = max(c[1] for c in components)
    v_max = max(c[2] for c in components)
    total = 0
    for _, h, v, _ in components:
        blocks_w = math.ceil(width * h / (h_max * 8))
        blocks_h = math.ceil(height * v / (v_max * 8))
        total += math.ceil(blocks_w / h) * h * math.ceil(blocks_h / v) * v * 64 * _JPEG_COEFFICIENT_BYTES
    return total


def _first_scan_components(fp):
    """Components in a JPEG's first scan (its SOS header), or None when the markers before it
    cannot be followed (then the caller assumes the whole-image buffer)."""
    position = fp.tell()
    try:
        fp.seek(0)
        if fp.read(2) != b"\xff\xd8":
            return None
        while True:
            byte = fp.read(1)
            if byte != b"\xff":
                return None
            while byte == b"\xff":  # fill bytes may precede a marker
                byte = fp.read(1)
            if not byte:
                return None
            if 0xD0 <= byte[0] <= 0xD7 or byte[0] == 0x01:  # markers without a length
                continue
            header = fp.read(2)
            if len(header) < 2:
                return None
            if byte == b"\xda":
                count = fp.read(1)
                return count[0] if count else None
            fp.seek(struct.unpack(">H", header)[0] - 2, os.SEEK_CUR)
    finally:
        fp.seek(position)


def _tiff_block_bytes(tags, width, height):
    """The strip or tile buffer Pillow's libtiff decoder allocates (TIFFStripSize or
    TIFFTileSize; width x rows x 4 when it decodes YCbCr through libtiff's RGBA interface)."""
    bits = tags.get(258, 1)
    bits = max(bits) if isinstance(bits, tuple) else bits
    samples = tags.get(277, 1)
    if 322 in tags and 323 in tags:
        block_w, rows = tags[322], tags[323]
    else:
        block_w, rows = width, min(tags.get(278, height), height)
    block = math.ceil(block_w * samples * bits / 8) * rows
    if tags.get(262) == _PHOTOMETRIC_YCBCR:
        block = max(block, width * 4 * rows)
    return block
