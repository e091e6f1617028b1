"""What a generation spent, read from the answer's tail (the hook told of it is
`governance.ratelimit.UsageObserver`).

`usage` sits after megabytes of base64 (last in the JSON answer, last in the `completed`
event), so only a bounded tail of the bytes going past is kept and parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

TAIL = 4096
_USAGE_KEY = b'"usage"'
_decoder = json.JSONDecoder()


@dataclass(slots=True)
class Usage:
    """Requests, images, tokens and micro-USD spent; added up per key. A value: never
    changed once made (not frozen only because a request makes several, and a frozen
    dataclass takes four times as long to make: bench/README.md)."""

    requests: int = 0
    images: int = 0
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    input_text_tokens: int = 0  # the parts of input_tokens, when the answer gives them
    input_image_tokens: int = 0
    output_text_tokens: int = 0  # the text part of output_tokens, when the answer gives it
    cost_micros: int = 0  # what the generation cost, once the proxy has priced it

    def __add__(self, other: Usage) -> Usage:
        # Spelled out, not a loop over the fields: every request adds a few (bench/README.md).
        return Usage(
            self.requests + other.requests,
            self.images + other.images,
            self.tokens + other.tokens,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.input_text_tokens + other.input_text_tokens,
            self.input_image_tokens + other.input_image_tokens,
            self.output_text_tokens + other.output_text_tokens,
            self.cost_micros + other.cost_micros,
        )

    def __sub__(self, other: Usage) -> Usage:
        return self + -other

    def __neg__(self) -> Usage:
        return Usage(*[-getattr(self, name) for name in _FIELDS])


_FIELDS = tuple(field.name for field in fields(Usage))


class Tail:
    """The last `TAIL` bytes of a stream, kept without holding the rest."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def feed(self, chunk: bytes | memoryview) -> None:
        if len(chunk) >= TAIL:
            self.data = bytes(chunk[-TAIL:])
        else:
            drop = max(0, len(self.data) + len(chunk) - TAIL)
            self.data = self.data[drop:] + bytes(chunk)


def tokens_in(tail: bytes) -> Usage | None:
    """The token counts of the last `"usage": {...}` object in `tail`, if it has a whole one."""
    at = tail.rfind(_USAGE_KEY)
    if at < 0:
        return None
    text = tail[at + len(_USAGE_KEY) :].decode("utf-8", "replace").lstrip()
    if not text.startswith(":"):
        return None
    try:
        value, _ = _decoder.raw_decode(text[1:].lstrip())
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    details = _dict(value, "input_tokens_details")
    return Usage(
        tokens=_int(value, "total_tokens"),
        input_tokens=_int(value, "input_tokens"),
        output_tokens=_int(value, "output_tokens"),
        input_text_tokens=_int(details, "text_tokens"),
        input_image_tokens=_int(details, "image_tokens"),
        output_text_tokens=_int(_dict(value, "output_tokens_details"), "text_tokens"),
    )


def _dict(value: dict[str, Any], key: str) -> dict[str, Any]:
    found = value.get(key)
    return found if isinstance(found, dict) else {}


def _int(value: dict[str, Any], key: str) -> int:
    number = value.get(key)
    # A count below zero is no count: it would credit budgets and quotas.
    return max(0, number) if isinstance(number, int) and not isinstance(number, bool) else 0
