"""Reading the PNGs clients send to edits and variations, with zlib alone.

Supported: every colour type (greyscale, RGB, palette with tRNS alpha, greyscale+alpha, RGBA)
at every bit depth (16-bit samples are cut to their high byte), not interlaced; the
transparent colour of a greyscale or RGB image is ignored. Anything else decodes to None, and
the mock edits a generated picture instead.

Rows are unfiltered with whole-row operations where the PNG filter allows it: None as is, Up
as one bytewise addition on big integers, Sub as a prefix sum of such additions. Average and
Paeth depend on the byte just decoded, so they go byte by byte in Python (0.1 to 0.3 µs a
byte); `MAX_SLOW_BYTES` bounds that work.
"""

from __future__ import annotations

import functools
import struct
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 4096x4096 RGBA is 64 MiB of pixels: anything larger is not worth a mock's memory.
MAX_PIXELS = 4096 * 4096
# About a second of byte-by-byte unfiltering: a 1024x1024 RGBA image filtered all Paeth.
MAX_SLOW_BYTES = 4 * 1024 * 1024
# Samples per pixel of each colour type, and the bit depths each may have.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


@dataclass(frozen=True, slots=True)
class Bitmap:
    """Pixels as 8-bit RGBA, four bytes a pixel, rows top to bottom."""

    width: int
    height: int
    rgba: bytes

    def resized(self, width: int, height: int) -> Bitmap:
        """Nearest-neighbour resize: each target pixel takes the source pixel under its centre."""
        if (width, height) == (self.width, self.height):
            return self
        # One 32-bit item a pixel, so a row is gathered in one C-level call, not byte by byte.
        pixels = memoryview(self.rgba).cast("I")
        columns = [(2 * x + 1) * self.width // (2 * width) for x in range(width)]
        pick = itemgetter(*columns)
        rows: dict[int, bytes] = {}
        out = []
        for y in range(height):
            source = (2 * y + 1) * self.height // (2 * height)
            row = rows.get(source)
            if row is None:
                picked = pick(pixels[source * self.width : (source + 1) * self.width])
                # With one column, itemgetter gives the item itself rather than a tuple.
                row = array("I", picked if width > 1 else (picked,)).tobytes()
                rows[source] = row
            out.append(row)
        return Bitmap(width, height, b"".join(out))


def png_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, without decoding it; None if it is no PNG."""
    if data[:8] != _SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return (width, height) if width and height else None


def decode_png(data: bytes) -> Bitmap | None:
    """Decode a PNG the mock supports (see the module docstring) to RGBA; None otherwise."""
    try:
        chunks = _chunks(data)
    except (ValueError, struct.error):
        return None
    header = _header(chunks.get(b"IHDR", [b""])[0])
    if header is None:
        return None
    width, height, depth, colour = header
    bits = _CHANNELS[colour] * depth
    row_bytes = (width * bits + 7) // 8
    raw = _inflate(b"".join(chunks.get(b"IDAT", [])), height * (row_bytes + 1))
    rows = None if raw is None else _unfilter(raw, row_bytes, max(bits // 8, 1))
    if rows is None:
        return None
    samples = _eight_bits(rows, width, depth, greyscale=colour == 0)
    if colour != 3:
        return Bitmap(width, height, _to_rgba(samples, _CHANNELS[colour]))
    palette = chunks.get(b"PLTE", [b""])[0]
    if not palette or len(palette) % 3 or len(palette) > 768:
        return None
    return Bitmap(width, height, _from_palette(samples, palette, chunks.get(b"tRNS", [b""])[0]))


def _header(ihdr: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) of an image the mock can decode."""
    if len(ihdr) != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", ihdr
    )
    if depth not in _DEPTHS.get(colour, ()) or (compression, filtering, interlace) != (0, 0, 0):
        return None
    if width == 0 or height == 0 or width * height > MAX_PIXELS:
        return None
    return width, height, depth, colour


def _chunks(data: bytes) -> dict[bytes, list[bytes]]:
    """The payloads of each chunk type, in order, up to IEND (CRCs are not checked: a
    damaged image stream still fails zlib's own checksum)."""
    if data[:8] != _SIGNATURE:
        raise ValueError("not a PNG")
    chunks: dict[bytes, list[bytes]] = {}
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IEND":
            return chunks
        chunks.setdefault(kind, []).append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    raise ValueError("no IEND chunk")


def _inflate(compressed: bytes, expected: int) -> bytes | None:
    """The image stream, if it inflates to exactly `expected` bytes (never more: a small
    upload must not expand into gigabytes)."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, expected + 1)
    except zlib.error:
        return None
    return raw if len(raw) == expected and inflater.eof else None


def _unfilter(raw: bytes, row_bytes: int, bpp: int) -> list[bytes] | None:
    """The rows with their filters undone; None if a filter type is unknown or the slow ones
    (Average, Paeth) would take more than `MAX_SLOW_BYTES`."""
    stride = row_bytes + 1
    kinds = raw[::stride]
    if max(kinds) > 4 or (kinds.count(3) + kinds.count(4)) * row_bytes > MAX_SLOW_BYTES:
        return None
    rows = []
    previous = bytes(row_bytes)
    for start, kind in zip(range(1, len(raw), stride), kinds, strict=True):
        row = raw[start : start + row_bytes]
        if kind:
            row = _FILTERS[kind](row, previous, bpp)
        rows.append(row)
        previous = row
    return rows


def _sub(row: bytes, previous: bytes, bpp: int) -> bytes:
    # Each channel is a running sum of its own bytes: a prefix sum in log2(pixels) steps,
    # adding to every byte the one `shift` bytes before it, with `shift` doubling each time.
    low, high = _masks(len(row))
    total = int.from_bytes(row, "little")
    shift = bpp
    while shift < len(row):
        total = _add(total, total << (8 * shift), low, high)
        shift *= 2
    return total.to_bytes(len(row), "little")


def _up(row: bytes, previous: bytes, bpp: int) -> bytes:
    low, high = _masks(len(row))
    total = _add(int.from_bytes(row, "little"), int.from_bytes(previous, "little"), low, high)
    return total.to_bytes(len(row), "little")


def _add(a: int, b: int, low: int, high: int) -> int:
    """Bytewise addition modulo 256 of two byte strings held as integers, within the length
    of the masks: add the low seven bits of every byte (no carry can cross a byte), then
    set each top bit by exclusive or."""
    return ((a & low) + (b & low)) ^ ((a ^ b) & high)


@functools.lru_cache(maxsize=8)
def _masks(size: int) -> tuple[int, int]:
    return int.from_bytes(b"\x7f" * size, "little"), int.from_bytes(b"\x80" * size, "little")


def _average(row: bytes, previous: bytes, bpp: int) -> bytes:
    out = bytearray(len(row))
    for lane in range(bpp):
        left = 0
        decoded = []
        for value, up in zip(row[lane::bpp], previous[lane::bpp], strict=True):
            left = (value + ((left + up) >> 1)) & 255
            decoded.append(left)
        out[lane::bpp] = bytes(decoded)
    return bytes(out)


def _paeth(row: bytes, previous: bytes, bpp: int) -> bytes:
    out = bytearray(len(row))
    for lane in range(bpp):
        ups = previous[lane::bpp]
        left = 0
        decoded = []
        for value, up, corner in zip(row[lane::bpp], ups, b"\x00" + ups[:-1], strict=True):
            # The neighbour (left, up or upper-left) closest to left + up - corner.
            to_left = abs(up - corner)
            to_up = abs(left - corner)
            to_corner = abs(left + up - corner - corner)
            if to_left <= to_up and to_left <= to_corner:
                left = (value + left) & 255
            elif to_up <= to_corner:
                left = (value + up) & 255
            else:
                left = (value + corner) & 255
            decoded.append(left)
        out[lane::bpp] = bytes(decoded)
    return bytes(out)


_FILTERS: dict[int, Callable[[bytes, bytes, int], bytes]] = {
    1: _sub,
    2: _up,
    3: _average,
    4: _paeth,
}


def _eight_bits(rows: list[bytes], width: int, depth: int, *, greyscale: bool) -> bytes:
    """One byte a sample: the high byte of 16-bit samples; samples packed 1, 2 or 4 to a bit
    byte spread out through a table (greyscale levels scaled up to 0..255)."""
    if depth == 16:
        return b"".join(rows)[::2]
    if depth == 8:
        return b"".join(rows)
    table = _unpacking(depth, greyscale)
    return b"".join(b"".join(map(table.__getitem__, row))[:width] for row in rows)


@functools.lru_cache(maxsize=8)
def _unpacking(depth: int, greyscale: bool) -> list[bytes]:
    """For each byte value, the samples it packs, high bits first."""
    top = (1 << depth) - 1
    scale = 255 // top if greyscale else 1
    shifts = range(8 - depth, -1, -depth)
    return [bytes((value >> shift & top) * scale for shift in shifts) for value in range(256)]


def _to_rgba(pixels: bytes, bpp: int) -> bytes:
    """Spread greyscale (1), greyscale+alpha (2), RGB (3) or RGBA (4) samples to RGBA."""
    if bpp == 4:
        return pixels
    count = len(pixels) // bpp
    out = bytearray(b"\xff" * (4 * count))
    if bpp == 3:
        for channel in range(3):
            out[channel::4] = pixels[channel::3]
        return bytes(out)
    grey = pixels[::bpp]
    for channel in range(3):
        out[channel::4] = grey
    if bpp == 2:
        out[3::4] = pixels[1::2]
    return bytes(out)


def _from_palette(indices: bytes, palette: bytes, alphas: bytes) -> bytes:
    """Look every index up in the palette, one table per channel (an index past the end of
    the palette reads as transparent black rather than failing the image)."""
    tables = [palette[channel::3].ljust(256, b"\x00") for channel in range(3)]
    tables.append((alphas[:256] + b"\xff" * (len(palette) // 3 - len(alphas))).ljust(256, b"\x00"))
    out = bytearray(4 * len(indices))
    for channel, table in enumerate(tables):
        out[channel::4] = indices.translate(table)
    return bytes(out)
