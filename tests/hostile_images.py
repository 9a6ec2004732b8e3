"""Writers of small files that decode to huge images, without ever holding the pixels: the
hostile inputs of the memory-budget tests (issue 18), usable by any test.

Every writer returns the encoded bytes. They write the formats by hand (PNG chunks, a TIFF IFD,
JPEG markers) from constant rows, so a 9000 x 9000 image costs a few hundred KB and well under
a second, and the pixels they decode to are known exactly.
"""

import math
import struct
import zlib


def _deflate(row: bytes, count: int) -> bytes:
    """zlib stream of `row` repeated `count` times, compressed as it goes."""
    stream = zlib.compressobj(1)
    return b"".join([stream.compress(row) for _ in range(count)] + [stream.flush()])


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png(width: int, height: int, *, bit_depth: int = 8, color_type: int = 2, pixel: bytes = b"\x0a\x14\x1e",
        palette: bytes = b"") -> bytes:
    """A PNG whose every pixel is `pixel` (its raw bytes: 3 for 8-bit RGB, 2 for 16-bit gray, ...).
    color_type: 0 gray, 2 RGB, 3 palette (pass PLTE's bytes as `palette`), 4 gray + alpha, 6 RGBA."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    if palette:
        chunks.append(_chunk(b"PLTE", palette))
    chunks += [_chunk(b"IDAT", _deflate(b"\x00" + pixel * width, height)), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def move_exif_after_pixels(data: bytes) -> bytes:
    """The PNG `data` with its eXIf chunk moved after the last IDAT (allowed by the PNG spec; then
    Pillow only sees the EXIF once it has decoded the pixels)."""
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunks.append(data[position : position + 12 + length])
        position += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    last_idat = max(i for i, c in enumerate(rest) if c[4:8] == b"IDAT")
    return data[:8] + b"".join(rest[: last_idat + 1] + exif + rest[last_idat + 1 :])


def float_tiff(width: int, height: int, *, rows_per_strip: int, value: float = 0.5) -> bytes:
    """A little-endian 32-bit float TIFF (deflate) whose every pixel is `value`. Full strips all
    point at one compressed strip, so a file of 1-row strips stays tiny; rows_per_strip=height
    gives the single whole-image strip libtiff must buffer."""
    rows = min(rows_per_strip, height)
    strips = math.ceil(height / rows)
    row = struct.pack("<f", value) * width
    full = _deflate(row, rows)
    last_rows = height - (strips - 1) * rows
    last = full if last_rows == rows else _deflate(row, last_rows)
    tags = [(256, 4, width), (257, 4, height), (258, 3, 32), (259, 3, 8), (262, 3, 1), (273, 4, None),
            (277, 3, 1), (278, 4, rows), (279, 4, None), (339, 3, 3)]  # 339 SampleFormat 3: IEEE float
    arrays_at = 8 + 2 + 12 * len(tags) + 4
    data_at = arrays_at + (8 * strips if strips > 1 else 0)
    offsets = [data_at] * (strips - 1) + [data_at + (len(full) if strips > 1 else 0)]
    counts = [len(full)] * (strips - 1) + [len(last)]
    ifd = [struct.pack("<H", len(tags))]
    for tag, kind, value_ in tags:
        if tag in (273, 279):
            values = offsets if tag == 273 else counts
            pointer = arrays_at + (0 if tag == 273 else 4 * strips)
            field = struct.pack("<I", values[0] if strips == 1 else pointer)
            ifd.append(struct.pack("<HHI", tag, 4, strips) + field)
        else:
            field = struct.pack("<HH", value_, 0) if kind == 3 else struct.pack("<I", value_)
            ifd.append(struct.pack("<HHI", tag, kind, 1) + field)
    ifd.append(struct.pack("<I", 0))  # no next IFD
    arrays = struct.pack(f"<{strips}I", *offsets) + struct.pack(f"<{strips}I", *counts) if strips > 1 else b""
    strip_data = (full if strips > 1 else b"") + last
    return b"II*\x00" + struct.pack("<I", 8) + b"".join(ifd) + arrays + strip_data


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def flat_jpeg(width: int, height: int, layout: str = "interleaved", components: int = 3) -> bytes:
    """A mid-gray (128) JPEG of any size with 1x1 sampling. Every 8x8 block has DC difference 0
    and no AC coefficient, coded with one-symbol Huffman tables (each symbol the 1-bit code "0"),
    so the entropy-coded data are zero bytes.

    layout: "interleaved" (one baseline scan of all components: libjpeg decodes it a row of
    blocks at a time), "separate" (baseline, one scan per component) or "progressive" (one DC
    scan; the AC coefficients are never sent, so they stay 0). libjpeg buffers every coefficient
    of the last two, 2 bytes each, at full size whatever scale it decodes at.
    """
    ids = list(range(1, components + 1))
    one_code = b"\x01" + bytes(15)  # BITS: one code, of length 1
    parts = [b"\xff\xd8", _segment(0xDB, b"\x00" + b"\x01" * 64),
             _segment(0xC2 if layout == "progressive" else 0xC0,
                      struct.pack(">BHHB", 8, height, width, components) + b"".join(bytes([c, 0x11, 0]) for c in ids)),
             _segment(0xC4, b"\x00" + one_code + b"\x00"),  # DC table 0: the symbol "category 0"
             _segment(0xC4, b"\x10" + one_code + b"\x00")]  # AC table 0: the symbol "end of block"
    blocks = math.ceil(width / 8) * math.ceil(height / 8)

    def scan(scan_ids, spectral_end, bits_per_block):
        header = bytes([len(scan_ids)]) + b"".join(bytes([c, 0]) for c in scan_ids) + bytes([0, spectral_end, 0])
        return _segment(0xDA, header) + bytes(math.ceil(blocks * len(scan_ids) * bits_per_block / 8))

    if layout == "interleaved":
        parts.append(scan(ids, 63, 2))
    elif layout == "separate":
        parts += [scan([c], 63, 2) for c in ids]
    elif layout == "progressive":
        parts.append(scan(ids, 0, 1))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return b"".join(parts) + b"\xff\xd9"
