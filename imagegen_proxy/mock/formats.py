"""The mock's other output formats: an animated GIF and an SVG of the same picture as the PNG
(`png.py`), standard library only.

The GIF's frames keep the picture's colours while its band and disc move from frame to
frame. Its LZW stream keeps every code 8 bits wide (a 128-colour palette, and a clear code
every 125 pixels), so encoding is byte slicing, never bit packing in Python: a 1024x1024
GIF of 9 frames encodes in tens of milliseconds, at about a byte a pixel. Any GIF decoder
reads it; it is simply not compressed much.
"""

from __future__ import annotations

import hashlib
import math
import struct

from .cache import BytesLRU
from .png import _BAND, _DISC, _RAMP, MAX_SIDE, _palette, _pixels, shapes

_COLOURS = 128  # GIF palette: 126 gradient steps, the band, the disc
_CLEAR, _END = b"\x80", b"\x81"  # with an LZW minimum code size of 7
_RUN = 125  # pixels between clear codes: the code table never outgrows 8 bits
# Palette index in the PNG (240 gradient steps, then band and disc) -> index in the GIF.
_TO_GIF = bytes(
    round(i * (_COLOURS - 3) / (_RAMP - 1))
    if i < _RAMP
    else {_BAND: _COLOURS - 2, _DISC: _COLOURS - 1}.get(i, 0)
    for i in range(256)
)

_cache = BytesLRU(max_bytes=128 * 1024 * 1024)


def _digest(prompt: str, index: int, frame: int | None = None) -> bytes:
    seed = f"{prompt}\x00{index}" + ("" if frame is None else f"\x00frame {frame}")
    # surrogatepass: JSON may carry lone surrogates, which plain UTF-8 encoding rejects.
    return hashlib.sha256(seed.encode("utf-8", "surrogatepass")).digest()


def _check(width: int, height: int) -> None:
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"image size out of range: {width}x{height}")


def render_gif(
    prompt: str, *, width: int, height: int, index: int = 0, frames: int = 9, frame_ms: int = 200
) -> bytes:
    """An animated GIF of `frames` frames shown `frame_ms` each (in GIF's hundredths of a
    second, at least one), looping forever; deterministic and cached."""
    _check(width, height)
    if frames < 1 or frame_ms < 1:
        raise ValueError("a GIF has at least one frame, shown at least 1 ms")
    key = ("gif", prompt, width, height, index, frames, frame_ms)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    ramp = _palette(_digest(prompt, index))
    palette = b"".join(
        ramp[3 * i : 3 * i + 3]
        for i in [round(j * (_RAMP - 1) / (_COLOURS - 3)) for j in range(_COLOURS - 2)]
    )
    palette += ramp[3 * _BAND : 3 * _BAND + 3] + ramp[3 * _DISC : 3 * _DISC + 3]
    delay = frame_delay(frame_ms)
    parts = [
        b"GIF89a",
        # Logical screen: a global palette of 2^(6+1) colours, 8 bits of colour resolution.
        struct.pack("<HHBBB", width, height, 0xF6, 0, 0),
        palette,
        # Loop forever (the NETSCAPE2.0 application extension).
        b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00",
    ]
    for frame in range(frames):
        parts += [
            # Graphic control: leave the frame in place, then the delay, no transparency.
            b"\x21\xf9\x04\x04" + struct.pack("<H", delay) + b"\x00\x00",
            b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0),
            b"\x07",
            _blocks(_lzw(_indices(_digest(prompt, index, frame), width, height))),
            b"\x00",
        ]
    parts.append(b"\x3b")
    gif = b"".join(parts)
    _cache.put(key, gif)
    return gif


def _indices(digest: bytes, width: int, height: int) -> bytes:
    """The frame's palette indices, row after row (the PNG's rows without their filter
    bytes), in the GIF's palette."""
    raw = _pixels(digest, width, height, 1.0)
    stride = width + 1
    rows = b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))
    return rows.translate(_TO_GIF)


def _lzw(indices: bytes) -> bytes:
    """An LZW stream of 8-bit codes: a clear code, then up to `_RUN` literal pixels, again
    and again, then the end code."""
    runs = [_CLEAR + indices[at : at + _RUN] for at in range(0, len(indices), _RUN)]
    return b"".join(runs) + _END


def _blocks(data: bytes) -> bytes:
    """GIF data sub-blocks: a length byte, then up to 255 bytes."""
    return b"".join(
        bytes((len(data[at : at + 255]),)) + data[at : at + 255] for at in range(0, len(data), 255)
    )


def render_svg(prompt: str, *, width: int, height: int, index: int = 0) -> bytes:
    """The picture as an SVG document: the gradient, the band and the disc."""
    _check(width, height)
    digest = _digest(prompt, index)
    palette = _palette(digest)

    def colour(entry: int) -> str:
        return "#" + palette[3 * entry : 3 * entry + 3].hex()

    cx, cy, radius, band_x, band_slope, band_half = shapes(digest, width, height)
    top, bottom = band_x - height / 2 * band_slope, band_x + height / 2 * band_slope
    band = (
        f"{top - band_half:.1f},0 {top + band_half:.1f},0 "
        f"{bottom + band_half:.1f},{height} {bottom - band_half:.1f},{height}"
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
        '<defs><linearGradient id="ramp" x1="0" y1="0" x2="1" y2="1">'
        f'<stop offset="0" stop-color="{colour(0)}"/>'
        f'<stop offset="1" stop-color="{colour(_RAMP - 1)}"/>'
        "</linearGradient></defs>"
        f'<rect width="{width}" height="{height}" fill="url(#ramp)"/>'
        f'<polygon points="{band}" fill="{colour(_BAND)}"/>'
        f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{radius:.1f}" fill="{colour(_DISC)}"/>'
        "</svg>"
    )
    return svg.encode()


def frame_delay(frame_ms: int) -> int:
    """The delay GIF stores for `frame_ms`: hundredths of a second, at least one, at most
    what its 16 bits hold."""
    return min(max(1, math.floor(frame_ms / 10 + 0.5)), 0xFFFF)
