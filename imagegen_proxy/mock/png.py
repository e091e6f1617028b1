"""Deterministic PNG rendering from a prompt, and the encoding of edited pictures, standard
library only.

The picture is a diagonal two-colour gradient with a band and a disc in contrasting colours,
all derived from sha256(prompt, image index). Rows are assembled from precomputed byte strings
(never pixel by pixel in Python) so a 1024x1024 image renders in a few milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import struct
import zlib

from .cache import BytesLRU

DEFAULT_SIZE = (1024, 1024)
MAX_SIDE = 4096

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIZE_RE = re.compile(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*")
# Palette layout: gradient ramp first, then the shape colours.
_RAMP = 240
_BAND = 240
_DISC = 241
# Level 6 takes ~5 ms on a 1024x1024 final image, but degrades to ~15 ms on the long runs of
# identical bytes in coarse partial images, where level 3 stays near 2 ms and compresses well.
_FINAL_LEVEL = 6
_PARTIAL_LEVEL = 3

_cache = BytesLRU(max_bytes=256 * 1024 * 1024)


def parse_size(size: str | None) -> tuple[int, int]:
    """Parse "WxH" (each side 1..4096); anything else, including None and "auto", is 1024x1024."""
    if not isinstance(size, str):
        return DEFAULT_SIZE
    match = _SIZE_RE.fullmatch(size)
    if match is None:
        return DEFAULT_SIZE
    width, height = int(match.group(1)), int(match.group(2))
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        return DEFAULT_SIZE
    return width, height


def render_png(
    prompt: str,
    *,
    width: int,
    height: int,
    index: int = 0,
    detail: float = 1.0,
    pad_to: int = 0,
) -> bytes:
    """Render the image for `prompt` as PNG bytes; deterministic and cached.

    `detail` below 1 gives a blockier, fewer-colour version of the same picture (used for
    partial images); `pad_to` pads the file with a private `prVt` chunk to at least that size.
    """
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"image size out of range: {width}x{height}")
    if math.isnan(detail):
        raise ValueError("detail must be a number between 0 and 1")
    detail = min(max(detail, 0.0), 1.0)
    key = (prompt, width, height, index, detail, pad_to)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    # surrogatepass: JSON may carry lone surrogates, which plain UTF-8 encoding rejects.
    seed = f"{prompt}\x00{index}".encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(seed).digest()
    pixels = _pixels(digest, width, height, detail)
    level = _FINAL_LEVEL if detail >= 1.0 else _PARTIAL_LEVEL
    png = _encode(width, height, _palette(digest), pixels, level, pad_to)
    _cache.put(key, png)
    return png


def _palette(digest: bytes) -> bytes:
    start, end = digest[0:3], digest[3:6]
    ramp = bytearray()
    for i in range(_RAMP):
        ramp.extend(a + (b - a) * i // (_RAMP - 1) for a, b in zip(start, end, strict=True))
    # Shape colours sit on the far side of the gradient's mean so they always stand out.
    mean = [(a + b) // 2 for a, b in zip(start, end, strict=True)]
    disc = bytes(
        200 + d % 56 if m < 128 else d % 56 for m, d in zip(mean, digest[6:9], strict=True)
    )
    band = bytes((c + 96 + d % 64) % 256 for c, d in zip(disc, digest[9:12], strict=True))
    filler = bytes(3 * (256 - _RAMP - 2))
    return bytes(ramp) + band + disc + filler


def _pixels(digest: bytes, width: int, height: int, detail: float) -> bytearray:
    """Palette indices, one filter byte (0, None) ahead of each row, ready for IDAT."""
    if detail >= 1.0:
        block, levels = 1, _RAMP
    else:
        # Coarse blocks and few colours: each partial looks like an earlier stage of the final.
        block = max(2, math.ceil(min(width, height) / (4 + 60 * detail * detail)))
        levels = max(4, int(_RAMP * detail * detail))
    cols, rows = -(-width // block), -(-height // block)
    span = max(width + height - 2, 1)
    # One long strip of gradient indices: block row i is strip[i*block : i*block + width].
    cells = []
    for k in range(cols + rows):
        level = round(min(k * block + block - 1, span) / span * (levels - 1))
        cells.append(bytes((level * (_RAMP - 1) // (levels - 1),)) * block)
    strip = b"".join(cells)

    cx, cy, radius, band_x, band_slope, band_half = shapes(digest, width, height)
    disc_fill = bytes((_DISC,)) * width
    band_fill = bytes((_BAND,)) * width

    stride = width + 1
    raw = bytearray(stride * height)
    half_block = block / 2
    for y in range(height):
        top = y - y % block
        off = y * stride + 1
        if top != y:
            # Rows inside a block repeat the block's first row.
            prev = top * stride + 1
            raw[off : off + width] = raw[prev : prev + width]
            continue
        raw[off : off + width] = strip[top : top + width]
        centre = top + half_block
        mid = band_x + (centre - height / 2) * band_slope
        a, b = _cover(mid - band_half, mid + band_half, block, width)
        if a < b:
            raw[off + a : off + b] = band_fill[: b - a]
        dy = centre - cy
        if dy * dy < radius * radius:
            reach = math.sqrt(radius * radius - dy * dy)
            a, b = _cover(cx - reach, cx + reach, block, width)
            if a < b:
                raw[off + a : off + b] = disc_fill[: b - a]
    return raw


def shapes(digest: bytes, width: int, height: int) -> tuple[float, ...]:
    """Where the picture's shapes are: the disc's centre and radius, then the band's centre
    (at mid-height), slope (x per y) and half width."""
    return (
        width * (0.25 + 0.5 * digest[12] / 255),
        height * (0.25 + 0.5 * digest[13] / 255),
        min(width, height) * (0.15 + 0.15 * digest[14] / 255),
        width * (0.2 + 0.6 * digest[15] / 255),
        width / height * (0.5 + 0.5 * digest[16] / 255),
        width * (0.03 + 0.04 * digest[17] / 255),
    )


def _cover(left: float, right: float, block: int, width: int) -> tuple[int, int]:
    """Pixel range [a, b) of the blocks whose centres fall within [left, right]."""
    first = math.ceil((left - block / 2) / block)
    last = math.floor((right - block / 2) / block) + 1
    return max(first * block, 0), min(last * block, width)


def _chunk(kind: bytes, data: bytes) -> list[bytes]:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return [struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)]


def encode_rgba(width: int, height: int, rgba: bytes, *, level: int = 1, pad_to: int = 0) -> bytes:
    """Encode 8-bit RGBA pixels (rows top to bottom, no filter bytes) as a PNG.

    Every row gets filter 0: filtering in Python would cost more than the bytes it saves.
    `pad_to` pads the file as `render_png` does.
    """
    stride = 4 * width
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE) or len(rgba) != stride * height:
        raise ValueError(f"{len(rgba)} bytes are not {width}x{height} RGBA pixels")
    lines = [b"\x00"] * (2 * height)
    lines[1::2] = [rgba[start : start + stride] for start in range(0, len(rgba), stride)]
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return _assemble(header, [], zlib.compress(b"".join(lines), level), pad_to)


def _encode(
    width: int, height: int, palette: bytes, raw: bytearray, level: int, pad_to: int
) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return _assemble(header, _chunk(b"PLTE", palette), zlib.compress(raw, level), pad_to)


def _assemble(header: bytes, extra: list[bytes], idat: bytes, pad_to: int) -> bytes:
    parts = [_SIGNATURE, *_chunk(b"IHDR", header), *extra, *_chunk(b"IDAT", idat)]
    size = sum(map(len, parts)) + 12
    if pad_to > size:
        parts.extend(_chunk(b"prVt", _filler(pad_to)[: max(pad_to - size - 12, 0)]))
    parts.extend(_chunk(b"IEND", b""))
    # One join: padded images are megabytes and every intermediate copy shows up in latency.
    return b"".join(parts)


@functools.lru_cache(maxsize=4)
def _filler(size: int) -> bytes:
    # Incompressible, so compression anywhere along the path cannot shrink the payload. Shared
    # by all images padded to the same size: generating megabytes per image would dominate.
    return random.Random(size).randbytes(size)
