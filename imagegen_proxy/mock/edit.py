"""Edited pictures: the input tinted toward a colour the prompt names, the mask's hole filled.

The edit is deterministic and easy to check from outside: every output pixel is
`(input * (256 - weight) + tint * weight) >> 8` per colour channel (alpha kept), except where
the mask is fully transparent (OpenAI's convention for "edit here"): there it is the tint
itself, opaque. The work is done on whole byte strings (translate tables, slices with a step,
bitwise operations on big integers), never pixel by pixel, so a 1024x1024 edit takes tens of
milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

from .decode import Bitmap, decode_png
from .png import encode_rgba, render_png

Colour = tuple[int, int, int]

COLOURS: dict[str, Colour] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "purple": (128, 0, 255),
    "magenta": (255, 0, 255),
    "pink": (255, 128, 192),
    "brown": (128, 64, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "gray": (128, 128, 128),
}
_COLOUR_WORD = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)
# Mask alpha to "keep this pixel": 0x00 where fully transparent, 0xFF elsewhere.
_KEEP = bytes((0,)) + b"\xff" * 255


def tint_colour(prompt: str) -> Colour:
    """The first colour word in the prompt ("make the sky red"), else three bytes of
    sha256(prompt): any prompt gets a colour, the same one every time."""
    match = _COLOUR_WORD.search(prompt)
    if match is not None:
        return COLOURS[match.group(1).lower()]
    # surrogatepass: a form field may carry lone surrogates, which plain UTF-8 rejects.
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()
    return digest[0], digest[1], digest[2]


def tint_weight(index: int, detail: float = 1.0) -> int:
    """How far, of 256, image `index` leans toward the tint: half for the first image and
    more for each next one, so that the `n` images of a request differ; partial images
    (`detail` below 1) lean proportionally less."""
    return round((128 + 32 * (index % 4)) * detail)


@dataclass(frozen=True, slots=True)
class Canvas:
    """The input at the output size, and which bytes the mask keeps: one integer (read
    little-endian) with 0xFF for each byte of a kept pixel, 0x00 in the hole; None without
    a mask, or with one the mock cannot decode."""

    width: int
    height: int
    rgba: bytes
    keep: int | None

    @classmethod
    def of(cls, source: Bitmap, mask: Bitmap | None, width: int, height: int) -> Canvas:
        """Resize the input, and the mask with it, to `width`x`height`."""
        rgba = source.resized(width, height).rgba
        if mask is None:
            return cls(width, height, rgba, None)
        keep = mask.resized(width, height).rgba[3::4].translate(_KEEP)
        spread = bytearray(len(rgba))
        for channel in range(4):
            spread[channel::4] = keep
        return cls(width, height, rgba, int.from_bytes(spread, "little"))

    def paint(self, colour: Colour, weight: int, *, pad_to: int = 0) -> bytes:
        """The edited picture as PNG bytes (see the module docstring)."""
        out = bytearray(self.rgba)
        for channel, value in enumerate(colour):
            out[channel::4] = self.rgba[channel::4].translate(_mix(value, weight))
        if self.keep is not None:
            fill = int.from_bytes(bytes((*colour, 255)) * (self.width * self.height), "little")
            kept = int.from_bytes(out, "little") & self.keep
            out[:] = (kept | (fill & ~self.keep)).to_bytes(len(out), "little")
        return encode_rgba(self.width, self.height, bytes(out), pad_to=pad_to)


def generated(prompt: str, width: int, height: int) -> Bitmap:
    """The picture generations would answer for `prompt`: what the mock edits when it cannot
    decode the input image. render_png keeps a cache that is not thread-safe: call this on
    the event loop."""
    bitmap = decode_png(render_png(prompt, width=width, height=height))
    if bitmap is None:  # render_png writes 8-bit palette PNGs, which decode_png reads
        raise AssertionError("decode_png cannot read what render_png wrote")
    return bitmap


@functools.lru_cache(maxsize=64)
def _mix(value: int, weight: int) -> bytes:
    """The translate table taking every byte `weight`/256 of the way toward `value`."""
    return bytes((byte * (256 - weight) + value * weight) >> 8 for byte in range(256))
