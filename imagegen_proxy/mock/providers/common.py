"""What the providers' wires share in the mock: its settings, its pictures at each provider's
sizes, and the words in a prompt that make it refuse, filter or throttle a request."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import math
import re
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Protocol

from ...types import Receive, Scope, Send
from ..cache import BytesLRU
from ..decode import Bitmap, decode_png
from ..edit import Canvas, tint_colour, tint_weight
from ..png import render_png
from ..replies import in_thread

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

# The most any provider request may carry here: the mock holds whole bodies in memory.
# This is the mock's line, not a provider's published limit.
MAX_BODY = 32 * 1024 * 1024
SEED_RANGE = 2**32


class Settings(Protocol):
    """The MockUpstream's knobs the providers' wires honour, read on every request."""

    @property
    def delay(self) -> float:
        """Seconds a generation takes."""
        ...

    @property
    def pad_to(self) -> int:
        """The least size of every PNG, in bytes."""
        ...


def flagged(prompt: str, word: str) -> bool:
    """Whether `word` appears in the prompt as a word of its own, in any case: "forbidden",
    "unsafe" and "throttle" are how a test asks for a refusal, a filtered image or a 429."""
    return re.search(rf"\b{word}\b", prompt, re.IGNORECASE) is not None


def seed_of(prompt: str) -> int:
    """The seed reported when the client sets none: real providers draw one at random; the
    mock derives it from the prompt so that an unseeded request renders the same (cached)
    picture every time."""
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:4], "big") % SEED_RANGE


def parse_ratio(text: object) -> Fraction | None:
    """ "W:H" with positive integers as a fraction, else None."""
    if not isinstance(text, str):
        return None
    match = re.fullmatch(r"\s*(\d{1,4})\s*:\s*(\d{1,4})\s*", text)
    if match is None or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        return None
    return Fraction(int(match.group(1)), int(match.group(2)))


def ratio_size(ratio: Fraction, area: int, multiple: int = 16) -> tuple[int, int]:
    """Width and height of about `area` pixels in the ratio `ratio`, each side rounded to
    the nearest multiple of `multiple` (at least one multiple)."""
    width = math.sqrt(area * ratio)
    height = math.sqrt(area / ratio)
    return _round(width, multiple), _round(height, multiple)


def fit(width: int, height: int, side: int, multiple: int = 16) -> tuple[int, int]:
    """The size scaled down, keeping its ratio, until neither side exceeds `side`; sides
    rounded to `multiple` again when it had to shrink."""
    longest = max(width, height)
    if longest <= side:
        return width, height
    scale = side / longest
    return min(_round(width * scale, multiple), side), min(_round(height * scale, multiple), side)


def _round(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def decode_base64(text: object) -> bytes | None:
    """The bytes of a base64 string, in the standard or the URL-safe alphabet (both are
    what Google's JSON reads for bytes), padding optional; None if it is none of that."""
    if not isinstance(text, str) or not text.isascii():
        return None
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    alphabet = b"-_" if "-" in compact or "_" in compact else None
    try:
        return base64.b64decode(compact, altchars=alphabet, validate=True)
    except (binascii.Error, ValueError):
        return None


class Studio:
    """The pictures of the providers' wires: `render_png` with the mock's padding (base64
    kept for repeats, like the OpenAI path's), and edits tinting an input PNG toward the
    prompt's colour, off the event loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._b64 = BytesLRU(max_bytes=128 * 1024 * 1024)

    def png(self, prompt: str, width: int, height: int, index: int = 0) -> bytes:
        """The generated picture of `prompt` (render_png's cache is not thread-safe: call
        this on the event loop)."""
        pad_to = self._settings.pad_to
        return render_png(prompt, width=width, height=height, index=index, pad_to=pad_to)

    def b64(self, prompt: str, width: int, height: int, index: int = 0) -> bytes:
        """`png` as base64."""
        key = (prompt, width, height, index, self._settings.pad_to)
        cached = self._b64.get(key)
        if cached is None:
            cached = base64.b64encode(self.png(prompt, width, height, index))
            self._b64.put(key, cached)
        return cached

    async def edit(
        self,
        image: bytes,
        prompt: str,
        width: int,
        height: int,
        *,
        mask: Bitmap | None = None,
        index: int = 0,
    ) -> bytes | None:
        """`image` resized to `width`x`height` and tinted (see `edit`), the mask's
        transparent area filled, as PNG; None when `image` is no PNG the mock reads."""
        source = await in_thread(functools.partial(decode_png, image))
        if source is None:
            return None
        canvas = await in_thread(functools.partial(Canvas.of, source, mask, width, height))
        paint = functools.partial(
            canvas.paint, tint_colour(prompt), tint_weight(index), pad_to=self._settings.pad_to
        )
        return await in_thread(paint)

    async def edit_or_render(
        self, image: bytes | None, prompt: str, width: int, height: int, index: int = 0
    ) -> bytes:
        """The edit of `image` when it is a PNG the mock reads (tinted halfway), else the
        generated picture of image `index` (the seed, where a provider has one)."""
        if image is not None:
            edited = await self.edit(image, prompt, width, height)
            if edited is not None:
                return edited
        return self.png(prompt, width, height, index)
